"""Sibling fusion (passes/fuse_sibling_linears.py): linears reading the same input become one sparse_linear.

Each case checks the exact `counters["flashllm"]`, the number of sparse_linear nodes in the rewritten graph and
of op calls per forward, and the output against eager (fp32, random data, odd shapes)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from compile_util import compile_and_compare
from torch import nn
from torch._dynamo.utils import counters

from flashllm_compile import ops
from flashllm_compile.backend import flashllm_backend
from flashllm_compile.codegen.formats import cache
from flashllm_compile.options import FlashLLMOptions
from flashllm_compile.passes.find_sparse_linears import find_sparse_linears
from flashllm_compile.passes.fuse_sibling_linears import find_sibling_groups

K = 100  # odd: padded to one 128-column chunk
SIZES = (72, 41, 57)  # odd N per sibling (x K = 4100+ elements, above min_weight_numel)
RTOL, ATOL = 1e-4, 1e-5
SPARSE_LINEAR = torch.ops.flashllm.sparse_linear.default
FUSED3 = {"linear_found": 3, "rewritten": 3, "fused_siblings": 1, "fused_linears": 3}


def sparse_(p: torch.Tensor, sparsity: float = 0.8) -> torch.Tensor:
    with torch.no_grad():
        p.copy_(torch.randn_like(p)).masked_fill_(torch.rand_like(p) < sparsity, 0.0)
    return p


def linear(k: int, n: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    sparse_(lin.weight)
    return lin


def run(model: nn.Module, *inputs: torch.Tensor, **options):
    """Compile (options), run once without grad, compare with eager; (output, op calls, graphs)."""
    return compile_and_compare(model, *inputs, rtol=RTOL, atol=ATOL, **options)


def op_nodes(graphs) -> list[torch.fx.Node]:
    return [n for gm in graphs for n in gm.graph.nodes if n.target is SPARSE_LINEAR]


class QKV(nn.Module):
    """Three projections of the same x (odd widths), combined so every output is used."""

    def __init__(self, bias: bool = True, sizes=SIZES):
        super().__init__()
        self.q, self.k, self.v = (linear(K, n, bias) for n in sizes)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x).tanh(), self.v(x) * 2], dim=-1)


@pytest.mark.parametrize("kernel, bias, batch", [
    ("auto", True, (1,)), ("auto", False, (2, 3)), ("emulated", True, (7,)), ("dense", False, (7,)),
    ("triton", True, (5,)),
])
def test_qkv_fused_into_one_op(kernel, bias, batch):
    out, hits, graphs = run(QKV(bias), torch.randn(*batch, K), kernel=kernel)
    assert dict(counters["flashllm"]) == FUSED3
    (node,) = op_nodes(graphs)
    assert node.args[6] == sum(SIZES)  # n of the fused weight
    assert node.args[10] == "{q,k,v}"
    families = {"auto": {"emulated"}, "emulated": {"emulated"}, "dense": {"dense"}}
    assert hits == 1 and set(ops.KERNEL_HITS) == families.get(kernel, set(ops.KERNEL_HITS) - {"dense", "emulated"})
    assert out.shape == (*batch, sum(SIZES))


def test_dense_fallback_runs_on_the_member_weights_in_place():
    """kernel="dense": no concatenated copy of the weights in the graph; the op gets the three parameters
    (`weights`) and runs one GEMM per member on them (results checked against eager by `run`)."""
    _, _, graphs = run(QKV(), torch.randn(5, K), kernel="dense")
    (node,) = op_nodes(graphs)
    assert node.args[5] is None and len(node.args[12]) == 3 and all(a.op == "placeholder" for a in node.args[12])
    weights = set(node.args[12])
    assert not any(n.target is torch.cat and weights & set(n.all_input_nodes) for g in graphs for n in g.graph.nodes)
    assert ops.KERNEL_HITS["dense"] >= 1
    _, _, graphs = run(QKV(), torch.randn(5, K), kernel="dense", release_dense_weights=True)
    assert op_nodes(graphs)[0].args[5] is None


def test_option_off_keeps_three_ops():
    _, hits, graphs = run(QKV(), torch.randn(5, K), fuse_siblings=False)
    assert dict(counters["flashllm"]) == {"linear_found": 3, "rewritten": 3}
    assert len(op_nodes(graphs)) == 3 and hits == 3


def test_mixed_forms_and_transposed_siblings():
    """F.linear, x @ W.t() and torch.matmul(x, W.T) on the same x fuse; weights stored [K, N] (as HF Conv1D
    does, used as x @ W) fuse with each other, not with the [N, K] ones; a sibling with a bias not with the
    bias-free ones."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = linear(K, 72, bias=False), linear(K, 41, bias=False), linear(K, 57)
            self.d = nn.Parameter(sparse_(torch.empty(K, 66)))
            self.e = nn.Parameter(sparse_(torch.empty(K, 45)))

        def forward(self, x):
            return torch.cat([self.a(x), x @ self.b.weight.t(), torch.matmul(x, self.c.weight.T) + self.c.bias,
                              x @ self.d, (x @ self.e).relu(), self.c(x)], -1)

    _, hits, graphs = run(Mixed(), torch.randn(2, 3, K))
    # groups: {a, b, c used as matmul (no bias in the op)}, {d, e}; c's nn.Linear call (with bias) stays alone
    assert dict(counters["flashllm"]) == {"linear_found": 6, "rewritten": 6, "fused_siblings": 2,
                                          "fused_linears": 5}
    assert sorted(n.args[6] for n in op_nodes(graphs)) == [57, 66 + 45, 72 + 41 + 57]
    assert hits == 3


def test_a_sibling_depending_on_another_is_not_fused_with_it():
    """b's bias is computed from a's output: fusing a and b would make a cycle; a and c still fuse."""

    class Dependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = linear(K, 72), linear(K, 57)
            self.wb = nn.Parameter(sparse_(torch.empty(72, K)))

        def forward(self, x):  # x [M, K]
            ya = self.a(x)
            yb = F.linear(x, self.wb, ya.mean(0))  # bias [72] depends on a
            return torch.cat([ya, yb, self.c(x)], -1)

    _, hits, graphs = run(Dependent(), torch.randn(6, K))
    assert dict(counters["flashllm"]) == {"linear_found": 3, "rewritten": 3, "fused_siblings": 1,
                                          "fused_linears": 2}
    assert len(op_nodes(graphs)) == 2 and hits == 2
    (fused,) = [n for n in op_nodes(graphs) if n.args[6] == 72 + 57]
    assert fused.args[10] == "{a,c}"


def test_different_inputs_not_fused():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = linear(K, 72), linear(K, 41)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x + 1)], -1)

    _, hits, _ = run(TwoInputs(), torch.randn(4, K))
    assert dict(counters["flashllm"]) == {"linear_found": 2, "rewritten": 2}
    assert hits == 2


def test_bias_computed_after_the_first_sibling_is_left_out():
    """The fused node goes before the first sibling; b's bias is computed later (independently): b stays alone."""

    class LateBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = linear(K, 72), linear(K, 57)
            self.wb = nn.Parameter(sparse_(torch.empty(41, K)))
            self.raw_bias = nn.Parameter(torch.randn(41))

        def forward(self, x):
            ya = self.a(x)
            return torch.cat([ya, F.linear(x, self.wb, self.raw_bias.tanh()), self.c(x)], -1)

    _, hits, _ = run(LateBias(), torch.randn(3, K))
    assert dict(counters["flashllm"]) == {"linear_found": 3, "rewritten": 3, "fused_siblings": 1,
                                          "fused_linears": 2}
    assert hits == 2


def test_different_dtype_not_grouped():
    """Siblings must share dtype (and device, K, orientation, bias-ness): checked on the pass itself, since eager
    linears of one input cannot mix dtypes."""
    captured = {}

    def capture(gm, example_inputs):
        captured.update(gm=gm, inputs=example_inputs)
        return gm.forward

    with torch.no_grad():
        torch.compile(QKV(), backend=capture)(torch.randn(4, K))
        gm = captured["gm"]
        matches = find_sparse_linears(gm, captured["inputs"], FlashLLMOptions())
    assert [len(g) for g in find_sibling_groups(gm, matches)] == [3]
    matches[1] = dataclasses.replace(matches[1], weight=matches[1].weight.half())
    assert [[m.name for m in g] for g in find_sibling_groups(gm, matches)] == [["q", "v"]]
    matches[2] = dataclasses.replace(matches[2], skip_reason="too_dense")
    assert find_sibling_groups(gm, matches) == []


def test_get_attr_siblings_of_a_traced_graph():
    """symbolic_trace puts each get_attr right before its use: the later siblings' weights are moved up."""

    class Traced(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = linear(K, 72), linear(K, 41)

        def forward(self, x):
            return torch.cat([F.linear(x, self.a.weight, self.a.bias) * 2, F.linear(x, self.b.weight, self.b.bias)], -1)

    model, x = Traced(), torch.randn(5, K)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        compiled = flashllm_backend(gm, [x])
        out = compiled(x)
    assert dict(counters["flashllm"]) == {"linear_found": 2, "rewritten": 2, "fused_siblings": 1,
                                          "fused_linears": 2}
    assert len(op_nodes([gm])) == 1
    torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, model(x), rtol=RTOL, atol=ATOL)


def test_compressed_once_and_every_member_watched():
    model, x = QKV(), torch.randn(3, K)
    before = cache.STATS["compressions"]
    compiled = torch.compile(model, backend="flashllm")
    with torch.no_grad():
        compiled(x)
        torch._dynamo.reset()
        torch.compile(model, backend="flashllm")(x)  # a second compile reuses the fused compression
        assert cache.STATS["compressions"] == before + 1
        compiled = torch.compile(model, backend="flashllm")
        compiled(x)
        model.v.weight.mul_(2)  # the last member only
        with pytest.raises(RuntimeError, match="modified in place"):
            compiled(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, backend="flashllm")(x), model(x), rtol=RTOL, atol=ATOL)
    assert cache.STATS["compressions"] == before + 2


@pytest.mark.parametrize("how", ["replaced_parameter", "another_instance"])
def test_other_weight_tensor_raises(how):
    """The fused op gets its parameters (not only their concatenation) to check they are the compressed ones: a
    replaced parameter, or one compiled graph reused for another instance (`layer.compile()` per layer, Dynamo does
    not guard on parameter identity), raise instead of computing with the first weights."""
    layers = nn.ModuleList([QKV(), QKV()])
    x = torch.randn(3, K)
    with torch.no_grad():
        if how == "replaced_parameter":
            compiled = torch.compile(layers[0], backend="flashllm")
            compiled(x)
            layers[0].k.weight = nn.Parameter(sparse_(torch.empty(SIZES[1], K)))
            call = functools.partial(compiled, x)
        else:
            ref = layers[0](x)
            for layer in layers:
                layer.compile(backend="flashllm")
            torch.testing.assert_close(layers[0](x), ref, rtol=RTOL, atol=ATOL)
            call = functools.partial(layers[1], x)  # the same compiled graph, layer 0's compressed weights
        with pytest.raises(RuntimeError, match=r"'\{q,k,v\}' got another weight tensor"):
            call()
    assert counters["flashllm"]["fused_siblings"] == 1


def test_input_grad_through_fused_op():
    model = QKV().requires_grad_(False)
    x = torch.randn(2, 3, K, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    model(x_ref).square().sum().backward()
    torch.compile(model, backend="flashllm")(x).square().sum().backward()
    assert counters["flashllm"]["fused_siblings"] == 1
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=RTOL, atol=ATOL)



def test_flattening_view_of_a_sibling_gets_a_contiguous_copy():
    """A sibling's output is a strided slice of the fused output: `.view(-1)` on it needs a copy (only there)."""

    class Flat(QKV):
        def forward(self, x):
            return self.q(x).view(-1)[:64] + self.k(x).flatten()[:64] + self.v(x).view(5, 3, 19)[..., 0].sum()

    _, hits, graphs = run(Flat(), torch.randn(5, K))
    assert dict(counters["flashllm"]) == FUSED3 and hits == 1
    copies = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.Tensor.contiguous]
    assert len(copies) == 1  # q's view(-1); v's view only splits the last dim, k's flatten copies by itself
