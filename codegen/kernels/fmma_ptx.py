"""Tensor-core kernel whose MMA A-fragments are built straight from the bitmap in registers (SpInfer's idea, on our
bitmap format), as inline PTX for `tl.inline_asm_elementwise` on a tensor with one element per thread.

Why not scatter (smma, smma_ptx.py): a random 16-bit scatter into shared memory costs ~7 wavefronts per 32 nonzeros
and left smma shared-memory bound at ~0.8x cuBLAS.  Here nothing is scattered: each thread reads the few values it
needs from a compact, staged copy of the nonzeros and places them into its fragment registers with byte permutes.

The K permutation.  mma.m16n8k16 sums over k, so any order of the 16 k-slots works if A and B use the same one.
Per 128-column chunk, thread (g = lane / 4, t = lane % 4) of a warp uses k-step s (0..7) for columns
32 t + 4 s .. + 3: its fragment slots (k 2t, 2t+1) take columns +0, +1 and (k 2t+8, 2t+9) take +2, +3.  So a thread
owns bitmap word t of its two rows (g and g + 8) for the whole chunk, one nibble a k-step, and its B fragment is 8
consecutive x values per two k-steps (one 16-byte load).

Per chunk c (one warp, rows r0 .. r0 + 15):
  stage     chunk c + 1's nonzeros are cp.asynced (.cg: they stream once) into the warp's other stage buffer.  With
            tile-major values (formats/bitmap.py) the warp's 16 runs are one segment, copied by all 32 lanes in
            512-byte steps (_stage_segment); with row-major values the 4 threads of a row copy its run
            (_stage_row: 16 runs of ~130 bytes, 8 rows an instruction).  With x_smem the program's threads also
            copy x chunk c + 1 into the other x buffer.
  decode    per k-step and row: r = popcount of the word's bits below the nibble (the nibble's first value is value r
            of the thread's run); three 32-bit shared loads, each only in the lanes whose values reach that word,
            and two funnel shifts give the 4 values from r on (lo, hi).  Three byte permutes place them: columns
            +0 / +1 from (lo, zero), the window moved to value r + popcount(low two bits) (lo, hi), columns +2 / +3
            from it.  Their selectors come from 4-entry permute tables indexed by two bits of the nibble, looked up
            for two k-steps with one prmt from per-chunk bytes of the word (_selectors): ~21 instructions per 4
            columns of one row, whatever the sparsity, shared by every 8-token tile.
  mma       per 8-token tile one mma.m16n8k16 per k-step; B from the staged x chunk (one barrier a chunk) or from
            global memory (no barrier; pays only for one tile: the tuner picks, TileConfig.num_stages).
Where it stands (H100, benchmarks/RESULTS.md ideas 17, 50-54): at 50-60% sparsity the chunk loop waited on its
staged values more than on its decode: without the decode it ran 7% faster, without the staging 28%; the linear
staging of tile-major values made it 1.14x faster, programmatic dependent launch and split-K 3 / 6 another 1.04x
(1.20 / 1.28x cuBLAS at 50 / 60%, M = 1..16, geo-mean).  More warps an SM (a register cap) did not help: the loop is
not waiting for latency other warps could cover; ~56% of its instructions run on the ALU pipe.
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
SEGMENT_BYTES = ROWS_PER_WARP * 2 * SMMA_CHUNK_K + 16  # linear staging: a warp's chunk of values (<= 16 x 128) from
# a 16-byte aligned start, in the room of the same warp's 16 slots (its windows read up to 12 bytes past it)
assert SEGMENT_BYTES + 12 <= ROWS_PER_WARP * SLOT_BYTES


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


# Permute tables (two registers, 8 bytes: four 16-bit entries), looked up with `prmt` by a two-bit field f of the
# bitmap: the lookup's selector is f * 0x22 + 0x10 (nibbles 2 f, 2 f + 1: entry f's two bytes).
# Values: which of two staged values go to the slots of two columns (bytes 0-3: the two values, low half first;
# bytes 4-7: a zero register).  f bit 0: first column, bit 1: second.
#   00 -> 0, 0    01 -> v0, 0    10 -> 0, v0    11 -> v0, v1
PERMUTE_TABLE = (0x4444, 0x4410, 0x1044, 0x3210)
TABLE_LO = PERMUTE_TABLE[1] << 16 | PERMUTE_TABLE[0]
TABLE_HI = PERMUTE_TABLE[3] << 16 | PERMUTE_TABLE[2]
# Window: the values of columns +2 / +3 start popcount(f) values after the nibble's first (f: its low two bits), so
# their window is bytes 2 popcount(f) .. + 3 of the nibble's 4-value window (lo, hi).
WINDOW_TABLE = tuple(0x3210 + 0x2222 * f.bit_count() for f in range(4))
WTABLE_LO = WINDOW_TABLE[1] << 16 | WINDOW_TABLE[0]
WTABLE_HI = WINDOW_TABLE[3] << 16 | WINDOW_TABLE[2]
FIELD_BYTES = 0x03030303  # one two-bit field a byte (nibbles 0, 2, 4, 6 of a shifted word)
FIELD_INDEX = (0x22, 0x10101010)  # a byte's field f -> f * 0x22 + 0x10, the table selector of entry f


def _load_raw(row: str, pred: str) -> list[str]:
    """Chunk words (4) and offset of row `row` ("A" or "B") at %bp{row} / %op{row}; zeros where `pred` is false."""
    return load_words([f"%r{row}{i}" for i in range(4)], f"%ro{row}", pred, f"%bp{row}", f"%op{row}")


def _load_segment(pred: str) -> list[str]:
    """Linear staging: the bounds of the warp's segment of a chunk c, %gs = offsets[c, r0] and %ge =
    offsets[c + 1, r0] (r0: the warp's first row; tile-major values: the next segment starts where this one ends),
    zero where `pred` is false."""
    return ["mov.b32 %gs, 0;", "mov.b32 %ge, 0;", f"@{pred} ld.global.nc.b32 %gs, [%sp];",
            f"@{pred} ld.global.nc.b32 %ge, [%sp2];"]


def _load_raw_ahead(ahead: int, c1: str, linear: bool) -> list[str]:
    """Advance both rows' word / offset pointers one chunk and load chunk c + `ahead`'s raw words (and with
    `linear` its segment bounds), where that chunk is one of the program's (< c1) and the row exists."""
    o = [f"add.u32 %tok, %c, {ahead};", f"setp.lt.u32 %pl, %tok, {c1};"]
    o += [f"add.s64 %bp{r}, %bp{r}, 16;" for r in "AB"] + [f"add.s64 %op{r}, %op{r}, %n4;" for r in "AB"]
    for r in "AB":
        o += [f"and.pred %pc, %pl, %p{r};"] + _load_raw(r, "%pc")
    if linear:
        o += ["add.s64 %sp, %sp, %n4;", "add.s64 %sp2, %sp2, %n4;", "and.pred %pc, %pl, %pW;"] + _load_segment("%pc")
    return o


def _thread_run(row: str) -> list[str]:
    """From the raw words of `row`: the thread's word (%nw{row}), %pre = the row's values before it, %cnt = the
    row's values in the chunk."""
    r = [f"%r{row}{i}" for i in range(4)]
    return [f"popc.b32 %p{i}, {r[i]};" for i in range(4)] + [
        f"selp.b32 %w, {r[1]}, {r[0]}, %pt1;", f"selp.b32 %w, {r[2]}, %w, %pt2;",
        f"selp.b32 %nw{row}, {r[3]}, %w, %pt3;",
        "selp.b32 %pre, %p0, 0, %pt1;", "selp.b32 %q, %p1, 0, %pt2;", "add.u32 %pre, %pre, %q;",
        "selp.b32 %q, %p2, 0, %pt3;", "add.u32 %pre, %pre, %q;",
        "add.u32 %cnt, %p0, %p1;", "add.u32 %cnt, %cnt, %p2;", "add.u32 %cnt, %cnt, %p3;"]


def _copies(count: int, step: int, label: str, bounded: bool, first_voted: int) -> list[str]:
    """cp.async block i (i < count) of a copy: `step` i bytes after this thread's first (%va global, %dst shared,
    %bo its byte offset from the start), where the block starts before %nby, the bytes needed.  From block
    `first_voted` on, a warp vote skips the rest once no thread needs one.  `bounded`: each copy reads only the
    bytes before the values' end (%rem bytes from the start; cp.async src-size; ~6 more instructions a block)."""
    o = []
    for i in range(count):
        o += [f"add.u32 %sz, %bo, {step * i};", "setp.lt.u32 %pc, %sz, %nby;"]
        if i >= first_voted:
            o += ["vote.sync.any.pred %pe, %pc, 0xffffffff;", f"@!%pe bra {label};"]
        if bounded:
            o += ["sub.u32 %sz, %rem, %sz;", "min.u32 %sz, %sz, 16;",
                  f"@%pc cp.async.cg.shared.global [%dst+{step * i}], [%va+{step * i}], 16, %sz;"]
        else:
            o += [f"@%pc cp.async.cg.shared.global [%dst+{step * i}], [%va+{step * i}], 16;"]
    return o + [f"{label}:"]


def _stage_segment(stage: str, label: str, bounded: bool) -> list[str]:
    """Linear staging (tile-major values): the warp's 32 lanes cp.async the 16-byte blocks covering its segment
    [%gs, %ge) of the chunk (its 16 rows' runs, one after another) into `stage`, lane l blocks l, l + 32, ...: full
    512-byte copies, where per-row staging copies 16 runs of ~130 bytes in 8 places an instruction.  Then each
    thread's first value (%nb{row}) is at its row's offset within the segment."""
    o = ["mad.wide.u32 %va, %gs, 2, %vp;", "cvt.u32.u64 %mis, %va;", "and.b32 %mis, %mis, 15;", "and.b64 %va, %va, -16;",
         "sub.u32 %nby, %ge, %gs;", "shl.b32 %nby, %nby, 1;", "add.u32 %nby, %nby, %mis;",
         "setp.eq.u32 %pe, %ge, %gs;", "selp.b32 %nby, 0, %nby, %pe;"]
    for row in "AB":
        o += _thread_run(row) + [f"sub.u32 %q, %ro{row}, %gs;", "add.u32 %pre, %pre, %q;", "shl.b32 %pre, %pre, 1;",
                                 f"add.u32 %nb{row}, {stage}, %mis;", f"add.u32 %nb{row}, %nb{row}, %pre;"]
    if bounded:  # bytes that may be read before the values end
        o += ["sub.s64 %o64, %ve, %va;", f"min.u64 %o64, %o64, {SEGMENT_BYTES};", "cvt.u32.u64 %rem, %o64;"]
    o += ["shl.b32 %bo, %lane, 4;", "cvt.u64.u32 %o64, %bo;", "add.s64 %va, %va, %o64;", f"add.u32 %dst, {stage}, %bo;"]
    return o + _copies(SEGMENT_BYTES // 512 + 1, 512, label, bounded, 2)


def _stage_row(row: str, slot: str, label: str, bounded: bool) -> list[str]:
    """Per-row staging (row-major values): from the raw words / offset of `row`, the thread's word (%nw{row}) and
    the address of its first value in the stage (%nb{row}); cp.async this thread's share of the row's 16-byte blocks
    (t, t + 4, ...) into `slot`.  Blocks past the second are skipped as soon as no thread of the warp needs them
    (they are needed only for dense runs)."""
    o = _thread_run(row) + [
        f"mad.wide.u32 %va, %ro{row}, 2, %vp;", "cvt.u32.u64 %mis, %va;", "and.b32 %mis, %mis, 15;",
        "and.b64 %va, %va, -16;",
        # bytes of 16-byte blocks needed (0 for an empty run)
        "shl.b32 %nby, %cnt, 1;", "add.u32 %nby, %nby, %mis;", "setp.eq.u32 %pe, %cnt, 0;",
        "selp.b32 %nby, 0, %nby, %pe;"]
    if bounded:  # bytes that may be read before the values end
        o += ["sub.s64 %o64, %ve, %va;", f"min.u64 %o64, %o64, {SLOT_BYTES};", "cvt.u32.u64 %rem, %o64;"]
    o += ["cvt.u64.u32 %o64, %t16;", "add.s64 %va, %va, %o64;", f"add.u32 %dst, {slot}, %t16;", "mov.u32 %bo, %t16;"]
    o += _copies(BLOCKS_PER_THREAD, 64, label, bounded, 2)
    return o + [f"add.u32 %nb{row}, {slot}, %mis;", "shl.b32 %pre, %pre, 1;", f"add.u32 %nb{row}, %nb{row}, %pre;"]


def _field_index(row: str, shift: int, out: str) -> list[str]:
    """`out` = table selectors for 4 k-steps at once: byte u = f * 0x22 + 0x10 for the two-bit field f at bit
    8 u + shift of the row's word (bits 4 s + shift of k-step s = 2 u + shift / 4 % 2)."""
    o = [f"shr.b32 {out}, %cw{row}, {shift};"] if shift else [f"mov.b32 {out}, %cw{row};"]
    return o + [f"and.b32 {out}, {out}, {FIELD_BYTES};", f"mad.lo.u32 {out}, {out}, {FIELD_INDEX[0]}, {FIELD_INDEX[1]};"]


def _selectors(row: str, p: int) -> list[str]:
    """At k-steps 0 and 4 (p = 0, 2): look up the permute selectors of k-steps 2 p + h and 2 p + 2 + h (h = 0, 1;
    low and high half) for `row`: %s01{row}{h} (columns +0 / +1), %sw{row}{h} (the window of +2 / +3), %s23{row}{h}
    (columns +2 / +3).  One prmt gives two k-steps' selectors: its selector's 4 nibbles are two table indices."""
    o = []
    if p == 0:
        for h in (0, 1):
            o += _field_index(row, 4 * h, f"%k{row}{h}") + _field_index(row, 4 * h + 2, f"%k{row}{h + 2}")
    for h in (0, 1):
        lo01, lo23 = f"%k{row}{h}", f"%k{row}{h + 2}"
        if p == 2:
            o += [f"shr.b32 %c01, {lo01}, 16;", f"shr.b32 %c23, {lo23}, 16;"]
            lo01, lo23 = "%c01", "%c23"
        o += [f"prmt.b32 %s01{row}{h}, %tlo, %thi, {lo01};", f"prmt.b32 %sw{row}{h}, %twlo, %twhi, {lo01};",
              f"prmt.b32 %s23{row}{h}, %tlo, %thi, {lo23};"]
    return o


def _decode(row: str, s: int, a01: str, a23: str) -> list[str]:
    """Fragment registers of k-step s for `row` from its word %cw{row} and first-value address %cb{row}: `a01` holds
    columns 32 t + 4 s + 0, 1 and `a23` columns + 2, 3 (two 16-bit values each, zero where the bit is clear).
    %a{row}: address of the nibble's first value (the end of k-step s - 1's values), %end{row}: its end.
    The window (lo, hi) is the 4 values from %a{row} on: three aligned 32-bit loads and two funnel shifts.  The
    first word is loaded by every lane whose row exists (%p{row}: a row past N has no stage address), the second and
    third only by the lanes whose values reach into them: a shared load costs a wavefront per bank conflict among its
    active lanes, and the lanes' addresses are random.  The first word is needed by 15 of 16 nibbles at 50%, so its
    predicate cost an instruction for nothing (1.014x without it); the other two are needed by 50% / 3% of them
    (35% / 1% at 60%), and loading them in every lane measured 0.97x / 0.93x (RESULTS.md ideas 50, 57).  Then three
    permutes with the k-step's selectors (_selectors): columns +0 / +1 from the window's first two values, the window
    shifted to the values of columns +2 / +3, and those."""
    w, base, a, end = f"%cw{row}", f"%cb{row}", f"%a{row}", f"%end{row}"
    h, odd = s % 2, s // 2 % 2
    o = [f"mov.u32 {a}, {base};"] if s == 0 else []
    o += ([f"and.b32 %m, {w}, {(1 << 4 * s + 4) - 1};"] if s < 7 else [f"mov.b32 %m, {w};"])
    o += ["popc.b32 %m, %m;", f"mad.lo.u32 {end}, %m, 2, {base};",
          f"and.b32 %a4, {a}, -4;", f"shl.b32 %sh, {a}, 3;"]  # funnel shifts take the amount mod 32: 16 (a / 2 % 2)
    o += [f"sub.u32 %m, {end}, %a4;", "setp.gt.u32 %pw1, %m, 4;", "setp.gt.u32 %pw2, %m, 8;",
          f"@%p{row} ld.shared.b32 %v0, [%a4];", "@%pw1 ld.shared.b32 %v1, [%a4+4];",
          "@%pw2 ld.shared.b32 %v2, [%a4+8];"]
    sel = [f"%{t}{row}{h}" for t in ("s01", "sw", "s23")]
    if odd:  # this k-step's selectors are the high halves
        o += [f"shr.b32 %sel{i}, {r}, 16;" for i, r in enumerate(sel)]
        sel = [f"%sel{i}" for i in range(3)]
    o += ["shf.r.wrap.b32 %lo, %v0, %v1, %sh;", "shf.r.wrap.b32 %hi, %v1, %v2, %sh;",
          f"prmt.b32 {a01}, %lo, %z, {sel[0]};", f"prmt.b32 %lo, %lo, %hi, {sel[1]};",
          f"prmt.b32 {a23}, %lo, %z, {sel[2]};", f"mov.u32 {a}, {end};"]
    return o


@functools.cache
def fmma_ptx(warps: int, nt: int, dtype: str, bounded: bool = True, x_smem: bool = True,
             linear: bool = False, pdl: bool = False) -> str:
    """PTX of one program (see the module docstring): `warps` warps of 16 rows, NT 8-token tiles, a torch dtype name
    in SMMA_TYPES.  x_smem: the program stages each x chunk once in shared memory (one barrier a chunk) instead of
    every warp loading its B fragments from global memory.  `linear`: the values are tile-major (formats/bitmap.py)
    and each warp stages its chunk's segment at once (_stage_segment), else row by row (_stage_row).  With `pdl`
    (launched with programmatic dependent launch) the next kernel may launch at once, and the program loads its
    first words and stages its first values before it waits for the kernel before it (x is that kernel's output;
    the weights are not).  Operands as smma_ptx (smma_constraints)."""
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
         ".reg .pred %pW, %pA, %pB, %pt1, %pt2, %pt3, %pe, %pc, %pl;", ".reg .b32 %gs, %ge, %wst;",
         ".reg .b64 %sp, %sp2;",
         ".reg .b32 %th, %lane, %warp, %g, %t, %t16, %nA, %tok, %c, %buf, %slotA, %slotB, %sA, %sB, %z, %tlo, %thi, %twlo, %twhi;",
         ".reg .b32 %kA<4>, %kB<4>, %c01, %c23, %sel<3>, %s01A<2>, %s01B<2>, %swA<2>, %swB<2>, %s23A<2>, %s23B<2>;",
         ".reg .b32 %rA<4>, %rB<4>, %roA, %roB, %nwA, %nwB, %nbA, %nbB, %cwA, %cwB, %cbA, %cbB;",
         ".reg .b32 %p<4>, %w, %pre, %q, %cnt, %mis, %nby, %rem, %dst, %bo, %sz;",
         ".reg .pred %pw1, %pw2;", ".reg .b32 %aA, %aB, %endA, %endB;",
         ".reg .b32 %m, %a, %a4, %sh, %v<3>, %lo, %hi, %i, %sel, %f<4>, %e<4>, %x<4>;",
         f".reg .b64 %vp, %ve, %va, %o64, %bpA, %bpB, %opA, %opB, %n4{xregs};"]
    o += [f"mov.f32 ${i}, 0f00000000;" for i in range(acc)]
    o += ["griddepcontrol.launch_dependents;"] if pdl else []
    o += ["mov.u32 %th, %tid.x;", f"mov.u32 ${acc}, %th;", "and.b32 %lane, %th, 31;", "shr.u32 %warp, %th, 5;",
          "shr.u32 %g, %lane, 2;", "and.b32 %t, %lane, 3;", "shl.b32 %t16, %t, 4;", "mov.b32 %z, 0;",
          # the permute table, or-ed with ~activemask (0: every lane is active) so that ptxas keeps it in a register
          # instead of moving a constant into one before every use
          "activemask.b32 %q;", "not.b32 %q, %q;", f"or.b32 %tlo, %q, {TABLE_LO};", f"or.b32 %thi, %q, {TABLE_HI};",
          f"or.b32 %twlo, %q, {WTABLE_LO};", f"or.b32 %twhi, %q, {WTABLE_HI};",
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
    if linear:  # the warp's stage and first row r0 = n0 + 16 warp; %sp / %sp2 at offsets[c0, r0] / [c0 + 1, r0]
        o += ["mov.u32 %wst, flf_v;", f"mad.lo.u32 %wst, %warp, {WARP_STAGE}, %wst;",
              f"mad.lo.u32 %tok, %warp, 16, {n0};", f"setp.lt.u32 %pW, %tok, {nn};",
              f"mad.lo.u32 %tok, {c0}, {nn}, %tok;", "mul.wide.u32 %o64, %tok, 4;", f"add.s64 %sp, {op}, %o64;",
              "add.s64 %sp2, %sp, %n4;"]
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
    if linear:
        o += _load_segment("%pW") + _stage_segment("%wst", "FMMA_P_S", bounded)
    else:
        o += _stage_row("A", "%slotA", "FMMA_P_A", bounded) + _stage_row("B", "%slotB", "FMMA_P_B", bounded)
    o += ["griddepcontrol.wait;"] if pdl else []  # from here on: x, and (after the program) the stores
    if x_smem:
        o += ["mov.u32 %xcur, 0;"] + [f"cp.async.cg.shared.global [%xd{k}], [%xs{k}], 16;" for k in range(pieces)]
        o += [f"add.s64 %xs{k}, %xs{k}, 256;" for k in range(pieces)]
    o += ["cp.async.commit_group;"]
    o += [f"mov.b32 %cw{r}, %nw{r};" for r in "AB"] + [f"mov.b32 %cb{r}, %nb{r};" for r in "AB"]
    o += _load_raw_ahead(1, c1, linear)
    o += ["FMMA_LOOP:",
          # chunk c is in buffer %buf; every lane is past its reads of the other buffer (chunk c - 1)
          "cp.async.wait_group 0;", "bar.sync 0;" if x_smem else "bar.warp.sync 0xffffffff;",
          "add.u32 %tok, %c, 1;", f"setp.lt.u32 %pl, %tok, {c1};", "@!%pl bra FMMA_STAGED;",
          f"xor.b32 %buf, %buf, {ROWS_PER_WARP * SLOT_BYTES};"]
    if linear:
        o += ["add.u32 %sA, %wst, %buf;"] + _stage_segment("%sA", "FMMA_L_S", bounded)
    else:
        o += ["add.u32 %sA, %slotA, %buf;", "add.u32 %sB, %slotB, %buf;"]
        o += _stage_row("A", "%sA", "FMMA_L_A", bounded) + _stage_row("B", "%sB", "FMMA_L_B", bounded)
    if x_smem:  # x chunk c + 1 to the other x buffer
        o += [f"xor.b32 %q, %xcur, {xbuf};"]
        o += [f"add.u32 %w, %xd{k}, %q;\ncp.async.cg.shared.global [%w], [%xs{k}], 16;" for k in range(pieces)]
        o += [f"add.s64 %xs{k}, %xs{k}, 256;" for k in range(pieces)]
    o += [f"xor.b32 %buf, %buf, {ROWS_PER_WARP * SLOT_BYTES};", "cp.async.commit_group;"]
    o += _load_raw_ahead(2, c1, linear)  # raw words of chunk c + 2 on their way
    o += ["FMMA_STAGED:"]
    for p in range(SMMA_CHUNK_K // 32):  # k-steps 2 p, 2 p + 1
        if p % 2 == 0:
            o += _selectors("A", p) + _selectors("B", p)
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
          "@%pe bra FMMA_LOOP;", "FMMA_END:", *(["griddepcontrol.wait;"] if pdl else []), "}"]  # (an empty split too)
    return "\n".join(o)


assert fmma_smem_bytes(4, 2) <= STATIC_SMEM_MAX and fmma_smem_bytes(2, 4) <= STATIC_SMEM_MAX
