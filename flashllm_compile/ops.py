"""The custom op `torch.ops.flashllm.sparse_linear` that rewritten graphs call.

A `torch.library` custom op with a fake implementation, so graphs containing it stay traceable
(`fullgraph=True`, AOTAutograd, Inductor) and Inductor calls it as an opaque kernel.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json

import torch
import torch.nn.functional as F

from flashllm_compile.codegen.autotune import AUTOTUNER, LAUNCHERS, dense_linear, untuned_choice
from flashllm_compile.codegen.epilogue_spec import Epilogue, apply_epilogue, parse_epilogue
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.formats.cache import replaced_weights, weight_is_stale
from flashllm_compile.codegen.formats.csl import CslWeight
from flashllm_compile.codegen.kernels.bitmap_unpack import unpack_weight
from flashllm_compile.codegen.kernels.common import KERNEL_DTYPES, finish_split_k, interpreting
from flashllm_compile.options import KernelPreference, default_cache_dir

# Which implementation ran, per call ("dense", "emulated", "mma", "rowwalk"): lets tests prove the path ran.
KERNEL_HITS: collections.Counter[str] = collections.Counter()

# Runtime settings of ops called without a `runtime` argument (e.g. eager `sparsify_` modules); compiled graphs
# pass their own (FlashLLMOptions.runtime_spec), so two models compiled with different options do not mix.
RUNTIME = {"autotune": True, "cache_dir": default_cache_dir(), "deterministic": False}


@functools.lru_cache(maxsize=64)
def _runtime(spec: str | None) -> dict:
    """The settings an op call runs with: its JSON `runtime` spec, else the process defaults (RUNTIME)."""
    return RUNTIME if spec is None else {**RUNTIME, **json.loads(spec)}


def _check_weight_unchanged(weight_token: int, name: str, dense_weight: torch.Tensor | None = None,
                            weights: list[torch.Tensor] | None = None) -> None:
    """Compressed tensors are a snapshot; an in-place update of the weight after compile, or a replaced
    weight tensor, would make them stale, so refuse rather than return stale results. (Not checked inside
    CUDA-graph replays; writes through `.data`, which bypass the version counter, are not seen.)"""
    if weight_token < 0:
        return
    if weight_is_stale(weight_token):
        raise RuntimeError(
            f"flashllm: the weight of '{name}' was modified in place (or its .data reassigned) after it was "
            "compressed at compile time. Call torch._dynamo.reset() and compile again so the weight is recompressed."
        )
    # fused / sliced ops: their member parameters (`weights`); a single weight: the dense weight it passes
    passed = weights if weights is not None else [dense_weight] if dense_weight is not None else []
    if replaced_weights(weight_token, passed):
        raise RuntimeError(
            f"flashllm: '{name}' got another weight tensor than the one compressed at compile time: the parameter "
            "was replaced (e.g. `module.weight = nn.Parameter(...)`), or this compiled graph is reused for another "
            "instance of the same module class (Dynamo does not guard on parameter identity: compile the model that "
            "contains them all once). Call torch._dynamo.reset() and compile again."
        )


# The schema is spelled out for `weights` (an optional tensor list, which the annotation-based inference rejects).
SCHEMA = ("(Tensor x, Tensor bitmap, Tensor offsets, Tensor values, Tensor? bias, Tensor? dense_weight, SymInt n, "
          "SymInt k, SymInt chunk_k, str kernel, str name, SymInt weight_token, Tensor[]? weights=None, "
          "str? runtime=None, str? epilogue=None, Tensor? residual=None, Tensor? in_cols=None, Tensor? out_rows=None, "
          "str? layout=None) -> Tensor")


def _sparse_linear(
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
    weights: list[torch.Tensor] | None = None,
    runtime: str | None = None,
    epilogue: str | None = None,
    residual: torch.Tensor | None = None,
    in_cols: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    layout: str | None = None,
) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W[N, K]^T (+ bias) with W given by the bitmap format (bitmap, offsets, values),
    then the epilogue, in fp32 before the cast (codegen/epilogue_spec.py; folded by passes/fuse_epilogues.py).

    dense_weight: the original [N, K] weight (or a view of it) when kept for the dense fallback, else None.
    kernel: a KernelPreference value. name: the layer, for errors. weight_token: from `watch_weight` (-1: none).
    weights: for a fused or sliced op (a `watch_weights` token), the parameters it was compressed from: checked to
    still be the tensors that were compressed, and for a fused op (when they tile [N, K] by rows) the dense
    fallback runs on them in place, one GEMM each.
    runtime: JSON of the compile's autotune / cache_dir / deterministic options (None: the process defaults).
    epilogue: "silu" | "gelu" | "gelu_tanh" | "relu", or "<act>*up": act(y[..., :N/2]) * y[..., N/2:] -> [..., N/2].
    residual: [..., N_out] in x's dtype, added last.
    in_cols / out_rows: a sliced op (passes/slice_structured_zeros.py): the compressed weight is W[out_rows][:, in_cols]
    [N, K] of a full weight [N_full, K_full]; x is the full input [..., K_full].  The sparse kernels read
    x[..., in_cols]; the dense fallback runs the full weight (`dense_weight` or the members `weights`, in place: no
    per-call copy of W[rows][:, cols]) on the full x and keeps the out_rows outputs.
    layout: the compressed weight's format: None / "bitmap" (bitmap, offsets, values; chunk_k) or "csl", the
    Tiled-CSL format (codegen/formats/csl.py): then bitmap / offsets / values carry its items, seg_start and a
    [0] tensor of the weight's dtype, and chunk_k its max_groups.
    """
    _check_weight_unchanged(weight_token, name, dense_weight, weights)
    k_full = k if in_cols is None else x.shape[-1]  # features of x (and of the dense fallback weight)
    n_full = n if out_rows is None else None  # rows of the dense fallback weight (a sliced op: any, rows are picked)
    # A fused op's dense fallback runs on its member weights in place (row blocks of the fused weight).
    dense = dense_weight
    if dense is None and weights and all(w.dim() == 2 and w.shape[1] == k_full for w in weights) and (
            n_full is None or sum(w.shape[0] for w in weights) == n_full):
        dense = list(weights)
    if in_cols is not None and in_cols.shape[0] != k:
        raise ValueError(f"flashllm '{name}': in_cols selects {in_cols.shape[0]} features, the weight expects {k}")
    if in_cols is None and x.shape[-1] != k:
        raise ValueError(f"flashllm '{name}': input has {x.shape[-1]} features, the weight expects {k}")
    fmt = weight_format(layout, bitmap, offsets, values, n, k, chunk_k)
    x_full = x.reshape(-1, k_full)  # [M, K_full]: what the dense fallback reads
    m = x_full.shape[0]
    epi = _epilogue(epilogue, residual, x, n, name)  # None: plain linear
    n_out = epi.out_features(n) if epi is not None else n
    preference = KernelPreference(kernel)
    on_kernel_device = x.device.type == "cuda" or (interpreting() and preference is KernelPreference.TRITON)
    usable = x.dtype == values.dtype and x.dtype in KERNEL_DTYPES and on_kernel_device
    if preference is KernelPreference.TRITON and not usable:
        raise RuntimeError(f"flashllm '{name}': kernel='triton' needs a CUDA input (or TRITON_INTERPRET=1) of "
                           f"dtype {values.dtype}; got {x.dtype} on {x.device}. Use kernel='auto' for fallbacks.")
    if preference is KernelPreference.EMULATED or (preference is KernelPreference.AUTO and not usable):
        family, out = "emulated", F.linear(_kept_columns(x_full, in_cols), fmt.to_dense().to(x.dtype),
                                           bias if epi is None else None)
        if epi is not None:
            out = apply_epilogue(out[None], bias, epi, x.dtype)
    elif preference is KernelPreference.DENSE:
        if dense is None:  # the Triton unpack pass on the GPU (to_dense's boolean indexing syncs the device)
            unpacked = unpack_weight(fmt) if (x.is_cuda and values.dtype in KERNEL_DTYPES
                                              and isinstance(fmt, BitmapWeight)) else fmt.to_dense()
            family, out = "dense", _dense_linear(_kept_columns(x_full, in_cols), unpacked, bias, epi)
        else:
            family, out = "dense", _dense_linear(x_full, dense, bias, epi, out_rows)
    else:
        allow_dense = preference is KernelPreference.AUTO and dense is not None
        settings = _runtime(runtime)
        if settings["deterministic"]:  # a choice that does not depend on timings (FlashLLMOptions.deterministic)
            choice = untuned_choice(m, allow_dense, fmt)
        else:
            choice = AUTOTUNER.choose(fmt, m, dense, allow_dense=allow_dense,
                                      tune=settings["autotune"] and not interpreting(),
                                      cache_dir=settings["cache_dir"])
        family = choice.family
        if family == "dense":
            out = _dense_linear(x_full, dense, bias, epi, out_rows)
        else:
            out = LAUNCHERS[family](_kept_columns(x_full, in_cols), fmt, bias, choice.config, epi)
    KERNEL_HITS[family] += 1
    return out.reshape(*x.shape[:-1], n_out)


sparse_linear = torch.library.custom_op("flashllm::sparse_linear", mutates_args=(), schema=SCHEMA)(_sparse_linear)


_PARAMETERS = inspect.signature(_sparse_linear)


def _sparse_linear_nograd(*args, **kwargs):
    """`sparse_linear` without an autograd layer, for the code Inductor generates (passes/nograd_ops.py): after
    AOTAutograd no op needs one.  custom_op's autograd and backend wrappers cost ~50 us of host time a call on the
    H100 machine, paid by every CUDA-graph recording (benchmarks/RESULTS.md, tenth session).  Called with grad mode
    on and an input requiring grad, it raises instead of dropping the gradient."""
    if torch.is_grad_enabled():  # not in Inductor's code (it runs without grad): name the operands, check them
        call = _PARAMETERS.bind(*args, **kwargs).arguments
        tensors = [call.get(name) for name in ("x", "bias", "dense_weight", "residual")]
        tensors += call.get("weights") or []
        if any(t is not None and t.requires_grad for t in tensors):
            raise RuntimeError(f"flashllm '{call['name']}': sparse_linear_nograd has no backward; call "
                               "torch.ops.flashllm.sparse_linear where a gradient may flow")
    return _sparse_linear(*args, **kwargs)


_LIB = torch.library.Library("flashllm", "FRAGMENT")  # the low-level API: custom_op always adds its wrappers
_LIB.define("sparse_linear_nograd" + SCHEMA)
_LIB.impl("sparse_linear_nograd", _sparse_linear_nograd, "CompositeExplicitAutograd")
_LIB.impl("sparse_linear_nograd", torch.library.fallthrough_kernel, "Autograd")  # no autograd layer, no Python there


def weight_format(layout: str | None, t0: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, n: int, k: int,
                  param: int) -> BitmapWeight | CslWeight:
    """The compressed weight an op call carries: its three tensor operands and its integer format argument."""
    if layout in (None, BitmapWeight.LAYOUT):
        return BitmapWeight.from_op_param(t0, t1, t2, n, k, param)
    if layout == CslWeight.LAYOUT:
        return CslWeight(t0, t1, t2, n, k, param)
    raise ValueError(f"flashllm: unknown weight layout {layout!r}")


def _kept_columns(x2d: torch.Tensor, in_cols: torch.Tensor | None) -> torch.Tensor:
    """What a sparse path reads: [M, K_full] -> x[:, in_cols] [M, K] for a sliced op (gathered only on the paths
    that run the compressed weight, not when the dense fallback runs), else x itself."""
    return x2d if in_cols is None else x2d.index_select(1, in_cols)


def _epilogue(text: str | None, residual: torch.Tensor | None, x: torch.Tensor, n: int, name: str) -> Epilogue | None:
    """The op's epilogue with its residual as [M, N_out] (None when there is neither); checked."""
    if not text and residual is None:
        return None
    epi = Epilogue.parse(text)
    if epi.glu and n % 2:
        raise ValueError(f"flashllm '{name}': epilogue {text!r} needs an even number of output features, got {n}")
    n_out = epi.out_features(n)
    if residual is not None:
        if residual.shape != (*x.shape[:-1], n_out) or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"flashllm '{name}': residual must be {(*x.shape[:-1], n_out)} {x.dtype} on {x.device} "
                             f"(no broadcasting), got {tuple(residual.shape)} {residual.dtype} on {residual.device}")
        epi = Epilogue(epi.act, epi.glu, residual.reshape(-1, n_out))
    return epi


def _dense_linear(x2d: torch.Tensor, dense, bias: torch.Tensor | None, epi: Epilogue | None,
                  out_rows: torch.Tensor | None = None) -> torch.Tensor:
    """cuBLAS (`dense_linear`), then the epilogue (bias included, in fp32): the epilogue kernel on CUDA, the torch
    reference elsewhere; a lone residual goes into cuBLAS's own epilogue (addmm, beta = 1: no extra launch).
    x2d: [M, K] -> [M, N_out].  out_rows (a sliced op): the full weight's outputs [M, N_full] -> those rows."""
    if out_rows is not None:  # the sliced rows' bias is the op's bias; epilogues are not folded into sliced ops
        y = dense_linear(x2d, dense).index_select(1, out_rows)  # [M, N]
        if epi is None:
            return y if bias is None else y + bias
        return _dense_epilogue(y, bias, epi)
    if epi is None:
        return dense_linear(x2d, dense, bias)
    weight = dense if isinstance(dense, torch.Tensor) else dense[0] if len(dense) == 1 else None  # [N, K]
    if weight is not None and bias is None and not epi.act and not epi.glu:
        return torch.addmm(epi.residual, x2d, weight.t())  # residual [M, N] + x [M, K] @ W^T
    return _dense_epilogue(dense_linear(x2d, dense), bias, epi)


def _dense_epilogue(y: torch.Tensor, bias: torch.Tensor | None, epi: Epilogue) -> torch.Tensor:
    """y: [M, N] in x's dtype -> epilogue(y + bias) [M, N_out]: the epilogue kernel on CUDA, else the reference."""
    return finish_split_k(y[None], bias, y.dtype, epi) if y.is_cuda else apply_epilogue(y[None], bias, epi, y.dtype)


@sparse_linear.register_fake
def _fake(x, bitmap, offsets, values, bias, dense_weight, n, k, chunk_k, kernel, name, weight_token, weights=None,
          runtime=None, epilogue=None, residual=None, in_cols=None, out_rows=None, layout=None):
    if in_cols is None:
        torch._check(x.shape[-1] == k, lambda: f"flashllm '{name}': input has {x.shape[-1]} features, expected {k}")
    _, glu = parse_epilogue(epilogue)
    return x.new_empty((*x.shape[:-1], n // 2 if glu else n))


torch.library.register_fake("flashllm::sparse_linear_nograd")(_fake)


def _setup_context(ctx, inputs, output) -> None:
    x, bitmap, offsets, values, bias, dense_weight, n, k, chunk_k, *_ = inputs
    in_cols = inputs[16] if len(inputs) > 16 else None
    ctx.sliced = in_cols is not None or (len(inputs) > 17 and inputs[17] is not None)
    ctx.save_for_backward(x, bitmap, offsets, values, dense_weight, in_cols)
    ctx.meta = (n, k, chunk_k)
    ctx.has_bias = bias is not None
    ctx.epilogue = (inputs[14], inputs[15] is not None)  # (epilogue, has residual)
    ctx.name = inputs[10]
    ctx.layout = inputs[18] if len(inputs) > 18 else None


def _backward(ctx, grad):
    """Dense backward (training is not the target; correctness is): grad_x = grad @ W, grad_W = grad^T x.
    A sliced op (in_cols / out_rows): grad [..., N'] @ W[rows][:, cols] lands in x's `in_cols` features, zeros
    elsewhere; its weights get no gradient (slicing is a frozen-weight rewrite)."""
    if ctx.epilogue[0] or ctx.epilogue[1]:  # passes/fuse_epilogues.py folds nothing when a gradient may flow
        raise RuntimeError(f"flashllm '{ctx.name}': no backward for a sparse_linear with a fused epilogue "
                           f"(epilogue={ctx.epilogue[0]!r}, residual: {ctx.epilogue[1]}); compile in grad mode with "
                           "inputs that require grad (the epilogue is then not folded), or fuse_epilogues=False")
    x, bitmap, offsets, values, dense_weight, in_cols = ctx.saved_tensors
    n, k, chunk_k = ctx.meta
    if ctx.sliced and ctx.needs_input_grad[5]:
        raise RuntimeError(f"flashllm '{ctx.name}': no weight gradient through a sliced sparse_linear; compile with "
                           "slice_structured_zeros=False to train its weight")
    weight = dense_weight if dense_weight is not None and not ctx.sliced else weight_format(
        ctx.layout, bitmap, offsets, values, n, k, chunk_k).to_dense()  # [N, K] (a sliced op: W[rows][:, cols])
    grad2d = grad.reshape(-1, n)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad2d @ weight.to(grad.dtype)  # [M, K]
        if in_cols is not None:  # -> [M, K_full], zeros at the dropped features
            grad_x = grad_x.new_zeros(grad_x.shape[0], x.shape[-1]).index_copy_(1, in_cols, grad_x)
        grad_x = grad_x.reshape(x.shape)
    grad_bias = grad2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    grad_w = grad2d.t() @ x.reshape(-1, k) if ctx.needs_input_grad[5] else None
    grads = (grad_x, None, None, None, grad_bias, grad_w, None, None, None, None, None, None)
    # `weights` (only when passed; autograd wants the structure of the passed inputs) and the trailing optional
    # operands: never differentiated
    passed = ctx.needs_input_grad[len(grads):]
    return (*grads, *([None] * len(p) if isinstance(p, (list, tuple)) else None for p in passed))


sparse_linear.register_autograd(_backward, setup_context=_setup_context)
