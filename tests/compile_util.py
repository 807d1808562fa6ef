"""Test helper shared by the graph-pass tests (imported as `compile_util`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

from flashllm_compile import ops
from flashllm_compile.backend import flashllm_backend


def compile_and_compare(model: nn.Module, *inputs: torch.Tensor, rtol: float, atol: float, **options):
    """Compile `model` with the flashllm backend (options), run it once without grad and compare with eager;
    returns (output, sparse_linear calls made, the rewritten GraphModules)."""
    graphs = []

    def backend(gm, example_inputs):
        compiled = flashllm_backend(gm, example_inputs, options=options)
        graphs.append(gm)
        return compiled

    with torch.no_grad():
        ref = model(*inputs)
        hits = sum(ops.KERNEL_HITS.values())
        out = torch.compile(model, backend=backend)(*inputs)
        hits = sum(ops.KERNEL_HITS.values()) - hits
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    return out, hits, graphs
