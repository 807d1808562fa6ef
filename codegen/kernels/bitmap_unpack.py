"""Prefill path without a dense copy of the weight: expand the bitmap format to a dense [N, K] weight in a
scratch buffer (one Triton pass: read the compressed bytes once, write 2 bytes per element), then cuBLAS.

For large M the GEMM dominates (2*M*N*K flops against N*K*(0.5 + 2) bytes of unpacking), so this stays close to
dense time where the tensor-core decode kernel, which re-decodes every tile for every M block, does not.  The
scratch buffer lives only for the call (the caching allocator reuses it across layers of the same shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flashllm_compile.codegen.epilogue_spec import Epilogue
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.kernels.bitmap_decode import decode_bitmap_tile
from flashllm_compile.codegen.kernels.common import TileConfig, check_launch, finish_split_k, interpreting
from flashllm_compile.codegen.kernels.host_math import cdiv
from flashllm_compile.codegen.kernels.launch import launch

UNPACK_MIN_M = 16  # below this the row walk / tensor-core kernels (or the kept dense weight) are the candidates


def get_bitmap_unpack_configs(m: int) -> list[TileConfig]:
    """Tuning space of the unpack pass for M tokens (the GEMM after it is cuBLAS's own choice)."""
    if m < UNPACK_MIN_M:
        return []
    return [TileConfig("unpack", block_n, m, 1, num_warps, 1) for block_n, num_warps in ((32, 4), (64, 4), (64, 8))]


@triton.jit
def _bitmap_unpack_kernel(
    # pointers
    bitmap_ptr, offsets_ptr, values_ptr, out_ptr,
    # sizes
    N, K, num_chunks,
    # meta-parameters
    CHUNK_K: tl.constexpr, BLOCK_N: tl.constexpr, HW_POPC: tl.constexpr,
):
    """out[n, k] = W[n, k] for rows [pid_n*BLOCK_N, +BLOCK_N) and chunk pid_c (out: [N, K] row-major)."""
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = chunk * CHUNK_K + tl.arange(0, CHUNK_K)  # [CHUNK_K]
    w = decode_bitmap_tile(bitmap_ptr, offsets_ptr, values_ptr, chunk, num_chunks, rows, N, CHUNK_K, BLOCK_N, HW_POPC)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w, mask=(rows[:, None] < N) & (cols[None, :] < K))


def unpack_weight(fmt: BitmapWeight, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """The dense [N, K] weight of `fmt`, expanded on the GPU (or in the interpreter) in one pass."""
    out = torch.empty(fmt.n, fmt.k, device=fmt.values.device, dtype=fmt.dtype)
    if out.numel():
        grid = (cdiv(fmt.n, block_n), fmt.num_chunks)
        launch(_bitmap_unpack_kernel, grid, (fmt.bitmap, fmt.offsets, fmt.values, out, fmt.n, fmt.k, fmt.num_chunks),
               CHUNK_K=fmt.chunk_k, BLOCK_N=block_n, HW_POPC=not interpreting(), num_warps=num_warps)
    return out


def bitmap_unpack(x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None, config: TileConfig,
                  epilogue: Epilogue | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N]: unpack the weight into a scratch buffer, then F.linear (cuBLAS); with an epilogue, the
    epilogue kernel on its output (bias added there, in fp32) -> [M, N_out]. Checks, launches."""
    check_launch(x, fmt, bias)
    weight = unpack_weight(fmt, config.block_n, config.num_warps)  # [N, K]
    if epilogue is None:
        return F.linear(x, weight, bias)
    return finish_split_k(F.linear(x, weight)[None], bias, x.dtype, epilogue)
