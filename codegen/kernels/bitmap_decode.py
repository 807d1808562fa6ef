"""Shared Triton device functions: popcount, expanding one chunk of the bitmap format into a dense register
tile, and the output epilogue every kernel family ends with.

`decode_bitmap_tile` is the only place that knows the format's layout (see codegen/formats/bitmap.py).
"""

import triton
import triton.language as tl

from flashllm_compile.codegen.kernels.epilogue import apply_act


@triton.jit
def popcount(words, HW_POPC: tl.constexpr):
    """Population count of uint32 lanes: one POPC instruction on the GPU, SWAR bit tricks in the interpreter."""
    if HW_POPC:
        return tl.extra.cuda.libdevice.popc(words.to(tl.int32, bitcast=True))
    else:
        words = words - ((words >> 1) & 0x55555555)
        words = (words & 0x33333333) + ((words >> 2) & 0x33333333)
        words = (words + (words >> 4)) & 0x0F0F0F0F
        return ((words * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def decode_bitmap_tile(
    bitmap_ptr, offsets_ptr, values_ptr, chunk, num_chunks, rows, N,
    CHUNK_K: tl.constexpr, BLOCK_N: tl.constexpr, HW_POPC: tl.constexpr,
):
    """Dense tile W[rows, chunk*CHUNK_K : (chunk+1)*CHUNK_K] as a [BLOCK_N, CHUNK_K] register tensor.

    rank of element (n, j) in the packed values = offsets[chunk, n]    (start of the row's run in this chunk)
                                                + sum of popc of the row's earlier words  (cumsum, per word)
                                                + popc(word & bits below j)              (per element)
    Rows >= N, and every row of a chunk >= num_chunks (the tail of the last split-K range), decode to zeros.
    The per-word work is shared by 32 elements; per element it is an AND, a POPC,
    an ADD, a bit test and one (L1-hitting, coalesced) gather load.
    """
    WORDS: tl.constexpr = CHUNK_K // 32
    row_ok = rows < tl.where(chunk < num_chunks, N, 0)
    word_ids = tl.arange(0, WORDS)
    # words: [BLOCK_N, WORDS]; bitmap is [N, num_chunks * WORDS], each row's chunk is WORDS contiguous words
    words = tl.load(bitmap_ptr + rows[:, None] * (num_chunks * WORDS) + chunk * WORDS + word_ids[None, :],
                    mask=row_ok[:, None], other=0).to(tl.uint32, bitcast=True)
    counts = popcount(words, HW_POPC)
    word_start = tl.load(offsets_ptr + chunk * N + rows, mask=row_ok, other=0)[:, None] + tl.cumsum(counts, 1) - counts

    # Broadcast per-word data to per-element [BLOCK_N, CHUNK_K].
    words_e = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, WORDS, 32)), (BLOCK_N, CHUNK_K))
    start_e = tl.reshape(tl.broadcast_to(word_start[:, :, None], (BLOCK_N, WORDS, 32)), (BLOCK_N, CHUNK_K))
    lane = (tl.arange(0, CHUNK_K) % 32).to(tl.uint32)
    bit = (tl.full((CHUNK_K,), 1, tl.uint32) << lane)[None, :]  # [1, CHUNK_K], loop invariant
    rank = start_e + popcount(words_e & (bit - 1), HW_POPC)
    return tl.load(values_ptr + rank, mask=(words_e & bit) != 0, other=0.0)


@triton.jit
def store_output(out_ptr, bias_ptr, res_ptr, acc, rows, toks, pid_s, M, N, stride_om, stride_os,
                 HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """acc: fp32 [BLOCK_N, BLOCK_M] for weight rows `rows` [BLOCK_N] and tokens `toks` [BLOCK_M]: store_elements."""
    store_elements(out_ptr, bias_ptr, res_ptr, acc, rows[:, None], toks[None, :], pid_s, M, N, stride_om, stride_os,
                   HAS_BIAS, PARTIALS, ACT, HAS_RESIDUAL)


@triton.jit
def store_elements(out_ptr, bias_ptr, res_ptr, acc, rows, toks, pid_s, M, N, stride_om, stride_os,
                   HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """acc: fp32, element i for weight row rows[i] and token toks[i] (rows / toks broadcast against acc) ->
    out[tok, row] = act(acc + bias[row]) + res[tok, row] in the output dtype (res: [M, N], row stride stride_om);
    with PARTIALS (split-K, or a GLU epilogue) the fp32 partial sums go to out[pid_s, tok, row] instead, and the
    epilogue kernel finishes them (codegen/kernels/epilogue.py)."""
    out_mask = (rows < N) & (toks < M)
    out_offs = pid_s * stride_os + toks * stride_om + rows
    if not PARTIALS:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        acc = apply_act(acc, ACT)
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, acc, mask=out_mask)


@triton.jit
def store_fragments(outs, out_ptr, bias_ptr, res_ptr, pid_n, pid_m, pid_s, M, N, stride_om, stride_os,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr,
                    ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RT: tl.constexpr = 1,
                    WARP_SPLIT: tl.constexpr = False):
    """Store what an inline-PTX tensor-core program returns (smma, fmma, cmma): outs = its 4 NT RT fp32 accumulators
    and %tid.x, where each warp owns RT consecutive 16-row weight tiles; accumulator 4 NT r + q (q < 4 NT) is weight
    row 16 (RT warp + r) + lane / 4 + 8 ((q % 4) / 2) and token 8 (q / 4) + 2 (lane % 4) + q % 2 of the program's
    [BLOCK_N, BLOCK_M] output tile (mma.m16n8k16's D fragment per 8-token tile).  WARP_SPLIT (cmma): every warp
    owns the program's RT tiles and warp 0 holds the sums; the other warps' partial accumulators are not stored."""
    NT: tl.constexpr = BLOCK_M // 8
    tid = outs[4 * NT * RT]
    lane = tid % 32
    if WARP_SPLIT:
        row0 = tl.where(tid < 32, pid_n * BLOCK_N + lane // 4, N)  # row N: masked out
    else:
        row0 = pid_n * BLOCK_N + (tid // 32) * (16 * RT) + lane // 4
    tok0 = pid_m * BLOCK_M + (lane % 4) * 2
    for q in tl.static_range(4 * NT * RT):
        store_elements(out_ptr, bias_ptr, res_ptr, outs[q], row0 + 16 * (q // (4 * NT)) + 8 * ((q % 4) // 2),
                       tok0 + 8 * ((q % (4 * NT)) // 4) + q % 2, pid_s, M, N, stride_om, stride_os, HAS_BIAS,
                       PARTIALS, ACT, HAS_RESIDUAL)
