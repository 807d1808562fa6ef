"""Symbolic decode shapes: one compile serves every token count M = 1..64.

Dynamo specialises M = 1 (0/1 specialisation), so `dynamic=True` makes at most two graphs: M = 1 and a symbolic
M >= 2.  The rewritten graph carries SymInt shapes through the fused / sliced sparse_linear nodes (the op's fake
implementation), and the kernel for each M bucket is chosen when the op runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.source import ConstantSource
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from flashllm_compile import ops
from flashllm_compile.backend import flashllm_backend
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.passes.fx_meta import meta_val

transformers = pytest.importorskip("transformers")
from flashllm_compile.prune import magnitude_prune_

SPARSE_LINEAR = torch.ops.flashllm.sparse_linear.default
RTOL, ATOL = 1e-4, 1e-4


class Recorder:
    """flashllm backend that keeps the rewritten graphs."""

    def __init__(self, **options):
        self.options, self.graphs = options, []

    def __call__(self, gm, example_inputs):
        compiled = flashllm_backend(gm, example_inputs, options=self.options)
        self.graphs.append(gm)
        return compiled


def op_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is SPARSE_LINEAR]


def test_llama_decode_m_1_to_64_one_recompile():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    magnitude_prune_(model, 0.8, progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[5:17] = 0  # structured zeros: sliced under symbolic M too
    recorder = Recorder(min_weight_numel=1024)
    compiled = torch.compile(model, backend=recorder, dynamic=True)
    with torch.no_grad():
        for m in range(1, 65):  # M decode sequences of one token each
            ids = torch.randint(0, 64, (m, 1))
            hits = sum(ops.KERNEL_HITS.values())
            out = compiled(ids, use_cache=False).logits
            assert sum(ops.KERNEL_HITS.values()) - hits == 4  # qkv, o, gate_up, down: the rewritten ops ran
            torch.testing.assert_close(out, model(ids, use_cache=False).logits, rtol=RTOL, atol=ATOL)
    assert counters["stats"]["unique_graphs"] <= 2  # M = 1, then one symbolic graph for M = 2..64
    graph = recorder.graphs[-1]
    names = sorted(n.args[10] for n in op_nodes(graph))
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.{gate_proj,up_proj}",
                     "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"]
    assert all(isinstance(meta_val(n).shape[0], torch.SymInt) for n in op_nodes(graph))  # symbolic M
    graphs = counters["flashllm"]["skip_too_dense"]  # the unpruned lm_head, once per compiled graph
    # epilogues: gate/up's SwiGLU and o_proj's residual (down_proj is sliced: its output is scattered first)
    assert dict(counters["flashllm"]) == {"linear_found": 8 * graphs, "rewritten": 7 * graphs,
                                          "skip_too_dense": graphs, "fused_siblings": 2 * graphs,
                                          "fused_linears": 5 * graphs, "sliced_rows": graphs,
                                          "fused_epilogues": 2 * graphs, "epilogue_glu": graphs,
                                          "epilogue_residual": graphs}


class Block(nn.Module):
    """Fused siblings (one with zero rows), then a plain sparse linear, on x [B, T, K]."""

    def __init__(self, k: int = 72, n: int = 48):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(k, n), nn.Linear(k, n + 8), nn.Linear(2 * n + 8, k)
        with torch.no_grad():
            for lin in (self.a, self.b, self.c):
                lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.8, 0.0)
            self.a.weight[:6] = 0

    def forward(self, x):
        return self.c(torch.cat([self.a(x).relu(), self.b(x)], -1))


def test_mark_dynamic_token_dim_one_graph_kernel_chosen_per_m():
    """mark_dynamic on T (from M = 2): a single graph; the Triton kernel family differs by M bucket at run time."""
    model = Block()
    recorder = Recorder(kernel="triton", min_weight_numel=1024)
    compiled = torch.compile(model, backend=recorder)
    with torch.no_grad():
        for t in (2, 3, 8, 17, 64):
            x = torch.randn(2, t, 72)
            torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x), model(x), rtol=RTOL, atol=ATOL)
    assert counters["stats"]["unique_graphs"] == 1 and len(recorder.graphs) == 1
    assert dict(counters["flashllm"]) == {"linear_found": 3, "rewritten": 3, "fused_siblings": 1,
                                          "fused_linears": 2, "sliced_rows": 1}
    assert len(set(ops.KERNEL_HITS) - {"dense", "emulated"}) >= 2, ops.KERNEL_HITS  # per-M-bucket families


def test_fake_impl_with_symbolic_shapes():
    w = torch.randn(40, 72).masked_fill_(torch.rand(40, 72) < 0.8, 0.0)
    fmt = BitmapWeight.from_dense(w, 64)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC, DimDynamic.STATIC])
    x = mode.from_tensor(torch.randn(3, 5, 72), source=ConstantSource("x"), symbolic_context=ctx)
    with mode:
        tensors = [mode.from_tensor(t) for t in fmt.tensors()]
        out = SPARSE_LINEAR(x, *tensors, None, None, 40, 72, 64, "auto", "w", -1)
    assert isinstance(out.shape[0], torch.SymInt) and isinstance(out.shape[1], torch.SymInt)
    assert out.shape[2] == 40 and out.dtype == x.dtype
