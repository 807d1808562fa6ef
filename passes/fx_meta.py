"""Create FX nodes with a valid meta['val'], so later passes and Inductor can read shapes and dtypes."""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def meta_val(node: fx.Node) -> Any:
    """The fake value of a node: meta['val'], or Dynamo's meta['example_value']; None when it has neither."""
    return node.meta.get("val", node.meta.get("example_value"))


def call_with_meta(graph: fx.Graph, target, *args: Any, **kwargs: Any) -> fx.Node:
    """graph.call_function(target, args, kwargs) at the current insertion point, with meta['val'] (and Dynamo's
    'example_value') computed by running `target` on the arguments' fake values (symbolic shapes included).
    Left without one when an argument node has no fake value."""
    node = graph.call_function(target, args, kwargs)
    missing: list[fx.Node] = []
    vals = fx.node.map_arg((args, kwargs), lambda n: meta_val(n) if meta_val(n) is not None else missing.append(n))
    if not missing:
        fake_modes = [v.fake_mode for v in pytree.tree_leaves(vals) if hasattr(v, "fake_mode")]
        with fake_modes[0] if fake_modes else contextlib.nullcontext():  # Python scalars become fake tensors too
            node.meta["val"] = node.meta["example_value"] = target(*vals[0], **vals[1])
    return node


def may_mutate(node: fx.Node) -> bool:
    """Could `node` write to a tensor in place (conservative: in-place names, out=, inplace=True, setitem)?"""
    if node.op not in ("call_function", "call_method"):
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return ((name.endswith("_") and not name.endswith("__")) or node.target in INPLACE_OPERATORS
            or "out" in node.kwargs or node.kwargs.get("inplace") is True)
