"""The size-aware bytes floor: how long the GPU takes to stream a given number of bytes from HBM, read only.

Why not bytes / copy bandwidth: the read rate depends on how many bytes one call moves.  H100 (benchmarks/RESULTS.md,
seventeenth session): 1.81 TB/s at 8 MB, 2.28 at 16, 2.67 at 42, 2.85 at 100, 3.05 at 400 MB.  A sparse kernel moves
fewer bytes than cuBLAS on the same weight, so it streams them at a lower rate: the best ratio a kernel that only
streams its bytes can reach is floor(dense bytes) / floor(our bytes), not the ratio of the bytes (LLaMA-7B qkv at 80%
in Tiled-CSL: 2.19x, not 2.40x).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from timing import graph_time_us
from triton.language.extra.cuda import gdc_wait

READ_BLOCK = 2048  # int32 a program reads (8 KB; 1 / 2 / 4 / 8 tiles a program measured within 1-4% of each other
# from 16 MB up, 1 the fastest below)
ROTATED_BYTES = 400 << 20  # copies rotated so that every call reads from HBM (the H100's L2: 50 MB)


@triton.jit
def _sum_tiles(src, out, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out[pid] = the sum of src[pid * BLOCK: (pid + 1) * BLOCK] (int32): one read of every element, one store a
    program.  With PDL (launched with programmatic dependent launch) the program reads before it waits for the kernel
    before it, as our kernels read their weights, and only its store waits."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.sum(tl.load(src + offs, mask=offs < n, other=0))
    if PDL:
        gdc_wait()
    tl.store(out + tl.program_id(0), total)


def sum_tiles(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """src: int32 [n] -> out[: cdiv(n, READ_BLOCK)], each the sum of one tile."""
    tiles = triton.cdiv(src.numel(), READ_BLOCK)
    _sum_tiles[(tiles,)](src, out, src.numel(), BLOCK=READ_BLOCK, num_warps=4)
    return out[:tiles]


def rotated_buffers(nbytes: int) -> list[torch.Tensor]:
    """Enough int32 copies of `nbytes` (at least 2, at most 100) that reading them in turn reads from HBM."""
    n = max(1, nbytes // 4)
    copies = max(2, min(100, -(-ROTATED_BYTES // (4 * n))))
    return [torch.ones(n, dtype=torch.int32, device="cuda") for _ in range(copies)]


@functools.cache
def read_floor_us(nbytes: int) -> float:
    """Time (us) of one call that reads `nbytes` from HBM and writes next to nothing, CUDA graph back to back."""
    bufs = rotated_buffers(nbytes)
    out = torch.empty(triton.cdiv(bufs[0].numel(), READ_BLOCK), dtype=torch.int32, device="cuda")
    us = graph_time_us([lambda b=b: sum_tiles(b, out) for b in bufs])
    del bufs
    torch.cuda.empty_cache()
    return us
