"""Epilogue fusion: pointwise ops right after a sparse_linear fold into the op, so the output is written once.

Runs on the graph rewrite_sparse_linears produced (Dynamo's torch-level targets), on its ops and on those a
sparsify_'d model calls itself.  Patterns, in this order:

    glu       y = sparse_linear(x, [W_gate; W_up])          fused siblings, or one linear of 2H rows
              g, u = y.split([H, H], -1)  (or .chunk(2, -1))
              out = act(g) * u                               (either operand order)      -> epilogue "silu*up"
    act       out = act(y)                                   silu, gelu (erf / tanh), relu -> epilogue "silu"
    residual  out = y + r  or  r + y                         y: the op, after a folded act / glu -> residual=r
 -> out = sparse_linear(x, ..., epilogue=..., residual=r)    [..., H] for glu, else [..., N]

HF LlamaMLP, `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with `hidden = residual + mlp(...)`, becomes two ops:
gate/up with "silu*up", down_proj with the residual (as o_proj with its own).  The op computes split-K sum + bias
-> act / glu -> + residual -> cast in one kernel (codegen/kernels/epilogue.py) instead of a pointwise kernel
(or two) over [M, N] after it.  Only exact folds:

- every folded value has no other user (the op's output, the split views, the activation);
- the residual has the output's shape (no broadcasting), dtype and device, is computed before the op (it is read
  there) and no in-place op runs between the op and the add; alpha = 1;
- not while a gradient may flow through the op (grad mode and an input requiring grad): its backward has no
  epilogue (ops.py raises);
- a GLU needs the activation on the FIRST half (gate rows first, as fused siblings in graph order give it).
Left alone: tensor-parallel ops (sparse_linear_dtensor), sliced ops (their output is scattered first), and the
unfused SwiGLU `act(gate) * up` of two separate ops (fuse_siblings=False: only the act folds into gate's op).

Counters: counters["flashllm"]["fused_epilogues"] (ops given an epilogue), ["epilogue_act"], ["epilogue_glu"],
["epilogue_residual"] (folds), ["epilogue_skip_<reason>"] where a pattern was found but not folded.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

import flashllm_compile.ops  # noqa: F401  (registers torch.ops.flashllm)
from flashllm_compile.codegen.epilogue_spec import GLU_SUFFIX
from flashllm_compile.passes.fx_meta import may_mutate, meta_val

log = logging.getLogger("flashllm_compile")
# the rewritten ops, and those a sparsify_'d model (SparseLinear) calls itself through the packet
SPARSE_LINEAR = (torch.ops.flashllm.sparse_linear.default, torch.ops.flashllm.sparse_linear)

ACT_FUNCTIONS = {F.silu: "silu", F.relu: "relu", torch.relu: "relu", F.gelu: "gelu"}  # F.gelu is torch._C._nn.gelu
ACT_METHODS = {"relu": "relu"}
GELU_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}
MUL_FUNCTIONS, ADD_FUNCTIONS = {operator.mul, torch.mul}, {operator.add, torch.add}
SPLIT_FUNCTIONS, SPLIT_METHODS = {torch.split: "split", torch.chunk: "chunk"}, {"split", "chunk"}


@dataclass
class Fold:
    """One folded pattern: `last` is the node whose value the op returns afterwards; `dead` are erased."""

    kind: str  # "act" | "glu" | "residual"
    last: fx.Node
    dead: list[fx.Node] = field(default_factory=list)
    epilogue: str | None = None  # the op's epilogue string ("silu", "silu*up")
    residual: fx.Node | None = None


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _calls(node: fx.Node, functions: set, method: str) -> bool:
    return (node.op == "call_function" and node.target in functions) or (node.op == "call_method"
                                                                          and node.target == method)


def _activation(node: fx.Node, x: fx.Node) -> str | None:
    """The epilogue name of `node` when it is act(x) for a foldable activation, else None."""
    kind = (ACT_FUNCTIONS.get(node.target) if node.op == "call_function" else
            ACT_METHODS.get(node.target) if node.op == "call_method" else None)
    if kind is None or node.args != (x,) or set(node.kwargs) - {"inplace", "approximate"}:
        return None
    if node.kwargs.get("inplace", False):
        return None
    return GELU_APPROXIMATE.get(node.kwargs.get("approximate", "none")) if kind == "gelu" else kind


def _other_operand(node: fx.Node, x: fx.Node, functions: set, method: str) -> fx.Node | None:
    """For node = f(x, other) or f(other, x), f a binary op of `functions` / `method` (alpha 1): `other` (a node)."""
    if not _calls(node, functions, method) or len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    other = b if a is x else a if b is x else None
    return other if isinstance(other, fx.Node) and other is not x else None


def _same_shape(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()
            and all(statically_known_true(p == q) for p, q in zip(a.shape, b.shape)))


def _halves(split: fx.Node, y: fx.Node) -> dict[int, fx.Node] | None:
    """{0: first half, 1: second half} (the getitem nodes) when `split` cuts y [..., 2H] into two [..., H] along
    the last dim and those are its only users; else None."""
    is_split = split.op == "call_function" and split.target in SPLIT_FUNCTIONS or (
        split.op == "call_method" and split.target in SPLIT_METHODS)
    val = meta_val(y)
    if not is_split or split.args[:1] != (y,) or not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    kind = split.target if split.op == "call_method" else SPLIT_FUNCTIONS[split.target]
    size = _arg(split, 1, "chunks") if kind == "chunk" else _arg(split, 1, "split_size_or_sections",
                                                                  split.kwargs.get("split_size"))
    dim = _arg(split, 2, "dim", 0)
    n = val.shape[-1]
    if dim not in (-1, val.dim() - 1) or not isinstance(n, int) or n % 2:
        return None
    if not (size == 2 if kind == "chunk" else size in (n // 2, [n // 2, n // 2], (n // 2, n // 2))):
        return None
    items = {u.args[1]: u for u in split.users if u.target is operator.getitem and u.args[0] is split}
    return items if len(items) == len(split.users) == 2 and set(items) == {0, 1} else None


def _match_glu(op: fx.Node) -> tuple[Fold | None, str | None]:
    """y.split -> act(first) * second (see the module docstring); (fold, None) or (None, skip reason or None)."""
    if len(op.users) != 1 or (halves := _halves(next(iter(op.users)), op)) is None:
        return None, None
    split = next(iter(op.users))
    for first, second in ((halves[0], halves[1]), (halves[1], halves[0])):
        for act_node in first.users:
            act = _activation(act_node, first)
            muls = [u for u in act_node.users if _other_operand(u, act_node, MUL_FUNCTIONS, "mul") is second]
            if act is None or not muls:
                continue
            if first is halves[1]:
                return None, "glu_order"  # act on the up half: the kernel's GLU takes the gate first
            if len(first.users) != 1 or len(act_node.users) != 1 or len(second.users) != 1:
                return None, "other_users"
            return Fold("glu", muls[0], [split, first, second, act_node, muls[0]], act + GLU_SUFFIX), None
    return None, None


def _match_act(op: fx.Node) -> tuple[Fold | None, str | None]:
    acts = [(u, act) for u in op.users if (act := _activation(u, op)) is not None]
    if not acts:
        return None, None
    if len(op.users) != 1:
        return None, "other_users"
    (node, act), = acts
    return Fold("act", node, [node], act), None


def _match_residual(op: fx.Node, tail: fx.Node, order: dict[fx.Node, int],
                    nodes: list[fx.Node]) -> tuple[Fold | None, str | None]:
    """tail + r or r + tail, tail = the op's value after the folds so far."""
    adds = [(u, r) for u in tail.users if (r := _other_operand(u, tail, ADD_FUNCTIONS, "add")) is not None]
    if not adds:
        return None, None
    if len(tail.users) != 1:
        return None, "other_users"
    (add, r), = adds
    y, res = meta_val(tail), meta_val(r)
    if not isinstance(res, torch.Tensor) or res.dtype != y.dtype or res.device != y.device:
        return None, "residual_dtype"
    if not (_same_shape(res, y) and _same_shape(meta_val(add), y)):
        return None, "residual_shape"  # broadcasting
    if r.op not in ("placeholder", "get_attr") and order[r] > order[op]:
        return None, "residual_order"
    if any(may_mutate(n) for n in nodes[order[op] + 1:order[add]]):
        return None, "mutation"
    return Fold("residual", add, [add], residual=r), None


def _may_need_grad(op: fx.Node, residual: fx.Node | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    inputs = [*op.all_input_nodes, *([residual] if residual is not None else [])]
    return any(getattr(meta_val(n), "requires_grad", False) for n in inputs)


def _apply(graph: fx.Graph, op: fx.Node, folds: list[Fold], order: dict[fx.Node, int]) -> None:
    kwargs = dict(op.kwargs)
    for fold in folds:
        if fold.epilogue:
            kwargs["epilogue"] = fold.epilogue
        if fold.residual is not None:
            kwargs["residual"] = fold.residual
            if fold.residual.op == "get_attr" and order[fold.residual] > order[op]:
                op.prepend(fold.residual)  # a get_attr has no inputs and no effects: safe to move up
    op.kwargs = kwargs
    last = folds[-1].last
    last.replace_all_uses_with(op)
    for key in ("val", "example_value", "tensor_meta"):  # the op's value is now last's
        if key in last.meta:
            op.meta[key] = last.meta[key]
        else:
            op.meta.pop(key, None)
    for node in sorted((n for f in folds for n in f.dead), key=order.__getitem__, reverse=True):  # users first
        graph.erase_node(node)


def describe(folds: list[Fold]) -> str:
    """"+silu*up +residual" for reports."""
    return " ".join(f"+{f.epilogue or f.kind}" for f in folds)


def fuse_epilogues(gm: fx.GraphModule) -> dict[str, str]:
    """Fold the patterns of the module docstring into the sparse_linear ops of `gm` (in place); returns
    {op name: what was folded, e.g. "+silu*up +residual"}."""
    graph = gm.graph
    nodes = list(graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    folded: dict[str, str] = {}
    for op in [n for n in nodes if n.op == "call_function" and n.target in SPARSE_LINEAR]:
        if op.kwargs.get("epilogue") or op.kwargs.get("residual") is not None:
            continue
        first, reason = _match_glu(op)
        if first is None and reason is None:
            first, reason = _match_act(op)
        folds = [first] if first is not None else []
        if reason is None:
            residual, reason = _match_residual(op, first.last if first else op, order, nodes)
            folds += [residual] if residual is not None else []
        if reason is not None:
            counters["flashllm"][f"epilogue_skip_{reason}"] += 1
            log.info("flashllm: %s: epilogue not folded: %s", op.args[10], reason)
        if not folds:
            continue
        if _may_need_grad(op, folds[-1].residual):
            counters["flashllm"]["epilogue_skip_requires_grad"] += 1
            continue
        _apply(graph, op, folds, order)
        counters["flashllm"]["fused_epilogues"] += 1
        for fold in folds:
            counters["flashllm"][f"epilogue_{fold.kind}"] += 1
        folded[op.args[10]] = describe(folds)
        log.info("flashllm: %s: %s folded into the sparse_linear epilogue", op.args[10], folded[op.args[10]])
    if folded:
        graph.lint()
        gm.recompile()
    return folded
