"""The row walk's inner loop as inline PTX, for `tl.inline_asm_elementwise` (one lane = one call).

Why PTX: the same loop in Triton costs ~30 SASS instructions per nonzero (64-bit address pairs for three
gathers, masked-load zeroing) and every lane runs the program's maximum trip count.  Here a lane stops after its
own `cnt` nonzeros, indices are 32-bit with one IMAD.WIDE per address, and two rounds share one basic block so
ptxas issues the loads of both before either FMA waits (H100: 6.7 M vs 9.6 M warp instructions on LLaMA-7B qkv
at 90%, benchmarks/RESULTS.md).  The interpreter cannot run PTX: `_bitmap_rowwalk_kernel` keeps a Triton loop.

Operands (after the BLOCK_M fp32 outputs): w (u32, the lane's first bitmap word with the bits before its first
nonzero cleared), wb (u64, address of the row's word 0), vp (u64, address of the lane's first value), xb (u64,
address of xt [K, BLOCK_M]), wi (u32, index of w in the row), kw (u32, words per row), cnt (u32, nonzeros to do).
One round:   j = lowest set bit of w;  acc[t] += v[vp] * xt[32 * wi + j, t];  vp += 1;  cnt -= 1;  w ^= 1 << j
             if w == 0 and cnt > 0:  w = the next word (loaded one word ahead);  wi += 1
"""

from __future__ import annotations

import functools

PTX_TYPES = {"float16": "f16", "bfloat16": "bf16"}  # value / activation dtypes the PTX loop handles
UNROLL = 2  # rounds per loop iteration (4 measured no faster)


def _x_load(block_m: int, u: int) -> str:
    """Predicated load of one xt row (BLOCK_M 16-bit activations) into %xh* / %xw* registers of round u."""
    if block_m == 1:
        return f"@%pu{u} ld.global.nc.b16 %xh{2 * u}, [%xa];"
    words = [f"%xw{u * (block_m // 2) + i}" for i in range(block_m // 2)]  # 2 activations per 32-bit word
    if len(words) == 1:
        return f"@%pu{u} ld.global.nc.b32 {words[0]}, [%xa];"
    return f"@%pu{u} ld.global.nc.v{len(words)}.b32 {{{', '.join(words)}}}, [%xa];"


@functools.cache
def rowwalk_ptx(block_m: int, dtype: str) -> str:
    """PTX text of one lane's walk for BLOCK_M in {1, 2, 4, 8} tokens and torch dtype name in PTX_TYPES."""
    ty = PTX_TYPES[dtype]
    xbytes = 2 * block_m  # one xt row: BLOCK_M 16-bit activations
    words = max(1, block_m // 2)
    a = block_m  # index of the first input operand
    o = ["{", ".reg .pred %pa, %pn, %pc;", f".reg .pred %pu<{UNROLL}>;",
         ".reg .b32 %w, %wn, %wi, %wlast, %cnt, %jj, %low, %j;", ".reg .b64 %wb, %vp, %xb, %xa, %wa;",
         f".reg .b16 %hv<{UNROLL}>;", f".reg .f32 %fv<{UNROLL}>;", f".reg .b32 %xw<{UNROLL * words}>;",
         f".reg .b16 %xh<{UNROLL * max(2, block_m)}>;", f".reg .f32 %xf<{UNROLL * block_m}>;"]
    o += [f"mov.f32 ${t}, 0f00000000;" for t in range(block_m)]
    o += [f"mov.b32 %w, ${a};", f"mov.b64 %wb, ${a + 1};", f"mov.b64 %vp, ${a + 2};", f"mov.b64 %xb, ${a + 3};",
          f"mov.b32 %wi, ${a + 4};", f"add.s32 %wlast, ${a + 5}, -1;", f"mov.b32 %cnt, ${a + 6};",
          "mov.b32 %wn, 0;", "setp.lt.s32 %pc, %cnt, 1;", "@%pc bra DONE;",
          "setp.lt.s32 %pn, %wi, %wlast;", "mad.wide.u32 %wa, %wi, 4, %wb;",
          "@%pn ld.global.nc.b32 %wn, [%wa+4];", "LOOP:"]
    for u in range(UNROLL):
        o += [f"setp.ne.b32 %pu{u}, %w, 0;", f"setp.gt.and.s32 %pu{u}, %cnt, 0, %pu{u};",
              "neg.s32 %low, %w;", "and.b32 %low, %low, %w;", "bfind.u32 %j, %low;", "xor.b32 %w, %w, %low;",
              f"@%pu{u} ld.global.nc.b16 %hv{u}, [%vp];", f"@%pu{u} add.s64 %vp, %vp, 2;",
              f"@%pu{u} add.s32 %cnt, %cnt, -1;",
              "mad.lo.u32 %jj, %wi, 32, %j;", f"mad.wide.u32 %xa, %jj, {xbytes}, %xb;", _x_load(block_m, u),
              # word used up and nonzeros left: take the prefetched next word, prefetch the one after
              "setp.eq.b32 %pa, %w, 0;", "setp.gt.and.s32 %pa, %cnt, 0, %pa;",
              "@%pa mov.b32 %w, %wn;", "@%pa add.s32 %wi, %wi, 1;",
              "setp.lt.and.s32 %pn, %wi, %wlast, %pa;", "mad.wide.u32 %wa, %wi, 4, %wb;",
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
    o += ["setp.gt.s32 %pc, %cnt, 0;", "@%pc bra LOOP;", "DONE:", "}"]
    return "\n".join(o)


def rowwalk_constraints(block_m: int) -> str:
    """LLVM constraint string: BLOCK_M fp32 outputs, then w, wb, vp, xb, wi, kw, cnt."""
    return ",".join(["=f"] * block_m + ["r", "l", "l", "l", "r", "r", "r"])
