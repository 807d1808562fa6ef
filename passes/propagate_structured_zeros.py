"""Structured zeros propagate: a linear whose input features are exact zeros drops those weight columns too.

passes/slice_structured_zeros.py slices the all-zero rows and columns of ONE weight.  A zero row has a
consequence downstream: output feature r of  y = x @ W^T + b  is an exact 0 for every finite x when W[r] is
all-zero and b[r] is 0 (or there is no bias), and ops that map 0 to 0 keep it one:

    g = gate(x)                  gate row r all-zero            g[..., r] == 0
    h = silu(g) * up(x)          silu(0) = 0, 0 * u = 0         h[..., r] == 0
    y = down(h)                  down's column r only ever multiplies that 0: sliced away as if it were all-zero

`zero_input_features` finds, for every linear the backend rewrites, which features of its input x (the last dim)
are such zeros: a forward dataflow over the FX graph, from the linears whose zero rows create them:

    linear           row r all-zero (outside the columns its own input zeroes) and bias[r] == 0 or no bias
    silu relu gelu tanh leaky_relu neg, dropout, casts (.to .float ...), contiguous / clone / detach: f(0) = 0
    view / reshape   keeping the last dim (each element's feature stays its flat index modulo it)
    a * b            zero where a OR b is (the other operand finite);  a / c for a nonzero finite number c
    a + b, a - b     zero where a AND b are (a broadcast operand, or a number other than 0, carries no zeros)
    split / chunk    along the last dim: each piece its slice of the features

Anything else (sigmoid, softmax, norms, + 1, attention, indexing, ...) stops it.  Producers are linears with a
real 2-D weight that are rewritten, or left dense only for being too dense / too small; tensor-parallel (DTensor)
linears neither produce nor consume.  A value that may be written in place (an in-place op, out= or inplace=True
on it or on anything that may alias it) carries no zeros.

Exact for finite activations, like the slicing itself: dense math gives 0 * Inf = NaN where the sliced op drops
the term; a weight column with a non-finite entry is kept (slice_structured_zeros.dropped_inputs).  The consumer's
op watches the producers' weights and biases and receives those that are graph inputs (`guards`), so updating or
replacing them after compile raises, as for its own weight, instead of relying on zeros that are gone.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from flashllm_compile.codegen.formats.cache import derive_once
from flashllm_compile.passes.dtensor_linears import is_dtensor
from flashllm_compile.passes.find_sparse_linears import LinearMatch, resolve_weight
from flashllm_compile.passes.fx_meta import may_mutate, meta_val
from flashllm_compile.passes.slice_structured_zeros import dropped_inputs

aten = torch.ops.aten
PRODUCER_SKIPS = {None, "too_dense", "too_small"}  # linears computed as written: their zero rows are zeros

# f(0) = 0 and a new tensor; the functions' `inplace=True` is a mutation (fx_meta.may_mutate)
ZERO_ACTS = {F.silu, F.relu, torch.relu, F.gelu, torch.tanh, F.tanh, F.leaky_relu, torch.neg, operator.neg,
             aten.silu.default, aten.relu.default, aten.gelu.default, aten.tanh.default, aten.neg.default}
ZERO_ACT_METHODS = {"relu", "tanh", "neg"}
# f(0) = 0, possibly returning the input itself (an alias)
ZERO_SAME = {F.dropout, aten.clone.default, aten._to_copy.default, aten.alias.default}
ZERO_SAME_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "contiguous", "clone", "detach"}
RESHAPES, RESHAPE_METHODS = {torch.reshape, aten.view.default, aten.reshape.default}, {"view", "reshape"}
MULS, ADDS, DIVS = ({operator.mul, torch.mul, aten.mul.Tensor}, {operator.add, torch.add, aten.add.Tensor},
                    {operator.truediv, torch.div, torch.true_divide, aten.div.Tensor})
SUBS = {operator.sub, torch.sub, aten.sub.Tensor}
SPLITS, SPLIT_METHODS = {torch.split, torch.chunk, aten.split.Tensor, aten.split_with_sizes.default}, {"split", "chunk"}


@dataclass(frozen=True)
class ZeroFeatures:
    """Features (last dim) of a node's value that are exact zeros for finite activations, and why."""

    mask: torch.Tensor  # bool [F] on the CPU: feature f is an exact zero
    producers: tuple[LinearMatch, ...]  # the linears whose zero rows make them so
    guards: tuple[tuple[fx.Node, torch.Tensor], ...]  # (node, tensor): the producers' weights and biases


def _is(node: fx.Node, functions: set, methods: set) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _features(node) -> int | None:
    """The static size of the last dim of a node's tensor value, else None."""
    val = meta_val(node) if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or is_dtensor(val) or val.dim() == 0:
        return None
    return val.shape[-1] if isinstance(val.shape[-1], int) else None


def _union(parts: list[ZeroFeatures], mask: torch.Tensor) -> ZeroFeatures | None:
    """ZeroFeatures(mask) citing every producer / guard of `parts` (deduplicated); None when mask has no zero."""
    if not bool(mask.any()):
        return None
    producers = {id(p): p for z in parts for p in z.producers}
    guards = {id(n): (n, t) for z in parts for n, t in z.guards}
    return ZeroFeatures(mask, tuple(producers.values()), tuple(guards.values()))


def _is_fresh(node: fx.Node, producers: dict[fx.Node, LinearMatch]) -> bool:
    """Does `node` return a new tensor (no alias of an input)?  Conservative: only linears and arithmetic."""
    if node in producers:
        return True
    return (_is(node, ZERO_ACTS | MULS | ADDS | SUBS | DIVS, ZERO_ACT_METHODS | {"mul", "add", "sub", "div"})
            and not may_mutate(node))


def _written_in_place(graph: fx.Graph, producers: dict[fx.Node, LinearMatch]) -> set[fx.Node]:
    """Nodes whose value may be written in place: every node sharing an alias root (the first argument of any
    op that is not `_is_fresh`, followed up) with a tensor an op mutates (its first argument, or out=)."""
    root: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        first = node.args[0] if node.args else None
        aliasing = node.op in ("call_function", "call_method") and not _is_fresh(node, producers)
        root[node] = root.get(first, first) if aliasing and isinstance(first, fx.Node) else node
    mutated = set()
    for node in graph.nodes:
        if may_mutate(node):
            targets = [node.args[0] if node.args else None, node.kwargs.get("out")]
            mutated |= {root.get(t, t) for t in targets if isinstance(t, fx.Node)}
    return {node for node, r in root.items() if r in mutated}


def _producer_zeros(match: LinearMatch, inputs: dict[fx.Node, object], x_zeros: ZeroFeatures | None,
                    gm: fx.GraphModule) -> ZeroFeatures | None:
    """Output features of a linear that are exact zeros: all-zero weight rows (counting the columns its input
    zeroes as zero) with a zero bias.  Cached per weight (and bias) version."""
    bias = None
    if match.bias is not None:
        resolved = resolve_weight(match.bias, gm, inputs)
        if resolved is None or resolved[0].shape != (match.out_features,):
            return None  # a bias computed in the graph: unknown
        bias = resolved[0]
    zero_inputs = x_zeros.mask if x_zeros is not None else None

    def build() -> torch.Tensor:
        with torch.no_grad():
            w = match.weight.t() if match.transposed else match.weight  # [N, K]
            nonzero = w != 0  # NaN counts as nonzero
            if zero_inputs is not None:
                nonzero &= ~dropped_inputs(w, zero_inputs)
            zero = ~nonzero.any(1)  # [N]
            if bias is not None:
                zero &= bias == 0
            return zero.cpu()

    tag = ("zero_rows", match.transposed, *((tuple(zero_inputs.nonzero().flatten().tolist()),)
                                             if zero_inputs is not None else ()))
    mask = derive_once([match.weight, *([bias] if bias is not None else [])], tag, build)
    own = ZeroFeatures(mask, (match,), ((match.weight_node, match.weight),
                                        *(((match.bias, bias),) if bias is not None else ())))
    return _union([own, *([x_zeros] if x_zeros is not None else [])], mask)


def _split_pieces(node: fx.Node, n: int) -> list[int] | None:
    """Piece sizes of a split / chunk of a [..., n] value along its last dim, else None."""
    x_val, parts = meta_val(node.args[0]), meta_val(node)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or not isinstance(dim, int) or dim % x_val.dim() != x_val.dim() - 1:
        return None
    sizes = [p.shape[-1] if isinstance(p, torch.Tensor) else None for p in parts]
    return sizes if all(isinstance(s, int) for s in sizes) and sum(sizes) == n else None


def _binary(node: fx.Node, zeros: dict[fx.Node, ZeroFeatures], n: int) -> ZeroFeatures | None:
    """mul: OR of the operands' zeros; add / sub: AND; div: the numerator's, by a nonzero finite number."""
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or "out" in node.kwargs:
        return None
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, (int, float)) and not math.isfinite(alpha):
        return None
    operands = []  # per operand: ZeroFeatures (None: no zeros); a Python number stays a number
    for a in node.args:
        if isinstance(a, fx.Node):
            operands.append(zeros.get(a) if _features(a) == n else None)
        elif isinstance(a, (int, float)):
            operands.append(a)
        else:
            return None
    if _is(node, DIVS, {"div"}):
        den = operands[1]
        ok = isinstance(den, (int, float)) and den != 0 and math.isfinite(den)
        return operands[0] if ok and isinstance(operands[0], ZeroFeatures) else None
    if any(isinstance(o, (int, float)) and not math.isfinite(o) for o in operands):
        return None  # 0 * inf = NaN whatever the inputs
    found = [o for o in operands if isinstance(o, ZeroFeatures)]
    if not found:
        return None
    if _is(node, MULS, {"mul"}):
        mask = found[0].mask | found[-1].mask
    elif all(isinstance(o, ZeroFeatures) or (isinstance(o, (int, float)) and o == 0) for o in operands):
        mask = found[0].mask & found[-1].mask  # add / sub of zeros (or of 0)
    else:
        return None
    return _union(found, mask)


def _node_zeros(node: fx.Node, zeros: dict[fx.Node, ZeroFeatures], pieces: dict[fx.Node, list],
                producers: dict[fx.Node, LinearMatch], inputs: dict, gm: fx.GraphModule) -> ZeroFeatures | None:
    n = _features(node)
    if (n is None and not _is(node, SPLITS, SPLIT_METHODS)) or "out" in node.kwargs:
        return None
    if node in producers:
        match = producers[node]
        x_zeros = zeros.get(match.x) if _features(match.x) == match.in_features else None
        return _producer_zeros(match, inputs, x_zeros, gm)
    first = node.args[0] if node.args else None
    if node.target is operator.getitem and first in pieces and isinstance(node.args[1], int):
        return pieces[first][node.args[1]]
    if _is(node, MULS | ADDS | SUBS | DIVS, {"mul", "add", "sub", "div"}):
        return _binary(node, zeros, n)
    if not isinstance(first, fx.Node) or first not in zeros:
        return None
    if _is(node, SPLITS, SPLIT_METHODS):
        sizes = _split_pieces(node, _features(first))
        if sizes is not None:
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            pieces[node] = [_union([zeros[first]], zeros[first].mask[s:s + size]) for s, size in zip(starts, sizes)]
        return None
    if _features(first) != n:  # unary ops below: the feature dim must stay the last dim, same size
        return None
    if _is(node, ZERO_ACTS | ZERO_SAME, ZERO_ACT_METHODS | ZERO_SAME_METHODS | RESHAPE_METHODS) or (
            node.op == "call_function" and node.target in RESHAPES):
        return zeros[first]
    return None


def _operands(node: fx.Node) -> list[fx.Node]:
    """The operands whose zeros `node` may carry (for the backward walk to what matters)."""
    if node.target is operator.getitem or _is(node, MULS | ADDS | SUBS | DIVS, {"mul", "add", "sub", "div"}):
        return [a for a in node.args if isinstance(a, fx.Node)]
    if _is(node, ZERO_ACTS | ZERO_SAME | RESHAPES | SPLITS,
           ZERO_ACT_METHODS | ZERO_SAME_METHODS | RESHAPE_METHODS | SPLIT_METHODS):
        return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
    return []


def zero_input_features(gm: fx.GraphModule, matches: list[LinearMatch], example_inputs) -> dict[fx.Node, ZeroFeatures]:
    """{linear node: ZeroFeatures of its input x} for every rewritable linear (skip_reason None, not DTensor)
    whose input has features that are exact zeros (see the module docstring)."""
    consumers = [m for m in matches if m.skip_reason is None and m.dtensor is None]
    producers = {m.node: m for m in matches if m.skip_reason in PRODUCER_SKIPS and m.dtensor is None
                 and type(m.weight) in (torch.Tensor, torch.nn.Parameter) and m.weight.dim() == 2
                 and not m.weight.is_meta and m.weight.numel() > 0}
    if not consumers or not producers:
        return {}
    # what matters: the nodes the consumers' inputs can get zeros from (producers' own inputs included)
    needed, stack = set(), [m.x for m in consumers]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack += [producers[node].x] if node in producers else _operands(node)
    if not needed.intersection(producers):
        return {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, example_inputs))
    written = _written_in_place(gm.graph, producers)
    zeros: dict[fx.Node, ZeroFeatures] = {}
    pieces: dict[fx.Node, list] = {}
    for node in gm.graph.nodes:  # topological order: operands first
        if node in needed and node not in written:
            found = _node_zeros(node, zeros, pieces, producers, inputs, gm)
            if found is not None and found.mask.numel() == _features(node):
                zeros[node] = found
    return {m.node: zeros[m.x] for m in consumers if m.x in zeros and zeros[m.x].mask.numel() == m.in_features}
