"""What the kernel launchers share: the tile config record, argument checks, split-K bookkeeping, the epilogue."""

from __future__ import annotations

from typing import NamedTuple

import torch

from flashllm_compile.codegen.epilogue_spec import Epilogue
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.formats.csl import CslWeight
from flashllm_compile.codegen.kernels.epilogue import fused_epilogue
from flashllm_compile.codegen.kernels.host_math import cdiv
from flashllm_compile.codegen.kernels.launch import interpreting, launch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CompressedWeight = BitmapWeight | CslWeight  # the formats a kernel family runs on (one each)


class TileConfig(NamedTuple):
    """One point of a kernel family's tuning space (UPPER_CASE meta-parameters of the Triton kernel)."""

    family: str  # "mma" (tensor cores), "gemv", "walk" or "rowwalk" (CUDA cores)
    block_n: int  # weight rows per program
    block_m: int  # tokens per program (mma pads to >= 16 in registers, never in HBM)
    split_k: int  # programs sharing one row block along K; partial sums reduced in fp32 afterwards
    num_warps: int
    num_stages: int
    segments: int = 1  # rowwalk: lanes per row in a program, each walking one equal share of the row
    jump: bool = False  # cmma: a chunk's word loads and scatters entered by an indirect jump, no predicate a group
    warp_split: bool = False  # cmma: the program's warps share its rows and split its chunks (summed in the program)

    def row_warps(self) -> int:
        """cmma: the warps of a program that own distinct weight rows (one when the warps split the chunks)."""
        return 1 if self.warp_split else self.num_warps

    def row_tiles(self) -> int:
        """cmma: the 16-row weight tiles each warp of a program owns (BLOCK_N = 16 x row_warps x tiles)."""
        return max(1, self.block_n // (16 * self.row_warps()))

    def short(self) -> str:
        extra = f",seg={self.segments}" if self.family == "rowwalk" else ""
        if self.family == "cmma":
            extra = f",rt={self.row_tiles()}" + (",jump" if self.jump else "") + (",wsplit" if self.warp_split else "")
        return (f"{self.family}[BN={self.block_n},BM={self.block_m},SK={self.split_k},w={self.num_warps},"
                f"s={self.num_stages}{extra}]")


def check_launch(x: torch.Tensor, fmt: CompressedWeight, bias: torch.Tensor | None) -> None:
    """Raise a clear error for anything the kernels cannot run; callers decide on fallbacks before this."""
    if x.dim() != 2 or x.shape[1] != fmt.k:
        raise ValueError(f"sparse kernel expects x of shape [M, {fmt.k}], got {tuple(x.shape)}")
    if x.dtype != fmt.dtype or x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"sparse kernel supports {KERNEL_DTYPES} with x.dtype == weight dtype, "
                        f"got x {x.dtype}, weight {fmt.dtype}")
    if x.device != fmt.device:
        raise ValueError(f"x on {x.device} but compressed weight on {fmt.device}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError("Triton sparse kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                           "use kernel='emulated' or 'dense' on CPU")
    if bias is not None and (bias.shape != (fmt.n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{fmt.n}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def split_k_plan(fmt: CompressedWeight, split_k: int) -> tuple[int, int]:
    """(chunks per split, number of splits actually used) so that no split is empty."""
    per_split = cdiv(fmt.num_chunks, split_k)
    return per_split, cdiv(fmt.num_chunks, per_split)


def split_k_output(x: torch.Tensor, fmt: CompressedWeight, config: TileConfig,
                   epilogue: Epilogue | None = None) -> tuple[torch.Tensor, int, int]:
    """(out, chunks per split, splits): out is [M, N] in x's dtype, or fp32 [S, M, N] partials for split-K and for a
    GLU epilogue (S = 1 then: a row block holds gate or up rows, not both).  Without partials the kernel applies
    bias, act and residual itself (`store_output`)."""
    chunks_per_split, split_k = split_k_plan(fmt, config.split_k)
    partials = split_k > 1 or (epilogue is not None and epilogue.glu)
    shape = (split_k, x.shape[0], fmt.n) if partials else (x.shape[0], fmt.n)
    out = torch.empty(shape, device=x.device, dtype=torch.float32 if partials else x.dtype)
    return out, chunks_per_split, split_k


def launch_bitmap_kernel(kernel, x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None,
                         config: TileConfig, grid_m: int = 1, epilogue: Epilogue | None = None,
                         prepare_x=None, **meta) -> torch.Tensor:
    """What every family's launcher does: check, allocate out ([M, N], or fp32 [S, M, N] partials for split-K or a
    GLU epilogue), launch `kernel` on grid (row blocks, splits, grid_m), finish the partials.  x: [M, K] -> [M, N_out].
    prepare_x (after the checks): the family's own copy of x (default: contiguous)."""
    check_launch(x, fmt, bias)
    x = prepare_x(x) if prepare_x is not None else x.contiguous()
    m = x.shape[0]
    out, chunks_per_split, split_k = split_k_output(x, fmt, config, epilogue)
    partials = out.dim() == 3
    if m == 0:
        return finish_split_k(out, bias, x.dtype, epilogue) if partials else out
    grid = (cdiv(fmt.n, config.block_n), split_k, grid_m)
    act, residual = in_kernel_epilogue(epilogue, partials, m, fmt.n)
    launch(
        kernel, grid,
        (x, fmt.bitmap, fmt.offsets, fmt.values, bias if bias is not None else x,
         residual if residual is not None else x, out,
         m, fmt.n, fmt.k, x.stride(0), fmt.n, m * fmt.n, chunks_per_split, fmt.num_chunks),
        HAS_BIAS=bias is not None, PARTIALS=partials, ACT=act, HAS_RESIDUAL=residual is not None, CHUNK_K=fmt.chunk_k,
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, HW_POPC=not interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages, **meta,
    )
    return finish_split_k(out, bias, x.dtype, epilogue) if partials else out


def in_kernel_epilogue(epilogue: Epilogue | None, partials: bool, m: int, n: int) -> tuple[int, torch.Tensor | None]:
    """(ACT code, residual [M, N] contiguous or None) for a kernel that writes its output itself (no partials);
    with partials the epilogue kernel applies them afterwards, so the main kernel gets none."""
    if partials or epilogue is None:
        return 0, None
    residual = epilogue.residual
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"residual must be [{m}, {n}], got {tuple(residual.shape)}")
    return epilogue.act_code, residual.contiguous() if residual is not None else None


def finish_split_k(partials: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   epilogue: Epilogue | None = None) -> torch.Tensor:
    """partials: fp32 [S, M, N] -> dtype [M, N_out], with the epilogue: one launch of the epilogue kernel
    (deterministic: fixed-order sum, no atomics)."""
    return fused_epilogue(partials, bias, epilogue, dtype)
