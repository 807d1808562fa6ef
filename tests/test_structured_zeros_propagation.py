"""Structured zeros propagate (passes/propagate_structured_zeros.py): a linear whose input features are exact zeros
of an upstream linear's all-zero rows (through silu, `* up`, relu, ...) drops those columns of its weight.

Each case checks `counters["flashllm"]`, the [N, K] of the consumer's sparse_linear node, and the output against
the dense eager model (fp32, random data, odd shapes).  The graph-level cases run the rewritten graph without
Inductor (its CPU C++ compile dominates a cold run); the kernel / fusion matrix and the HF models go through it."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from flashllm_compile import ops
from flashllm_compile.backend import flashllm_backend
from flashllm_compile.report import record_decisions

D, H = 67, 150  # hidden, intermediate (odd)
ZERO = [0, 5, 17, 33, 34, 80, 99, 120, 149]  # 9 of 150 rows of the producer: >= 150 / 64 columns of the consumer
RTOL, ATOL = 1e-5, 1e-5
SPARSE_LINEAR = torch.ops.flashllm.sparse_linear.default


def sparse_linear(k: int, n: int, rows=(), bias: bool = False) -> nn.Linear:
    """A 60%-sparse linear (rewritten: min_sparsity 0.5) whose `rows` are all-zero, bias included."""
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.masked_fill_(torch.rand(n, k) < 0.6, 0.0)
        lin.weight[list(rows)] = 0
        if bias:
            lin.bias[list(rows)] = 0
    return lin


class MLP(nn.Module):
    """LLaMA's SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate_rows=ZERO, up_rows=()):
        super().__init__()
        self.gate, self.up, self.down = sparse_linear(D, H, gate_rows), sparse_linear(D, H, up_rows), sparse_linear(H, D)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Chain(nn.Module):
    """fc2(op(fc1(x))): OPT's relu(fc1(x)) -> fc2 for op = relu."""

    def __init__(self, op=F.relu, rows=ZERO, bias: bool = False):
        super().__init__()
        self.op, self.fc1, self.fc2 = op, sparse_linear(D, H, rows, bias), sparse_linear(H, D, bias=bias)

    def forward(self, x):
        return self.fc2(self.op(self.fc1(x)))


def run(model: nn.Module, x: torch.Tensor | None = None, inductor: bool = False, **options):
    """Compile (options) and run once without grad; output == dense eager (NaN == NaN); (output, op nodes by name,
    decisions).  inductor=False: the backend's passes, then the rewritten FX graph as it is."""
    x = torch.randn(2, 5, D) if x is None else x
    graphs = []

    def backend(gm, example_inputs):
        compiled = flashllm_backend(gm, example_inputs, options=options)
        graphs.append(gm)
        return compiled

    skip_inductor = mock.patch("torch._inductor.compile_fx.compile_fx", lambda gm, *args, **kwargs: gm.forward)
    with torch.no_grad(), record_decisions() as decisions, (
            contextlib.nullcontext() if inductor else skip_inductor):
        ref = model(x)
        hits = sum(ops.KERNEL_HITS.values())
        out = torch.compile(model, backend=backend)(x)
        assert sum(ops.KERNEL_HITS.values()) > hits  # the ops ran
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL, equal_nan=True)
    nodes = {n.args[10]: n for gm in graphs for n in gm.graph.nodes if n.target is SPARSE_LINEAR}
    return out, nodes, decisions


def op_shape(node: torch.fx.Node) -> tuple[int, int]:
    return node.args[6], node.args[7]  # (n, k) of the compressed weight


def propagated() -> int:
    return counters["flashllm"]["propagated_cols"]


@pytest.mark.parametrize("kernel", ["emulated", "triton", "dense"])
@pytest.mark.parametrize("fuse_siblings", [True, False])
def test_swiglu_gate_zero_rows_drop_down_columns(kernel, fuse_siblings):
    _, nodes, decisions = run(MLP(), inductor=True, kernel=kernel, fuse_siblings=fuse_siblings)
    fused = {"fused_siblings": 1, "fused_linears": 2} if fuse_siblings else {}
    assert dict(counters["flashllm"]) == {"linear_found": 3, "rewritten": 3, **fused, "sliced_rows": 1,
                                          "sliced_cols": 1, "propagated_cols": 1}
    assert op_shape(nodes["down"]) == (D, H - len(ZERO))
    gate = nodes["{gate,up}" if fuse_siblings else "gate"]
    assert op_shape(gate) == ((2 * H if fuse_siblings else H) - len(ZERO), D)  # gate's rows themselves: sliced
    families = {"emulated": {"emulated"}, "dense": {"dense"}}.get(kernel)
    assert set(ops.KERNEL_HITS) == families if families else not {"emulated", "dense"} & set(ops.KERNEL_HITS)
    (down,) = [d for d in decisions if d.name == "down"]
    assert down.op_shape == (D, H - len(ZERO))  # what explain() shows


def test_up_zero_rows_drop_down_columns_too():
    """0 * silu(g) = 0: either factor's zero rows."""
    _, nodes, _ = run(MLP(gate_rows=ZERO[:4], up_rows=ZERO[4:]))
    assert propagated() == 1 and op_shape(nodes["down"]) == (D, H - len(ZERO))


def test_glu_epilogue_still_folds():
    """4 zero gate rows: too few of gate/up's 300 rows to slice them (no scatter, so silu * up folds into the op's
    epilogue), enough of down's 150 columns."""
    _, nodes, _ = run(MLP(gate_rows=ZERO[:4]))
    assert counters["flashllm"]["epilogue_glu"] == 1 and "sliced_rows" not in counters["flashllm"]
    assert propagated() == 1 and op_shape(nodes["down"]) == (D, H - 4)


def test_single_gate_up_linear_chunked():
    """Phi-3 style: one gate_up linear, chunk(2, -1): the gate half's zero rows reach down's columns."""

    class GateUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up, self.down = sparse_linear(D, 2 * H, ZERO), sparse_linear(H, D)

        def forward(self, x):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(up * F.silu(gate))

    _, nodes, _ = run(GateUp())
    assert propagated() == 1 and op_shape(nodes["down"]) == (D, H - len(ZERO))


OTHER = torch.randn(H, generator=torch.Generator().manual_seed(2))  # [H] broadcast over the features
ZERO_PRESERVING = {
    "relu": F.relu, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "tanh": torch.tanh, "neg": lambda g: -g, "leaky_relu": F.leaky_relu, "times_2": lambda g: 2.5 * g,
    "div_3": lambda g: g / 3, "dropout_eval": lambda g: F.dropout(g, 0.5, training=False),
    "casts": lambda g: g.double().to(torch.float32).contiguous(), "reshape": lambda g: g.reshape(-1, H).view(g.shape),
    "relu_plus_self": lambda g: F.relu(g) + g, "times_tensor": lambda g: g * OTHER,
    "gelu_new": lambda g: 0.5 * g * (1.0 + torch.tanh(0.79788456 * (g + 0.044715 * torch.pow(g, 3.0)))),  # GPT-2
}
NOT_ZERO_PRESERVING = {
    "plus_1": lambda g: g + 1, "sigmoid": torch.sigmoid, "softmax": lambda g: g.softmax(-1), "exp": torch.exp,
    "layer_norm": lambda g: F.layer_norm(g, (H,)), "plus_tensor": lambda g: g + OTHER,
    "times_inf": lambda g: g * float("inf"), "transpose": lambda g: g.transpose(-1, -2).contiguous().transpose(-1, -2),
    "relu_": lambda g: F.relu(g).add_(1), "inplace_via_view": lambda g: _bump_through_view(F.relu(g)),
}


def _bump_through_view(h: torch.Tensor) -> torch.Tensor:
    h.view(-1)[:D].add_(1.0)  # writes h's zero features through an alias
    return h


class Branches(nn.Module):
    """One Chain per op (separate inputs' linears: fuse_siblings=False), so one compile checks them all."""

    def __init__(self, ops: dict):
        super().__init__()
        self.names = list(ops)
        self.chains = nn.ModuleDict({name: Chain(op) for name, op in ops.items()})

    def forward(self, x):
        return torch.stack([self.chains[name](x) for name in self.names])


def test_zero_preserving_ops_propagate():
    _, nodes, _ = run(Branches(ZERO_PRESERVING), fuse_siblings=False)
    assert propagated() == len(ZERO_PRESERVING)
    for name in ZERO_PRESERVING:
        assert op_shape(nodes[f"chains.{name}.fc2"]) == (D, H - len(ZERO)), name


def test_other_ops_stop_it():
    _, nodes, _ = run(Branches(NOT_ZERO_PRESERVING), fuse_siblings=False)
    assert "propagated_cols" not in counters["flashllm"]
    for name in NOT_ZERO_PRESERVING:
        assert op_shape(nodes[f"chains.{name}.fc2"]) == (D, H), name


@pytest.mark.parametrize("bias", ["zero", "nonzero", "some_nonzero"])
def test_producer_bias(bias):
    """OPT's fc1 (bias) -> relu -> fc2: a zero row is a zero feature only where its bias is 0 too."""
    model = Chain(rows=ZERO, bias=True)
    nonzero = {"zero": [], "nonzero": ZERO, "some_nonzero": ZERO[:3]}[bias]
    with torch.no_grad():
        model.fc1.bias[nonzero] = 0.5  # relu(0.5) != 0
    _, nodes, _ = run(model)
    dropped = len(ZERO) - len(nonzero)
    assert propagated() == (1 if dropped else 0) and op_shape(nodes["fc2"]) == (D, H - dropped)


def test_fused_consumers():
    """Two siblings reading the same zero features: one op, both weights' columns dropped."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.a, self.b = sparse_linear(D, H, ZERO), sparse_linear(H, D), sparse_linear(H, 41)

        def forward(self, x):
            h = F.relu(self.fc1(x))
            return torch.cat([self.a(h), self.b(h)], -1)

    _, nodes, _ = run(TwoHeads())
    assert counters["flashllm"]["fused_siblings"] == 1 and propagated() == 1
    assert op_shape(nodes["{a,b}"]) == (D + 41, H - len(ZERO))


def test_chained_through_a_linear():
    """fc2's rows whose nonzeros all meet fc1's zero features output zeros: fc3 drops those columns."""

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = sparse_linear(D, H, ZERO), sparse_linear(H, 90), sparse_linear(90, D)
            with torch.no_grad():
                self.fc2.weight[:6] = 0
                self.fc2.weight[:6, ZERO] = torch.randn(6, len(ZERO))  # rows 0..5 only read fc1's zero features

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    _, nodes, _ = run(Three())
    assert propagated() == 2
    assert op_shape(nodes["fc2"]) == (90 - 6, H - len(ZERO)) and op_shape(nodes["fc3"]) == (D, 90 - 6)


def test_option_off():
    _, nodes, _ = run(MLP(), slice_structured_zeros=False)
    assert dict(counters["flashllm"]) == {"linear_found": 3, "rewritten": 3, "fused_siblings": 1, "fused_linears": 2,
                                          "fused_epilogues": 1, "epilogue_glu": 1}
    assert op_shape(nodes["down"]) == (D, H)


def test_non_finite_weight_column_kept():
    """inf * 0 = NaN in the dense model: a consumer column with a non-finite entry is not dropped."""
    model = Chain()
    with torch.no_grad():
        model.fc2.weight[3, ZERO[0]] = float("inf")
    out, nodes, _ = run(model)
    assert out[..., 3].isnan().all() and propagated() == 1
    assert op_shape(nodes["fc2"]) == (D, H - len(ZERO) + 1)


def test_dense_producer_propagates_and_is_watched():
    """A producer left dense (too dense) still makes zeros; updating its weight after compile raises."""
    model = Chain()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.randn(H, D))
        model.fc1.weight[ZERO] = 0
    _, nodes, _ = run(model)
    assert counters["flashllm"]["skip_too_dense"] == 1 and propagated() == 1
    assert op_shape(nodes["fc2"]) == (D, H - len(ZERO))
    compiled = torch.compile(model, backend="flashllm")
    x = torch.randn(3, D)
    with torch.no_grad():
        compiled(x)
        model.fc1.weight[ZERO[0], 0] = 1.0
        with pytest.raises(RuntimeError, match="'fc2' was modified in place"):
            compiled(x)


@pytest.mark.parametrize("how", ["in_place", "replaced"])
def test_producer_bias_update_raises(how):
    """The consumer's columns rely on fc1's bias being 0 there: changing it after compile is refused."""
    model = Chain(bias=True)
    x = torch.randn(3, D)
    with torch.no_grad():
        compiled = torch.compile(model, backend="flashllm")
        torch.testing.assert_close(compiled(x), model(x), rtol=RTOL, atol=ATOL)
        assert propagated() == 1
        if how == "in_place":
            model.fc1.bias[ZERO[0]] = 1.0
        else:
            model.fc1.bias = nn.Parameter(model.fc1.bias.detach().clone() + 1)
        match = "modified in place" if how == "in_place" else "got another weight tensor"
        with pytest.raises(RuntimeError, match=match):
            compiled(x)


transformers = pytest.importorskip("transformers")
LAYERS = 2


def _tiny(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=LAYERS,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                            max_position_embeddings=64)), "mlp.gate_proj", "mlp.down_proj"
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=128, n_positions=64,
                                      n_inner=160, bos_token_id=127, eos_token_id=127)), "mlp.c_fc", "mlp.c_proj"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_model_logits_match_eager(name):
    """Pruned tiny HF models with some MLP neurons' input rows zeroed (GPT-2's Conv1D: weight columns, and the
    bias; its gelu_new is spelled out with tanh): logits match eager, every layer's down projection drops those
    columns.  (OPT's fc1 -> relu -> fc2 with biases: test_producer_bias.)"""
    from flashllm_compile.prune import magnitude_prune_

    model, producer, consumer = _tiny(name)
    magnitude_prune_(model, 0.7, progress=False)
    rows = [1, 2, 30, 64, 65, 100, 159]
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            if mod_name.endswith(producer):
                weight = module.weight.t() if name == "gpt2" else module.weight  # [N, K] view
                weight[rows] = 0
                if module.bias is not None:
                    module.bias[rows] = 0
    model.eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record_decisions() as decisions:
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="flashllm", options={"min_weight_numel": 1024})(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert propagated() == LAYERS
    downs = [d for d in decisions if d.name.endswith(consumer)]
    assert len(downs) == LAYERS and all(d.op_shape == (64, 160 - len(rows)) for d in downs), downs
