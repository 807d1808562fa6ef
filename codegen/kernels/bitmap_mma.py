"""Tensor-core kernel: decode a bitmap chunk to a dense tile in registers, then tl.dot ("load as sparse,
compute as dense", Flash-LLM).  Y^T[N, M] = W[N, K] @ X^T[K, M]: weight rows are the MMA's big dimension,
tokens the skinny one (padded to 16 in registers only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashllm_compile.codegen.epilogue_spec import Epilogue
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.kernels.bitmap_decode import decode_bitmap_tile, store_output
from flashllm_compile.codegen.kernels.common import TileConfig, interpreting, launch_bitmap_kernel
from flashllm_compile.codegen.kernels.host_math import cdiv, next_power_of_2


def get_bitmap_mma_configs(m: int) -> list[TileConfig]:
    """Tuning space for M tokens: BLOCK_M covers M (>= 16 for the MMA), the rest is searched."""
    block_m = min(64, max(16, next_power_of_2(m)))
    return [
        TileConfig("mma", block_n, block_m, split_k, num_warps, num_stages)
        for block_n in (64, 128)
        for split_k in (1, 2, 4, 8)
        for num_warps, num_stages in ((4, 2), (4, 3), (8, 3))
    ]


@triton.jit
def _bitmap_mma_kernel(
    # pointers
    x_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, res_ptr, out_ptr,
    # sizes and strides
    M, N, K, stride_xm, stride_om, stride_os, chunks_per_split, num_chunks,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    CHUNK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HW_POPC: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]); program (pid_n, pid_s, pid_m) covers rows
    [pid_n*BLOCK_N, +BLOCK_N), tokens [pid_m*BLOCK_M, +BLOCK_M) and chunks of split pid_s.
    With PARTIALS (split-K > 1) it writes fp32 partials out[pid_s, m, n] instead."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.arange(0, CHUNK_K)  # [CHUNK_K]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Fixed trip count (the last split may run past the end: those chunks decode to zeros and read x as 0).
    for i in range(chunks_per_split):
        chunk = pid_s * chunks_per_split + i
        w = decode_bitmap_tile(bitmap_ptr, offsets_ptr, values_ptr, chunk, num_chunks, rows, N,
                               CHUNK_K, BLOCK_N, HW_POPC)
        k_idx = chunk * CHUNK_K + cols
        # xt: [CHUNK_K, BLOCK_M] = X^T tile; padded tokens / columns read as 0
        xt = tl.load(x_ptr + toks[None, :] * stride_xm + k_idx[:, None],
                     mask=(toks[None, :] < M) & (k_idx[:, None] < K), other=0.0)
        if FP32_DOT:
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w, xt)
    store_output(out_ptr, bias_ptr, res_ptr, acc, rows, toks, pid_s, M, N, stride_om, stride_os, HAS_BIAS, PARTIALS,
                 ACT, HAS_RESIDUAL)


def bitmap_mma(x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None, config: TileConfig,
               epilogue: Epilogue | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] (N_out with an epilogue) with the tensor-core kernel. Checks, allocates, launches."""
    # fp32 must not silently become tf32; the interpreter's bf16 dot is wrong (numpy has no bf16), so it
    # upcasts there too. On the GPU, fp16/bf16 use the native tensor-core dot.
    fp32_dot = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
    return launch_bitmap_kernel(_bitmap_mma_kernel, x, fmt, bias, config, grid_m=cdiv(x.shape[0], config.block_m),
                                epilogue=epilogue, FP32_DOT=fp32_dot)
