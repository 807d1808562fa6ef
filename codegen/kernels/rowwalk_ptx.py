"""The row walk's inner loop as inline PTX, for `tl.inline_asm_elementwise` (one lane = one call).

Why PTX: the same loop in Triton costs ~30 SASS instructions per nonzero (64-bit address pairs for three
gathers, masked-load zeroing) and every lane runs the program's maximum trip count.  Here a lane stops after its
own `cnt` nonzeros, its state is 32-bit byte offsets (one 64-bit add per address), and two rounds share one block so
ptxas issues the loads of both before either FMA waits (H100: 6.7 M vs 9.6 M warp instructions on LLaMA-7B qkv
at 90%, benchmarks/RESULTS.md).  The interpreter cannot run PTX: `_bitmap_rowwalk_kernel` keeps a Triton loop.

Operands (after the BLOCK_M fp32 outputs): w (u32, the lane's first bitmap word with the bits before its first
nonzero cleared), wb (u64, address of the row's word 0), vp (u64, address of the lane's first value), xb (u64,
address of xt [K, BLOCK_M]), wi (u32, index of w in the row), kw (u32, words per row), cnt (u32, nonzeros to do),
xtot (u32, bytes of xt).
One round:   j = lowest set bit of w;  acc[t] += v[vp] * xt[32 * wi + j, t];  vp += 1;  cnt -= 1;  w ^= 1 << j
             if w == 0 and cnt > 0:  w = the next word (loaded one word ahead);  wi += 1
Where xt fits (smem_bytes > 0) the program first copies it into a shared array and the rounds gather from there:
a warp's 32 random 2..16-byte gathers cost a few shared-memory bank wavefronts instead of ~32 L1 sectors (H100,
M = 1: LLaMA-7B qkv 80% 28.8 -> 25.5 us, down 33.0 -> 25.5 us, 90% qkv 20.4 -> 17.2 us).  Tried and dropped: values
read 16 bytes (8 nonzeros) at a time into a register ring, one block ahead: 10-25% slower (per-slot predication and
the out-of-line empty-word path cost more than the loads saved; benchmarks/RESULTS.md idea 13).
"""

from __future__ import annotations

import functools

PTX_TYPES = {"float16": "f16", "bfloat16": "bf16"}  # value / activation dtypes the PTX loop handles
UNROLL = 2  # rounds per loop iteration (4 measured no faster)


def _x_load(block_m: int, u: int, smem: bool) -> str:
    """Predicated load of one xt row (BLOCK_M 16-bit activations) into %xh* / %xw* registers of round u."""
    space, addr = ("shared", "%xs") if smem else ("global.nc", "%xa")
    if block_m == 1:
        return f"@%pu{u} ld.{space}.b16 %xh{2 * u}, [{addr}];"
    words = [f"%xw{u * (block_m // 2) + i}" for i in range(block_m // 2)]  # 2 activations per 32-bit word
    if len(words) == 1:
        return f"@%pu{u} ld.{space}.b32 {words[0]}, [{addr}];"
    return f"@%pu{u} ld.{space}.v{len(words)}.b32 {{{', '.join(words)}}}, [{addr}];"


def _stage_x() -> list[str]:
    """Every thread of the program copies its part of xt (%xtot bytes, at %xb) into the shared array flx_xs, then
    one barrier: 16-byte pieces (the launcher passes a 16-byte aligned xt), then the < 16-byte tail in 16-bit ones."""
    return ["{", ".reg .pred %pf;", ".reg .b32 %t, %nt, %xv, %o, %st, %sa, %f<4>;", ".reg .b16 %fh;",
            ".reg .b64 %o64, %ga;",
            "mov.u32 %t, %tid.x;", "mov.u32 %nt, %ntid.x;", "and.b32 %xv, %xtot, -16;", "shl.b32 %o, %t, 4;",
            "shl.b32 %st, %nt, 4;",
            "FILL:", "setp.ge.u32 %pf, %o, %xv;", "@%pf bra FILLED;",
            "cvt.u64.u32 %o64, %o;", "add.s64 %ga, %xb, %o64;", "ld.global.nc.v4.b32 {%f0, %f1, %f2, %f3}, [%ga];",
            "add.u32 %sa, %sb, %o;", "st.shared.v4.b32 [%sa], {%f0, %f1, %f2, %f3};",
            "add.u32 %o, %o, %st;", "bra.uni FILL;", "FILLED:",
            "shl.b32 %o, %t, 1;", "add.u32 %o, %o, %xv;", "setp.lt.u32 %pf, %o, %xtot;",
            "cvt.u64.u32 %o64, %o;", "add.s64 %ga, %xb, %o64;", "@%pf ld.global.nc.b16 %fh, [%ga];",
            "add.u32 %sa, %sb, %o;", "@%pf st.shared.b16 [%sa], %fh;", "bar.sync 0;", "}"]


@functools.cache
def rowwalk_ptx(block_m: int, dtype: str, smem_bytes: int = 0) -> str:
    """PTX text of one lane's walk for BLOCK_M in {1, 2, 4, 8} tokens and torch dtype name in PTX_TYPES.
    smem_bytes > 0 (a multiple of 16, >= the bytes of xt): the program first stages xt in a shared array of that
    size and gathers activations from it (LDS: ~3 bank wavefronts per warp instead of ~32 L1 sectors)."""
    ty = PTX_TYPES[dtype]
    xbytes = 2 * block_m  # one xt row: BLOCK_M 16-bit activations
    words = max(1, block_m // 2)
    smem = smem_bytes > 0
    a = block_m  # index of the first input operand
    o = ["{"] + ([f".shared .align 16 .b8 flx_xs[{smem_bytes}];"] if smem else [])
    o += [".reg .pred %pa, %pn, %pc;", f".reg .pred %pu<{UNROLL}>;",
          ".reg .b32 %w, %wn, %wo, %wol, %cb, %jj, %low, %j, %xtot, %sb, %xs;",
          ".reg .b64 %wb, %ve, %va, %xb, %xa, %wa, %o64;", f".reg .b16 %hv<{UNROLL}>;", f".reg .f32 %fv<{UNROLL}>;",
          f".reg .b32 %xw<{UNROLL * words}>;", f".reg .b16 %xh<{UNROLL * max(2, block_m)}>;",
          f".reg .f32 %xf<{UNROLL * block_m}>;"]
    o += [f"mov.f32 ${t}, 0f00000000;" for t in range(block_m)]
    # Loop state as byte offsets, so each address is one 64-bit add (2 SASS) of a 32-bit offset:
    #   cb = bytes of values left (2 * nonzeros left); the next value is at ve - cb (ve: end of the lane's run)
    #   wo = byte offset of the current word in the row (4 * its index); wol = that of the row's last word
    o += [f"mov.b32 %w, ${a};", f"mov.b64 %wb, ${a + 1};", f"mov.b64 %xb, ${a + 3};",
          f"shl.b32 %wo, ${a + 4}, 2;", f"shl.b32 %wol, ${a + 5}, 2;", "add.s32 %wol, %wol, -4;",
          f"shl.b32 %cb, ${a + 6}, 1;", f"mov.b32 %xtot, ${a + 7};", "cvt.u64.u32 %o64, %cb;",
          f"add.s64 %ve, ${a + 2}, %o64;"]
    if smem:  # before any lane leaves: every thread of the program takes part in the barrier
        o += ["mov.u32 %sb, flx_xs;", *_stage_x()]
    o += ["mov.b32 %wn, 0;", "setp.lt.s32 %pc, %cb, 1;", "@%pc bra DONE;",
          "setp.lt.s32 %pn, %wo, %wol;", "cvt.u64.u32 %o64, %wo;", "add.s64 %wa, %wb, %o64;",
          "@%pn ld.global.nc.b32 %wn, [%wa+4];", "LOOP:"]
    x_address = (f"mad.lo.u32 %xs, %jj, {xbytes}, %sb;" if smem else f"mad.wide.u32 %xa, %jj, {xbytes}, %xb;")
    for u in range(UNROLL):
        o += [f"setp.ne.b32 %pu{u}, %w, 0;"]  # a live round: a set bit left, and (after round 0) a value left
        o += [f"setp.gt.and.s32 %pu{u}, %cb, 0, %pu{u};"] if u else []  # the loop is entered only with cb > 0
        o += ["neg.s32 %low, %w;", "and.b32 %low, %low, %w;", "bfind.u32 %j, %low;", "xor.b32 %w, %w, %low;",
              "cvt.u64.u32 %o64, %cb;", "sub.s64 %va, %ve, %o64;", f"@%pu{u} ld.global.nc.b16 %hv{u}, [%va];",
              f"@%pu{u} add.s32 %cb, %cb, -2;",
              "mad.lo.u32 %jj, %wo, 8, %j;", x_address, _x_load(block_m, u, smem),  # column 32 * (wo / 4) + j
              # word used up and nonzeros left: take the prefetched next word, prefetch the one after
              "setp.eq.b32 %pa, %w, 0;", "setp.gt.and.s32 %pa, %cb, 0, %pa;",
              "@%pa mov.b32 %w, %wn;", "@%pa add.s32 %wo, %wo, 4;",
              "setp.lt.and.s32 %pn, %wo, %wol, %pa;", "cvt.u64.u32 %o64, %wo;", "add.s64 %wa, %wb, %o64;",
              "@%pn ld.global.nc.b32 %wn, [%wa+4];"]
    for u in range(UNROLL):  # FMAs last: the loads of every round of the iteration are in flight together
        o.append(f"cvt.f32.{ty} %fv{u}, %hv{u};")
        if block_m > 1:
            o += [f"mov.b32 {{%xh{u * block_m + 2 * i}, %xh{u * block_m + 2 * i + 1}}}, %xw{u * words + i};"
                  for i in range(words)]
        for t in range(block_m):
            h = f"%xh{2 * u}" if block_m == 1 else f"%xh{u * block_m + t}"
            o += [f"cvt.f32.{ty} %xf{u * block_m + t}, {h};",
                  f"@%pu{u} fma.rn.f32 ${t}, %fv{u}, %xf{u * block_m + t}, ${t};"]
    o += ["setp.gt.s32 %pc, %cb, 0;", "@%pc bra LOOP;", "DONE:", "}"]
    return "\n".join(o)


def rowwalk_constraints(block_m: int) -> str:
    """LLVM constraint string: BLOCK_M fp32 outputs, then w, wb, vp, xb, wi, kw, cnt, xtot (bytes of xt)."""
    return ",".join(["=f"] * block_m + ["r", "l", "l", "l", "r", "r", "r", "r"])
