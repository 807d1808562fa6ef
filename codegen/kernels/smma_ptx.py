"""The scatter + tensor-core kernel's program body as inline PTX, for `tl.inline_asm_elementwise` on a tensor with
one element per thread (so the text runs exactly once in every thread of the program).

Why: a tensor-core decode that expands every dense element in registers costs 13-15 lane-instructions per element
on the H100 (KERNEL_NOTES.md), against a budget of ~5.  Flash-LLM's way costs per nonzero instead: zero a
shared-memory tile, scatter the nonzeros into it, read it back with ldmatrix and run mma.sync.  Triton exposes no
shared-memory scatter, so the whole body is PTX; Triton keeps the launch, the epilogue and the stores.

One program: BLOCK_N = 16 * warps weight rows, 8 * NT tokens, the chunks [c0, c1) of 128 columns.  Per chunk c:
  prefetch  (one chunk ahead) the words of chunk c + 2 load into registers; thread t cp.asyncs its run of chunk
            c + 1's values (the 16-byte blocks covering it) into its private stage.  Values come in as coalesced
            16-byte copies: an earlier version gathered each nonzero from global memory, one L1 line per lane, and
            was L1-bound (H100, qkv 80% M=8: 71 us; with the stage 57 us).
  scatter   thread t owns row t / 2, columns 64 * (t % 2) .. + 63 (two bitmap words) of the tile: it zeroes that
            128-byte half row with 16-byte stores, then walks the set bits of its words from the highest, copying
            value r of its run (r counts down from its count) from the stage to the bit's column, 4 bits a round.
  barrier   (two tile buffers, so one barrier per chunk: a buffer is rewritten two chunks later, after every warp
            has passed the next barrier); then x chunk c + 1 is cp.asynced to the other x buffer.
  mma       warp w computes rows 16 w .. 16 w + 15 of the tile: per pair of k-steps, two ldmatrix.x4 of A (the W
            tile, 16 x 16) and per 8-token tile one ldmatrix.x4 of B (the staged x chunk: [tokens, k] row-major is
            B's column-major layout) and two mma.m16n8k16 with fp32 accumulators.  (B straight from global memory,
            one L1 line per token row per load, cost ~13 us per 8 tokens on qkv.)
Tokens past M are clamped to M - 1 (a B column only feeds its own D column, which is never stored), so no copy is
predicated.  Outputs: the 4 * NT fp32 accumulators, then %tid.x (Triton maps registers to (row, token) from it).
Accumulator q of n-tile t (q = 0..3) is row 16 w + lane / 4 + 8 (q / 2), token 8 t + 2 (lane % 4) + q % 2.

Where it stands (H100, benchmarks/RESULTS.md idea 16): flat in M up to 16 (tensor cores), but bound by shared-memory
wavefronts: the random 16-bit scatter and stage reads conflict 3-4 ways (ncu: L1 75% busy at 8.9% occupancy,
qkv 80% M=16 52 us against cuBLAS 38 us).  The dispatcher picks it only where it measures faster.
"""

from __future__ import annotations

import functools

SMMA_TYPES = {"float16": "f16", "bfloat16": "bf16"}
SMMA_CHUNK_K = 128  # columns per chunk: 4 bitmap words a row, 8 k-steps of 16
ROW_BYTES = 2 * SMMA_CHUNK_K + 16  # a tile row in shared memory, padded 16 bytes: ldmatrix rows hit distinct banks


STAGE_BYTES = 144  # one thread's run of values for one chunk: <= 64 values (128 B) from a 16-byte aligned start
# A thread's two stages, padded so that neighbouring threads' stages start 12 banks apart (304 B = 76 words) instead
# of 8 (288 B, 4 bases a warp).  Measured no faster on the H100 (RESULTS.md idea 16, v5): the scatter's stores, not
# these reads, dominate the bank conflicts.
STAGE_STRIDE = 2 * STAGE_BYTES + 16
THREADS_PER_ROW = 2  # a thread owns 2 of a tile row's 4 bitmap words


STATIC_SMEM_MAX = 48 * 1024  # static shared arrays (the inline PTX declares its own) are capped at 48 KB


def smma_smem_bytes(block_n: int, nt: int) -> int:
    """Shared memory of one program: two [BLOCK_N, 128] weight tiles, two private value stages per thread and two
    x chunks [8 NT, 128]."""
    return 2 * block_n * ROW_BYTES + THREADS_PER_ROW * block_n * STAGE_STRIDE + 2 * 8 * nt * ROW_BYTES


def _thread_run(w: list[str], off: str) -> list[str]:
    """From a chunk's 4 words and row offset: %wa / %wb (the thread's words), %st (its first value index), %cnt."""
    return [f"selp.b32 %wa, {w[2]}, {w[0]}, %ph;", f"selp.b32 %wb, {w[3]}, {w[1]}, %ph;",
            f"popc.b32 %t, {w[0]};", f"popc.b32 %t2, {w[1]};", "add.u32 %t, %t, %t2;", "selp.b32 %t, %t, 0, %ph;",
            f"add.u32 %st, {off}, %t;", "popc.b32 %t, %wa;", "popc.b32 %cnt, %wb;", "add.u32 %cnt, %cnt, %t;",
            # misalignment of the run's first byte; the stage holds the 16-byte blocks from its start
            "mul.lo.u32 %t, %st, 2;", "add.u32 %t, %t, %vlo;", "and.b32 %mis, %t, 15;"]


def _stage_run(stage: str) -> list[str]:
    """cp.async the thread's run (from _thread_run) into its stage: the 16-byte blocks covering it (<= 9).  The last
    block of the values array may end past the allocation: each copy reads at most the bytes left before %ve (the
    end of the values; the rest of its 16 bytes is zero-filled)."""
    o = ["mad.wide.u32 %va, %st, 2, %vp;", "and.b64 %va, %va, -16;", "shl.b32 %t2, %cnt, 1;",
         "add.u32 %t2, %t2, %mis;", "setp.ne.u32 %p1, %cnt, 0;", "sub.s64 %o64, %ve, %va;",
         f"min.u64 %o64, %o64, {STAGE_BYTES};", "cvt.u32.u64 %rem, %o64;"]
    for i in range(STAGE_BYTES // 16):  # a needed block starts before the run's end, so before %ve: 0 < size
        o += [f"setp.gt.and.u32 %pc, %t2, {16 * i}, %p1;", f"sub.u32 %sz, %rem, {16 * i};", "min.u32 %sz, %sz, 16;",
              f"@%pc cp.async.ca.shared.global [{stage}+{16 * i}], [%va+{16 * i}], 16, %sz;"]
    return o


def _stage_x(pieces: int, dst: str) -> list[str]:
    """cp.async this thread's pieces of the x chunk (16 bytes each, rows 4 j apart) to `dst`."""
    return [f"cp.async.ca.shared.global [{dst}+{4 * j * ROW_BYTES}], [%x{j}], 16;" for j in range(pieces)]


WALK_UNROLL = 4  # bits scattered per loop iteration: their shared-memory loads are all in flight before any store


def _walk_word(name: str, word: str, col_base: int) -> list[str]:
    """Scatter the set bits of `word` (columns col_base .. + 31 of the thread's half row), highest first: value r of
    the run (r counts down) is at %lb + 2 r in the stage."""
    top, done = f"{name}_TOP", f"{name}_DONE"
    o = [f"{top}:", f"setp.eq.b32 %pe, {word}, 0;", f"@%pe bra {done};"]
    for u in range(WALK_UNROLL):
        pred = f"@%pu{u} " if u else ""
        o += [f"setp.ne.b32 %pu{u}, {word}, 0;"] if u else []
        o += [f"{pred}bfind.u32 %j{u}, {word};", f"{pred}shl.b32 %m, 1, %j{u};", f"{pred}xor.b32 {word}, {word}, %m;",
              f"{pred}add.s32 %cnt, %cnt, -1;", f"{pred}mad.lo.u32 %la, %cnt, 2, %lb;",
              f"{pred}ld.shared.b16 %h{u}, [%la];"]
    for u in range(WALK_UNROLL):
        pred = f"@%pu{u} " if u else ""
        o += [f"{pred}mad.lo.u32 %ad, %j{u}, 2, %sb;", f"{pred}st.shared.b16 [%ad+{2 * col_base}], %h{u};"]
    return o + [f"bra {top};", f"{done}:"]


def load_words(w: list[str], off: str, pred: str, bp: str = "%bp", opp: str = "%opp") -> list[str]:
    """Load a chunk's 4 bitmap words of a row (16 bytes at `bp`) and its offset (at `opp`); zeros where `pred` is
    false."""
    return [f"mov.b32 {r}, 0;" for r in (*w, off)] + [
        f"@{pred} ld.global.nc.v4.b32 {{{', '.join(w)}}}, [{bp}];", f"@{pred} ld.global.nc.b32 {off}, [{opp}];"]


def ldmatrix_mma_chunk(tile: str, x: str, nt: int, ty: str, rt: int = 1, tile_stride: int = 0,
                       x_odd: str | None = None, x_row_bytes: int = ROW_BYTES) -> list[str]:
    """One 128-column chunk on the tensor cores: per pair of k-steps and per weight tile r < `rt` (this lane's address
    in `tile` + r `tile_stride`, rows ROW_BYTES apart) two ldmatrix.x4 into %a / %e, and per 8-token tile i one
    ldmatrix.x4 of the x chunk (at `x`, or at `x_odd` for odd pairs of k-steps when given; token rows `x_row_bytes`
    apart; loaded once for all rt tiles) and two mma.m16n8k16 accumulating into $4 (NT r + i) .. + 3 (`ty`: f16 /
    bf16).  B fragments: %b0..3 when rt = 1, else %b(4 i) .. %b(4 i + 3) (the caller declares %b<4 NT>)."""
    o = []
    for p in range(SMMA_CHUNK_K // 32):  # k-steps 2 p and 2 p + 1
        xp = x_odd if x_odd and p % 2 else x
        for r in range(rt):
            a = r * tile_stride + 64 * p
            o += [f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{%a0, %a1, %a2, %a3}}, [{tile}+{a}];",
                  f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{%e0, %e1, %e2, %e3}}, [{tile}+{a + 32}];"]
            for i in range(nt):
                b = [f"%b{q if rt == 1 else 4 * i + q}" for q in range(4)]
                d = ", ".join(f"${4 * (nt * r + i) + q}" for q in range(4))
                mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{d}}}"
                if r == 0:
                    o.append(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(b)}}}, "
                             f"[{xp}+{8 * i * x_row_bytes + 64 * p}];")
                o += [f"{mma}, {{%a0, %a1, %a2, %a3}}, {{{b[0]}, {b[1]}}}, {{{d}}};",
                      f"{mma}, {{%e0, %e1, %e2, %e3}}, {{{b[2]}, {b[3]}}}, {{{d}}};"]
    return o


@functools.cache
def smma_ptx(block_n: int, nt: int, dtype: str) -> str:
    """PTX of one program (see the module docstring) for BLOCK_N rows (BLOCK_N / 16 warps), NT 8-token tiles and a
    torch dtype name in SMMA_TYPES."""
    ty = SMMA_TYPES[dtype]
    tile = block_n * ROW_BYTES
    threads = THREADS_PER_ROW * block_n
    acc = 4 * nt
    # operands: $0..$acc-1 accumulators, $acc tid, then the inputs
    bm, op, vp, xp, n0, nn, kw, c0, c1, t0, mm, sx, _, ve = (f"${acc + 1 + i}" for i in range(14))
    wa, wb, wc = ([f"%{p}w{i}" for i in range(4)] for p in "abc")  # words of chunks c, c + 1, c + 2
    xtile = 8 * nt * ROW_BYTES  # x chunk [8 NT tokens, 128] in shared memory
    pieces = 8 * nt * (SMMA_CHUNK_K * 2 // 16) // threads  # 16-byte pieces of the x chunk per thread
    o = ["{", f".shared .align 16 .b8 flx_w[{2 * tile}];", f".shared .align 16 .b8 flx_v[{threads * STAGE_STRIDE}];",
         f".shared .align 16 .b8 flx_x[{2 * xtile}];",
         ".reg .pred %pe, %p1, %pc, %prow, %ph, %pl, %pu<4>;",
         ".reg .b32 %th, %lane, %warp, %r, %h, %n, %z, %c, %buf, %t, %t2, %sw, %ss, %sa, %sb, %ad, %m, %j<4>;",
         ".reg .b32 %st, %cnt, %mis, %vlo, %stg, %lb, %la, %sbuf, %aoff, %boff, %coff, %wa, %wb, %tok, %a<4>, %e<4>;",
         ".reg .b32 " + ", ".join(wa + wb + wc) + ";", ".reg .b16 %h<4>;",
         ".reg .b32 %xs, %xd, %xl, %xbuf, %b<4>;",
         ".reg .b32 %rem, %sz;", ".reg .b64 %va, %vp, %ve, %bp, %opp, %o64, %n4, " + ", ".join(f"%x{i}" for i in range(pieces)) + ";"]
    o += [f"mov.f32 ${i}, 0f00000000;" for i in range(acc)]
    o += ["mov.u32 %th, %tid.x;", f"mov.u32 ${acc}, %th;", "and.b32 %lane, %th, 31;", "shr.u32 %warp, %th, 5;",
          f"mov.b64 %vp, {vp};", f"mov.b64 %ve, {ve};", "cvt.u32.u64 %vlo, %vp;", "mov.b32 %z, 0;", "mov.u32 %sw, flx_w;",
          "mov.u32 %stg, flx_v;", f"mad.lo.u32 %stg, %th, {STAGE_STRIDE}, %stg;",
          # scatter role: row r = tid / 2 of the tile (global row n), half h = tid % 2
          "shr.u32 %r, %th, 1;", "and.b32 %h, %th, 1;", f"add.u32 %n, {n0}, %r;", f"setp.lt.u32 %prow, %n, {nn};",
          "setp.ne.u32 %ph, %h, 0;",
          f"mad.lo.u32 %ss, %r, {ROW_BYTES}, %sw;", "mad.lo.u32 %ss, %h, 128, %ss;",
          # bitmap words of row n, chunk c0: bm + 4 * (n * KW + 4 * c0); offsets[c0, n]: op + 4 * (c0 * N + n)
          f"mul.wide.u32 %o64, %n, {kw};", "shl.b64 %o64, %o64, 2;", f"add.s64 %bp, {bm}, %o64;",
          f"mul.wide.u32 %o64, {c0}, 16;", "add.s64 %bp, %bp, %o64;",
          f"mad.lo.u32 %t, {c0}, {nn}, %n;", "mul.wide.u32 %o64, %t, 4;", f"add.s64 %opp, {op}, %o64;",
          f"mul.wide.u32 %n4, {nn}, 4;",
          # ldmatrix.x4 address of this lane: row 16 warp + lane % 8 + 8 ((lane / 8) % 2), column 8 (lane / 16)
          "and.b32 %t, %lane, 7;", "bfe.u32 %t2, %lane, 3, 1;", "mad.lo.u32 %t, %t2, 8, %t;",
          "mad.lo.u32 %t, %warp, 16, %t;", f"mul.lo.u32 %t, %t, {ROW_BYTES};", "shr.u32 %t2, %lane, 4;",
          "mad.lo.u32 %t, %t2, 16, %t;", "add.u32 %sa, %sw, %t;",
          # ldmatrix.x4 address of B (x chunk) for k-steps 2 p, 2 p + 1 of n-tile i: token row 8 i + lane % 8,
          # column 8 (lane / 8) (+ 32 p, + 8 i rows as immediates)
          "and.b32 %t, %lane, 7;", f"mul.lo.u32 %t, %t, {ROW_BYTES};", "shr.u32 %t2, %lane, 3;",
          "mad.lo.u32 %t, %t2, 16, %t;", "mov.u32 %xs, flx_x;", "add.u32 %xs, %xs, %t;",
          # x pieces this thread copies: rows tid / 16 + 4 j of the chunk (token t0 + row, clamped to M - 1),
          # 16 bytes at column 8 (tid % 16); source pointers advance 256 bytes a chunk
          "and.b32 %t, %th, 15;", "shr.u32 %t2, %th, 4;", "shl.b32 %t, %t, 4;", f"mad.lo.u32 %xd, %t2, {ROW_BYTES}, %t;", "mov.u32 %t, flx_x;", "add.u32 %xd, %xd, %t;",
          f"add.u32 %m, {mm}, -1;"]
    for j in range(pieces):
        o += [f"add.u32 %tok, {t0}, %t2;", f"add.u32 %tok, %tok, {4 * j};", "min.u32 %tok, %tok, %m;",
              f"mul.lo.u32 %tok, %tok, {sx};", f"mad.lo.u32 %tok, {c0}, 128, %tok;", "mul.wide.u32 %o64, %tok, 2;",
              f"add.s64 %x{j}, {xp}, %o64;", "and.b32 %tok, %th, 15;", "mul.wide.u32 %o64, %tok, 16;",
              f"add.s64 %x{j}, %x{j}, %o64;"]
    # prologue: words of chunks c0 (a) and c0 + 1 (b); chunk c0's values on their way to stage 0
    o += ["mov.u32 %buf, 0;", "mov.u32 %sbuf, 0;", f"mov.u32 %c, {c0};", f"setp.ge.u32 %pe, %c, {c1};",
          "@%pe bra SMMA_END;"]
    o += load_words(wa, "%aoff", "%prow")
    o += ["add.u32 %t, %c, 1;", f"setp.lt.u32 %pl, %t, {c1};", "and.pred %pl, %pl, %prow;",
          "add.s64 %bp, %bp, 16;", "add.s64 %opp, %opp, %n4;"]
    o += load_words(wb, "%boff", "%pl")
    o += _thread_run(wa, "%aoff") + _stage_run("%stg") + _stage_x(pieces, "%xd") + ["cp.async.commit_group;",
                                                                                   "mov.u32 %xbuf, 0;"]
    o += ["SMMA_LOOP:",
          # words of chunk c + 2 on their way; chunk c + 1's values on their way to the other stage
          "add.u32 %t, %c, 2;", f"setp.lt.u32 %pl, %t, {c1};", "and.pred %pl, %pl, %prow;",
          "add.s64 %bp, %bp, 16;", "add.s64 %opp, %opp, %n4;"]
    o += load_words(wc, "%coff", "%pl")
    o += ["add.u32 %t, %c, 1;", f"setp.lt.u32 %pl, %t, {c1};", "xor.b32 %t, %sbuf, " + str(STAGE_BYTES) + ";",
          "add.u32 %lb, %stg, %t;", "@!%pl bra SMMA_STAGED;"]
    o += _thread_run(wb, "%boff") + _stage_run("%lb")
    o += ["SMMA_STAGED:", "cp.async.commit_group;", "cp.async.wait_group 1;",
          # zero this thread's half row of the tile buffer, then scatter chunk c from its stage
          "add.u32 %ad, %ss, %buf;"]
    o += [f"st.shared.v4.b32 [%ad+{16 * i}], {{%z, %z, %z, %z}};" for i in range(8)]
    o += _thread_run(wa, "%aoff") + ["add.u32 %lb, %stg, %sbuf;", "add.u32 %lb, %lb, %mis;",
                                     "add.u32 %sb, %ss, %buf;"]
    o += _walk_word("SMMA_WB", "%wb", 32) + _walk_word("SMMA_WA", "%wa", 0)
    # every thread's scatter of chunk c and its copies of x chunk c are done; then x chunk c + 1 to the other x
    # buffer (the barrier also ends every read of that buffer, by chunk c - 1's mma)
    o += ["barrier.sync 0;", "bar.warp.sync 0xffffffff;", "add.u32 %ad, %sa, %buf;",
          f"xor.b32 %t, %xbuf, {xtile};", "add.u32 %t, %t, %xd;", "add.u32 %t2, %c, 1;", f"setp.lt.u32 %pl, %t2, {c1};"]
    o += [f"@%pl cp.async.ca.shared.global [%t+{4 * j * ROW_BYTES}], [%x{j}+256], 16;" for j in range(pieces)]
    o += [f"add.s64 %x{j}, %x{j}, 256;" for j in range(pieces)]
    o += ["cp.async.commit_group;", "add.u32 %xl, %xs, %xbuf;"] + ldmatrix_mma_chunk("%ad", "%xl", nt, ty)
    o += [f"xor.b32 %xbuf, %xbuf, {xtile};"]
    o += [f"mov.b32 {a}, {b};" for a, b in zip(wa + ["%aoff"] + wb + ["%boff"], wb + ["%boff"] + wc + ["%coff"])]
    o += [f"xor.b32 %buf, %buf, {tile};", f"xor.b32 %sbuf, %sbuf, {STAGE_BYTES};", "add.u32 %c, %c, 1;",
          f"setp.lt.u32 %pe, %c, {c1};", "@%pe bra SMMA_LOOP;", "SMMA_END:", "}"]
    return "\n".join(o)


def smma_constraints(nt: int) -> str:
    """LLVM constraints: 4 * NT fp32 accumulators, tid; then bitmap, offsets, values, x (u64), first row, N, words
    per row, first chunk, end chunk, first token, M, x row stride, element index (u32; unused by the PTX), end of the
    values (u64)."""
    return ",".join(["=f"] * (4 * nt) + ["=r"] + ["l"] * 4 + ["r"] * 9 + ["l"])
