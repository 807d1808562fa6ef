"""Tensor-core kernel that pays per nonzero: scatter the bitmap chunk into a zeroed shared-memory tile, then
ldmatrix + mma.sync (Flash-LLM's "load as sparse, compute as dense").  The program body is inline PTX
(codegen/kernels/smma_ptx.py); this file is the Triton kernel around it (launch, epilogue, stores) and the launcher.

GPU only (fp16 / bf16, chunk_k = 128): the interpreter cannot run PTX, so this family is offered only on CUDA; on
the CPU the "mma" family (same maths, decode in registers) is the tensor-core path the tests run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flashllm_compile.codegen.epilogue_spec import Epilogue
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.kernels.bitmap_decode import store_fragments
from flashllm_compile.codegen.kernels.common import CompressedWeight, TileConfig, interpreting, launch_bitmap_kernel
from flashllm_compile.codegen.kernels.host_math import cdiv
from flashllm_compile.codegen.kernels.smma_ptx import SMMA_CHUNK_K, SMMA_TYPES, smma_constraints, smma_ptx

SMMA_BLOCK_M = (8, 16)  # tokens per program (1 or 2 n-tiles of 8: shared memory); more M runs more programs
SMMA_MAX_M = 64  # beyond this every 16 tokens re-decode the weight: the unpack / mma families serve larger M


def get_bitmap_smma_configs(m: int) -> list[TileConfig]:
    """Tuning space for M <= SMMA_MAX_M tokens: BLOCK_M 8 or 16, BLOCK_N 32 rows (2 warps: shared memory), split-K."""
    if interpreting() or m > SMMA_MAX_M:
        return []
    block_m = SMMA_BLOCK_M[0] if m <= SMMA_BLOCK_M[0] else SMMA_BLOCK_M[1]
    return [TileConfig("smma", 32, block_m, split_k, 2, 1) for split_k in (1, 2, 4, 8)]


def smma_supported(x: torch.Tensor, fmt: BitmapWeight) -> bool:
    """Whether the PTX kernel can run this call (the tuner only offers the family where it can)."""
    return (x.is_cuda and not interpreting() and str(x.dtype).removeprefix("torch.") in SMMA_TYPES
            and fmt.chunk_k == SMMA_CHUNK_K and fmt.bitmap.data_ptr() % 16 == 0)


@triton.jit
def _bitmap_smma_kernel(
    # pointers
    x_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, res_ptr, out_ptr,
    # sizes and strides
    M, N, K, stride_xm, stride_om, stride_os, chunks_per_split, num_chunks,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    CHUNK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HW_POPC: tl.constexpr,
    ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * W[n, k] (+ epilogue) for rows [pid_n*BLOCK_N, +BLOCK_N), tokens
    [pid_m*BLOCK_M, +BLOCK_M) and the chunks of split pid_s; with PARTIALS fp32 partials out[pid_s, m, n]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    NT: tl.constexpr = BLOCK_M // 8
    # One element per thread, so the PTX runs once in every thread (checked on the compiled layout in the tests).
    # The last input is the end of the values (offsets[C, N - 1] = nnz): copies never read past it.
    # The arange keeps the op a tensor op: with only uniform inputs Triton hoists it to a scalar and splats it.
    idx = tl.arange(0, BLOCK_N * 2)
    zero = idx * 0
    c0 = pid_s * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, num_chunks)
    args = [(bitmap_ptr + zero).to(tl.int64, bitcast=True), (offsets_ptr + zero).to(tl.int64, bitcast=True),
            (values_ptr + zero).to(tl.int64, bitcast=True), (x_ptr + zero).to(tl.int64, bitcast=True),
            zero + pid_n * BLOCK_N, zero + N, zero + num_chunks * (CHUNK_K // 32), zero + c0, zero + c1,
            zero + pid_m * BLOCK_M, zero + M, zero + stride_xm, idx,
            (values_ptr + tl.load(offsets_ptr + num_chunks * N + N - 1) + zero).to(tl.int64, bitcast=True)]
    outs = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(tl.float32,) * (4 * NT) + (tl.int32,),
                                     is_pure=True, pack=1)
    store_fragments(outs, out_ptr, bias_ptr, res_ptr, pid_n, pid_m, pid_s, M, N, stride_om, stride_os, BLOCK_N, BLOCK_M,
                    HAS_BIAS, PARTIALS, ACT, HAS_RESIDUAL)


def bitmap_smma(x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None, config: TileConfig,
                epilogue: Epilogue | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] (N_out with an epilogue) with the scatter + tensor-core kernel.  x is padded to whole
    chunks and kept 16-byte aligned (_whole_chunks)."""
    if not smma_supported(x, fmt):
        raise RuntimeError("the smma kernel needs a CUDA fp16/bf16 x, chunk_k=128 and a 16-byte aligned bitmap "
                           f"(got {x.device} {x.dtype}, chunk_k={fmt.chunk_k})")
    dtype = str(x.dtype).removeprefix("torch.")
    nt = config.block_m // 8
    return launch_bitmap_kernel(_bitmap_smma_kernel, x, fmt, bias, config, grid_m=cdiv(x.shape[0], config.block_m),
                                epilogue=epilogue, prepare_x=lambda x: _whole_chunks(x, fmt),
                                ASM=smma_ptx(config.block_n, nt, dtype), CONSTRAINTS=smma_constraints(nt))


def _whole_chunks(x: torch.Tensor, fmt: CompressedWeight) -> torch.Tensor:
    """x: [M, K] -> [M, C * 128] row-major, 16-byte aligned: the PTX programs (smma, fmma, cmma) copy whole chunks of x
    into shared memory with unmasked 16-byte cp.async (columns past K are zero, as are the weight's)."""
    padded = fmt.num_chunks * SMMA_CHUNK_K
    if padded != fmt.k:
        return F.pad(x, (0, padded - fmt.k))
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 16 else x
