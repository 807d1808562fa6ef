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
from flashllm_compile.codegen.kernels.launch import launch, pdl_enabled
from flashllm_compile.codegen.kernels.smma_ptx import SMMA_TYPES

CMMA_DEPTHS = (1,)  # TileConfig.num_stages: chunks between a chunk's word loads and its scatter (2 measured the
# same on the H100, within 2%, with more registers; 2 and 3 measured 10-16% slower on geo-mean even with every
# segment bound prefetched: benchmarks/RESULTS.md idea 28 -- the words already stream at HBM speed)
CMMA_MAX_M = 64  # decode sizes: the compile-time dispatch offers the format up to here (beyond, every 64 tokens
# scatter the tile again; at M = 64 cuBLAS already wins below ~90% sparsity)
CMMA_MAX_GROUPS = 32  # word registers a lane may hold per chunk and weight tile (x depth + 1): more would spill
# (50% sparsity needs ~40, where the format moves as many bytes as dense anyway)
CMMA_MAX_BLOCK_M = 64  # 8 tiles of 8 tokens share one scatter
# (warps, weight tiles a warp) to tune; (1, 2), (1, 4), (2, 4) measured 7-25% slower than the best (H100, LLaMA-7B,
# 70-90%, M = 1..64: benchmarks/RESULTS.md, ninth session)
CMMA_SHAPES = ((2, 1), (4, 1), (2, 2), (4, 2))
# word loads / scatters guarded by a predicate a group (False), or entered by an indirect jump (True): neither wins
# everywhere (H100, benchmarks/RESULTS.md idea 33: the jump +2-15% at M >= 8 and at 80-90%, 0.44-0.75x at 70% M = 1,
# twelfth session).  Up to M = 16 only the jump is offered now: every config timed at 24 points (LLaMA-7B, 70-90%,
# M = 1 / 8, sixteenth session) had a jump config fastest at each (the best guarded one 1.055x slower on geo-mean),
# and the tuner picked one at 223 of 226 cmma points with M <= 16 in the fifteenth to seventeenth sessions' benches.
# Half the candidates to compile and time there (RESULTS.md idea 47).
CMMA_JUMPS = (False, True)
CMMA_JUMP_ONLY_MAX_M = 16
# The program's warps splitting its chunks (warp_split: no fp32 partials, no epilogue kernel, no block barrier a
# chunk; each warp copies its own x) next to split-K 1 or 2 over programs.  H100, LLaMA-7B, 70-90%, best against
# best (benchmarks/RESULTS.md idea 42): M = 1..8 1.02-1.03x on geo-mean, up to 1.17x (qkv 80% M = 4); M = 16 0.96x,
# M = 32 0.90x (every warp copies and reads the whole x chunk), so only offered up to M = 16.  Timed as in a decode
# step (each call after another kernel, idea 43) they win more: the tuner picked them at all 60 cmma points up to
# M = 16, and a layer's four linears in context ran 1.01-1.07x faster than with the tuner's picks without them.
CMMA_WARP_SPLIT_KS = (1, 2)
CMMA_WARP_SPLIT_MAX_M = 16
# Split-K over programs.  Beyond M = 16 also 3 and 6, which fill one wave where powers of two do not (LLaMA-7B
# gate_up, 11008 rows): H100, LLaMA-7B at 70-90%, M = 32 / 64, 1.026 / 1.019x on geo-mean, gate_up at 90% 1.16 /
# 1.19x; up to M = 16 no gain (0.99-1.00x), so not offered there (benchmarks/RESULTS.md idea 55)
CMMA_SPLIT_KS, CMMA_WIDE_SPLIT_KS = (1, 2, 4, 8), (1, 2, 3, 4, 6, 8)


def cmma_words_ok(rt: int, nt: int, max_groups: int) -> bool:
    """Whether a warp owning `rt` tiles, with NT token tiles, holds a weight's `max_groups` words a tile: at most 32
    word registers a chunk over its tiles, 24 for two tiles next to 8 token tiles (ptxas spills beyond, with the
    in-kernel epilogue: checked offline, tests/test_csl.py).  Two tiles of a 70% weight (48 words) compile without
    spills but measured no faster (H100, benchmarks/RESULTS.md idea 22), so they are not offered."""
    return max_groups <= CMMA_MAX_GROUPS and rt * max_groups <= (24 if nt > 4 and rt > 1 else 32)


@triton.jit
def _csl_mma_kernel(
    x_ptr, items_ptr, seg_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, stride_xm, stride_om, stride_os, chunks_per_split, num_chunks,
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, RT: tl.constexpr, THREADS: tl.constexpr, WARP_SPLIT: tl.constexpr,
    ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * W[n, k] (+ epilogue) for rows [pid_n*BLOCK_N, +BLOCK_N), tokens
    [pid_m*BLOCK_M, +BLOCK_M) and the chunks of split pid_s; with PARTIALS fp32 partials out[pid_s, m, n]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    NT: tl.constexpr = BLOCK_M // 8
    # One element per thread, so the PTX runs once in every thread.
    idx = tl.arange(0, THREADS)
    zero = idx * 0
    c0 = pid_s * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, num_chunks)
    args = [(items_ptr + zero).to(tl.int64, bitcast=True), (seg_ptr + zero).to(tl.int64, bitcast=True),
            (x_ptr + zero).to(tl.int64, bitcast=True), zero + pid_n * BLOCK_N, zero + N, zero + num_chunks,
            zero + c0, zero + c1, zero + pid_m * BLOCK_M, zero + M, zero + stride_xm, idx]
    outs = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(tl.float32,) * (4 * NT * RT) + (tl.int32,),
                                     is_pure=True, pack=1)
    store_fragments(outs, out_ptr, bias_ptr, res_ptr, pid_n, pid_m, pid_s, M, N, stride_om, stride_os, BLOCK_N, BLOCK_M,
                    HAS_BIAS, PARTIALS, ACT, HAS_RESIDUAL, RT, WARP_SPLIT)


def cmma_block_m(m: int) -> int:
    return min(CMMA_MAX_BLOCK_M, max(8, next_power_of_2(m)))


def cmma_default_config(m: int) -> TileConfig:
    """Untuned choice (autotune off, deterministic mode, or M first seen inside a CUDA-graph capture).  Up to M = 16:
    4 warps splitting the chunks of one weight tile, split-K 2, the word path entered by jump.  Over LLaMA-7B shapes
    at 70-90%, M = 1 / 4 / 8 / 16, each call after another kernel (H100), it ran 1.11-1.17x the time of the best
    config on geo-mean (at most 1.61x), against 1.24-1.35x (at most 2.33x) for the previous default, 4 warps owning
    2 tiles each with split-K 4 (benchmarks/RESULTS.md, sixteenth session).  Beyond M = 16: 4 warps owning one tile
    each, split-K 4 (the ninth session's best on average)."""
    if m <= CMMA_WARP_SPLIT_MAX_M:
        return TileConfig("cmma", CSL_ROWS, cmma_block_m(m), 2, 4, CMMA_DEPTHS[0], jump=True, warp_split=True)
    return TileConfig("cmma", CSL_ROWS * 4, cmma_block_m(m), 4, 4, CMMA_DEPTHS[0])


def get_csl_mma_configs(m: int, max_groups: int) -> list[TileConfig]:
    """Tuning space for a weight whose segments need up to `max_groups` word registers: CMMA_SHAPES (warps x weight
    tiles a warp, where shared memory and registers allow) x split-K (CMMA_SPLIT_KS, beyond M = 16
    CMMA_WIDE_SPLIT_KS) x CMMA_JUMPS (the jump only up to CMMA_JUMP_ONLY_MAX_M); up to M = 16 also the warps
    splitting the program's chunks (warp_split) x split-K 1, 2."""
    if interpreting():
        return []
    block_m = cmma_block_m(m)
    nt = block_m // 8
    jumps = (True,) if m <= CMMA_JUMP_ONLY_MAX_M else CMMA_JUMPS
    wide = m > CMMA_WARP_SPLIT_MAX_M
    return [TileConfig("cmma", CSL_ROWS * (1 if split else warps) * rt, block_m, split_k, warps, depth, jump=jump,
                       warp_split=split)
            for warps, rt in CMMA_SHAPES
            for split, split_ks in ((False, CMMA_WIDE_SPLIT_KS if wide else CMMA_SPLIT_KS),
                                    (True, () if wide else CMMA_WARP_SPLIT_KS))
            for split_k in split_ks for depth in CMMA_DEPTHS for jump in jumps
            if cmma_config_ok(warps, rt, nt, split) and cmma_words_ok(rt, nt, max_groups)]


def csl_mma(x: torch.Tensor, fmt: CslWeight, bias: torch.Tensor | None, config: TileConfig,
            epilogue: Epilogue | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] (N_out with an epilogue)."""
    dtype = str(x.dtype).removeprefix("torch.")
    if not (x.is_cuda and not interpreting() and dtype in SMMA_TYPES):
        raise RuntimeError(f"the cmma kernel needs a CUDA fp16/bf16 x, got {x.device} {x.dtype}")
    check_launch(x, fmt, bias)
    nt, rt = config.block_m // 8, config.row_tiles()
    if config.block_n != CSL_ROWS * config.row_warps() * rt or \
            not cmma_config_ok(config.num_warps, rt, nt, config.warp_split):
        raise ValueError(f"not a cmma config: {config.short()}")
    if fmt.max_groups > CMMA_MAX_GROUPS:
        raise ValueError(f"cmma holds at most {CMMA_MAX_GROUPS} words a lane per chunk; this weight needs "
                         f"{fmt.max_groups} (too dense for the Tiled-CSL format)")
    if not cmma_words_ok(rt, nt, fmt.max_groups):
        raise ValueError(f"{config.short()} owns {rt} weight tiles a warp: too few word registers for this weight's "
                         f"{fmt.max_groups} words a lane per chunk and tile")
    x = _whole_chunks(x, fmt)  # [M, C * 128], 16-byte aligned
    m = x.shape[0]
    out, per_split, split_k = split_k_output(x, fmt, config, epilogue)
    partials = out.dim() == 3
    if m == 0:
        return finish_split_k(out, bias, x.dtype, epilogue) if partials else out
    act, residual = in_kernel_epilogue(epilogue, partials, m, fmt.n)
    grid = (cdiv(fmt.n, config.block_n), split_k, cdiv(m, config.block_m))
    pdl = pdl_enabled(x.device)
    launch(
        _csl_mma_kernel, grid,
        (x, fmt.items, fmt.seg_start, bias if bias is not None else x, residual if residual is not None else x, out,
         m, fmt.n, x.stride(0), fmt.n, m * fmt.n, per_split, fmt.num_chunks),
        HAS_BIAS=bias is not None, PARTIALS=partials, ACT=act, HAS_RESIDUAL=residual is not None,
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, RT=rt, THREADS=32 * config.num_warps,
        WARP_SPLIT=config.warp_split,
        ASM=cmma_ptx(config.num_warps, rt, nt, dtype, fmt.max_groups, config.num_stages, pdl, config.jump,
                     config.warp_split),
        CONSTRAINTS=cmma_constraints(nt, rt), num_warps=config.num_warps, num_stages=1, pdl=pdl,
    )
    return finish_split_k(out, bias, x.dtype, epilogue) if partials else out
