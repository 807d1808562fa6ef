"""Sibling fusion: linears chosen for rewriting that read the same input become ONE sparse_linear call.

LLaMA's q/k/v and gate/up projections, OPT's q/k/v:

    q = x @ Wq^T + bq;  k = x @ Wk^T + bk;  v = x @ Wv^T + bv         three launches, three skinny shapes
 -> qkv = sparse_linear(x, compress(cat[Wq; Wk; Wv]), cat[bq, bk, bv])  one launch on [Nq + Nk + Nv, K]
    q, k, v = qkv.split([Nq, Nk, Nv], -1)                              views, no copy

The concatenated weight is compressed once per set of parameters (codegen/formats/cache.py `compress_weights`),
and one weight token watches every member for in-place updates.  Siblings must share x (the same FX node),
dtype, device, K, storage orientation (Conv1D's [K, N] or [N, K]) and having a bias; they must not depend on
each other (checked with networkx on the FX graph) and must be distinct parameters.  Contracting a set of
nodes into one creates a cycle exactly when a path leads from one member to another, so independent members
can be fused; the fused node goes right before the first member, where all operands are available (members
whose bias is computed later in the graph are left out) and which precedes every member's users.

The op also gets the members' parameters themselves (its `weights` argument, no copy), so that a parameter
replaced after compile, or the graph reused for another module instance, raises; and its dense fallback
(kernel "auto" on CUDA where cuBLAS is faster, or "dense") runs one GEMM per member on them in place, outputs
concatenated.  An in-graph torch.cat of the weights would copy them on every call (measured on the H100: an
8-layer LLaMA at 0.7x of inductor); only HF Conv1D members ([K, N_i]) and sliced groups still get one.
"""

from __future__ import annotations

import collections
import operator

import networkx as nx
import torch
from torch import fx

from flashllm_compile.passes.find_sparse_linears import LinearMatch
from flashllm_compile.passes.fx_meta import call_with_meta, meta_val

MIN_GROUP = 2  # a "group" of one is just the plain rewrite
VIEW_METHODS = {"view", "view_as"}  # users that need a contiguous-compatible layout
VIEW_FUNCTIONS = {torch.Tensor.view, torch.Tensor.view_as, torch.ops.aten.view.default}


def graph_to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Data-dependency DAG of an FX graph: an edge from every input node to each of its users."""
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from((arg, node) for node in graph.nodes for arg in node.all_input_nodes)
    return dag


def _sibling_key(match: LinearMatch) -> tuple:
    w = match.weight
    return match.x, w.dtype, w.device, match.in_features, match.transposed, match.bias is None


def _available_before(operand: fx.Node | None, first: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Can `operand` be used by a node inserted right before `first`? get_attr nodes are moved up if needed."""
    return operand is None or operand.op in ("placeholder", "get_attr") or order[operand] < order[first]


def find_sibling_groups(gm: fx.GraphModule, matches: list[LinearMatch]) -> list[list[LinearMatch]]:
    """Groups (in graph order, each >= MIN_GROUP members) of rewritable linears to fuse; see the module docstring.
    Tensor-parallel (DTensor) linears are not fused."""
    buckets: dict[tuple, list[LinearMatch]] = collections.defaultdict(list)
    for m in matches:
        if m.skip_reason is None and getattr(m, "dtensor", None) is None:
            buckets[_sibling_key(m)].append(m)
    if not any(len(b) >= MIN_GROUP for b in buckets.values()):
        return []
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    dag = graph_to_networkx(gm.graph)
    descendants: dict[fx.Node, set[fx.Node]] = {}

    def independent(a: fx.Node, b: fx.Node) -> bool:
        for u, v in ((a, b), (b, a)):
            if u not in descendants:
                descendants[u] = nx.descendants(dag, u)
            if v in descendants[u]:
                return False
        return True

    groups = []
    for bucket in buckets.values():
        remaining = sorted(bucket, key=lambda m: order[m.node])
        while len(remaining) >= MIN_GROUP:  # greedy: the first member always joins, so `remaining` shrinks
            group, rest = [], []
            for m in remaining:
                fits = not group or (
                    all(m.weight is not g.weight and independent(m.node, g.node) for g in group)
                    and all(_available_before(op, group[0].node, order) for op in (m.weight_node, m.bias)))
                (group if fits else rest).append(m)
            if len(group) >= MIN_GROUP:
                groups.append(group)
            remaining = rest
    return sorted(groups, key=lambda g: order[g[0].node])


def fused_name(members: list[LinearMatch]) -> str:
    """"model.layers.0.self_attn.{q_proj,k_proj,v_proj}" for error messages and logs."""
    prefixes, leaves = zip(*(m.name.rpartition(".")[::2] for m in members))
    if len(members) == 1:
        return members[0].name
    if len(set(prefixes)) == 1:
        return f"{prefixes[0]}{'.' if prefixes[0] else ''}{{{','.join(leaves)}}}"
    return "+".join(m.name for m in members)


def concat_operands(graph: fx.Graph, members: list[LinearMatch], with_dense: bool) -> tuple[fx.Node | None, ...]:
    """(bias [N_total] or None, dense weight [N_total, K] or None) of the members, as nodes inserted at the current
    insertion point (which must follow the members' operands; get_attr operands are moved up to it)."""
    first = members[0].node
    order = {node: i for i, node in enumerate(graph.nodes)}
    for m in members:
        for operand in (m.weight_node, m.bias):
            if operand is not None and operand.op == "get_attr" and order[operand] > order[first]:
                first.prepend(operand)  # a get_attr has no inputs and no effects: safe to move earlier
    bias = None
    if members[0].bias is not None:
        biases = [m.bias for m in members]
        bias = biases[0] if len(biases) == 1 else call_with_meta(graph, torch.cat, biases)  # [N_total]
    dense = None
    if with_dense:  # a copy of the weights on every call: only where the op may run it
        weights = [m.weight_node for m in members]
        if members[0].transposed:  # Conv1D: each [K, N_i] -> [K, N_total] -> a [N_total, K] view
            dense = call_with_meta(graph, torch.t, weights[0] if len(weights) == 1 else
                                   call_with_meta(graph, torch.cat, weights, 1))
        else:
            dense = weights[0] if len(weights) == 1 else call_with_meta(graph, torch.cat, weights)  # [N_total, K]
    return bias, dense


def _view_fails(node: fx.Node, val: torch.Tensor) -> bool:
    """Would a `.view` user of `node` fail once node's value is `val`, a strided slice of the fused output (a view
    merging the last dim with another one needs contiguous memory)?  Checked by running it on the fake value."""
    for user in node.users:
        method = user.op == "call_method" and user.target in VIEW_METHODS
        if not (method or user.op == "call_function" and user.target in VIEW_FUNCTIONS):
            continue
        args, kwargs = fx.node.map_arg((user.args, user.kwargs), lambda n: val if n is node else meta_val(n))
        try:
            getattr(args[0], user.target)(*args[1:], **kwargs) if method else user.target(*args, **kwargs)
        except (RuntimeError, ValueError):
            return True
    return False


def split_outputs(graph: fx.Graph, y: fx.Node, members: list[LinearMatch]) -> list[fx.Node]:
    """Views of y [..., N_total] along the last dim, one per member ([..., N_i]); a contiguous copy for a member
    whose output a `.view` could not reshape otherwise."""
    parts = call_with_meta(graph, torch.split, y, [m.out_features for m in members], -1)
    outs = []
    for i, m in enumerate(members):
        out = call_with_meta(graph, operator.getitem, parts, i)
        if meta_val(out) is not None and _view_fails(m.node, meta_val(out)):
            out = call_with_meta(graph, torch.Tensor.contiguous, out)
        outs.append(out)
    return outs
