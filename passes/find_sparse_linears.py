"""Find linear-like FX nodes whose weight is a real parameter, and decide which are worth a sparse kernel.

Matched forms (Dynamo graphs are torch-level; aten forms cover graphs from export / other passes):
    F.linear(x, W[N,K], b)                     torch._C._nn.linear, F.linear, aten.linear
    x @ W.t(), torch.matmul/mm(x, W.t())       operator.matmul, torch.matmul, torch.mm, aten.mm
    torch.addmm(b, x, W.t())                   torch.addmm, aten.addmm
    torch.addmm(b, x, W[K,N])                  HF GPT-2 Conv1D (weight stored transposed)
A weight is "real" when it is a placeholder whose example input is an nn.Parameter (default Dynamo, which
lifts parameters to inputs) or a get_attr node (Inductor freezing / prepare_freezing).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx

from flashllm_compile.codegen.kernels.common import KERNEL_DTYPES
from flashllm_compile.options import FlashLLMOptions
from flashllm_compile.passes import dtensor_linears

aten = torch.ops.aten
LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear, aten.linear.default}
MATMUL_TARGETS = {operator.matmul, torch.matmul, torch.mm, aten.mm.default, aten.matmul.default}
ADDMM_TARGETS = {torch.addmm, aten.addmm.default}
TRANSPOSE_METHODS = {"t", "transpose", "permute"}
TRANSPOSE_FUNCTIONS = {torch.t, torch.transpose, torch.permute, aten.t.default, aten.transpose.int,
                       aten.permute.default}


@dataclass
class LinearMatch:
    """One linear-like node: out[..., N] = x[..., K] @ W[N, K]^T (+ bias)."""

    node: fx.Node  # the node to replace
    x: fx.Node  # activation [..., K]
    weight_node: fx.Node  # placeholder or get_attr holding the stored weight
    weight: torch.Tensor  # the real stored weight: [N, K], or [K, N] when `transposed`
    transposed: bool  # stored as [K, N] (Conv1D / x @ W)
    bias: fx.Node | None
    name: str  # module path of the weight, for reports and errors
    skip_reason: str | None = None  # None: rewrite it
    sparsity: float = float("nan")  # exact-zero fraction of the weight, measured once (nan: not measurable)
    dtensor: str | None = None  # tensor parallelism: "colwise"/"rowwise" when the weight is a DTensor shard

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1]


def clean_source_name(source_name: str) -> str:
    """"L['self']._modules['layers']._modules['0']._parameters['weight']" -> "layers.0.weight".  A forward wrapped as
    f(*args) (transformers >= 5.24) has the module in L['args'][0]: the same name."""
    name = re.sub(r"^(L|G)\['args'\]\[0\](?=\.)", "", source_name)
    name = re.sub(r"^(L|G)\['[^']+'\]", "", name)
    name = re.sub(r"\._(modules|parameters|buffers)\['([^']+)'\]", r".\2", name)
    name = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", name)
    return name.strip(".") or source_name


def _placeholder_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None) or getattr(node, "_dynamo_source", None)
    if source is None:
        return node.name
    name = source.name  # a property since torch 2.12, a method before
    return clean_source_name(name() if callable(name) else name)


def resolve_weight(node: fx.Node, gm: fx.GraphModule, inputs: dict[fx.Node, object]) -> tuple[torch.Tensor, str] | None:
    """(real tensor, name) when `node` is a parameter placeholder or a get_attr tensor, else None."""
    if node.op == "placeholder":
        value = inputs.get(node)
        if isinstance(value, torch.nn.Parameter):
            return value, _placeholder_name(node)
    elif node.op == "get_attr":
        value = gm
        for atom in str(node.target).split("."):
            value = getattr(value, atom, None)
        if isinstance(value, torch.Tensor):
            return value, str(node.target)
    return None


def _is_transpose_2d(node: fx.Node) -> bool:
    """node is W.t() / W.transpose(i, j) / W.permute(1, 0) / W.T of a 2-D tensor (dims normalised mod 2)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("T", "mT")
    is_method = node.op == "call_method" and node.target in TRANSPOSE_METHODS
    if not (is_method or node.op == "call_function" and node.target in TRANSPOSE_FUNCTIONS):
        return False
    name = node.target if is_method else getattr(node.target, "__name__", str(node.target))
    dims = [a for a in (*node.args[1:], *node.kwargs.values()) if not isinstance(a, fx.Node)]
    if dims and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return False
    dims = [d % 2 for d in dims]
    if "permute" in str(name):
        return dims == [1, 0]  # permute(0, 1) is the identity, not a transpose
    if "transpose" in str(name):
        return len(dims) == 2 and dims[0] != dims[1]
    return not dims  # t()


def _linear_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, bool] | None:
    """(x, weight-ish node, bias, weight_is_transposed_view) of a linear-like node, else None."""
    if node.op != "call_function":
        return None
    args = list(node.args)
    if node.target in LINEAR_TARGETS and len(args) >= 2:
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        return args[0], args[1], bias, False
    if node.target in MATMUL_TARGETS and len(args) == 2 and not node.kwargs:
        rhs, bias = args[1], None
        x = args[0]
    elif node.target in ADDMM_TARGETS and len(args) == 3:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias, x, rhs = args
    else:
        return None
    if not isinstance(rhs, fx.Node):
        return None
    if _is_transpose_2d(rhs):
        return x, rhs.args[0], bias, False
    return x, rhs, bias, True  # x @ W with W stored [K, N]


def _meta_val(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))  # Dynamo graphs carry "example_value"
    val = dtensor_linears.local_shard(val)  # tensor parallelism: the shard this rank computes on
    return val if isinstance(val, torch.Tensor) else None


def skip_reason(match: LinearMatch, options: FlashLLMOptions) -> str | None:
    """Pure predicate: why this linear must not be rewritten, or None (reads node.meta['val'] and the weight)."""
    w, x_val = match.weight, _meta_val(match.x)
    if type(w) not in (torch.Tensor, torch.nn.Parameter):
        return "tensor_subclass_weight"
    if w.dim() != 2:
        return "weight_not_2d"
    if w.dtype not in KERNEL_DTYPES:
        return "unsupported_dtype"
    if x_val is None:
        return "no_input_metadata"
    if x_val.dtype != w.dtype:
        return "dtype_mismatch"
    if x_val.device != w.device:
        return "device_mismatch"
    if x_val.dim() < 1 or x_val.shape[-1] != match.in_features:
        return "shape_mismatch"
    if w.requires_grad and torch.is_grad_enabled():
        return "weight_requires_grad"
    bias_val = _meta_val(match.bias)
    if match.bias is not None and (bias_val is None or tuple(bias_val.shape) != (match.out_features,)
                                   or bias_val.dtype != w.dtype):
        return "bias_not_1d"
    if w.numel() < options.min_weight_numel:
        return "too_small"
    if w.numel() == 0:  # N or K = 0 (min_weight_numel=0): nothing to compress; its sparsity is nan
        return "empty_weight"
    if w.is_meta:
        return "meta_weight"
    if match.sparsity < options.min_sparsity:
        return "too_dense"
    return None


def exact_zero_fraction(weight: torch.Tensor) -> float:
    """Fraction of exact zeros of a materialised tensor (one pass over it); nan when not measurable."""
    if weight.is_meta or weight.numel() == 0:
        return float("nan")
    with torch.no_grad():
        return (weight == 0).sum().item() / weight.numel()


def uses_autocast(gm: fx.GraphModule) -> bool:
    """Autocast changes a linear's compute dtype, which the rewritten op would not follow: leave such graphs
    dense (global autocast at compile time, or an autocast region inside the graph)."""
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return True
    return any(n.op == "call_function" and "autocast" in getattr(n.target, "__name__", "") for n in gm.graph.nodes)


def find_sparse_linears(gm: fx.GraphModule, example_inputs, options: FlashLLMOptions) -> list[LinearMatch]:
    """Every linear-like node with a real weight, each with its skip reason (None = rewrite)."""
    autocast = uses_autocast(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, example_inputs))
    matches = []
    for node in gm.graph.nodes:
        operands = _linear_operands(node)
        if operands is None:
            continue
        x, weight_node, bias, transposed = operands
        if not isinstance(x, fx.Node) or not isinstance(weight_node, fx.Node):
            continue
        resolved = resolve_weight(weight_node, gm, inputs)
        if resolved is None:
            if node.target in LINEAR_TARGETS:  # a linear whose weight is computed in the graph: report it
                matches.append(LinearMatch(node, x, weight_node, torch.empty(0), False, bias, node.name,
                                           "weight_not_parameter"))
            continue  # plain matmuls of activations (attention) are not linears
        weight, name = resolved
        name = name.removesuffix(".weight")
        tp_style = tp_reason = None
        if dtensor_linears.is_dtensor(weight):  # tensor parallelism: this rank's shard (passes/dtensor_linears.py)
            tp_style, tp_reason = dtensor_linears.classify(node, x, bias, weight, transposed)
            weight = dtensor_linears.local_shard(weight)
        match = LinearMatch(node, x, weight_node, weight, transposed, bias if isinstance(bias, fx.Node) else None,
                            name, sparsity=exact_zero_fraction(weight), dtensor=tp_style)
        if autocast:
            match.skip_reason = "autocast"
        elif bias is not None and not isinstance(bias, fx.Node):
            match.skip_reason = "bias_not_1d"
        else:
            match.skip_reason = tp_reason or skip_reason(match, options)
        matches.append(match)
    return matches
