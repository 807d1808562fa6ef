"""Create FX nodes with a valid meta['val'], so later passes and Inductor can read shapes and dtypes."""

from __future__ import annotations

import contextlib
from typing import Any

import torch.utils._pytree as pytree
from torch import fx


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
