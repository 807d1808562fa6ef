"""CUDA-core kernel for M = 1..8 tokens: each lane walks an equal SHARE of one row's nonzeros.

Cost is per nonzero (not per dense element).  Row r's nonzeros are cut into SHARES = SEGMENTS x split_k equal
runs (ceil(nnz_r / SHARES) each); lane (s, r) of split pid_s walks run pid_s * SEGMENTS + s.  Runs are equal by
count, so every lane of a warp does the same number of rounds (an earlier split by equal K ranges ran the
maximum over 512 lanes, ~2x the mean at 80-90%: 12.7 M vs 9.6 M warp instructions on the H100, same bytes).

Start of a run (once per lane): its first value index v_lo -> the chunk holding it (binary search on
offsets[:, row]) -> the word (popcounts of the chunk's words) -> the bit (binary search on popcounts); the bits
before it are cleared.  One round of the walk:
    j      = position of the lowest set bit of the current word w
    acc   += values[v] * xt[32 * wi + j, :]                           one value, BLOCK_M tokens in one load
    v     += 1;  cnt -= 1;  w &= w - 1
    if w == 0 and cnt > 0: wi += 1; w = bitmap[row, wi]              next word = next address (row-major)
On the GPU (fp16 / bf16) the loop is inline PTX (codegen/kernels/rowwalk_ptx.py): each lane stops after its own
count, and xt is staged in shared memory when it fits (SMEM_X_MAX).  Elsewhere (the interpreter, fp32) a Triton
loop runs max(cnt) rounds, then rounds until no lane is left (lanes that met empty words; rare below ~95%).
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
    in_kernel_epilogue,
    interpreting,
    split_k_output,
)
from flashllm_compile.codegen.kernels.host_math import cdiv, next_power_of_2
from flashllm_compile.codegen.kernels.launch import launch, pdl_enabled, wait_for_previous_kernel
from flashllm_compile.codegen.kernels.rowwalk_ptx import PTX_TYPES, rowwalk_constraints, rowwalk_ptx

ROWWALK_MAX_M = 8


def get_bitmap_rowwalk_configs(m: int) -> list[TileConfig]:
    """Tuning space for M <= ROWWALK_MAX_M: BLOCK_N rows x SEGMENTS shares = lanes (one per thread), x split_k.
    A split covers a contiguous K range of its rows (its shares), so split-K also shrinks the part of x a program
    gathers from: that matters for long rows (K = 28672 / 36864), whose x overflows L1."""
    if m > ROWWALK_MAX_M:
        return []
    block_m = next_power_of_2(max(m, 1))
    return [
        TileConfig("rowwalk", block_n, block_m, split_k, block_n * segments // 32, 1, segments)
        for block_n, segments, split_k in ((32, 16, 1), (16, 32, 1), (16, 64, 1), (32, 32, 1), (16, 32, 2),
                                           (32, 16, 4), (32, 8, 8))
    ]


@triton.jit
def _run_start(bitmap_ptr, offsets_ptr, rows, row_ok, share_ids, N, KW, num_chunks, shares,
               CHUNK_K: tl.constexpr, CHUNK_STEPS: tl.constexpr, HW_POPC: tl.constexpr):
    """Where lane (share, row) starts.  rows: [1, BLOCK_N], share_ids: [SEGMENTS, 1]; returns [SEGMENTS, BLOCK_N]
    tensors: first value index, nonzero count, word index, and that word with the bits before the run cleared."""
    WORDS: tl.constexpr = CHUNK_K // 32
    row_start = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    row_end = tl.load(offsets_ptr + num_chunks * N + rows, mask=row_ok, other=0)
    run = tl.cdiv(row_end - row_start, shares)
    v_lo = tl.minimum(row_start + share_ids * run, row_end)
    cnt = tl.minimum(v_lo + run, row_end) - v_lo
    # the chunk holding value v_lo: the largest c < num_chunks with offsets[c, row] <= v_lo (chunk_start: that
    # offset, the last accepted probe; offsets[0, row] = row_start to begin with)
    c = tl.zeros_like(v_lo)
    chunk_start = row_start + tl.zeros_like(v_lo)
    for i in tl.static_range(CHUNK_STEPS):
        probe_c = c + (1 << (CHUNK_STEPS - 1 - i))
        probe = tl.load(offsets_ptr + probe_c * N + rows, mask=row_ok & (probe_c < num_chunks), other=2147483647)
        c = tl.where(probe <= v_lo, probe_c, c)
        chunk_start = tl.where(probe <= v_lo, probe, chunk_start)
    rank = v_lo - chunk_start  # of v_lo among the chunk's values
    row_words = bitmap_ptr + rows * KW
    wi = c * WORDS
    for _ in tl.static_range(WORDS - 1):  # the word of the chunk holding it
        count = popcount(tl.load(row_words + wi, mask=row_ok, other=0).to(tl.uint32, bitcast=True), HW_POPC)
        past = rank >= count
        rank = tl.where(past, rank - count, rank)
        wi += past.to(tl.int32)
    w = tl.load(row_words + wi, mask=row_ok & (cnt > 0), other=0).to(tl.uint32, bitcast=True)
    pos = tl.zeros_like(v_lo)
    for i in tl.static_range(5):  # the position of its rank-th set bit: binary search on popcounts
        below = popcount((w >> pos.to(tl.uint32)) & ((1 << (16 >> i)) - 1), HW_POPC)
        past = rank >= below
        rank = tl.where(past, rank - below, rank)
        pos = tl.where(past, pos + (16 >> i), pos)
    return v_lo, cnt, wi, (w >> pos.to(tl.uint32)) << pos.to(tl.uint32)


@triton.jit
def _walk_round(w, w_next, wi, vi, cnt, acc, row_words, xt_ptr, values_ptr, KW, toks,
                BLOCK_M: tl.constexpr, HW_POPC: tl.constexpr):
    """One round of the Triton walk on every lane (a lane with no nonzero left idles); returns the new state."""
    live = (w != 0) & (cnt > 0)
    low = w & (0 - w)
    col = wi * 32 + popcount(low - 1, HW_POPC)  # [SEGMENTS, BLOCK_N]: column of the lowest set bit
    v = tl.load(values_ptr + vi, mask=live, other=0.0).to(tl.float32)
    if BLOCK_M == 1:
        acc += v * tl.load(xt_ptr + col, mask=live, other=0.0).to(tl.float32)
    else:
        xv = tl.load(xt_ptr + col[:, :, None] * BLOCK_M + toks[None, None, :], mask=live[:, :, None], other=0.0)
        acc += v[:, :, None] * xv.to(tl.float32)
    vi += live.to(tl.int32)
    cnt -= live.to(tl.int32)
    w = w ^ low
    advance = (w == 0) & (cnt > 0)
    wi += advance.to(tl.int32)
    w = tl.where(advance, w_next, w)
    fetched = tl.load(row_words + wi + 1, mask=advance & (wi + 1 < KW), other=0).to(tl.uint32, bitcast=True)
    return w, tl.where(advance, fetched, w_next), wi, vi, cnt, acc


@triton.jit
def _ptx_walk(w, row_words, values_ptr, xt_ptr, v_lo, wi, KW, cnt, x_bytes, ASM: tl.constexpr,
              BLOCK_M: tl.constexpr, CONSTRAINTS: tl.constexpr):
    """The PTX loop (rowwalk_ptx.py) on every lane -> fp32 [BLOCK_N, BLOCK_M], summed over the SEGMENTS lanes."""
    args = [w.to(tl.int32, bitcast=True), (row_words + 0 * wi).to(tl.int64, bitcast=True),
            (values_ptr + v_lo).to(tl.int64, bitcast=True), (xt_ptr + 0 * wi).to(tl.int64, bitcast=True),
            wi, KW + 0 * wi, cnt, x_bytes + 0 * wi]
    if BLOCK_M == 1:
        a0 = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=tl.float32, is_pure=True, pack=1)
        out = tl.sum(a0, axis=0)[:, None]
    elif BLOCK_M == 2:
        a0, a1 = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(tl.float32,) * 2, is_pure=True, pack=1)
        out = tl.join(tl.sum(a0, axis=0), tl.sum(a1, axis=0))
    elif BLOCK_M == 4:
        a0, a1, a2, a3 = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(tl.float32,) * 4, is_pure=True,
                                                   pack=1)
        # join appends a trailing axis: [BLOCK_N, 2, 2] flattens row-major to tokens 0, 1, 2, 3
        out = tl.reshape(tl.join(tl.join(tl.sum(a0, axis=0), tl.sum(a2, axis=0)),
                                 tl.join(tl.sum(a1, axis=0), tl.sum(a3, axis=0))), (a0.shape[1], BLOCK_M))
    else:
        a0, a1, a2, a3, a4, a5, a6, a7 = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(tl.float32,) * 8,
                                                                   is_pure=True, pack=1)
        out = tl.reshape(tl.join(tl.join(tl.join(tl.sum(a0, axis=0), tl.sum(a4, axis=0)),
                                         tl.join(tl.sum(a2, axis=0), tl.sum(a6, axis=0))),
                                 tl.join(tl.join(tl.sum(a1, axis=0), tl.sum(a5, axis=0)),
                                         tl.join(tl.sum(a3, axis=0), tl.sum(a7, axis=0)))), (a0.shape[1], BLOCK_M))
    return out


@triton.jit
def _bitmap_rowwalk_kernel(
    # pointers
    xt_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, res_ptr, out_ptr,
    # sizes and strides
    M, N, KW, stride_om, stride_os, num_chunks, x_bytes,
    # meta-parameters
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    CHUNK_K: tl.constexpr, CHUNK_STEPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SEGMENTS: tl.constexpr, HW_POPC: tl.constexpr,
    ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[m, n] = sum over nonzeros W[n, k] * xt[k, m] (+ bias[n]); lanes [SEGMENTS, BLOCK_N] reduced over
    SEGMENTS at the end.  With PARTIALS (split-K) writes fp32 partials out[pid_s, m, n]; ASM "" = Triton loop.
    With PDL (launched with programmatic dependent launch) the first bitmap words load before the wait for the
    kernel before it (xt is its output)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_ids = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rows = row_ids[None, :]  # [1, BLOCK_N]
    row_ok = rows < N
    share_ids = pid_s * SEGMENTS + tl.arange(0, SEGMENTS)[:, None]  # [SEGMENTS, 1]
    v_lo, cnt, wi, w = _run_start(bitmap_ptr, offsets_ptr, rows, row_ok, share_ids, N, KW, num_chunks,
                                  SEGMENTS * tl.num_programs(1), CHUNK_K, CHUNK_STEPS, HW_POPC)
    wait_for_previous_kernel(PDL)
    row_words = bitmap_ptr + rows * KW  # [1, BLOCK_N]
    toks = tl.arange(0, BLOCK_M)
    if ASM != "":
        out = _ptx_walk(w, row_words, values_ptr, xt_ptr, v_lo, wi, KW, cnt, x_bytes, ASM, BLOCK_M, CONSTRAINTS)
    else:
        w_next = tl.load(row_words + wi + 1, mask=(cnt > 0) & (wi + 1 < KW), other=0).to(tl.uint32, bitcast=True)
        vi = v_lo
        if BLOCK_M == 1:
            acc = tl.zeros((SEGMENTS, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((SEGMENTS, BLOCK_N, BLOCK_M), dtype=tl.float32)
        for _ in range(tl.max(tl.max(cnt, axis=1), axis=0)):
            w, w_next, wi, vi, cnt, acc = _walk_round(w, w_next, wi, vi, cnt, acc, row_words, xt_ptr, values_ptr,
                                                      KW, toks, BLOCK_M, HW_POPC)
        while tl.max(tl.max(cnt, axis=1), axis=0) > 0:  # lanes that met empty words
            w, w_next, wi, vi, cnt, acc = _walk_round(w, w_next, wi, vi, cnt, acc, row_words, xt_ptr, values_ptr,
                                                      KW, toks, BLOCK_M, HW_POPC)
        if BLOCK_M == 1:
            out = tl.sum(acc, axis=0)[:, None]  # [BLOCK_N, 1]
        else:
            out = tl.sum(acc, axis=0)  # [BLOCK_N, BLOCK_M]
    store_output(out_ptr, bias_ptr, res_ptr, out, row_ids, toks, pid_s, M, N, stride_om, stride_os, HAS_BIAS,
                 PARTIALS, ACT, HAS_RESIDUAL)


# Largest xt (bytes) staged in shared memory by the PTX walk: a static shared array is capped at 48 KB, and Triton's
# own reduction scratch shares the program's shared memory.  Larger xt (e.g. M = 8 at K = 4096) is gathered from
# global memory through L1.  Staging measured on the H100 at M = 1: 1.30 -> 1.47x (qkv, 80%), 1.11 -> 1.44x (down).
SMEM_X_MAX = 40 * 1024


def walk_smem_bytes(x_bytes: int) -> int:
    """Size of the shared array the PTX walk stages xt (x_bytes) in: x_bytes rounded up to 16, or 0 (no staging)."""
    return -(-x_bytes // 16) * 16 if 0 < x_bytes <= SMEM_X_MAX else 0


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
    if fmt.tile_rows:
        raise ValueError("the row walk needs the bitmap's values row-major (tile_rows=0): each lane follows one row's "
                         f"values across the chunks; this weight is tile-major (tile_rows={fmt.tile_rows})")
    m = x.shape[0]
    if m > config.block_m:
        raise ValueError(f"rowwalk config covers {config.block_m} tokens, got M={m}")
    out, _, split_k = split_k_output(x, fmt, config, epilogue)
    partials = out.dim() == 3  # fp32 [S, M, N]: split-K, or an epilogue
    if m == 0:
        return finish_split_k(out, bias, x.dtype, epilogue) if partials else out
    xt = transpose_tokens(x, config.block_m)  # [K, BLOCK_M]
    dtype = str(x.dtype).removeprefix("torch.")
    use_ptx = dtype in PTX_TYPES and not interpreting()
    x_bytes = xt.numel() * xt.element_size()
    smem_bytes = walk_smem_bytes(x_bytes) if use_ptx else 0
    if smem_bytes and xt.data_ptr() % 16:  # xt is staged in shared memory 16 bytes at a time
        xt = xt.clone()
    asm = rowwalk_ptx(config.block_m, dtype, smem_bytes) if use_ptx else ""
    pdl = pdl_enabled(x.device)
    grid = (cdiv(fmt.n, config.block_n), split_k)
    act, residual = in_kernel_epilogue(epilogue, partials, m, fmt.n)
    launch(
        _bitmap_rowwalk_kernel, grid,
        (xt, fmt.bitmap, fmt.offsets, fmt.values, bias if bias is not None else x,
         residual if residual is not None else x, out,
         m, fmt.n, fmt.bitmap.shape[1], fmt.n, m * fmt.n, fmt.num_chunks, x_bytes),
        HAS_BIAS=bias is not None, PARTIALS=partials, ACT=act, HAS_RESIDUAL=residual is not None, CHUNK_K=fmt.chunk_k,
        CHUNK_STEPS=max(1, (fmt.num_chunks - 1).bit_length()), BLOCK_N=config.block_n, BLOCK_M=config.block_m,
        SEGMENTS=config.segments, HW_POPC=not interpreting(),
        ASM=asm,
        CONSTRAINTS=rowwalk_constraints(config.block_m) if use_ptx else "",
        PDL=pdl, num_warps=config.num_warps, num_stages=1, pdl=pdl,
    )
    return finish_split_k(out, bias, x.dtype, epilogue) if partials else out
