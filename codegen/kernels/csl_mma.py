"""Launcher of the Tiled-CSL tensor-core kernel (cmma_ptx.py): the Triton program around the PTX (launch, epilogue,
stores) and the tuning space.  GPU only (fp16 / bf16), like fmma: the interpreter cannot run PTX.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashllm_compile.codegen.epilogue_spec import Epilogue
from flashllm_compile.codegen.formats.csl import CSL_ROWS, CslWeight
from flashllm_compile.codegen.kernels.bitmap_decode import store_fragments
from flashllm_compile.codegen.kernels.bitmap_smma import _whole_chunks
from flashllm_compile.codegen.kernels.cmma_ptx import cmma_config_ok, cmma_constraints, cmma_ptx
from flashllm_compile.codegen.kernels.common import (
    TileConfig,
    check_launch,
    finish_split_k,
    in_kernel_epilogue,
    interpreting,
    split_k_output,
)
from flashllm_compile.codegen.kernels.host_math import cdiv, next_power_of_2
from flashllm_compile.codegen.kernels.smma_ptx import SMMA_TYPES

CMMA_DEPTHS = (1,)  # TileConfig.num_stages: chunks between a chunk's word loads and its scatter (2 measured the
# same on the H100, within 2%, with more registers)
CMMA_MAX_M = 64  # decode sizes: the compile-time dispatch offers the format up to here (beyond, every 32 tokens
# scatter the tile again and cuBLAS wins)
CMMA_MAX_GROUPS = 32  # word registers a lane may hold per chunk (x depth + 1): more would spill (50% sparsity needs
# ~40, where the format moves as many bytes as dense anyway)
CMMA_MAX_BLOCK_M = 32  # 4 tiles of 8 tokens share one scatter (more: x chunks no longer fit next to the tiles)


@triton.jit
def _csl_mma_kernel(
    x_ptr, items_ptr, seg_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, stride_xm, stride_om, stride_os, chunks_per_split, num_chunks,
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * W[n, k] (+ epilogue) for rows [pid_n*BLOCK_N, +BLOCK_N), tokens
    [pid_m*BLOCK_M, +BLOCK_M) and the chunks of split pid_s; with PARTIALS fp32 partials out[pid_s, m, n]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    NT: tl.constexpr = BLOCK_M // 8
    # One element per thread (BLOCK_N / 16 warps of 32), so the PTX runs once in every thread.
    idx = tl.arange(0, BLOCK_N * 2)
    zero = idx * 0
    c0 = pid_s * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, num_chunks)
    args = [(items_ptr + zero).to(tl.int64, bitcast=True), (seg_ptr + zero).to(tl.int64, bitcast=True),
            (x_ptr + zero).to(tl.int64, bitcast=True), zero + pid_n * BLOCK_N, zero + N, zero + num_chunks,
            zero + c0, zero + c1, zero + pid_m * BLOCK_M, zero + M, zero + stride_xm, idx]
    outs = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(tl.float32,) * (4 * NT) + (tl.int32,),
                                     is_pure=True, pack=1)
    store_fragments(outs, out_ptr, bias_ptr, res_ptr, pid_n, pid_m, pid_s, M, N, stride_om, stride_os, BLOCK_N, BLOCK_M,
                    HAS_BIAS, PARTIALS, ACT, HAS_RESIDUAL)


def cmma_block_m(m: int) -> int:
    return min(CMMA_MAX_BLOCK_M, max(8, next_power_of_2(m)))


def cmma_default_config(m: int) -> TileConfig:
    """Untuned choice (autotune off, or M first seen inside a CUDA-graph capture): the H100 tuner's most frequent
    pick on LLaMA-7B shapes at 80-90% (benchmarks/RESULTS.md, eighth session): 4 warps up to M = 16, then 2."""
    return TileConfig("cmma", 64 if m <= 16 else 32, cmma_block_m(m), 2, 4 if m <= 16 else 2, 1)


def get_csl_mma_configs(m: int) -> list[TileConfig]:
    """Tuning space: 2 or 4 warps (16 rows each) where shared memory allows, split-K 1..8; BLOCK_M up to 32 (larger M
    runs more programs along M, each scattering the tile again)."""
    if interpreting():
        return []
    block_m = cmma_block_m(m)
    return [TileConfig("cmma", 16 * warps, block_m, split_k, warps, depth) for warps in (2, 4)
            for split_k in (1, 2, 4, 8) for depth in CMMA_DEPTHS if cmma_config_ok(warps, block_m // 8)]


def csl_mma(x: torch.Tensor, fmt: CslWeight, bias: torch.Tensor | None, config: TileConfig,
            epilogue: Epilogue | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] (N_out with an epilogue)."""
    if not (x.is_cuda and not interpreting() and str(x.dtype).removeprefix("torch.") in SMMA_TYPES):
        raise RuntimeError(f"the cmma kernel needs a CUDA fp16/bf16 x, got {x.device} {x.dtype}")
    check_launch(x, fmt, bias)
    nt = config.block_m // 8
    if config.block_n != CSL_ROWS * config.num_warps or not cmma_config_ok(config.num_warps, nt):
        raise ValueError(f"not a cmma config: {config.short()}")
    if fmt.max_groups > CMMA_MAX_GROUPS:
        raise ValueError(f"cmma holds at most {CMMA_MAX_GROUPS} words a lane per chunk; this weight needs "
                         f"{fmt.max_groups} (too dense for the Tiled-CSL format)")
    x = _whole_chunks(x, fmt)  # [M, C * 128], 16-byte aligned
    m = x.shape[0]
    out, per_split, split_k = split_k_output(x, fmt, config, epilogue)
    partials = out.dim() == 3
    if m == 0:
        return finish_split_k(out, bias, x.dtype, epilogue) if partials else out
    act, residual = in_kernel_epilogue(epilogue, partials, m, fmt.n)
    grid = (cdiv(fmt.n, config.block_n), split_k, cdiv(m, config.block_m))
    _csl_mma_kernel[grid](
        x, fmt.items, fmt.seg_start, bias if bias is not None else x, residual if residual is not None else x, out,
        m, fmt.n, x.stride(0), fmt.n, m * fmt.n, per_split, fmt.num_chunks,
        HAS_BIAS=bias is not None, PARTIALS=partials, ACT=act, HAS_RESIDUAL=residual is not None,
        BLOCK_N=config.block_n, BLOCK_M=config.block_m,
        ASM=cmma_ptx(config.num_warps, nt, str(x.dtype).removeprefix("torch."), fmt.max_groups,
                     config.num_stages),
        CONSTRAINTS=cmma_constraints(nt), num_warps=config.num_warps, num_stages=1,
    )
    return finish_split_k(out, bias, x.dtype, epilogue) if partials else out
