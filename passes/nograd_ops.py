"""Inductor post-grad pass: call `sparse_linear_nograd`, the op's twin without an autograd layer.

Why: a decode graph under `mode="reduce-overhead"` is recorded again for every new KV cache, and a recording runs
each op's Python once; custom_op's autograd and backend wrappers cost ~50 us of host time a call on the H100
machine (benchmarks/RESULTS.md, tenth session).  Safe everywhere after AOTAutograd: its forward and backward graphs
run without autograd (a training graph's gradients come from AOTAutograd's own autograd.Function), so no op in
them needs an autograd layer.  The backend's Dynamo-level graph, which tests and reports inspect, keeps
`sparse_linear`; only the code Inductor generates calls the twin.

Counter: counters["flashllm_nograd"]["ops"] (outside counters["flashllm"], whose keys describe the rewrites).
"""

from __future__ import annotations

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import flashllm_compile.ops  # noqa: F401 -- registers the ops


class UseNogradOps(CustomGraphPass):
    """`config.post_grad_custom_post_pass`: retarget every sparse_linear call of a post-grad graph to the twin."""

    def __call__(self, graph: fx.Graph) -> None:
        twin = torch.ops.flashllm.sparse_linear_nograd.default
        for node in graph.find_nodes(op="call_function", target=torch.ops.flashllm.sparse_linear.default):
            node.target = twin
            counters["flashllm_nograd"]["ops"] += 1

    def uuid(self) -> str:
        return "flashllm_compile.passes.nograd_ops.UseNogradOps/1"  # bump when the pass changes (FX graph cache key)
