"""The custom op `torch.ops.flashllm.sparse_linear` that rewritten graphs call.

A `torch.library` custom op with a fake implementation, so graphs containing it stay traceable
(`fullgraph=True`, AOTAutograd, Inductor) and Inductor calls it as an opaque kernel.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from flashllm_compile.codegen.autotune import AUTOTUNER, LAUNCHERS
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.formats.cache import weight_is_stale
from flashllm_compile.codegen.kernels.common import KERNEL_DTYPES, interpreting
from flashllm_compile.options import KernelPreference, default_cache_dir

# Which implementation ran, per call ("dense", "emulated", "mma", "gemv"): lets tests prove the path ran.
KERNEL_HITS: collections.Counter[str] = collections.Counter()

# Process-wide runtime settings the op reads (the op's signature only carries per-layer data).
RUNTIME = {"autotune": True, "cache_dir": default_cache_dir()}


def _check_weight_unchanged(weight_token: int, name: str) -> None:
    """Compressed tensors are a snapshot; an in-place update of the weight after compile would make them
    stale, so refuse rather than return stale results. (Not checked inside CUDA-graph replays.)"""
    if weight_token >= 0 and weight_is_stale(weight_token):
        raise RuntimeError(
            f"flashllm: the weight of '{name}' was modified in place after it was compressed at compile time. "
            "Call torch._dynamo.reset() and compile again so the weight is recompressed."
        )


@torch.library.custom_op("flashllm::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    bitmap: torch.Tensor,
    offsets: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    dense_weight: torch.Tensor | None,
    n: int,
    k: int,
    chunk_k: int,
    kernel: str,
    name: str,
    weight_token: int,
) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W[N, K]^T (+ bias) with W given by the bitmap format (bitmap, offsets, values).

    dense_weight: the original [N, K] weight (or a view of it) when kept for the dense fallback, else None.
    kernel: a KernelPreference value. name: the layer, for errors. weight_token: from `watch_weight` (-1: none).
    """
    _check_weight_unchanged(weight_token, name)
    if x.shape[-1] != k:
        raise ValueError(f"flashllm '{name}': input has {x.shape[-1]} features, the weight expects {k}")
    fmt = BitmapWeight(bitmap, offsets, values, n, k, chunk_k)
    x2d = x.reshape(-1, k)
    preference = KernelPreference(kernel)
    on_kernel_device = x.device.type == "cuda" or (interpreting() and preference is KernelPreference.TRITON)
    usable = x.dtype == values.dtype and x.dtype in KERNEL_DTYPES and on_kernel_device
    if preference is KernelPreference.TRITON and not usable:
        raise RuntimeError(f"flashllm '{name}': kernel='triton' needs a CUDA input (or TRITON_INTERPRET=1) of "
                           f"dtype {values.dtype}; got {x.dtype} on {x.device}. Use kernel='auto' for fallbacks.")
    if preference is KernelPreference.EMULATED or (preference is KernelPreference.AUTO and not usable):
        family, out = "emulated", F.linear(x2d, fmt.to_dense().to(x.dtype), bias)
    elif preference is KernelPreference.DENSE:
        weight = dense_weight if dense_weight is not None else fmt.to_dense()
        family, out = "dense", F.linear(x2d, weight, bias)
    else:
        choice = AUTOTUNER.choose(fmt, x2d.shape[0], dense_weight, allow_dense=(
            preference is KernelPreference.AUTO and dense_weight is not None),
            tune=RUNTIME["autotune"] and not interpreting(), cache_dir=RUNTIME["cache_dir"])
        family = choice.family
        if family == "dense":
            out = F.linear(x2d, dense_weight, bias)
        else:
            out = LAUNCHERS[family](x2d, fmt, bias, choice.config)
    KERNEL_HITS[family] += 1
    return out.reshape(*x.shape[:-1], n)


@sparse_linear.register_fake
def _(x, bitmap, offsets, values, bias, dense_weight, n, k, chunk_k, kernel, name, weight_token):
    torch._check(x.shape[-1] == k, lambda: f"flashllm '{name}': input has {x.shape[-1]} features, expected {k}")
    return x.new_empty((*x.shape[:-1], n))


def _setup_context(ctx, inputs, output) -> None:
    x, bitmap, offsets, values, bias, dense_weight, n, k, chunk_k, *_ = inputs
    ctx.save_for_backward(x, bitmap, offsets, values, dense_weight)
    ctx.meta = (n, k, chunk_k)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Dense backward (training is not the target; correctness is): grad_x = grad @ W, grad_W = grad^T x."""
    x, bitmap, offsets, values, dense_weight = ctx.saved_tensors
    n, k, chunk_k = ctx.meta
    weight = dense_weight if dense_weight is not None else BitmapWeight(bitmap, offsets, values, n, k,
                                                                        chunk_k).to_dense()
    grad2d = grad.reshape(-1, n)
    grad_x = (grad2d @ weight.to(grad.dtype)).reshape(x.shape) if ctx.needs_input_grad[0] else None
    grad_bias = grad2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    grad_w = grad2d.t() @ x.reshape(-1, k) if ctx.needs_input_grad[5] else None
    return grad_x, None, None, None, grad_bias, grad_w, None, None, None, None, None, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)
