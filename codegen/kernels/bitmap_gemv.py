"""CUDA-core kernel for tiny M (1..8 tokens): decode a bitmap chunk to a dense register tile, then
multiply-accumulate it with each token row on CUDA cores.  No tensor-core padding of M to 16, and the
row reduction is delayed to the end (one cross-lane reduction per program instead of one per chunk)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.kernels.bitmap_decode import decode_bitmap_tile
from flashllm_compile.codegen.kernels.common import TileConfig, check_launch, finish_split_k, interpreting, split_k_plan

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
        row_limit = tl.where(chunk < num_chunks, N, 0)
        w = decode_bitmap_tile(bitmap_ptr, offsets_ptr, values_ptr, chunk, rows, N, row_limit,
                               CHUNK_K, BLOCK_N, HW_POPC)
        k_idx = chunk * CHUNK_K + cols
        # x: [BLOCK_M, CHUNK_K]
        x = tl.load(x_ptr + toks[:, None] * stride_xm + k_idx[None, :],
                    mask=(toks[:, None] < M) & (k_idx[None, :] < K), other=0.0)
        acc3 += w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
    acc = tl.sum(acc3, axis=2)  # [BLOCK_N, BLOCK_M]
    out_mask = (rows[:, None] < N) & (toks[None, :] < M)
    out_offs = pid_s * stride_os + toks[None, :] * stride_om + rows[:, None]
    if not PARTIALS:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, acc, mask=out_mask)


def bitmap_gemv(x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None, config: TileConfig) -> torch.Tensor:
    """x: [M, K] with M <= config.block_m -> [M, N] on CUDA cores. Checks, allocates, launches."""
    check_launch(x, fmt, bias)
    m = x.shape[0]
    if m > config.block_m:
        raise ValueError(f"gemv config covers {config.block_m} tokens, got M={m}")
    x = x.contiguous()
    chunks_per_split, split_k = split_k_plan(fmt, config.split_k)
    if split_k == 1:
        out = torch.empty((m, fmt.n), device=x.device, dtype=x.dtype)
    else:
        out = torch.empty((split_k, m, fmt.n), device=x.device, dtype=torch.float32)
    if m == 0:
        return out if split_k == 1 else out.sum(0).to(x.dtype)
    grid = (triton.cdiv(fmt.n, config.block_n), split_k)
    _bitmap_gemv_kernel[grid](
        x, fmt.bitmap, fmt.offsets, fmt.values, bias if bias is not None else x, out,
        m, fmt.n, fmt.k, x.stride(0), fmt.n, m * fmt.n, chunks_per_split, fmt.num_chunks,
        HAS_BIAS=bias is not None, PARTIALS=split_k > 1, CHUNK_K=fmt.chunk_k,
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, HW_POPC=not interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out if split_k == 1 else finish_split_k(out, bias, x.dtype)
