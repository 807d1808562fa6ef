"""CUDA-core kernel for tiny M (1..8 tokens): decode a bitmap chunk to a dense register tile, then
multiply-accumulate it with each token row on CUDA cores.  No tensor-core padding of M to 16, and the
row reduction is delayed to the end (one cross-lane reduction per program instead of one per chunk)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.kernels.bitmap_decode import decode_bitmap_tile, store_output
from flashllm_compile.codegen.kernels.common import TileConfig, launch_bitmap_kernel

GEMV_MAX_M = 8


def get_bitmap_gemv_configs(m: int) -> list[TileConfig]:
    """Tuning space for M <= GEMV_MAX_M tokens (BLOCK_M = next power of two >= M)."""
    if m > GEMV_MAX_M:
        return []
    block_m = triton.next_power_of_2(max(m, 1))
    block_ns = (16, 32) if block_m >= 4 else (16, 32, 64)
    return [
        TileConfig("gemv", block_n, block_m, split_k, num_warps, num_stages)
        for block_n in block_ns
        for split_k in (1, 2, 4, 8)
        for num_warps, num_stages in ((4, 2), (4, 3))
    ]


@triton.jit
def _bitmap_gemv_kernel(
    # pointers
    x_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, out_ptr,
    # sizes and strides
    M, N, K, stride_xm, stride_om, stride_os, chunks_per_split, num_chunks,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, CHUNK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HW_POPC: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for all M (<= BLOCK_M) tokens in one program.
    acc3[n, m, j] accumulates products of column j of every chunk; summed over j once at the end."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    toks = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.arange(0, CHUNK_K)  # [CHUNK_K]
    acc3 = tl.zeros((BLOCK_N, BLOCK_M, CHUNK_K), dtype=tl.float32)
    # Fixed trip count (the last split may run past the end: those chunks decode to zeros and read x as 0).
    for i in range(chunks_per_split):
        chunk = pid_s * chunks_per_split + i
        w = decode_bitmap_tile(bitmap_ptr, offsets_ptr, values_ptr, chunk, num_chunks, rows, N,
                               CHUNK_K, BLOCK_N, HW_POPC)
        k_idx = chunk * CHUNK_K + cols
        # x: [BLOCK_M, CHUNK_K]
        x = tl.load(x_ptr + toks[:, None] * stride_xm + k_idx[None, :],
                    mask=(toks[:, None] < M) & (k_idx[None, :] < K), other=0.0)
        acc3 += w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
    acc = tl.sum(acc3, axis=2)  # [BLOCK_N, BLOCK_M]
    store_output(out_ptr, bias_ptr, acc, rows, toks, pid_s, M, N, stride_om, stride_os, HAS_BIAS, PARTIALS)


def bitmap_gemv(x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None, config: TileConfig) -> torch.Tensor:
    """x: [M, K] with M <= config.block_m -> [M, N] on CUDA cores. Checks, allocates, launches."""
    if x.dim() == 2 and x.shape[0] > config.block_m:
        raise ValueError(f"gemv config covers {config.block_m} tokens, got M={x.shape[0]}")
    return launch_bitmap_kernel(_bitmap_gemv_kernel, x, fmt, bias, config)
