"""What both kernel launchers share: the tile config record, argument checks, split-K bookkeeping."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
from flashllm_compile.codegen.formats.bitmap import BitmapWeight

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TileConfig(NamedTuple):
    """One point of a kernel family's tuning space (UPPER_CASE meta-parameters of the Triton kernel)."""

    family: str  # "mma" (tensor cores) or "gemv" (CUDA cores)
    block_n: int  # weight rows per program
    block_m: int  # tokens per program (mma pads to >= 16 in registers, never in HBM)
    split_k: int  # programs sharing one row block along K; partial sums reduced in fp32 afterwards
    num_warps: int
    num_stages: int

    def short(self) -> str:
        return f"{self.family}[BN={self.block_n},BM={self.block_m},SK={self.split_k},w={self.num_warps},s={self.num_stages}]"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launch(x: torch.Tensor, fmt: BitmapWeight, bias: torch.Tensor | None) -> None:
    """Raise a clear error for anything the kernels cannot run; callers decide on fallbacks before this."""
    if x.dim() != 2 or x.shape[1] != fmt.k:
        raise ValueError(f"sparse kernel expects x of shape [M, {fmt.k}], got {tuple(x.shape)}")
    if x.dtype != fmt.dtype or x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"sparse kernel supports {KERNEL_DTYPES} with x.dtype == weight dtype, "
                        f"got x {x.dtype}, weight {fmt.dtype}")
    if x.device != fmt.values.device:
        raise ValueError(f"x on {x.device} but compressed weight on {fmt.values.device}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError("Triton sparse kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                           "use kernel='emulated' or 'dense' on CPU")
    if bias is not None and (bias.shape != (fmt.n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{fmt.n}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def split_k_plan(fmt: BitmapWeight, split_k: int) -> tuple[int, int]:
    """(chunks per split, number of splits actually used) so that no split is empty."""
    per_split = triton.cdiv(fmt.num_chunks, split_k)
    return per_split, triton.cdiv(fmt.num_chunks, per_split)


def finish_split_k(partials: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """partials: fp32 [S, M, N] -> dtype [M, N]; deterministic (fixed-order sum, no atomics)."""
    out = partials.sum(0)
    if bias is not None:
        out += bias.float()
    return out.to(dtype)
