"""Tensor-core kernel on the Tiled-CSL format (codegen/formats/csl.py), as inline PTX for
`tl.inline_asm_elementwise` on a tensor with one element per thread (the text runs once in every thread).

Flash-LLM's "load as sparse, compute as dense" with a decode that costs per nonzero: every warp owns RT consecutive
16-row tiles of the weight and, per 128-column chunk c,
  load      its segments' words (one 32-bit word a nonzero, `offset << 16 | value`) for chunk c + depth into
            registers, one coalesced 128-byte load per group of 32 (issued `depth` chunks before they are used;
            each group guarded by a predicate, or, `jump`, entered by an indirect jump on the group count);
  clear     its [16, 128] tile buffers: a zero stored where chunk c - 1's words went, while those words are still
            in registers (zeroing whole tiles, 8 16-byte stores a lane that conflict two ways, measured 10-20%
            slower from 80% sparsity: RESULTS.md idea 23; they are zeroed whole once, before the first chunk);
  scatter   chunk c's words: shift, add, 16-bit store (the format orders them so that a group's 32 stores mostly
            hit distinct banks);
  mma       per pair of k-steps and per 8-token tile one ldmatrix.x4 of the x chunk staged in shared memory (once
            per program), shared by the RT weight tiles: two ldmatrix.x4 of each tile and two mma.m16n8k16.
Why RT tiles a warp: the kernel is bound by shared-memory wavefronts (ncu, RESULTS.md idea 21), and every warp reads
the whole x chunk (16 wavefronts per 8 tokens) whatever its rows; owning 2 tiles halves that per weight row, which
matters from M = 16 (H100, LLaMA-7B 80%: M = 32 0.99 -> 1.20x cuBLAS, M = 64 0.58 -> 0.88x; idea 22).
The tiles are private to their warp and single-buffered (only warp-level syncs guard them).  x is double-buffered
(chunk c + 1 copied while chunk c is computed, one barrier a chunk) where shared memory allows, else single
(two barriers a chunk).  Outputs: the 4 NT RT fp32 accumulators, then %tid.x; accumulator 4 NT r + q of weight
tile r is row 16 (RT w + r) + lane / 4 + 8 ((q % 4) / 2), token 8 (q / 4) + 2 (lane % 4) + q % 2 (smma's mapping per
tile, so the Triton kernel around it stores it the same way: bitmap_decode.store_fragments).
"""

from __future__ import annotations

import functools
import itertools

from flashllm_compile.codegen.formats.csl import CSL_CHUNK, TILE_BYTES, TILE_ROW_BYTES
from flashllm_compile.codegen.kernels.smma_ptx import ROW_BYTES, SMMA_TYPES, STATIC_SMEM_MAX, ldmatrix_mma_chunk

# A token's x chunk in shared memory: 256 bytes, unpadded, its 16-byte piece j stored at piece j ^ (token % 8), so
# that ldmatrix's 8 token rows of one piece hit 8 distinct bank groups and every cp.async of a quarter warp fills one
# aligned 128-byte line.  (Rows padded to 272 bytes, like the tiles, made each cp.async take ~2.6x its ideal shared
# memory wavefronts, ncu; the swizzle made cmma 1.06x faster over 24 points, up to 1.24x at M = 64: H100,
# benchmarks/RESULTS.md idea 36.)
X_ROW_BYTES = 2 * CSL_CHUNK
assert TILE_ROW_BYTES == ROW_BYTES  # smma's tile rows: the ldmatrix / mma code is shared
ROW_TILES = (1, 2, 4)  # weight tiles a warp may own
MAX_PIECES = 16  # 16-byte pieces of an x chunk a thread copies (one unrolled cp.async each)


def _x_copiers(warps: int, warp_split: bool) -> int:
    """The groups of threads that each copy an x chunk for themselves: every warp when the warps split the chunks,
    else the whole program (one group)."""
    return warps if warp_split else 1


def _x_area_bytes(warps: int, nt: int, x_buffers: int, warp_split: bool) -> int:
    """`x_buffers` x chunk buffers [8 NT, 128] for each group of copying threads."""
    return _x_copiers(warps, warp_split) * x_buffers * 8 * nt * X_ROW_BYTES


def _smem_bytes(warps: int, rt: int, nt: int, x_buffers: int, warp_split: bool = False) -> int:
    """One tile buffer per weight tile of every warp, and the x chunk buffers."""
    return warps * rt * TILE_BYTES + _x_area_bytes(warps, nt, x_buffers, warp_split)


def cmma_x_buffers(warps: int, rt: int, nt: int, warp_split: bool = False) -> int:
    """x chunk buffers: two (x chunk c + 1 copied while chunk c is computed, one barrier a chunk) where shared memory
    allows, else one (two barriers a chunk)."""
    return 2 if _smem_bytes(warps, rt, nt, 2, warp_split) <= STATIC_SMEM_MAX else 1


def cmma_smem_bytes(warps: int, rt: int, nt: int, warp_split: bool = False) -> int:
    """Static shared memory of one program."""
    return _smem_bytes(warps, rt, nt, cmma_x_buffers(warps, rt, nt, warp_split), warp_split)


def cmma_config_ok(warps: int, rt: int, nt: int, warp_split: bool = False) -> bool:
    """Whether a program of `warps` warps owning `rt` weight tiles each and NT 8-token tiles can be built: whole x
    pieces per thread (the program's threads copy an x chunk together; each warp its own when the warps split the
    chunks), static shared memory under the cap."""
    threads = 32 * warps // _x_copiers(warps, warp_split)
    return warps in (1, 2, 4, 8) and rt in ROW_TILES and nt >= 1 and (8 * nt * 16) % threads == 0 and \
        8 * nt * 16 // threads <= MAX_PIECES and cmma_smem_bytes(warps, rt, nt, warp_split) <= STATIC_SMEM_MAX


def _load_groups(regs: list[str], count: str, base: str, pred: str, jump: str | None = None) -> list[str]:
    """Group g's word of this lane (base + 128 g) into regs[g] where g < count and `pred`; zero-filler otherwise is
    not needed (unloaded groups are not scattered).  With a `jump` label, by an indirect jump instead of a
    predicate a group (`count` is then already 0 where `pred` is false)."""
    if jump:
        return _unrolled_from(count, jump, [[f"ld.global.nc.b32 {r}, [{base}+{128 * g}];"] for g, r in enumerate(regs)])
    o = []
    for g, r in enumerate(regs):
        o += [f"setp.gt.and.u32 %pg, {count}, {g}, {pred};", f"@%pg ld.global.nc.b32 {r}, [{base}+{128 * g}];"]
    return o


def _scatter(regs: list[str], count: str, tile: str, value: str | None = None, jump: str | None = None) -> list[str]:
    """Store the value (low half) of each loaded word, or `value`'s low half, at tile + its offset (high half).  With
    a `jump` label, by an indirect jump instead of a predicate a group."""
    if jump:
        return _unrolled_from(count, jump, [[f"shr.u32 %so, {r}, 16;", f"add.u32 %so, %so, {tile};",
                                             f"st.shared.b16 [%so], {value or r};"] for r in regs])
    o = []
    for g, r in enumerate(regs):
        o += [f"setp.gt.u32 %pg, {count}, {g};", f"shr.u32 %so, {r}, 16;", f"add.u32 %so, %so, {tile};",
              f"@%pg st.shared.b16 [%so], {value or r};"]
    return o


def _unrolled_from(count: str, tag: str, steps: list[list[str]]) -> list[str]:
    """steps[g] for g = count - 1 down to 0, without a predicate a step: an indirect jump (`brx.idx`, `count` is
    warp-uniform) into the unrolled sequence, entry `count` (Duff's device).  count <= len(steps): a segment's
    groups never exceed the format's max_groups (CslWeight.from_dense), which sizes the sequence."""
    labels = [f"{tag}_{i}" for i in range(len(steps) + 1)]
    o = [f"{tag}: .branchtargets {', '.join(labels)};", f"brx.idx {count}, {tag};"]
    for g in range(len(steps) - 1, -1, -1):
        o += [f"{labels[g + 1]}:", *steps[g]]
    return o + [f"{labels[0]}:"]


@functools.cache
def cmma_ptx(warps: int, rt: int, nt: int, dtype: str, max_groups: int, depth: int = 1, pdl: bool = False,
             jump: bool = False, warp_split: bool = False) -> str:
    """PTX of one program: `warps` warps owning `rt` consecutive 16-row weight tiles each, NT 8-token tiles, a torch
    dtype name in SMMA_TYPES, at most `max_groups` groups of 32 words per segment (registers per lane and tile for
    one chunk), and the words of chunk c + `depth` loaded while chunk c is computed.  With `pdl` (launched with
    programmatic dependent launch) the next kernel may launch at once, and the program loads its first words before
    it waits for the kernel before it (x is that kernel's output; the weights are not).  With `jump` a tile's word
    loads, clears and scatters of a chunk are entered by an indirect jump on its group count (warp-uniform) into
    max_groups unguarded steps, instead of a compare and a predicate a group and phase: the SASS per word falls from
    ~12 instructions to 5 (ISETP was 26% of the instructions executed, ncu), but each step is a basic block that
    ptxas no longer interleaves or sinks.  With `warp_split` every warp owns the same RT tiles (the program's rows) and
    an equal share of its chunks, with its own x buffers and no block barrier in the loop; at the end warp 0 adds the
    other warps' accumulators, in warp order, to its own (the other warps' outputs are partial: not to be stored).
    Why: a split-K over programs writes fp32 partials that a second kernel sums (~2.5 us a call at M <= 16, 12-15% of
    the call, H100); splitting inside the program needs neither.  Operands (cmma_constraints):
    items, seg_start, x (u64), first row, N, chunks C, first chunk, end chunk, first token, M, x row stride, element
    index (unused)."""
    if not cmma_config_ok(warps, rt, nt, warp_split) or depth < 1:
        raise ValueError(f"no cmma program for {warps} warps, {rt} row tiles, {nt} token tiles, depth {depth}"
                         + (", warps splitting the chunks" if warp_split else ""))
    ty = SMMA_TYPES[dtype]
    acc = 4 * nt * rt
    items, seg, xp, n0, nn, nc, c0, c1, t0, mm, sx, _ = (f"${acc + 1 + i}" for i in range(12))
    threads = 32 * warps // _x_copiers(warps, warp_split)  # the threads that copy one x chunk together
    xtile = 8 * nt * X_ROW_BYTES
    xbufs = cmma_x_buffers(warps, rt, nt, warp_split)
    pieces = 8 * nt * 16 // threads  # 16-byte pieces of an x chunk each thread copies
    rows_per_piece = threads // 16
    tiles = range(rt)
    labels = itertools.count()  # jump tables and their targets: unique in the program (the body is unrolled)

    def label() -> str | None:
        """A fresh label for the next jump table (None: the guarded form)."""
        return f"CMMA_J{next(labels)}" if jump else None

    # word registers of depth + 1 chunks per weight tile, and their counts
    sets = [[[f"%g{j}_{r}_{g}" for g in range(max_groups)] for r in tiles] for j in range(depth + 1)]
    counts = [[f"%cnt{j}_{r}" for r in tiles] for j in range(depth + 1)]
    per_tile = [f"%{name}{r}" for r in tiles for name in ("eS", "eN")]
    o = ["{", f".shared .align 16 .b8 flc_w[{warps * rt * TILE_BYTES}];",
         f".shared .align 16 .b8 flc_x[{_x_area_bytes(warps, nt, xbufs, warp_split)}];",
         ".reg .pred %pe, %pl, %pg, %pc, " + ", ".join(f"%pw{r}" for r in tiles) + ";",
         ".reg .b32 %th, %lane, %warp, %rt, %c, %t, %t2, %t3, %nv, %xb, %xstep, %xo, %tb, %zb, %zc, %sa, %so, %z;",
         ".reg .b32 %xt, %xw, %c0w, %c1w;", ".reg .f32 %fa;",
         f".reg .b32 %xs, %xs2, %xl, %xl2, %xbuf, %xd<8>, %xa<8>, %a<4>, %e<4>, %b<{4 * nt}>, "
         + ", ".join([c for cs in counts for c in cs] + per_tile) + ";",
         *([".reg .b32 " + ", ".join(g for regs in sets for rs in regs for g in rs) + ";"] if max_groups else []),
         ".reg .b64 %o64, %ip, %xc, " + ", ".join(f"%sp{r}" for r in tiles) + ";"]
    o += [f"mov.f32 ${i}, 0f00000000;" for i in range(acc)]
    o += ["griddepcontrol.launch_dependents;"] if pdl else []
    o += ["mov.u32 %th, %tid.x;", f"mov.u32 ${acc}, %th;", "and.b32 %lane, %th, 31;", "shr.u32 %warp, %th, 5;",
          "mov.b32 %z, 0;", "shr.u32 %rt, " + n0 + ", 4;"]
    if warp_split:
        # every warp: the program's rows; chunks [c0 + warp per, + per) within [c0, c1), per = ceil((c1 - c0) / warps)
        o += ["sub.s32 %t, " + c1 + ", " + c0 + ";", "max.s32 %t, %t, 0;", f"add.u32 %t, %t, {warps - 1};",
              f"shr.u32 %t, %t, {warps.bit_length() - 1};", f"mad.lo.u32 %c0w, %warp, %t, {c0};",
              f"min.u32 %c0w, %c0w, {c1};", "add.u32 %c1w, %c0w, %t;", f"min.u32 %c1w, %c1w, {c1};",
              "mov.u32 %xt, %lane;", "mov.u32 %xw, flc_x;", f"mad.lo.u32 %xw, %warp, {xbufs * xtile}, %xw;"]
        c0, c1 = "%c0w", "%c1w"
    else:
        o += [f"mad.lo.u32 %rt, %warp, {rt}, %rt;", "mov.u32 %xt, %th;", "mov.u32 %xw, flc_x;"]
    for r in tiles:
        # weight tile rt + r of this warp (rows 16 (rt + r) ..): past N it loads and scatters nothing but keeps the
        # barriers; &seg_start[(rt + r) * C + c0]
        o += [f"add.u32 %t2, %rt, {r};", "shl.b32 %t, %t2, 4;", f"setp.lt.u32 %pw{r}, %t, {nn};",
              f"mad.lo.u32 %t, %t2, {nc}, {c0};", "mul.wide.u32 %o64, %t, 4;", f"add.s64 %sp{r}, {seg}, %o64;"]
    o += [  # this warp's tile buffers; zero role: row lane / 2, half lane % 2
          "mov.u32 %tb, flc_w;", f"mad.lo.u32 %tb, %warp, {rt * TILE_BYTES}, %tb;",
          "shr.u32 %t, %lane, 1;", "and.b32 %t2, %lane, 1;", f"mad.lo.u32 %zb, %t, {TILE_ROW_BYTES}, %tb;",
          # odd lanes zero pieces 12..15 (%zb + 192 ..), then 8..11 (%zc + 64 ..) of the row, so the 8 lanes of a
          # quarter warp hit 8 distinct groups of 4 banks (a row's two halves start on the same bank)
          "mad.lo.u32 %zc, %t2, 64, %zb;", "mad.lo.u32 %zb, %t2, 192, %zb;",
          # ldmatrix.x4 address of A: row lane % 8 + 8 ((lane / 8) % 2), column 8 (lane / 16)
          "and.b32 %t, %lane, 7;", "bfe.u32 %t2, %lane, 3, 1;", "mad.lo.u32 %t, %t2, 8, %t;",
          f"mul.lo.u32 %t, %t, {TILE_ROW_BYTES};", "shr.u32 %t2, %lane, 4;", "mad.lo.u32 %t, %t2, 16, %t;",
          "add.u32 %sa, %tb, %t;",
          # ldmatrix.x4 address of B (x chunk, X_ROW_BYTES): token row s = lane % 8 (+ 8 i), piece (4 p + lane / 8) ^ s,
          # i.e. byte 64 (p ^ (s / 4)) + 16 ((lane / 8) ^ (s % 4)): %xs + 64 p for even p, %xs2 + 64 p for odd p
          "and.b32 %t, %lane, 7;", "shr.u32 %t2, %lane, 3;", "and.b32 %t3, %t, 3;", "xor.b32 %t2, %t2, %t3;",
          "shl.b32 %t2, %t2, 4;", f"mad.lo.u32 %t2, %t, {X_ROW_BYTES}, %t2;", "mov.u32 %t3, %xw;",
          "add.u32 %t2, %t2, %t3;", "shr.u32 %t, %t, 2;", "shl.b32 %t, %t, 6;", "add.u32 %xs, %t2, %t;",
          "sub.u32 %xs2, %t2, %t;"]
    # x pieces this thread copies (%xt: its index among the copying threads): token rows xt / 16 + rows_per_piece j,
    # piece xt % 16, stored at piece (xt % 16) ^ (row % 8): %xd<v> + rows_per_piece j X_ROW_BYTES, one register per
    # value v = rows_per_piece j % 8
    swz = sorted({rows_per_piece * j % 8 for j in range(pieces)})
    o += ["and.b32 %t, %xt, 15;", "shr.u32 %t2, %xt, 4;", "mov.u32 %t3, %xw;",
          f"mad.lo.u32 %t3, %t2, {X_ROW_BYTES}, %t3;"]
    for v in swz:
        o += [f"add.u32 %xo, %t2, {v};", "and.b32 %xo, %xo, 7;", "xor.b32 %xo, %xo, %t;", "shl.b32 %xo, %xo, 4;",
              f"add.u32 %xd{v}, %t3, %xo;"]
    o += ["shl.b32 %t, %t, 3;",  # %t: xt % 16 (from above)
          # %xc: x chunk c (advances 256 bytes a chunk); piece j's element offset in it is %xb + j %xstep (token
          # t0 + xt / 16 + rows_per_piece j, column 8 (xt % 16)).  Only the first %nv pieces (tokens < M) are
          # copied: a padding token's B column only feeds its own D column, which is never stored, so its row may
          # hold anything.  (Copying token M - 1's row in its place, 8 NT - M times a chunk, made M = 1 1.14-1.31x
          # slower: H100, benchmarks/RESULTS.md idea 35.)
          f"mul.wide.u32 %o64, {c0}, {2 * CSL_CHUNK};", f"add.s64 %xc, {xp}, %o64;",
          # %nv = ceil((M - t0 - xt / 16) / rows_per_piece), at least 0
          f"sub.s32 %nv, {mm}, {t0};", "sub.s32 %nv, %nv, %t2;", f"add.s32 %nv, %nv, {rows_per_piece - 1};",
          "max.s32 %nv, %nv, 0;", f"shr.s32 %nv, %nv, {rows_per_piece.bit_length() - 1};",
          f"add.u32 %xb, {t0}, %t2;", f"mad.lo.u32 %xb, %xb, {sx}, %t;", f"mul.lo.u32 %xstep, {sx}, {rows_per_piece};"]

    def load_chunk(j: int, ahead: int) -> list[str]:
        """Words of chunk c + `ahead` (tile r's segment from %eS_r to %eN_r) into sets[j], where that chunk is the
        program's."""
        b = [f"add.u32 %t, %c, {ahead};"]
        for r in tiles:
            b += [f"setp.lt.u32 %pl, %t, {c1};", f"and.pred %pl, %pl, %pw{r};", f"mov.u32 {counts[j][r]}, 0;",
                  f"@%pl sub.u32 {counts[j][r]}, %eN{r}, %eS{r};", f"mul.wide.u32 %o64, %eS{r}, 128;",
                  f"add.s64 %ip, {items}, %o64;", "mul.wide.u32 %o64, %lane, 4;", "add.s64 %ip, %ip, %o64;"]
            b += _load_groups(sets[j][r], counts[j][r], "%ip", "%pl", label())
        return b

    def next_end(ahead: int) -> list[str]:
        """Per tile: %eS <- %eN; %eN <- the end of chunk c + `ahead`'s segment (%sp: its seg_start entry); %sp
        advances."""
        b = [f"add.u32 %t, %c, {ahead};"]
        for r in tiles:
            b += [f"mov.u32 %eS{r}, %eN{r};", f"setp.lt.u32 %pl, %t, {c1};", f"and.pred %pl, %pl, %pw{r};",
                  f"@%pl ld.global.nc.b32 %eN{r}, [%sp{r}+4];", f"add.s64 %sp{r}, %sp{r}, 4;"]
        return b

    def zero_tiles() -> list[str]:
        """Zero this warp's tiles: 8 16-byte stores a lane and tile."""
        return [f"st.shared.v4.b32 [{'%zb' if i < 4 else '%zc'}+{r * TILE_BYTES + 16 * i}], {{%z, %z, %z, %z}};"
                for r in tiles for i in range(8)]

    def copy_x(dst: str | None, src_offset: int, pred: str | None) -> list[str]:
        """This thread's pieces of an x chunk (source pointers + src_offset) to the x buffer at byte `dst` (a register,
        None: 0): those of tokens < M, where `pred`."""
        b = [f"add.u32 %xa{v}, %xd{v}, {dst};" if dst else f"mov.u32 %xa{v}, %xd{v};" for v in swz]
        for j in range(pieces):
            b += [f"setp.gt.and.u32 %pc, %nv, {j}, {pred};" if pred else f"setp.gt.u32 %pc, %nv, {j};",
                  f"mad.lo.u32 %xo, %xstep, {j}, %xb;", "mul.wide.u32 %o64, %xo, 2;", "add.s64 %o64, %xc, %o64;",
                  f"@%pc cp.async.cg.shared.global [%xa{rows_per_piece * j % 8}+{rows_per_piece * j * X_ROW_BYTES}], "
                  + f"[%o64+{src_offset}], 16;"]
        return b + ["cp.async.commit_group;"]

    # prologue: words of chunks c0 .. c0 + depth - 1, the end of chunk c0 + depth's segment, x chunk c0 (when x is
    # double-buffered; single-buffered, every chunk copies its own)
    o += [f"mov.u32 %c, {c0};", f"setp.ge.u32 %pe, %c, {c1};", "@%pe bra CMMA_END;", "mov.u32 %xbuf, 0;"]
    for r in tiles:
        o += [f"mov.u32 %eN{r}, 0;", f"@%pw{r} ld.global.nc.b32 %eN{r}, [%sp{r}];"]
    for j in range(depth):
        o += next_end(j) + load_chunk(j, j)
    o += next_end(depth)
    o += ["griddepcontrol.wait;"] if pdl else []  # from here on: x, and (after the program) the stores
    if xbufs == 2:
        o += copy_x(None, 0, None)
    # the tiles start zeroed; the set of chunk c0 - 1 holds no words
    o += zero_tiles() + [f"mov.u32 {count}, 0;" for count in counts[depth]]

    # who reads an x chunk: the warp (warp_split: ptxas drops the warp sync in this convergent code, and racecheck,
    # which sees no instruction, still reports nothing; a named barrier a warp instead measured 4% slower, H100,
    # benchmarks/RESULTS.md idea 42), or the program
    sync = "bar.warp.sync 0xffffffff;" if warp_split else "barrier.sync 0;"

    def body(j: int) -> list[str]:
        """Chunk c, whose words are in sets[j]; chunk c + depth's go to the set chunk c - 1 used."""
        nxt = (j + depth) % (depth + 1)
        load = load_chunk(nxt, depth) + next_end(depth + 1)
        if xbufs == 1:
            # every warp is done reading x chunk c - 1 (and this warp its tiles); then x chunk c into the buffer
            done = [sync] + copy_x(None, 0, None)
        else:
            done = ["bar.warp.sync 0xffffffff;"]  # this warp's ldmatrix reads of its tiles (chunk c - 1) are done
        # zeros where chunk c - 1's words went, before their registers are reloaded
        b = list(done)
        for r in tiles:
            b += [f"add.u32 %t, %tb, {r * TILE_BYTES};"] + _scatter(sets[nxt][r], counts[nxt][r], "%t", "%z", label())
        b += load
        b += ["bar.warp.sync 0xffffffff;"]  # the tiles are clear; scatter chunk c's words
        for r in tiles:
            b += [f"add.u32 %t, %tb, {r * TILE_BYTES};"] + _scatter(sets[j][r], counts[j][r], "%t", jump=label())
        # every warp's scatter of chunk c and every copy of x chunk c are done
        b += ["cp.async.wait_group 0;", sync]
        if xbufs == 2:
            # x chunk c + 1 to the other buffer (the barrier also ended every read of it, by chunk c - 1's mma)
            b += [f"xor.b32 %t, %xbuf, {xtile};", "add.u32 %t2, %c, 1;",
                  f"setp.lt.u32 %pl, %t2, {c1};"] + copy_x("%t", 256, "%pl")
        b += [f"add.s64 %xc, %xc, {2 * CSL_CHUNK};"]
        b += ["add.u32 %xl, %xs, %xbuf;", "add.u32 %xl2, %xs2, %xbuf;"]
        b += ldmatrix_mma_chunk("%sa", "%xl", nt, ty, rt, TILE_BYTES, "%xl2", X_ROW_BYTES)
        if xbufs == 2:
            b += [f"xor.b32 %xbuf, %xbuf, {xtile};"]
        b += ["add.u32 %c, %c, 1;", f"setp.ge.u32 %pe, %c, {c1};", "@%pe bra CMMA_END;"]
        return b

    # depth + 1 chunks per loop iteration, so the word registers rotate instead of being copied
    o += ["CMMA_LOOP:"] + [line for j in range(depth + 1) for line in body(j)]
    o += ["bra CMMA_LOOP;", "CMMA_END:", *(["griddepcontrol.wait;"] if pdl else [])]  # (an empty split too)
    if warp_split and warps > 1:
        # warps 1..: accumulator q of each lane to 4 (32 q + lane) of the warp's own tile buffers (done with them;
        # 512 NT RT <= 4352 RT bytes); warp 0 adds them in warp order (deterministic)
        # (after the warp's last ldmatrix reads of its tiles: without this sync racecheck reported intra-warp WAR
        # hazards there)
        o += ["bar.warp.sync 0xffffffff;", "mad.lo.u32 %t, %lane, 4, %tb;", "setp.ne.u32 %pe, %warp, 0;"]
        o += [f"@%pe st.shared.f32 [%t+{128 * q}], ${q};" for q in range(acc)]
        o += ["barrier.sync 0;", "@%pe bra CMMA_DONE;", "mov.u32 %t, flc_w;", "mad.lo.u32 %t, %lane, 4, %t;"]
        for w in range(1, warps):
            for q in range(acc):
                o += [f"ld.shared.f32 %fa, [%t+{w * rt * TILE_BYTES + 128 * q}];", f"add.f32 ${q}, ${q}, %fa;"]
        o += ["CMMA_DONE:"]
    return "\n".join(o + ["}"])


def cmma_constraints(nt: int, rt: int = 1) -> str:
    """LLVM constraints: 4 * NT * RT fp32 accumulators, tid; then items, seg_start, x (u64), first row, N, chunks, first
    chunk, end chunk, first token, M, x row stride, element index (u32)."""
    return ",".join(["=f"] * (4 * nt * rt) + ["=r"] + ["l"] * 3 + ["r"] * 9)
