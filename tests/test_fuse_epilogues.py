"""Epilogue fusion (passes/fuse_epilogues.py): act, SwiGLU and residual folded into the sparse_linear op.

Each case checks the exact `counters["flashllm"]` epilogue counts, that the folded nodes are gone from the graph
(and the op carries the epilogue), and the output against eager (fp32, odd shapes), with the emulated reference
and the Triton kernels (interpreter)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from compile_util import compile_and_compare
from torch import nn
from torch._dynamo.utils import counters

from flashllm_compile import ops
from flashllm_compile.backend import flashllm_backend
from flashllm_compile.codegen.epilogue_spec import Epilogue, apply_epilogue
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.prune import magnitude_prune_
from flashllm_compile.report import LinearDecision, publish, record_decisions
from flashllm_compile.sparsify import sparsify_

K, H = 100, 75  # odd: K padded to one chunk; H the SwiGLU width (gate and up: 75 rows each)
RTOL, ATOL = 1e-4, 1e-4
SPARSE_LINEAR = torch.ops.flashllm.sparse_linear.default
POINTWISE = {F.silu, F.gelu, F.relu, torch.relu, operator.mul, operator.add, torch.add, torch.mul, "relu", "add"}
# batch shapes: M = 3 runs the row-walk kernel (split_k 1: forced fp32 partials), M = 18 the tensor-core one
# (untuned default split_k 2: the epilogue rides on the split-K reduction)
BATCHES = [(3,), (2, 9)]
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def linear(k: int, n: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.8, 0.0)
    return lin


def run(model: nn.Module, *inputs: torch.Tensor, rtol: float = RTOL, atol: float = ATOL, **options):
    """Compile (options), run once without grad, compare with eager; (output, op calls, graphs)."""
    return compile_and_compare(model, *inputs, rtol=rtol, atol=atol, **options)


def epilogue_counters() -> dict[str, int]:
    return {k: v for k, v in counters["flashllm"].items() if "epilogue" in k}


def op_nodes(graphs) -> list[torch.fx.Node]:
    return [n for gm in graphs for n in gm.graph.nodes if n.target is SPARSE_LINEAR]


def pointwise_left(graphs) -> list[str]:
    return [n.name for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and n.target in POINTWISE]


class MLP(nn.Module):
    """LLaMA's MLP with its residual: x + down(silu(gate(x)) * up(x)), operand orders switchable."""

    def __init__(self, swap_mul: bool = False, swap_add: bool = False, bias: bool = False):
        super().__init__()
        self.gate, self.up, self.down = linear(K, H, bias), linear(K, H, bias), linear(H, K, bias)
        self.swap_mul, self.swap_add = swap_mul, swap_add

    def forward(self, x):  # x: [..., K]
        g = F.silu(self.gate(x))  # the gate runs first: the first half of the fused op
        u = self.up(x)
        y = self.down(u * g if self.swap_mul else g * u)
        return y + x if self.swap_add else x + y


@pytest.mark.parametrize("kernel", ["emulated", "triton", "dense"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("swap", [False, True])
def test_swiglu_and_residual_folded(kernel, batch, swap):
    out, hits, graphs = run(MLP(swap, swap, bias=swap), torch.randn(*batch, K), kernel=kernel)
    assert epilogue_counters() == {"fused_epilogues": 2, "epilogue_glu": 1, "epilogue_residual": 1}
    assert counters["flashllm"]["fused_siblings"] == 1
    assert pointwise_left(graphs) == []
    gate_up, down = op_nodes(graphs)
    assert gate_up.kwargs["epilogue"] == "silu*up" and "residual" not in gate_up.kwargs
    assert down.kwargs["residual"].op == "placeholder" and "epilogue" not in down.kwargs
    assert hits == 2 and out.shape == (*batch, K)
    if kernel == "triton":
        assert set(ops.KERNEL_HITS) == {"rowwalk" if len(batch) == 1 else "mma"}


ACTS = {"silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": torch.relu}


@pytest.mark.parametrize("kernel", ["emulated", "triton"])
@pytest.mark.parametrize("name", list(ACTS))
def test_activation_and_residual_folded(kernel, name):
    class ActResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = linear(K, 57)

        def forward(self, x, r):  # x: [..., K], r: [..., 57]
            return torch.add(ACTS[name](self.fc(x)), r)

    _, hits, graphs = run(ActResidual(), torch.randn(5, K), torch.randn(5, 57), kernel=kernel)
    assert epilogue_counters() == {"fused_epilogues": 1, "epilogue_act": 1, "epilogue_residual": 1}
    assert pointwise_left(graphs) == []
    (op,) = op_nodes(graphs)
    assert op.kwargs["epilogue"] == name and op.kwargs["residual"].op == "placeholder"
    assert hits == 1


def test_chunked_gate_up_projection_folded():
    """One linear of 2H rows whose output is `.chunk(2, -1)` (Phi-3 style gate_up_proj) folds like fused siblings."""

    class GateUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up = linear(K, 2 * H)

        def forward(self, x):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return up * F.silu(gate)

    _, _, graphs = run(GateUp(), torch.randn(4, K), kernel="triton")
    assert epilogue_counters() == {"fused_epilogues": 1, "epilogue_glu": 1}
    assert op_nodes(graphs)[0].kwargs["epilogue"] == "silu*up" and pointwise_left(graphs) == []


def test_fp16_within_one_percent_of_fp32_dense():
    model, x = MLP(), torch.randn(2, 4, K)
    with torch.no_grad():
        ref = model(x)  # fp32 eager
    out, _, graphs = run(model.half(), x.half(), rtol=1e-2, atol=1e-2, kernel="triton")  # vs fp16 eager
    assert epilogue_counters()["fused_epilogues"] == 2 and pointwise_left(graphs) == []
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_option_off_and_unfused_siblings():
    """fuse_epilogues=False folds nothing; with fuse_siblings=False the SwiGLU product of two separate ops is left
    (only silu folds into the gate's op, the residual into down's)."""
    _, _, graphs = run(MLP(), torch.randn(3, K), fuse_epilogues=False)
    assert epilogue_counters() == {} and len(pointwise_left(graphs)) == 3
    assert all("epilogue" not in n.kwargs and "residual" not in n.kwargs for n in op_nodes(graphs))
    counters.clear()
    _, _, graphs = run(MLP(), torch.randn(3, K), fuse_siblings=False)
    assert epilogue_counters() == {"fused_epilogues": 2, "epilogue_act": 1, "epilogue_residual": 1}
    assert pointwise_left(graphs) == ["mul"]


class Case(nn.Module):
    """One linear followed by `tail(y, x, r)`."""

    def __init__(self, tail, n: int = 57):
        super().__init__()
        self.fc, self.tail = linear(K, n), tail

    def forward(self, x, r):
        return self.tail(self.fc(x), x, r)


@pytest.mark.parametrize("tail, r_shape, reason", [
    (lambda y, x, r: F.silu(y) + y, (5, 57), "other_users"),
    (lambda y, x, r: (y + r, y.sum()), (5, 57), "other_users"),
    (lambda y, x, r: y + r, (57,), "residual_shape"),  # broadcast
    (lambda y, x, r: y + r.double(), (5, 57), "residual_dtype"),  # type promotion
    (lambda y, x, r: y + torch.tanh(r), (5, 57), "residual_order"),  # computed after the op
])
def test_not_folded(tail, r_shape, reason):
    _, _, graphs = run(Case(tail), torch.randn(5, K), torch.randn(r_shape))
    assert epilogue_counters() == {f"epilogue_skip_{reason}": 1}
    assert all("epilogue" not in n.kwargs and "residual" not in n.kwargs for n in op_nodes(graphs))


def test_residual_mutated_between_op_and_add_not_folded():
    def tail(y, x, r):
        r.mul_(2)  # after the op, before the add: the op must not read r early
        return y + r

    model, x, r = Case(tail), torch.randn(5, K), torch.randn(5, 57)
    with torch.no_grad():
        ref = model(x, r.clone())
        out = torch.compile(model, backend="flashllm")(x, r.clone())
    assert epilogue_counters() == {"epilogue_skip_mutation": 1}
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_not_folded_add_with_alpha_or_scalar():
    tail = lambda y, x, r: torch.add(y, r, alpha=2) + torch.relu(y * 1.0) + 1.0
    _, _, graphs = run(Case(tail), torch.randn(5, K), torch.randn(5, 57))
    assert epilogue_counters() == {} and "epilogue" not in op_nodes(graphs)[0].kwargs


def test_swiglu_with_act_on_up_half_or_extra_view_user_not_folded():
    class UpFirst(MLP):  # up(x) evaluated first: the activation lands on the second half of the fused op
        def forward(self, x):
            u = self.up(x)
            return self.down(F.silu(self.gate(x)) * u)

    class ViewUsed(MLP):
        def forward(self, x):
            g = self.gate(x)
            return self.down(F.silu(g) * self.up(x)) + g.sum()

    for model, reason in ((UpFirst(), "glu_order"), (ViewUsed(), "other_users")):
        counters.clear()
        run(model, torch.randn(3, K))
        assert epilogue_counters()[f"epilogue_skip_{reason}"] == 1 and "epilogue_glu" not in counters["flashllm"]


def test_sliced_op_not_folded():
    """All-zero rows are sliced away: the op's output is scattered first, so the activation stays in the graph."""
    model = Case(lambda y, x, r: F.silu(y), n=128)
    with torch.no_grad():
        model.fc.weight[:32] = 0
    _, _, graphs = run(model, torch.randn(5, K), torch.randn(1))
    assert counters["flashllm"]["sliced_rows"] == 1 and epilogue_counters() == {}
    assert [n.target for gm in graphs for n in gm.graph.nodes if n.target is F.silu] == [F.silu]


def test_grad_enabled_input_requiring_grad_not_folded():
    model = MLP().requires_grad_(False)
    x = torch.randn(2, 3, K, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    model(x_ref).square().sum().backward()
    torch.compile(model, backend="flashllm")(x).square().sum().backward()
    assert epilogue_counters() == {"epilogue_skip_requires_grad": 2}
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=RTOL, atol=ATOL)


def test_grad_enabled_without_grad_inputs_folds():
    """Grad mode on but nothing requires grad: no gradient can flow, the folds are safe."""
    model, x = MLP().requires_grad_(False), torch.randn(3, K)
    out = torch.compile(model, backend="flashllm")(x)
    assert epilogue_counters() == {"fused_epilogues": 2, "epilogue_glu": 1, "epilogue_residual": 1}
    torch.testing.assert_close(out, model(x), rtol=RTOL, atol=ATOL)


def _op_call(x, fmt, bias, kernel, epilogue=None, residual=None, dense=None):
    return torch.ops.flashllm.sparse_linear(x, *fmt.tensors(), bias, dense, fmt.n, fmt.k, fmt.chunk_k, kernel,
                                            "layer", -1, epilogue=epilogue, residual=residual)


@pytest.mark.parametrize("kernel", ["emulated", "dense", "triton"])
@pytest.mark.parametrize("m", [0, 1, 9])
def test_op_with_epilogue_matches_reference(kernel, m):
    w = torch.randn(2 * H, K) * (torch.rand(2 * H, K) > 0.8)
    fmt, b, x, r = BitmapWeight.from_dense(w, 128), torch.randn(2 * H), torch.randn(2, m, K), torch.randn(2, m, H)
    out = _op_call(x, fmt, b, kernel, "gelu*up", r, dense=w)
    ref = apply_epilogue(F.linear(x, w)[None], b, Epilogue("gelu", True, r), torch.float32)
    assert out.shape == (2, m, H)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_op_checks_and_opcheck():
    w = torch.randn(2 * H, K) * (torch.rand(2 * H, K) > 0.8)
    fmt, x = BitmapWeight.from_dense(w, 128), torch.randn(3, K)
    torch.library.opcheck(SPARSE_LINEAR, (x, *fmt.tensors(), None, w, fmt.n, fmt.k, fmt.chunk_k, "emulated", "l", -1),
                          {"epilogue": "silu*up", "residual": torch.randn(3, H)})
    with pytest.raises(ValueError, match="no broadcasting"):
        _op_call(x, fmt, None, "emulated", "silu*up", torch.randn(H))
    with pytest.raises(ValueError, match="unknown epilogue"):
        _op_call(x, fmt, None, "emulated", "swish")
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward for a sparse_linear with a fused epilogue"):
        _op_call(x, fmt, None, "emulated", "relu").sum().backward()


@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_tiny_llama_mlp_and_residuals_folded(kernel):
    transformers = pytest.importorskip("transformers")
    layers = 2
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    magnitude_prune_(model, 0.8, progress=False)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad(), record_decisions() as decisions:
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="flashllm", options={"min_weight_numel": 1024, "kernel": kernel})(
            ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    assert set(ops.KERNEL_HITS) == ({"emulated"} if kernel == "auto" else {"mma"})  # M = 10 tokens
    # per layer: gate/up -> silu*up; o_proj and down_proj -> + residual
    assert epilogue_counters() == {"fused_epilogues": 3 * layers, "epilogue_glu": layers,
                                   "epilogue_residual": 2 * layers}
    shown = {d.name.rpartition(".")[2]: d.epilogue for d in decisions if ".layers.0." in d.name}
    assert shown == {"q_proj": "", "k_proj": "", "v_proj": "", "o_proj": "+residual", "gate_proj": "+silu*up",
                     "up_proj": "+silu*up", "down_proj": "+residual"}


def test_sparsified_model_ops_fold_too():
    """A sparsify_'d model calls the op itself (nothing left to rewrite): its act and residual still fold."""
    model, x = MLP(), torch.randn(3, K)
    with torch.no_grad():
        ref = model(x)
        sparsify_(model)
        out = torch.compile(model, backend="flashllm")(x)
    assert counters["flashllm"]["rewritten"] == 0
    assert epilogue_counters() == {"fused_epilogues": 2, "epilogue_act": 1, "epilogue_residual": 1}
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_nested_recorders_are_removed_by_identity():
    """The backend records each compile's decisions inside the caller's recorder; equal (e.g. empty) lists must
    not be confused when one block ends."""
    decision = LinearDecision("fc", 1, 1, "float32", 0.9, True, "rewritten", "auto", 4, 2, "linear")
    with record_decisions() as outer:
        with record_decisions():
            pass
        publish(decision)
    assert outer == [decision]


def test_backend_on_a_traced_graph_folds_residual_from_get_attr():
    """symbolic_trace puts a get_attr right before its use (after the op): it is moved up to the op."""

    class Traced(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = linear(K, 57)
            self.register_buffer("r", torch.randn(4, 57))

        def forward(self, x):  # F.linear: symbolic_trace keeps nn.Linear as an opaque call_module
            return F.linear(x, self.fc.weight, self.fc.bias) + self.r

    model, x = Traced(), torch.randn(4, K)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = flashllm_backend(gm, [x])(x)
    assert epilogue_counters() == {"fused_epilogues": 1, "epilogue_residual": 1}
    (op,) = op_nodes([gm])
    assert op.kwargs["residual"].op == "get_attr" and next(iter(op.users)).op == "output"
    torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, model(x), rtol=RTOL, atol=ATOL)
