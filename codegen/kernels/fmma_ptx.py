"""Tensor-core kernel whose MMA A-fragments are built straight from the bitmap in registers (SpInfer's idea, on our
row-major bitmap format), as inline PTX for `tl.inline_asm_elementwise` on a tensor with one element per thread.

Why not scatter (smma, smma_ptx.py): a random 16-bit scatter into shared memory costs ~7 wavefronts per 32 nonzeros
and left smma shared-memory bound at ~0.8x cuBLAS.  Here nothing is scattered: each thread reads the few values it
needs from a compact, staged copy of the nonzeros and places them into its fragment registers with byte permutes.

The K permutation.  mma.m16n8k16 sums over k, so any order of the 16 k-slots works if A and B use the same one.
Per 128-column chunk, thread (g = lane / 4, t = lane % 4) of a warp uses k-step s (0..7) for columns
32 t + 4 s .. + 3: its fragment slots (k 2t, 2t+1) take columns +0, +1 and (k 2t+8, 2t+9) take +2, +3.  So a thread
owns bitmap word t of its two rows (g and g + 8) for the whole chunk, one nibble a k-step, and its B fragment is 8
consecutive x values per two k-steps (one 16-byte load).

Per chunk c (one warp, rows r0 .. r0 + 15):
  stage     the 4 threads of a row cp.async the 16-byte blocks covering the row's run of chunk c + 1's nonzeros into
            the row's slot of the warp's other stage buffer (coalesced; values stream once, .cg skips L1); with
            x_smem the program's threads also copy x chunk c + 1 into the other x buffer.
  decode    per k-step and row: r = popcount of the word's bits below the nibble (the nibble's first value is value r
            of the thread's run); three 32-bit shared loads, each only in the lanes whose values reach that word,
            and two funnel shifts give the 4 values from r on; the nibble's low two bits pick, through a 4-entry
            permute table, which of them go to the slots of columns +0 / +1 (zero where the bit is clear); the high
            two bits do the same for +2 / +3 from value r + popcount(low two bits) (a byte of a second table).
            ~27 instructions per 4 columns of one row, whatever the sparsity, and shared by every 8-token tile.
  mma       per 8-token tile one mma.m16n8k16 per k-step; B from the staged x chunk (one barrier a chunk) or from
            global memory (no barrier; pays only for one tile: the tuner picks, TileConfig.num_stages).
Where it stands (H100, benchmarks/RESULTS.md idea 17): 1.1-1.3x cuBLAS at M = 8..16 from 70% sparsity, ~1.0 at 50%;
bound by instruction issue and latency (ncu: 59% of issue slots busy, ~9 lane-instructions per dense element).
Accumulator q of n-tile i (q = 0..3) is row 16 w + lane / 4 + 8 (q / 2), token 8 i + 2 (lane % 4) + q % 2 (the same
mapping as smma: the Triton kernel around it is bitmap_smma's).
"""

from __future__ import annotations

import functools

from flashllm_compile.codegen.kernels.smma_ptx import SMMA_CHUNK_K, SMMA_TYPES, STATIC_SMEM_MAX, load_words

SLOT_BYTES = 272  # one row's run of one chunk: <= 128 values (256 B) from a 16-byte aligned start; 68 words, so the
# 8 rows a load instruction reads start 4 banks apart
ROWS_PER_WARP = 16
BLOCKS_PER_THREAD = SLOT_BYTES // 16 // 4 + 1  # 17 blocks a row, 4 threads a row
WARP_STAGE = 2 * ROWS_PER_WARP * SLOT_BYTES  # two buffers of 16 slots
TAIL = 16  # the last slot's 3-word window may read 12 bytes past the 272


X_ROW = 2 * SMMA_CHUNK_K  # one token's x chunk in shared memory (256 B, 16 pieces of 16 B, swizzled: _x_piece)


def fmma_smem_bytes(warps: int, nt: int, x_smem: bool = True) -> int:
    """Value stages (two buffers of 16 row slots a warp) and, with x_smem, two x chunks [8 NT, 128]."""
    return warps * WARP_STAGE + TAIL + (2 * 8 * nt * X_ROW if x_smem else 0)


def _x_piece(row: str, piece: str, out: str) -> list[str]:
    """Byte offset of 16-byte piece `piece` (0..15; thread t reads pieces 4 t .. 4 t + 3) of token row `row` in an
    x chunk: piece j goes to j ^ 2 ((j / 8) % 2) ^ (row % 2), so the 8 lanes of one quarter-warp load (2 rows x
    4 threads, one piece each) hit 8 distinct 16-byte bank groups."""
    return [f"bfe.u32 %q, {piece}, 3, 1;", "shl.b32 %q, %q, 1;", f"xor.b32 %q, %q, {piece};",
            f"and.b32 %w, {row}, 1;", "xor.b32 %q, %q, %w;", f"mad.lo.u32 {out}, {row}, {X_ROW}, 0;",
            f"mad.lo.u32 {out}, %q, 16, {out};"]


# Permute selectors, indexed by two bitmap bits (bit 0: first column, bit 1: second): bytes 0-3 are the two values
# from the run (low half first), bytes 4-7 a zero register.
#   00 -> 0, 0    01 -> v0, 0    10 -> 0, v0    11 -> v0, v1
PERMUTE_TABLE = (0x4444, 0x4410, 0x1044, 0x3210)
TABLE_LO = PERMUTE_TABLE[1] << 16 | PERMUTE_TABLE[0]
TABLE_HI = PERMUTE_TABLE[3] << 16 | PERMUTE_TABLE[2]
SHIFT_TABLE = 0x20101000  # byte i: 16 * popcount(i) for two bitmap bits i


def _load_raw(row: str, pred: str) -> list[str]:
    """Chunk words (4) and offset of row `row` ("A" or "B") at %bp{row} / %op{row}; zeros where `pred` is false."""
    return load_words([f"%r{row}{i}" for i in range(4)], f"%ro{row}", pred, f"%bp{row}", f"%op{row}")


def _load_raw_ahead(ahead: int, c1: str) -> list[str]:
    """Advance both rows' word / offset pointers one chunk and load chunk c + `ahead`'s raw words, where that chunk
    is one of the program's (< c1) and the row exists."""
    o = [f"add.u32 %tok, %c, {ahead};", f"setp.lt.u32 %pl, %tok, {c1};"]
    o += [f"add.s64 %bp{r}, %bp{r}, 16;" for r in "AB"] + [f"add.s64 %op{r}, %op{r}, %n4;" for r in "AB"]
    for r in "AB":
        o += [f"and.pred %pc, %pl, %p{r};"] + _load_raw(r, "%pc")
    return o


def _stage_row(row: str, slot: str, label: str, bounded: bool) -> list[str]:
    """From the raw words / offset of `row`: the thread's word (%nw{row}) and the address of its first value in the
    stage (%nb{row}); cp.async this thread's share of the row's 16-byte blocks (t, t + 4, ...) into `slot`.
    `bounded`: the values array may end less than 16 bytes after its last value, so each copy reads only the bytes
    before the end (cp.async src-size; ~6 more instructions a block).  Blocks past the second are skipped as soon as
    no thread of the warp needs them (they are needed only for dense runs)."""
    r = [f"%r{row}{i}" for i in range(4)]
    o = [f"popc.b32 %p{i}, {r[i]};" for i in range(4)]
    o += [f"selp.b32 %w, {r[1]}, {r[0]}, %pt1;", f"selp.b32 %w, {r[2]}, %w, %pt2;",
          f"selp.b32 %nw{row}, {r[3]}, %w, %pt3;",
          "selp.b32 %pre, %p0, 0, %pt1;", "selp.b32 %q, %p1, 0, %pt2;", "add.u32 %pre, %pre, %q;",
          "selp.b32 %q, %p2, 0, %pt3;", "add.u32 %pre, %pre, %q;",
          "add.u32 %cnt, %p0, %p1;", "add.u32 %cnt, %cnt, %p2;", "add.u32 %cnt, %cnt, %p3;",
          f"mad.wide.u32 %va, %ro{row}, 2, %vp;", "cvt.u32.u64 %mis, %va;", "and.b32 %mis, %mis, 15;",
          "and.b64 %va, %va, -16;",
          # bytes of 16-byte blocks needed (0 for an empty run)
          "shl.b32 %nby, %cnt, 1;", "add.u32 %nby, %nby, %mis;", "setp.eq.u32 %pe, %cnt, 0;",
          "selp.b32 %nby, 0, %nby, %pe;"]
    if bounded:  # bytes that may be read before the values end
        o += ["sub.s64 %o64, %ve, %va;", f"min.u64 %o64, %o64, {SLOT_BYTES};", "cvt.u32.u64 %rem, %o64;"]
    o += ["cvt.u64.u32 %o64, %t16;", "add.s64 %va, %va, %o64;", f"add.u32 %dst, {slot}, %t16;"]
    for i in range(BLOCKS_PER_THREAD):  # block t + 4 i at byte 16 t + 64 i; a needed block starts before the end
        o += [f"add.u32 %bo, %t16, {64 * i};", "setp.lt.u32 %pc, %bo, %nby;"]
        if i >= 2:
            o += ["vote.sync.any.pred %pe, %pc, 0xffffffff;", f"@!%pe bra {label};"]
        if bounded:
            o += ["sub.u32 %sz, %rem, %bo;", "min.u32 %sz, %sz, 16;",
                  f"@%pc cp.async.cg.shared.global [%dst+{64 * i}], [%va+{64 * i}], 16, %sz;"]
        else:
            o += [f"@%pc cp.async.cg.shared.global [%dst+{64 * i}], [%va+{64 * i}], 16;"]
    return o + [f"{label}:", f"add.u32 %nb{row}, {slot}, %mis;", "shl.b32 %pre, %pre, 1;",
                f"add.u32 %nb{row}, %nb{row}, %pre;"]


def _decode(row: str, s: int, a01: str, a23: str) -> list[str]:
    """Fragment registers of k-step s for `row` from its word %cw{row} and first-value address %cb{row}: `a01` holds
    columns 32 t + 4 s + 0, 1 and `a23` columns + 2, 3 (two 16-bit values each, zero where the bit is clear).
    %a{row}: address of the nibble's first value (set by k-step s - 1: the end of its values), %end{row}: its end.
    Each of the three window words is loaded only by the lanes whose values reach into it: a shared load costs
    wavefronts per bank conflict among its active lanes, and at 80% sparsity most nibbles hold 0 or 1 value."""
    w, base, a, end = f"%cw{row}", f"%cb{row}", f"%a{row}", f"%end{row}"
    o = [f"mov.u32 {a}, {base};"] if s == 0 else []
    o += ([f"and.b32 %m, {w}, {(1 << 4 * s + 4) - 1};"] if s < 7 else [f"mov.b32 %m, {w};"])
    o += ["popc.b32 %m, %m;", f"mad.lo.u32 {end}, %m, 2, {base};",
          f"and.b32 %a4, {a}, -4;", f"shl.b32 %sh, {a}, 3;",  # funnel shifts take the amount mod 32: 16 (a / 2 % 2)
          f"sub.u32 %m, {end}, %a4;", f"setp.gt.u32 %pw0, {end}, {a};", "setp.gt.u32 %pw1, %m, 4;",
          "setp.gt.u32 %pw2, %m, 8;",
          "@%pw0 ld.shared.b32 %v0, [%a4];", "@%pw1 ld.shared.b32 %v1, [%a4+4];", "@%pw2 ld.shared.b32 %v2, [%a4+8];",
          "shf.r.wrap.b32 %lo, %v0, %v1, %sh;", "shf.r.wrap.b32 %hi, %v1, %v2, %sh;",
          # the +2 / +3 values start popcount(low bits) values later: shift the window by 16 bits per value (a
          # byte of %tsh; POPC issues at a quarter of the integer rate on the H100)
          f"bfe.u32 %i, {w}, {4 * s}, 2;", "prmt.b32 %m, %tsh, %z, %i;", "mad.lo.u32 %i, %i, 34, 16;",
          "prmt.b32 %sel, %tlo, %thi, %i;", f"prmt.b32 {a01}, %lo, %z, %sel;", "shf.r.clamp.b32 %lo, %lo, %hi, %m;",
          f"bfe.u32 %i, {w}, {4 * s + 2}, 2;", "mad.lo.u32 %i, %i, 34, 16;",
          "prmt.b32 %sel, %tlo, %thi, %i;", f"prmt.b32 {a23}, %lo, %z, %sel;", f"mov.u32 {a}, {end};"]
    return o


@functools.cache
def fmma_ptx(warps: int, nt: int, dtype: str, bounded: bool = True, x_smem: bool = True) -> str:
    """PTX of one program (see the module docstring): `warps` warps of 16 rows, NT 8-token tiles, a torch dtype name
    in SMMA_TYPES.  x_smem: the program stages each x chunk once in shared memory (one barrier a chunk) instead of
    every warp loading its B fragments from global memory.  Operands as smma_ptx (smma_constraints)."""
    ty = SMMA_TYPES[dtype]
    acc = 4 * nt
    bm, op, vp, xp, n0, nn, kw, c0, c1, t0, mm, sx, _, ve = (f"${acc + 1 + i}" for i in range(14))
    xregs = "".join(f", %xp{i}" for i in range(nt if not x_smem else 0))
    xbuf = 8 * nt * X_ROW
    pieces = 8 * nt * 16 // (32 * warps)  # 16-byte pieces of an x chunk each thread copies
    xs = [f"%xs{k}" for k in range(pieces)]
    o = ["{", f".shared .align 16 .b8 flf_v[{warps * WARP_STAGE + TAIL}];",
         *([f".shared .align 16 .b8 flf_x[{2 * xbuf}];", ".reg .b32 %xo<4>, %xa<4>, %xcur, " + ", ".join(
             f"%xd{k}" for k in range(pieces)) + ";", ".reg .b64 " + ", ".join(xs) + ";"] if x_smem else []),
         ".reg .pred %pA, %pB, %pt1, %pt2, %pt3, %pe, %pc, %pl;",
         ".reg .b32 %th, %lane, %warp, %g, %t, %t16, %nA, %tok, %c, %buf, %slotA, %slotB, %sA, %sB, %z, %tlo, %thi, %tsh;",
         ".reg .b32 %rA<4>, %rB<4>, %roA, %roB, %nwA, %nwB, %nbA, %nbB, %cwA, %cwB, %cbA, %cbB;",
         ".reg .b32 %p<4>, %w, %pre, %q, %cnt, %mis, %nby, %rem, %dst, %bo, %sz;",
         ".reg .pred %pw0, %pw1, %pw2;", ".reg .b32 %aA, %aB, %endA, %endB;",
         ".reg .b32 %m, %a, %a4, %sh, %v<3>, %lo, %hi, %i, %sel, %f<4>, %e<4>, %x<4>;",
         f".reg .b64 %vp, %ve, %va, %o64, %bpA, %bpB, %opA, %opB, %n4{xregs};"]
    o += [f"mov.f32 ${i}, 0f00000000;" for i in range(acc)]
    o += ["mov.u32 %th, %tid.x;", f"mov.u32 ${acc}, %th;", "and.b32 %lane, %th, 31;", "shr.u32 %warp, %th, 5;",
          "shr.u32 %g, %lane, 2;", "and.b32 %t, %lane, 3;", "shl.b32 %t16, %t, 4;", "mov.b32 %z, 0;",
          # the permute table, or-ed with ~activemask (0: every lane is active) so that ptxas keeps it in a register
          # instead of moving a constant into one before every use
          "activemask.b32 %q;", "not.b32 %q, %q;", f"or.b32 %tlo, %q, {TABLE_LO};", f"or.b32 %thi, %q, {TABLE_HI};",
          f"or.b32 %tsh, %q, {SHIFT_TABLE};",
          "setp.ge.u32 %pt1, %t, 1;", "setp.ge.u32 %pt2, %t, 2;", "setp.ge.u32 %pt3, %t, 3;",
          f"mov.b64 %vp, {vp};", f"mov.b64 %ve, {ve};",
          # rows nA = n0 + 16 warp + g and nA + 8; their slots g and 8 + g of the warp's stage
          "mad.lo.u32 %nA, %warp, 16, %g;", f"add.u32 %nA, %nA, {n0};", f"setp.lt.u32 %pA, %nA, {nn};",
          "add.u32 %tok, %nA, 8;", f"setp.lt.u32 %pB, %tok, {nn};",
          "mov.u32 %slotA, flf_v;", f"mad.lo.u32 %slotA, %warp, {WARP_STAGE}, %slotA;",
          f"mad.lo.u32 %slotA, %g, {SLOT_BYTES}, %slotA;", f"add.u32 %slotB, %slotA, {8 * SLOT_BYTES};",
          # words of row nA, chunk c0: bm + 4 (nA KW + 4 c0); row nA + 8 is 8 KW words later.  offsets[c0, nA]
          f"mul.wide.u32 %o64, %nA, {kw};", "shl.b64 %o64, %o64, 2;", f"add.s64 %bpA, {bm}, %o64;",
          f"mul.wide.u32 %o64, {c0}, 16;", "add.s64 %bpA, %bpA, %o64;",
          f"mul.wide.u32 %o64, {kw}, 32;", "add.s64 %bpB, %bpA, %o64;",
          f"mad.lo.u32 %tok, {c0}, {nn}, %nA;", "mul.wide.u32 %o64, %tok, 4;", f"add.s64 %opA, {op}, %o64;",
          "add.s64 %opB, %opA, 32;", f"mul.wide.u32 %n4, {nn}, 4;", f"add.u32 %m, {mm}, -1;"]
    if x_smem:
        # copies: piece q = tid + 32 warps k of the chunk: token row q / 16 (token t0 + row, clamped to M - 1), piece
        # q % 16; sources advance 256 bytes a chunk
        for k in range(pieces):
            o += [f"add.u32 %bo, %th, {32 * warps * k};", "shr.u32 %nby, %bo, 4;", "and.b32 %bo, %bo, 15;"]
            o += _x_piece("%nby", "%bo", f"%xd{k}")
            o += ["mov.u32 %q, flf_x;", f"add.u32 %xd{k}, %xd{k}, %q;",
                  f"add.u32 %tok, {t0}, %nby;", "min.u32 %tok, %tok, %m;", f"mul.lo.u32 %tok, %tok, {sx};",
                  f"mad.lo.u32 %tok, {c0}, 128, %tok;", "mul.wide.u32 %o64, %tok, 2;", f"add.s64 %xs{k}, {xp}, %o64;",
                  "mul.wide.u32 %o64, %bo, 16;", f"add.s64 %xs{k}, %xs{k}, %o64;"]
        # reads: thread (g, t) loads piece 4 t + p of token row 8 i + g (+ 8 i rows as an immediate)
        for p in range(4):
            o += ["add.u32 %bo, %t, %t;", "add.u32 %bo, %bo, %bo;", f"add.u32 %bo, %bo, {p};"]
            o += _x_piece("%g", "%bo", f"%xo{p}")
            o += ["mov.u32 %q, flf_x;", f"add.u32 %xo{p}, %xo{p}, %q;"]
    for i in range(nt if not x_smem else 0):  # x of token t0 + 8 i + g (clamped to M - 1), columns 128 c0 + 32 t
        o += [f"add.u32 %tok, {t0}, %g;", f"add.u32 %tok, %tok, {8 * i};", "min.u32 %tok, %tok, %m;",
              f"mul.lo.u32 %tok, %tok, {sx};", f"mad.lo.u32 %tok, {c0}, 128, %tok;", "mad.lo.u32 %tok, %t, 32, %tok;",
              "mul.wide.u32 %o64, %tok, 2;", f"add.s64 %xp{i}, {xp}, %o64;"]
    # prologue: chunk c0 staged into buffer 0, raw words of c0 + 1 loaded
    o += [f"mov.u32 %c, {c0};", f"setp.ge.u32 %pe, %c, {c1};", "@%pe bra FMMA_END;", "mov.u32 %buf, 0;"]
    o += _load_raw("A", "%pA") + _load_raw("B", "%pB")
    o += _stage_row("A", "%slotA", "FMMA_P_A", bounded) + _stage_row("B", "%slotB", "FMMA_P_B", bounded)
    if x_smem:
        o += ["mov.u32 %xcur, 0;"] + [f"cp.async.cg.shared.global [%xd{k}], [%xs{k}], 16;" for k in range(pieces)]
        o += [f"add.s64 %xs{k}, %xs{k}, 256;" for k in range(pieces)]
    o += ["cp.async.commit_group;"]
    o += [f"mov.b32 %cw{r}, %nw{r};" for r in "AB"] + [f"mov.b32 %cb{r}, %nb{r};" for r in "AB"]
    o += _load_raw_ahead(1, c1)
    o += ["FMMA_LOOP:",
          # chunk c is in buffer %buf; every lane is past its reads of the other buffer (chunk c - 1)
          "cp.async.wait_group 0;", "bar.sync 0;" if x_smem else "bar.warp.sync 0xffffffff;",
          "add.u32 %tok, %c, 1;", f"setp.lt.u32 %pl, %tok, {c1};", "@!%pl bra FMMA_STAGED;",
          f"xor.b32 %buf, %buf, {ROWS_PER_WARP * SLOT_BYTES};", "add.u32 %sA, %slotA, %buf;",
          "add.u32 %sB, %slotB, %buf;"]
    o += _stage_row("A", "%sA", "FMMA_L_A", bounded) + _stage_row("B", "%sB", "FMMA_L_B", bounded)
    if x_smem:  # x chunk c + 1 to the other x buffer
        o += [f"xor.b32 %q, %xcur, {xbuf};"]
        o += [f"add.u32 %w, %xd{k}, %q;\ncp.async.cg.shared.global [%w], [%xs{k}], 16;" for k in range(pieces)]
        o += [f"add.s64 %xs{k}, %xs{k}, 256;" for k in range(pieces)]
    o += [f"xor.b32 %buf, %buf, {ROWS_PER_WARP * SLOT_BYTES};", "cp.async.commit_group;"]
    o += _load_raw_ahead(2, c1)  # raw words of chunk c + 2 on their way
    o += ["FMMA_STAGED:"]
    for p in range(SMMA_CHUNK_K // 32):  # k-steps 2 p, 2 p + 1
        for s in (2 * p, 2 * p + 1):
            f = "%f" if s % 2 == 0 else "%e"
            o += _decode("A", s, f"{f}0", f"{f}2") + _decode("B", s, f"{f}1", f"{f}3")
        if x_smem:
            o += [f"add.u32 %xa{p}, %xo{p}, %xcur;"]
        for i in range(nt):
            d = ", ".join(f"${4 * i + q}" for q in range(4))
            mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{d}}}"
            load = (f"ld.shared.v4.b32 {{%x0, %x1, %x2, %x3}}, [%xa{p}+{8 * i * X_ROW}];" if x_smem else
                    f"ld.global.nc.v4.b32 {{%x0, %x1, %x2, %x3}}, [%xp{i}+{16 * p}];")
            o += [load,
                  f"{mma}, {{%f0, %f1, %f2, %f3}}, {{%x0, %x1}}, {{{d}}};",
                  f"{mma}, {{%e0, %e1, %e2, %e3}}, {{%x2, %x3}}, {{{d}}};"]
    o += [f"add.s64 %xp{i}, %xp{i}, 256;" for i in range(nt if not x_smem else 0)]
    o += [f"xor.b32 %xcur, %xcur, {xbuf};"] if x_smem else []
    o += [f"mov.b32 %cw{r}, %nw{r};" for r in "AB"] + [f"mov.b32 %cb{r}, %nb{r};" for r in "AB"]
    o += [f"xor.b32 %buf, %buf, {ROWS_PER_WARP * SLOT_BYTES};", "add.u32 %c, %c, 1;", f"setp.lt.u32 %pe, %c, {c1};",
          "@%pe bra FMMA_LOOP;", "FMMA_END:", "}"]
    return "\n".join(o)


assert fmma_smem_bytes(4, 2) <= STATIC_SMEM_MAX and fmma_smem_bytes(2, 4) <= STATIC_SMEM_MAX
