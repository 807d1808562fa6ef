"""Launcher of the fragment-decode tensor-core kernel (fmma_ptx.py): MMA A-fragments built from the bitmap in
registers, so its cost per dense element does not grow with M (one decode feeds every 8-token tile) and no shared
memory is scattered.  The Triton kernel around the PTX (launch, epilogue, stores) is bitmap_smma's.

GPU only (fp16 / bf16, chunk_k = 128), like smma: the interpreter cannot run PTX.
"""

from __future__ import annotations

import torch

from flashllm_compile.codegen.epilogue_spec import Epilogue
from flashllm_compile.codegen.formats.bitmap import TILE_ROWS, BitmapWeight, values_slack_bytes
from flashllm_compile.codegen.kernels.bitmap_smma import _bitmap_smma_kernel, _whole_chunks, smma_supported
from flashllm_compile.codegen.kernels.common import TileConfig, interpreting, launch_bitmap_kernel
from flashllm_compile.codegen.kernels.fmma_ptx import fmma_ptx, fmma_smem_bytes
from flashllm_compile.codegen.kernels.host_math import cdiv, next_power_of_2
from flashllm_compile.codegen.kernels.launch import pdl_enabled
from flashllm_compile.codegen.kernels.smma_ptx import STATIC_SMEM_MAX, smma_constraints

_bitmap_fmma_kernel = _bitmap_smma_kernel  # the Triton program around the PTX (launch, epilogue, stores) is shared

FMMA_MAX_M = 64  # larger M runs more programs along M, each paying the decode again: the unpack family wins there
FMMA_MAX_BLOCK_M = 32  # 4 tiles of 8 tokens share one decode; x chunks for more do not fit next to the value stages
FMMA_WARPS = (2, 4)  # 16 rows a warp
# TileConfig.num_stages says where x comes from: X_SHARED, each chunk staged once per program in shared memory (two
# buffers, one barrier a chunk), or X_GLOBAL, each warp loading its B fragments from global memory (no barrier:
# measured faster at M = 1, slower from M = 8 on, where the x re-reads miss L1)
X_GLOBAL, X_SHARED = 1, 2
# Split-K counts offered.  3 and 6 fill one wave where powers of two do not: LLaMA-7B gate_up (11008 rows) at 4 warps
# runs 172 programs a split, 516 at split-K 3 where 4 fit on each of the H100's 132 SMs; 1.04x on geo-mean over
# LLaMA-7B's shapes at 50-70%, M = 1..16, up to 1.15x on gate_up (benchmarks/RESULTS.md idea 54)
FMMA_SPLIT_KS = (1, 2, 3, 4, 6, 8)


def fmma_block_m(m: int) -> int:
    """Tokens per program: all of M up to 32 (the decode is paid once per program)."""
    return min(FMMA_MAX_BLOCK_M, max(8, next_power_of_2(m)))


def fmma_config_ok(config: TileConfig) -> bool:
    """Whether the PTX program can be built for `config`: 16 rows a warp, BLOCK_M a multiple of 8 up to
    FMMA_MAX_BLOCK_M, an x mode, and static shared memory under the cap."""
    return (config.block_n == 16 * config.num_warps and config.block_m % 8 == 0
            and 0 < config.block_m <= FMMA_MAX_BLOCK_M and config.num_stages in (X_GLOBAL, X_SHARED)
            and fmma_smem_bytes(config.num_warps, config.block_m // 8, config.num_stages == X_SHARED)
            <= STATIC_SMEM_MAX)


def get_bitmap_fmma_configs(m: int) -> list[TileConfig]:
    """Tuning space for M <= FMMA_MAX_M tokens: 2 or 4 warps (32 / 64 rows) where shared memory allows, x from
    global memory or shared memory, split-K FMMA_SPLIT_KS."""
    if interpreting() or m > FMMA_MAX_M:
        return []
    block_m = fmma_block_m(m)
    x_modes = (X_GLOBAL, X_SHARED) if block_m == 8 else (X_SHARED,)  # from global only pays for one 8-token tile
    configs = [TileConfig("fmma", 16 * warps, block_m, split_k, warps, x_mode) for x_mode in x_modes
               for warps in FMMA_WARPS for split_k in FMMA_SPLIT_KS]
    return [c for c in configs if fmma_config_ok(c)]


def bitmap_fmma(x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None, config: TileConfig,
                epilogue: Epilogue | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] (N_out with an epilogue).  x is padded to whole chunks and kept 16-byte aligned."""
    if not smma_supported(x, fmt):
        raise RuntimeError("the fmma kernel needs a CUDA fp16/bf16 x, chunk_k=128 and a 16-byte aligned bitmap "
                           f"(got {x.device} {x.dtype}, chunk_k={fmt.chunk_k})")
    if not fmma_config_ok(config):
        raise ValueError(f"not an fmma config: {config.short()} (16 rows a warp, BLOCK_M a multiple of 8 up to "
                         f"{FMMA_MAX_BLOCK_M}, num_stages {X_GLOBAL} or {X_SHARED}, shared memory <= "
                         f"{STATIC_SMEM_MAX} bytes)")
    dtype = str(x.dtype).removeprefix("torch.")
    nt, x_smem = config.block_m // 8, config.num_stages == X_SHARED
    bounded = values_slack_bytes(fmt.values) < 16  # e.g. values built by hand or moved: bound every copy
    linear = fmt.tile_rows == TILE_ROWS  # tile-major values: each warp stages its chunk's segment at once
    pdl = pdl_enabled(x.device)
    return launch_bitmap_kernel(_bitmap_fmma_kernel, x, fmt, bias, config, grid_m=cdiv(x.shape[0], config.block_m),
                                epilogue=epilogue, prepare_x=lambda x: _whole_chunks(x, fmt),
                                ASM=fmma_ptx(config.num_warps, nt, dtype, bounded, x_smem, linear, pdl),
                                CONSTRAINTS=smma_constraints(nt), pdl=pdl)
