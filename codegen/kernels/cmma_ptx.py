"""Tensor-core kernel on the Tiled-CSL format (codegen/formats/csl.py), as inline PTX for
`tl.inline_asm_elementwise` on a tensor with one element per thread (the text runs once in every thread).

Flash-LLM's "load as sparse, compute as dense" with a decode that costs per nonzero: every warp owns one 16-row
tile of the weight and, per 128-column chunk c,
  load      its segment's words (one 32-bit word a nonzero, `offset << 16 | value`) for chunk c + depth into
            registers, one coalesced 128-byte load per group of 32 (issued `depth` chunks before they are used);
  zero      its [16, 128] tile buffer (8 16-byte stores a lane);
  scatter   chunk c's words: shift, add, 16-bit store (the format orders them so that a group's 32 stores mostly
            hit distinct banks);
  mma       per pair of k-steps two ldmatrix.x4 of the tile and, per 8-token tile, one ldmatrix.x4 of the x chunk
            staged in shared memory (once per program, one barrier a chunk) and two mma.m16n8k16.
The weight tile is private to its warp (double-buffered, so a buffer is zeroed two chunks after its last read,
with only warp-level syncs); the barrier is for x.  Outputs: the 4 * NT fp32 accumulators, then %tid.x; accumulator q
of n-tile i is row 16 w + lane / 4 + 8 (q / 2), token 8 i + 2 (lane % 4) + q % 2 (smma's mapping, so the Triton
kernel around it stores it the same way).
Where it stands (H100, benchmarks/RESULTS.md idea 21): 1.33-1.38x cuBLAS at M = 4..16 and 80% sparsity (fmma: 1.15-
1.27x), 1.45-1.52x at 90%, ~1.0 at M = 32; it moves its bytes at about half the copy bandwidth.
"""

from __future__ import annotations

import functools

from flashllm_compile.codegen.formats.csl import CSL_CHUNK, TILE_BYTES, TILE_ROW_BYTES
from flashllm_compile.codegen.kernels.smma_ptx import ROW_BYTES, SMMA_TYPES, STATIC_SMEM_MAX, ldmatrix_mma_chunk

X_ROW_BYTES = TILE_ROW_BYTES  # a token's x chunk in shared memory, padded like a tile row (ldmatrix without conflicts)
assert TILE_ROW_BYTES == X_ROW_BYTES == ROW_BYTES  # smma's tile rows: the ldmatrix / mma code is shared


def cmma_smem_bytes(warps: int, nt: int) -> int:
    """Two tile buffers a warp and two x chunks [8 NT, 128]."""
    return warps * 2 * TILE_BYTES + 2 * 8 * nt * X_ROW_BYTES


def cmma_config_ok(warps: int, nt: int) -> bool:
    """Whether a program of `warps` warps and NT 8-token tiles can be built: whole x pieces per thread, static
    shared memory under the cap."""
    threads = 32 * warps
    return warps in (1, 2, 4, 8) and nt >= 1 and (8 * nt * 16) % threads == 0 and \
        cmma_smem_bytes(warps, nt) <= STATIC_SMEM_MAX


def _load_groups(regs: list[str], count: str, base: str, pred: str) -> list[str]:
    """Group g's word of this lane (base + 128 g) into regs[g] where g < count and `pred`; zero-filler otherwise is
    not needed (unloaded groups are not scattered)."""
    o = []
    for g, r in enumerate(regs):
        o += [f"setp.gt.and.u32 %pg, {count}, {g}, {pred};", f"@%pg ld.global.nc.b32 {r}, [{base}+{128 * g}];"]
    return o


def _scatter(regs: list[str], count: str, tile: str) -> list[str]:
    """Store the value (low half) of each loaded word at tile + its offset (high half)."""
    o = []
    for g, r in enumerate(regs):
        o += [f"setp.gt.u32 %pg, {count}, {g};", f"shr.u32 %so, {r}, 16;", f"add.u32 %so, %so, {tile};",
              f"@%pg st.shared.b16 [%so], {r};"]
    return o


@functools.cache
def cmma_ptx(warps: int, nt: int, dtype: str, max_groups: int, depth: int = 2) -> str:
    """PTX of one program: `warps` warps (16 weight rows each), NT 8-token tiles, a torch dtype name in SMMA_TYPES,
    at most `max_groups` groups of 32 words per segment (registers per lane for one chunk), and the words of chunk
    c + `depth` loaded while chunk c is computed.  Operands (cmma_constraints): items, seg_start, x (u64), first
    row, N, chunks C, first chunk, end chunk, first token, M, x row stride, element index (unused)."""
    if not cmma_config_ok(warps, nt) or depth < 1:
        raise ValueError(f"no cmma program for {warps} warps, {nt} token tiles, depth {depth}")
    ty = SMMA_TYPES[dtype]
    acc = 4 * nt
    items, seg, xp, n0, nn, nc, c0, c1, t0, mm, sx, _ = (f"${acc + 1 + i}" for i in range(12))
    threads = 32 * warps
    xtile = 8 * nt * X_ROW_BYTES
    pieces = 8 * nt * 16 // threads  # 16-byte pieces of an x chunk each thread copies
    rows_per_piece = threads // 16
    sets = [[f"%g{j}_{g}" for g in range(max_groups)] for j in range(depth + 1)]  # words of depth + 1 chunks
    counts = [f"%cnt{j}" for j in range(depth + 1)]
    o = ["{", f".shared .align 16 .b8 flc_w[{warps * 2 * TILE_BYTES}];", f".shared .align 16 .b8 flc_x[{2 * xtile}];",
         ".reg .pred %pw, %pe, %pl, %pg;",
         ".reg .b32 %th, %lane, %warp, %rt, %c, %t, %t2, %m, %tok, %tb, %buf, %zb, %sa, %so, %z, %eS, %eN;",
         ".reg .b32 %xs, %xd, %xl, %xbuf, %a<4>, %e<4>, %b<4>, " + ", ".join(counts) + ";",
         *([".reg .b32 " + ", ".join(r for regs in sets for r in regs) + ";"] if max_groups else []),
         ".reg .b64 %o64, %sp, %ip, " + ", ".join(f"%x{i}" for i in range(pieces)) + ";"]
    o += [f"mov.f32 ${i}, 0f00000000;" for i in range(acc)]
    o += ["mov.u32 %th, %tid.x;", f"mov.u32 ${acc}, %th;", "and.b32 %lane, %th, 31;", "shr.u32 %warp, %th, 5;",
          "mov.b32 %z, 0;",
          # row tile of this warp (rows 16 rt ..): a warp past N loads and scatters nothing but keeps the barriers
          "shr.u32 %rt, " + n0 + ", 4;", "add.u32 %rt, %rt, %warp;", "shl.b32 %t, %rt, 4;",
          f"setp.lt.u32 %pw, %t, {nn};",
          # &seg_start[rt * C + c0]
          f"mad.lo.u32 %t, %rt, {nc}, {c0};", "mul.wide.u32 %o64, %t, 4;", f"add.s64 %sp, {seg}, %o64;",
          # this warp's tile buffers; zero role: row lane / 2, half lane % 2
          "mov.u32 %tb, flc_w;", f"mad.lo.u32 %tb, %warp, {2 * TILE_BYTES}, %tb;",
          "shr.u32 %t, %lane, 1;", "and.b32 %t2, %lane, 1;", f"mad.lo.u32 %zb, %t, {TILE_ROW_BYTES}, %tb;",
          "mad.lo.u32 %zb, %t2, 128, %zb;",
          # ldmatrix.x4 address of A: row lane % 8 + 8 ((lane / 8) % 2), column 8 (lane / 16)
          "and.b32 %t, %lane, 7;", "bfe.u32 %t2, %lane, 3, 1;", "mad.lo.u32 %t, %t2, 8, %t;",
          f"mul.lo.u32 %t, %t, {TILE_ROW_BYTES};", "shr.u32 %t2, %lane, 4;", "mad.lo.u32 %t, %t2, 16, %t;",
          "add.u32 %sa, %tb, %t;",
          # ldmatrix.x4 address of B (x chunk): token row 8 i + lane % 8, column 8 (lane / 8) (+ 32 p)
          "and.b32 %t, %lane, 7;", f"mul.lo.u32 %t, %t, {X_ROW_BYTES};", "shr.u32 %t2, %lane, 3;",
          "mad.lo.u32 %t, %t2, 16, %t;", "mov.u32 %xs, flc_x;", "add.u32 %xs, %xs, %t;",
          # x pieces this thread copies: token rows tid / 16 + rows_per_piece j, 16 bytes at column 8 (tid % 16)
          "and.b32 %t, %th, 15;", "shr.u32 %t2, %th, 4;", "shl.b32 %t, %t, 4;",
          f"mad.lo.u32 %xd, %t2, {X_ROW_BYTES}, %t;", "mov.u32 %t, flc_x;", "add.u32 %xd, %xd, %t;",
          f"add.u32 %m, {mm}, -1;"]
    for j in range(pieces):
        o += [f"add.u32 %tok, {t0}, %t2;", f"add.u32 %tok, %tok, {rows_per_piece * j};", "min.u32 %tok, %tok, %m;",
              f"mul.lo.u32 %tok, %tok, {sx};", f"mad.lo.u32 %tok, {c0}, {CSL_CHUNK}, %tok;",
              "mul.wide.u32 %o64, %tok, 2;", f"add.s64 %x{j}, {xp}, %o64;", "and.b32 %tok, %th, 15;",
              "mul.wide.u32 %o64, %tok, 16;", f"add.s64 %x{j}, %x{j}, %o64;"]

    def load_chunk(regs: list[str], count: str, ahead: int) -> list[str]:
        """Words of chunk c + `ahead` (segment from %eS to %eN) into `regs`, where that chunk is the program's."""
        b = [f"add.u32 %t, %c, {ahead};", f"setp.lt.u32 %pl, %t, {c1};", "and.pred %pl, %pl, %pw;",
             f"mov.u32 {count}, 0;", f"@%pl sub.u32 {count}, %eN, %eS;",
             "mul.wide.u32 %o64, %eS, 128;", f"add.s64 %ip, {items}, %o64;", "mul.wide.u32 %o64, %lane, 4;",
             "add.s64 %ip, %ip, %o64;"]
        return b + _load_groups(regs, count, "%ip", "%pl")

    def next_end(ahead: int) -> list[str]:
        """%eS <- %eN; %eN <- the end of chunk c + `ahead`'s segment (%sp: its seg_start entry); %sp advances."""
        return ["mov.u32 %eS, %eN;", f"add.u32 %t, %c, {ahead};", f"setp.lt.u32 %pl, %t, {c1};",
                "and.pred %pl, %pl, %pw;", "@%pl ld.global.nc.b32 %eN, [%sp+4];", "add.s64 %sp, %sp, 4;"]

    # prologue: words of chunks c0 .. c0 + depth - 1, the end of chunk c0 + depth's segment, x chunk c0
    o += [f"mov.u32 %c, {c0};", f"setp.ge.u32 %pe, %c, {c1};", "@%pe bra CMMA_END;", "mov.u32 %buf, 0;",
          "mov.u32 %xbuf, 0;", "mov.u32 %eN, 0;", "@%pw ld.global.nc.b32 %eN, [%sp];"]
    for j in range(depth):
        o += next_end(j) + load_chunk(sets[j], counts[j], j)
    o += next_end(depth)
    o += [f"cp.async.cg.shared.global [%xd+{rows_per_piece * j * X_ROW_BYTES}], [%x{j}], 16;" for j in range(pieces)]
    o += ["cp.async.commit_group;"]

    def body(j: int) -> list[str]:
        """Chunk c, whose words are in sets[j]; chunk c + depth's go to the set chunk c - 1 used."""
        nxt = (j + depth) % (depth + 1)
        b = load_chunk(sets[nxt], counts[nxt], depth) + next_end(depth + 1)
        # zero this warp's buffer (its last reads, two chunks ago, are behind the previous barrier), then scatter
        b += ["add.u32 %t, %zb, %buf;"] + [f"st.shared.v4.b32 [%t+{16 * i}], {{%z, %z, %z, %z}};" for i in range(8)]
        b += ["bar.warp.sync 0xffffffff;", "add.u32 %t, %tb, %buf;"] + _scatter(sets[j], counts[j], "%t")
        # every warp's scatter of chunk c and every copy of x chunk c are done; then x chunk c + 1 to the other
        # x buffer (the barrier also ends every read of that buffer, by chunk c - 1's mma)
        b += ["cp.async.wait_group 0;", "barrier.sync 0;", f"xor.b32 %t, %xbuf, {xtile};", "add.u32 %t, %t, %xd;",
              "add.u32 %t2, %c, 1;", f"setp.lt.u32 %pl, %t2, {c1};"]
        b += [f"@%pl cp.async.cg.shared.global [%t+{rows_per_piece * j * X_ROW_BYTES}], [%x{j}+256], 16;"
              for j in range(pieces)]
        b += [f"add.s64 %x{j}, %x{j}, 256;" for j in range(pieces)]
        b += ["cp.async.commit_group;", "add.u32 %t, %sa, %buf;", "add.u32 %xl, %xs, %xbuf;"]
        b += ldmatrix_mma_chunk("%t", "%xl", nt, ty)
        b += [f"xor.b32 %xbuf, %xbuf, {xtile};", f"xor.b32 %buf, %buf, {TILE_BYTES};", "add.u32 %c, %c, 1;",
              f"setp.ge.u32 %pe, %c, {c1};", "@%pe bra CMMA_END;"]
        return b

    # depth + 1 chunks per loop iteration, so the word registers rotate instead of being copied
    o += ["CMMA_LOOP:"] + [line for j in range(depth + 1) for line in body(j)]
    o += ["bra CMMA_LOOP;", "CMMA_END:", "}"]
    return "\n".join(o)


def cmma_constraints(nt: int) -> str:
    """LLVM constraints: 4 * NT fp32 accumulators, tid; then items, seg_start, x (u64), first row, N, chunks, first
    chunk, end chunk, first token, M, x row stride, element index (u32)."""
    return ",".join(["=f"] * (4 * nt) + ["=r"] + ["l"] * 3 + ["r"] * 9)
