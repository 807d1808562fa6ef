"""CUDA-core kernel for M = 1..8 tokens: each lane walks ONE ROW's set bits through a long run of K.

Cost is per nonzero (not per dense element), and the work is balanced: a lane's trip count is the number of
nonzeros of its row segment (hundreds), whose maximum over a program is close to its mean, unlike a walk over
single 32-bit words (a handful of bits each, where the slowest word sets the pace).

Lane (s, r) of a program owns row `pid_n * BLOCK_N + r` and segment s of the program's split of the chunks.
One round of the walk, on every lane at once (a lane with no bit left idles):
    j      = position of the lowest set bit of the current word w     popc((w & -w) - 1)
    acc   += values[vi] * xt[32 * wi + j, :]                          one value, BLOCK_M tokens in one load
    vi    += 1;  w &= w - 1
    if w == 0: wi += 1; w = bitmap[row, wi]                           next word = next address (row-major)
A word with p bits costs p rounds (an empty one, one round); the program runs the maximum over its lanes.
Many lanes per SM (BLOCK_N x SEGMENTS per program, split-K across programs) hide the loads' latency; a 4-deep
FIFO of values loaded ahead was measured slower on the H100 (more instructions per round, no latency gain).
Activations come transposed, xt: [K, BLOCK_M], so one 2..16-byte load fetches a column for every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flashllm_compile.codegen.epilogue_spec import Epilogue
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.kernels.bitmap_decode import popcount, store_output
from flashllm_compile.codegen.kernels.common import (
    TileConfig,
    check_launch,
    finish_split_k,
    interpreting,
    split_k_output,
)

ROWWALK_MAX_M = 8


def get_bitmap_rowwalk_configs(m: int) -> list[TileConfig]:
    """Tuning space for M <= ROWWALK_MAX_M: BLOCK_N rows x SEGMENTS K-segments = lanes (one per thread)."""
    if m > ROWWALK_MAX_M:
        return []
    block_m = triton.next_power_of_2(max(m, 1))
    return [
        TileConfig("rowwalk", block_n, block_m, split_k, block_n * segments // 32, 1, segments)
        for block_n, segments in ((32, 8), (32, 16), (64, 4), (64, 8))
        for split_k in (1, 2, 4, 8)
    ]


@triton.jit
def _bitmap_rowwalk_kernel(
    # pointers
    xt_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, out_ptr,
    # sizes and strides
    M, N, stride_om, stride_os, chunks_per_split, num_chunks,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, CHUNK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, SEGMENTS: tl.constexpr, HW_POPC: tl.constexpr,
):
    """out[m, n] = sum over nonzeros W[n, k] * xt[k, m] (+ bias[n]); lanes [SEGMENTS, BLOCK_N] reduced over
    SEGMENTS at the end.  With PARTIALS (split-K) writes fp32 partials out[pid_s, m, n]."""
    WORDS: tl.constexpr = CHUNK_K // 32
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_ids = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rows = row_ids[None, :]  # [1, BLOCK_N]
    row_ok = rows < N
    bitmap_row = bitmap_ptr + rows * (num_chunks * WORDS)  # [1, BLOCK_N]: start of each row's words
    # Chunks [c_lo, c_hi) of segment s (empty for segments past the end of the split / of the weight).
    split_end = tl.minimum(pid_s * chunks_per_split + chunks_per_split, num_chunks)
    per_segment = tl.cdiv(chunks_per_split, SEGMENTS)
    seg = tl.arange(0, SEGMENTS)[:, None]  # [SEGMENTS, 1]
    c_lo = tl.minimum(pid_s * chunks_per_split + seg * per_segment, split_end)
    c_hi = tl.minimum(c_lo + per_segment, split_end)
    vi = tl.load(offsets_ptr + c_lo * N + rows, mask=row_ok, other=0)  # [SEGMENTS, BLOCK_N]: next value
    nnz = tl.load(offsets_ptr + c_hi * N + rows, mask=row_ok, other=0) - vi
    wi = tl.broadcast_to(c_lo * WORDS, (SEGMENTS, BLOCK_N))  # current word of the row
    w_end = c_hi * WORDS  # [SEGMENTS, 1]

    # Trip count: a word with p bits takes p rounds, an empty word one; the maximum over the program's lanes.
    lane_rounds = nnz
    for c in range(per_segment):
        word_ids = ((c_lo + c) * WORDS)[:, :, None] + tl.arange(0, WORDS)[None, None, :]  # [SEGMENTS, 1, WORDS]
        in_seg = (row_ok & (c_lo + c < c_hi))[:, :, None]
        words = tl.load(bitmap_row[:, :, None] + word_ids, mask=in_seg, other=1)
        lane_rounds += tl.sum((words == 0).to(tl.int32), axis=2)
    rounds = tl.max(tl.max(lane_rounds, axis=1), axis=0)

    # The next bitmap word is loaded one word ahead of its use, so a round rarely waits on it.
    w = tl.load(bitmap_row + wi, mask=row_ok & (wi < w_end), other=0).to(tl.uint32, bitcast=True)
    w_next = tl.load(bitmap_row + wi + 1, mask=row_ok & (wi + 1 < w_end), other=0).to(tl.uint32, bitcast=True)
    toks = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        acc = tl.zeros((SEGMENTS, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((SEGMENTS, BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(rounds):
        live = w != 0
        low = w & (0 - w)
        col = wi * 32 + popcount(low - 1, HW_POPC)  # [SEGMENTS, BLOCK_N]: column of the lowest set bit
        v = tl.load(values_ptr + vi, mask=live, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            acc += v * tl.load(xt_ptr + col, mask=live, other=0.0).to(tl.float32)
        else:
            xv = tl.load(xt_ptr + col[:, :, None] * BLOCK_M + toks[None, None, :], mask=live[:, :, None], other=0.0)
            acc += v[:, :, None] * xv.to(tl.float32)
        vi += live.to(tl.int32)
        w = w ^ low
        advance = (w == 0) & (wi + 1 < w_end)
        wi += advance.to(tl.int32)
        w = tl.where(advance, w_next, w)
        w_next = tl.where(advance, tl.load(bitmap_row + wi + 1, mask=advance & row_ok & (wi + 1 < w_end), other=0).to(
            tl.uint32, bitcast=True), w_next)

    if BLOCK_M == 1:
        out = tl.sum(acc, axis=0)[:, None]  # [BLOCK_N, 1]
    else:
        out = tl.sum(acc, axis=0)  # [BLOCK_N, BLOCK_M]
    store_output(out_ptr, bias_ptr, out, row_ids, toks, pid_s, M, N, stride_om, stride_os, HAS_BIAS, PARTIALS)


def transpose_tokens(x: torch.Tensor, block_m: int) -> torch.Tensor:
    """x: [M, K] -> xt: [K, block_m] contiguous, tokens M..block_m-1 zero (no copy when M == block_m == 1)."""
    m = x.shape[0]
    if m == block_m == 1:
        return x.contiguous()
    return F.pad(x, (0, 0, 0, block_m - m)).t().contiguous() if m < block_m else x.t().contiguous()


def bitmap_rowwalk(x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None, config: TileConfig,
                   epilogue: Epilogue | None = None) -> torch.Tensor:
    """x: [M, K] with M <= config.block_m -> [M, N] (N_out with an epilogue), row-walking CUDA-core kernel.
    Checks, allocates, launches."""
    check_launch(x, fmt, bias)
    m = x.shape[0]
    if m > config.block_m:
        raise ValueError(f"rowwalk config covers {config.block_m} tokens, got M={m}")
    out, chunks_per_split, split_k = split_k_output(x, fmt, config, epilogue)
    partials = out.dim() == 3  # fp32 [S, M, N]: split-K, or an epilogue
    if m == 0:
        return finish_split_k(out, bias, x.dtype, epilogue) if partials else out
    xt = transpose_tokens(x, config.block_m)  # [K, BLOCK_M]
    grid = (triton.cdiv(fmt.n, config.block_n), split_k)
    _bitmap_rowwalk_kernel[grid](
        xt, fmt.bitmap, fmt.offsets, fmt.values, bias if bias is not None else x, out,
        m, fmt.n, fmt.n, m * fmt.n, chunks_per_split, fmt.num_chunks,
        HAS_BIAS=bias is not None, PARTIALS=partials, CHUNK_K=fmt.chunk_k, BLOCK_N=config.block_n,
        BLOCK_M=config.block_m, SEGMENTS=config.segments, HW_POPC=not interpreting(),
        num_warps=config.num_warps, num_stages=1,
    )
    return finish_split_k(out, bias, x.dtype, epilogue) if partials else out
