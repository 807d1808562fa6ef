"""Detection + rewrite passes, end to end through `torch.compile(backend="flashllm")` on CPU (fp32).

Every case checks the exact `counters["flashllm"]`, the output against eager, and (for rewrites) that
`torch.ops.flashllm.sparse_linear` really ran (`flashllm_compile.ops.KERNEL_HITS`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters

from flashllm_compile import ops
from flashllm_compile.backend import flashllm_backend
from flashllm_compile.codegen.formats import cache
from flashllm_compile.report import record_decisions

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D

K, N = 128, 64  # weight [N, K] = 8192 elements, above the default min_weight_numel (4096)
RTOL, ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def sparsify_(p: torch.Tensor, sparsity: float = 0.8) -> torch.Tensor:
    """Zero (in place) a random `sparsity` fraction of a random (nonzero) tensor; returns it."""
    with torch.no_grad():
        p.copy_(torch.randn_like(p))
        p.masked_fill_(torch.rand_like(p) < sparsity, 0.0)
    return p


def zero_fraction(t: torch.Tensor) -> float:
    return (t == 0).sum().item() / t.numel()


def flashllm_counters() -> dict[str, int]:
    """The detection / rewrite counters (the epilogue folds after it: tests/test_fuse_epilogues.py)."""
    return {k: v for k, v in counters["flashllm"].items() if "epilogue" not in k}


def hits() -> int:
    return sum(ops.KERNEL_HITS.values())


def compile_and_check(model: nn.Module, x: torch.Tensor, expected: dict[str, int], **compile_kwargs) -> torch.Tensor:
    """Compile, run under no_grad, compare with eager and the exact counters; check the op ran iff rewritten."""
    with torch.no_grad():
        ref = model(x)
        before = hits()
        out = torch.compile(model, backend="flashllm", **compile_kwargs)(x)
    assert flashllm_counters() == expected
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    if expected.get("rewritten", 0):
        assert hits() > before, f"sparse_linear never ran: {ops.KERNEL_HITS}"
    else:
        assert hits() == before, f"sparse_linear ran although nothing was rewritten: {ops.KERNEL_HITS}"
    return out


class FLinear(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(sparsify_(torch.empty(N, K)))
        self.bias = nn.Parameter(torch.randn(N)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class WeightNK(nn.Module):
    """A weight stored [N, K] used through a matmul-like form; `fn(x, weight, bias)`."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(sparsify_(torch.empty(N, K)))
        self.bias = nn.Parameter(torch.randn(N))

    def forward(self, x):
        return self.fn(x, self.weight, self.bias)


class WeightKN(nn.Module):
    """A weight stored transposed, [K, N] (as HF Conv1D does), used as `x @ W`."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(sparsify_(torch.empty(K, N)))

    def forward(self, x):
        return x @ self.weight


def flat(x):
    return x.reshape(-1, x.shape[-1])


def make_linear(bias=True):
    lin = nn.Linear(K, N, bias=bias)
    sparsify_(lin.weight)
    return lin


def make_conv1d():
    conv = Conv1D(N, K)  # nf=N outputs, nx=K inputs, weight [K, N]
    sparsify_(conv.weight)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(N))
    return conv


FORMS = {
    "nn.Linear": lambda: make_linear(bias=True),
    "nn.Linear-no-bias": lambda: make_linear(bias=False),
    "F.linear": lambda: FLinear(bias=True),
    "F.linear-no-bias": lambda: FLinear(bias=False),
    "x@W.t()": lambda: WeightNK(lambda x, w, b: x @ w.t()),
    "matmul(x,W.t())": lambda: WeightNK(lambda x, w, b: torch.matmul(x, w.t())),
    "x@W.T": lambda: WeightNK(lambda x, w, b: x @ w.T),
    "x@W.transpose(0,1)": lambda: WeightNK(lambda x, w, b: x @ w.transpose(0, 1)),
    "mm(x2d,W.t())": lambda: WeightNK(lambda x, w, b: torch.mm(flat(x), w.t())),
    "addmm(b,x2d,W.t())": lambda: WeightNK(lambda x, w, b: torch.addmm(b, flat(x), w.t())),
    "Conv1D-addmm": make_conv1d,
    "x@W_kn": WeightKN,
}


# ----------------------------------------------------------------------------------------------------------------
# matched forms
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("form", list(FORMS))
def test_linear_forms_rewritten(form, batch):
    model = FORMS[form]()
    x = torch.randn(*batch, K)
    out = compile_and_check(model, x, {"linear_found": 1, "rewritten": 1})
    assert out.shape[-1] == N


def test_k_not_a_multiple_of_chunk():
    lin = nn.Linear(100, 72)  # K=100 is padded to one 128-column chunk
    sparsify_(lin.weight)
    compile_and_check(lin, torch.randn(2, 3, 100), {"linear_found": 1, "rewritten": 1})


def test_small_chunk_option():
    compile_and_check(make_linear(), torch.randn(3, K), {"linear_found": 1, "rewritten": 1},
                      options={"chunk_k": 32})


def test_attention_matmuls_of_activations_not_counted():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = make_linear()
            self.k = make_linear()

        def forward(self, x):  # x [B, T, K]
            q, k = self.q(x), self.k(x)  # [B, T, N]
            scores = torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1)  # [B, T, T]
            ctx = torch.matmul(scores, k)  # [B, T, N]
            return ctx + torch.bmm(q, k.mT) @ q

    # q and k read the same x: fused into one sparse_linear (passes/fuse_sibling_linears.py)
    compile_and_check(Attention(), torch.randn(2, 6, K), {"linear_found": 2, "rewritten": 2, "fused_siblings": 1,
                                                          "fused_linears": 2})


def test_only_activation_matmuls_counts_nothing():
    class Scores(nn.Module):
        def forward(self, a, b):
            return a @ b.t() + torch.mm(a, b.t()) + torch.matmul(a, b.transpose(0, 1))

    a, b = torch.randn(8, K), torch.randn(16, K)
    with torch.no_grad():
        out = torch.compile(Scores(), backend="flashllm")(a, b)
    torch.testing.assert_close(out, Scores()(a, b), rtol=RTOL, atol=ATOL)
    assert flashllm_counters() == {}
    assert hits() == 0


def test_fullgraph():
    model = nn.Sequential(make_linear(), nn.GELU(), nn.Linear(N, K))
    sparsify_(model[2].weight)
    compile_and_check(model, torch.randn(2, 3, K), {"linear_found": 2, "rewritten": 2}, fullgraph=True)


# ----------------------------------------------------------------------------------------------------------------
# skip reasons
# ----------------------------------------------------------------------------------------------------------------


def test_too_dense_default_threshold():
    lin = nn.Linear(K, N)
    sparsify_(lin.weight, 0.3)  # below the default min_sparsity 0.5
    compile_and_check(lin, torch.randn(4, K), {"linear_found": 1, "skip_too_dense": 1})


def test_too_dense_via_min_sparsity_option():
    lin = make_linear()  # ~80% zeros, below 0.9
    compile_and_check(lin, torch.randn(4, K), {"linear_found": 1, "skip_too_dense": 1},
                      options={"min_sparsity": 0.9})


def test_min_sparsity_option_can_lower_the_threshold():
    lin = nn.Linear(K, N)
    sparsify_(lin.weight, 0.3)
    compile_and_check(lin, torch.randn(4, K), {"linear_found": 1, "rewritten": 1},
                      options={"min_sparsity": 0.2})


@pytest.mark.parametrize("case", ["default-threshold", "option"])
def test_too_small(case):
    if case == "default-threshold":
        lin, opts = nn.Linear(32, 64), None  # 2048 < 4096 elements
        sparsify_(lin.weight)
        x = torch.randn(4, 32)
    else:
        lin, opts = make_linear(), {"min_weight_numel": N * K + 1}
        x = torch.randn(4, K)
    compile_and_check(lin, x, {"linear_found": 1, "skip_too_small": 1},
                      **({"options": opts} if opts is not None else {}))


def test_min_weight_numel_option_can_lower_the_threshold():
    lin = nn.Linear(32, 64)
    sparsify_(lin.weight)
    compile_and_check(lin, torch.randn(4, 32), {"linear_found": 1, "rewritten": 1},
                      options={"min_weight_numel": 0})


def test_weight_computed_in_forward_is_not_a_parameter():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(N, K))
            self.register_buffer("mask", (torch.rand(N, K) > 0.8).float())

        def forward(self, x):
            return F.linear(x, self.w * self.mask)

    compile_and_check(Masked(), torch.randn(4, K), {"linear_found": 1, "skip_weight_not_parameter": 1})


def test_unsupported_dtype_float64():
    lin = make_linear().double()
    compile_and_check(lin, torch.randn(4, K, dtype=torch.float64), {"linear_found": 1, "skip_unsupported_dtype": 1})


def test_weight_requires_grad_outputs_and_grads_match():
    torch.manual_seed(0)
    model = nn.Sequential(make_linear(), nn.Tanh(), nn.Linear(N, 16))
    sparsify_(model[2].weight)
    x = torch.randn(3, K, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    ref = model(x_ref)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    out = torch.compile(model, backend="flashllm")(x)
    out.square().sum().backward()
    # N x 16 = 1024 elements: the second linear is also below min_weight_numel; requires_grad is checked first
    assert flashllm_counters() == {"linear_found": 2, "skip_weight_requires_grad": 2}
    assert hits() == 0
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=RTOL, atol=ATOL)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=RTOL, atol=ATOL)


def test_frozen_weights_with_grad_enabled_rewrite_and_input_grad_matches():
    lin = make_linear().requires_grad_(False)
    x = torch.randn(2, 3, K, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = lin(x_ref)
    ref.sum().backward()
    out = torch.compile(lin, backend="flashllm")(x)
    out.sum().backward()
    assert flashllm_counters() == {"linear_found": 1, "rewritten": 1}
    assert hits() > 0
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=RTOL, atol=ATOL)


def test_mixed_model_counts_each_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.sparse = make_linear()
            self.dense = nn.Linear(N, K)  # random init: essentially no exact zeros
            self.small = nn.Linear(K, 8)
            sparsify_(self.small.weight)

        def forward(self, x):
            h = self.dense(self.sparse(x))
            return self.small(h)

    compile_and_check(Mixed(), torch.randn(4, K),
                      {"linear_found": 3, "rewritten": 1, "skip_too_dense": 1, "skip_too_small": 1})


# ----------------------------------------------------------------------------------------------------------------
# shared weights, get_attr graphs, options, staleness
# ----------------------------------------------------------------------------------------------------------------


def test_shared_weight_rewritten_twice_compressed_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = make_linear()
            self.b = nn.Linear(K, N)
            self.b.weight = self.a.weight  # the same Parameter object

        def forward(self, x):
            return self.a(x) * self.b(x)

    model = Shared()
    assert model.a.weight is model.b.weight
    before = cache.STATS["compressions"]
    compile_and_check(model, torch.randn(4, K), {"linear_found": 2, "rewritten": 2})
    assert cache.STATS["compressions"] == before + 1


class ProjFLinear(nn.Module):
    """F.linear on a submodule's parameters, so symbolic_trace emits get_attr nodes "proj.weight"/"proj.bias"."""

    def __init__(self):
        super().__init__()
        self.proj = make_linear()

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias) + x @ self.proj.weight.t()


def test_get_attr_path_direct_backend_call():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    model = ProjFLinear()
    x = torch.randn(4, K)
    gm = torch.fx.symbolic_trace(model)
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} == {"proj.weight", "proj.bias"}
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)  # meta["val"] for the pass
    with torch.no_grad(), record_decisions() as decisions:
        compiled = flashllm_backend(gm, [x])
        assert flashllm_counters() == {"linear_found": 2, "rewritten": 2}
        assert [d.name for d in decisions] == ["proj", "proj"]
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert targets.count(torch.ops.flashllm.sparse_linear.default) == 2
        before = hits()
        out = compiled(x)  # compile_fx's callable takes the inputs as *args (not a list)
        out = out[0] if isinstance(out, (list, tuple)) else out
        assert hits() == before + 2
        torch.testing.assert_close(out, model(x), rtol=RTOL, atol=ATOL)


def test_get_attr_path_plain_symbolic_trace():
    model = ProjFLinear()
    x = torch.randn(4, K)
    with torch.no_grad():
        compiled = flashllm_backend(torch.fx.symbolic_trace(model), [x])
        out = compiled(x)
        torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, model(x), rtol=RTOL, atol=ATOL)
    assert flashllm_counters() == {"linear_found": 2, "rewritten": 2}


@pytest.mark.parametrize("kernel", ["dense", "emulated"])
def test_kernel_option(kernel):
    compile_and_check(make_linear(), torch.randn(2, 3, K), {"linear_found": 1, "rewritten": 1},
                      options={"kernel": kernel})
    assert set(ops.KERNEL_HITS) == {kernel}


def test_auto_kernel_on_cpu_runs_emulated():
    compile_and_check(make_linear(), torch.randn(4, K), {"linear_found": 1, "rewritten": 1})
    assert set(ops.KERNEL_HITS) == {"emulated"}


def test_release_dense_weights_option():
    compile_and_check(make_linear(), torch.randn(4, K), {"linear_found": 1, "rewritten": 1},
                      options={"release_dense_weights": True, "kernel": "dense"})
    assert set(ops.KERNEL_HITS) == {"dense"}


@pytest.mark.parametrize("options, match", [
    ({"no_such_option": 1}, "unknown flashllm option"),
    ({"min_sparsity": 1.5}, "min_sparsity must be in"),
    ({"chunk_k": 48}, "chunk_k must be a positive multiple of 32"),
    ({"kernel": "cublas"}, "is not a valid KernelPreference"),
])
def test_bad_options_raise(options, match):
    compiled = torch.compile(make_linear(), backend="flashllm", options=options)
    with torch.no_grad(), pytest.raises((BackendCompilerFailed, ValueError), match=match):
        compiled(torch.randn(4, K))


def test_in_place_weight_update_after_compile_raises():
    lin = make_linear()
    x = torch.randn(4, K)
    compiled = torch.compile(lin, backend="flashllm")
    with torch.no_grad():
        compiled(x)
        assert flashllm_counters() == {"linear_found": 1, "rewritten": 1}
        lin.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified in place"):
            compiled(x)


def test_recompile_after_reset_uses_the_updated_weight():
    lin = make_linear()
    x = torch.randn(4, K)
    with torch.no_grad():
        torch.compile(lin, backend="flashllm")(x)
        lin.weight.mul_(2)
        torch._dynamo.reset()
        out = torch.compile(lin, backend="flashllm")(x)
        torch.testing.assert_close(out, lin(x), rtol=RTOL, atol=ATOL)


def test_identity_permute_is_not_a_transpose():
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(sparsify_(torch.empty(K, K)))

        def forward(self, x):
            return x @ self.weight.permute(0, 1)  # == x @ W: not a transpose, must not be treated as one

    compile_and_check(Square(), torch.randn(4, K), {})  # left to Inductor, and correct


def test_in_place_update_of_inference_mode_weight_after_reset():
    x = torch.randn(4, K)
    with torch.inference_mode():
        lin = make_linear()
        torch.compile(lin, backend="flashllm")(x)
        lin.weight.mul_(2)
        torch._dynamo.reset()
        out = torch.compile(lin, backend="flashllm")(x)
        torch.testing.assert_close(out, lin(x), rtol=RTOL, atol=ATOL)


def test_autocast_leaves_linears_dense():
    lin = make_linear()
    x = torch.randn(4, K)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = lin(x)
        out = torch.compile(lin, backend="flashllm")(x)
    assert flashllm_counters() == {"linear_found": 1, "skip_autocast": 1}
    assert out.dtype == ref.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------


def test_record_decisions_report():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = make_linear()
            self.b = nn.Linear(N, K)  # dense -> too_dense
            self.layers = nn.ModuleList([make_linear(), nn.Linear(N, 8)])  # layers.1 too small
            self.layers[0].weight.data[:] = sparsify_(torch.empty(N, K), 0.9)
            sparsify_(self.layers[1].weight)

        def forward(self, x):
            h = self.b(self.a(x))
            return self.layers[1](self.layers[0](h))

    model = Net()
    with record_decisions() as decisions:
        compile_and_check(model, torch.randn(4, K),
                          {"linear_found": 4, "rewritten": 2, "skip_too_dense": 1, "skip_too_small": 1})
    by_name = {d.name: d for d in decisions}
    assert len(decisions) == 4 and set(by_name) == {"a", "b", "layers.0", "layers.1"}
    expected = {  # name: (module, rewritten, reason)
        "a": (model.a, True, "rewritten"),
        "b": (model.b, False, "too_dense"),
        "layers.0": (model.layers[0], True, "rewritten"),
        "layers.1": (model.layers[1], False, "too_small"),
    }
    for name, (module, rewritten, reason) in expected.items():
        d = by_name[name]
        assert (d.out_features, d.in_features) == tuple(module.weight.shape)
        assert d.dtype == "float32"
        assert d.sparsity == pytest.approx(zero_fraction(module.weight), abs=0.01)
        assert (d.rewritten, d.reason) == (rewritten, reason)
        assert d.dense_bytes == module.weight.numel() * 4
        if rewritten:
            assert d.kernel == "auto"
            assert 0 < d.compressed_bytes < d.dense_bytes
        else:
            assert d.kernel == "" and d.compressed_bytes == 0
    assert by_name["layers.0"].sparsity == pytest.approx(0.9, abs=0.01)
    assert by_name["a"].sparsity == pytest.approx(0.8, abs=0.01)


def test_record_decisions_only_inside_the_block():
    with record_decisions() as decisions:
        pass
    compile_and_check(make_linear(), torch.randn(4, K), {"linear_found": 1, "rewritten": 1})
    assert decisions == []


def test_in_place_input_mutation_is_kept():
    """A static KV cache writes into a graph input (index_copy_); the rewrite must not drop that write."""
    lin = make_linear()

    def step(x, cache, pos):
        y = lin(x)
        cache.index_copy_(0, pos, y)
        return cache.sum(0, keepdim=True) + y

    x, pos = torch.randn(4, K), torch.arange(4)
    cache_ref, cache = torch.zeros(8, lin.out_features), torch.zeros(8, lin.out_features)
    with torch.no_grad():
        ref = step(x, cache_ref, pos)
        out = torch.compile(step, backend="flashllm")(x, cache, pos)
    assert flashllm_counters() == {"linear_found": 1, "rewritten": 1}
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(cache, cache_ref, rtol=RTOL, atol=ATOL)
