"""CUDA-core kernel for M = 1..8 that walks the set bits of the bitmap: cost per NONZERO, not per element.

One lane per 32-column bitmap word.  Iteration t handles the t-th set bit of every word at once:
    j    = position of the lowest set bit   (popc((w & -w) - 1))
    acc += values[word_start + t] * x[:, word_col + j]
    w   &= w - 1                            (clear it)
The trip count of a chunk is the largest popcount in the program's block (a uniform scalar), so sparser
weights run proportionally fewer iterations; no dense tile is ever materialised.  This is the ELL
"one row per lane" idea of the kernel notes, on the bitmap format (no column indices to read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.kernels.bitmap_decode import popcount, store_output
from flashllm_compile.codegen.kernels.common import TileConfig, launch_bitmap_kernel

WALK_MAX_M = 8


def get_bitmap_walk_configs(m: int) -> list[TileConfig]:
    """Tuning space for M <= WALK_MAX_M tokens: BLOCK_N rows x (CHUNK_K/32) words = lanes per program."""
    if m > WALK_MAX_M:
        return []
    block_m = triton.next_power_of_2(max(m, 1))
    return [
        TileConfig("walk", block_n, block_m, split_k, num_warps, 1)
        for block_n in (16, 32, 64)
        for split_k in (1, 2, 4, 8)
        for num_warps in (2, 4)
    ]


@triton.jit
def _bitmap_walk_kernel(
    # pointers
    x_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, out_ptr,
    # sizes and strides
    M, N, K, stride_xm, stride_om, stride_os, chunks_per_split, num_chunks,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, CHUNK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HW_POPC: tl.constexpr,
):
    """out[m, n] = sum over nonzeros W[n, k] * x[m, k] (+ bias[n]).

    Lanes are flat "slots" s = (row s // WORDS, word s % WORDS) so the bit walk stays 1-D (no layout
    shuffles through shared memory); acc: [SLOTS, BLOCK_M] fp32, reduced over each row's words at the end."""
    WORDS: tl.constexpr = CHUNK_K // 32
    SLOTS: tl.constexpr = BLOCK_N * WORDS
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    slots = tl.arange(0, SLOTS)
    rows = pid_n * BLOCK_N + slots // WORDS  # [SLOTS]
    word = slots % WORDS  # [SLOTS]
    toks = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    acc = tl.zeros((SLOTS, BLOCK_M), dtype=tl.float32)
    for i in range(chunks_per_split):
        chunk = pid_s * chunks_per_split + i
        row_ok = rows < tl.where(chunk < num_chunks, N, 0)
        words = tl.load(bitmap_ptr + rows * (num_chunks * WORDS) + chunk * WORDS + word, mask=row_ok, other=0).to(tl.uint32,
                                                                                                    bitcast=True)
        counts = popcount(words, HW_POPC)
        # exclusive prefix of counts within each row's WORDS slots
        row_start = tl.load(offsets_ptr + chunk * N + rows, mask=row_ok, other=0)
        inclusive = tl.reshape(tl.cumsum(tl.reshape(counts, (BLOCK_N, WORDS)), 1), (SLOTS,))
        value_ptrs = values_ptr + row_start + inclusive - counts  # [SLOTS]: the word's first value
        x_ptrs = x_ptr + chunk * CHUNK_K + word * 32  # [SLOTS]: x column of the word's bit 0 (token 0)
        for t in range(tl.max(counts, 0)):
            live = words != 0
            j = popcount((words & (0 - words)) - 1, HW_POPC)  # position of the lowest set bit
            v = tl.load(value_ptrs + t, mask=live, other=0.0).to(tl.float32)
            if BLOCK_M == 1:
                xv = tl.load(x_ptrs + j, mask=live, other=0.0).to(tl.float32)
                acc += (v * xv)[:, None]
            else:
                xv = tl.load((x_ptrs + j)[:, None] + toks[None, :] * stride_xm,
                             mask=live[:, None] & (toks[None, :] < M), other=0.0).to(tl.float32)
                acc += v[:, None] * xv
            words = words & (words - 1)
    out = tl.sum(tl.reshape(acc, (BLOCK_N, WORDS, BLOCK_M)), axis=1)  # [BLOCK_N, BLOCK_M]
    out_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    store_output(out_ptr, bias_ptr, out, out_rows, toks, pid_s, M, N, stride_om, stride_os, HAS_BIAS, PARTIALS)


def bitmap_walk(x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None, config: TileConfig) -> torch.Tensor:
    """x: [M, K] with M <= config.block_m -> [M, N], bit-walking CUDA-core kernel. Checks, allocates, launches."""
    if x.dim() == 2 and x.shape[0] > config.block_m:
        raise ValueError(f"walk config covers {config.block_m} tokens, got M={x.shape[0]}")
    return launch_bitmap_kernel(_bitmap_walk_kernel, x, fmt, bias, config)
