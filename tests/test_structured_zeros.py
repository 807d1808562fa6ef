"""Structured zeros (passes/slice_structured_zeros.py): all-zero weight rows / columns are sliced away.

Each case checks the exact `counters["flashllm"]`, the shape of the weight the sparse_linear node runs on, and the
output against eager (fp32, random data, odd shapes); rows of all-zero weight rows must equal the bias exactly."""

from __future__ import annotations

import pytest
import torch
from compile_util import compile_and_compare
from torch import nn
from torch._dynamo.utils import counters

from flashllm_compile.codegen.formats import cache
from flashllm_compile.passes.slice_structured_zeros import MIN_SLICE_FRACTION, structured_slice

N, K = 75, 101  # odd
ZERO_ROWS = [0, 3, 4, 40, 74]  # 5 of 75 (6.7% >= MIN_SLICE_FRACTION)
ZERO_COLS = [1, 2, 50, 99, 100, 64]  # 6 of 101
RTOL, ATOL = 1e-4, 1e-5
SPARSE_LINEAR = torch.ops.flashllm.sparse_linear.default


def make_linear(rows=ZERO_ROWS, cols=ZERO_COLS, bias: bool = True, n: int = N, k: int = K) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k)).masked_fill_(torch.rand(n, k) < 0.7, 0.0)
        lin.weight[rows] = 0
        lin.weight[:, cols] = 0
    return lin


def run(model: nn.Module, x: torch.Tensor, **options):
    """Compile (options), run once without grad, compare with eager; (output, op calls, sparse_linear nodes)."""
    out, hits, graphs = compile_and_compare(model, x, rtol=RTOL, atol=ATOL, **options)
    return out, hits, [n for gm in graphs for n in gm.graph.nodes if n.target is SPARSE_LINEAR]


def op_shape(node: torch.fx.Node) -> tuple[int, int]:
    return node.args[6], node.args[7]  # (n, k) of the compressed weight


@pytest.mark.parametrize("case, kernel", [(c, k) for k in ("auto", "dense") for c in ("rows", "cols", "both")]
                         + [("both", "triton")])
def test_sliced(case, kernel):
    rows, cols = (ZERO_ROWS if case != "cols" else []), (ZERO_COLS if case != "rows" else [])
    lin = make_linear(rows, cols)
    out, hits, nodes = run(lin, torch.randn(2, 3, K), kernel=kernel)
    expected = {"linear_found": 1, "rewritten": 1, **({"sliced_rows": 1} if rows else {}),
                **({"sliced_cols": 1} if cols else {})}
    assert dict(counters["flashllm"]) == expected
    (node,) = nodes
    assert op_shape(node) == (N - len(rows), K - len(cols)) and hits == 1
    assert torch.equal(out[..., rows], lin.bias[rows].expand(2, 3, len(rows)))  # zero rows: exactly the bias


def test_no_bias_zero_rows_are_zero_and_grad_flows():
    lin = make_linear(bias=False).requires_grad_(False)
    x = torch.randn(7, K, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = lin(x_ref)
    ref.sum().backward()
    out = torch.compile(lin, backend="flashllm")(x)
    out.sum().backward()
    assert dict(counters["flashllm"]) == {"linear_found": 1, "rewritten": 1, "sliced_rows": 1, "sliced_cols": 1}
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    assert torch.equal(out[:, ZERO_ROWS], torch.zeros(7, len(ZERO_ROWS)))
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=RTOL, atol=ATOL)
    assert torch.equal(x.grad[:, ZERO_COLS], torch.zeros(7, len(ZERO_COLS)))


@pytest.mark.parametrize("case", ["none", "below_threshold", "option_off", "all_zero"])
def test_not_sliced(case):
    rows = {"none": [], "below_threshold": [7], "option_off": ZERO_ROWS, "all_zero": list(range(N))}[case]
    cols = ZERO_COLS if case == "option_off" else []
    assert 1 / N < MIN_SLICE_FRACTION
    lin = make_linear(rows, cols)
    options = {"slice_structured_zeros": False} if case == "option_off" else {}
    _, hits, (node,) = run(lin, torch.randn(5, K), **options)
    assert dict(counters["flashllm"]) == {"linear_found": 1, "rewritten": 1}
    assert op_shape(node) == (N, K) and hits == 1


def test_transposed_weight_rows_and_cols():
    """A weight stored [K, N] (HF Conv1D layout, used as x @ W): output rows are its columns."""

    class XW(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(make_linear().weight.detach().t().contiguous())  # [K, N]

        def forward(self, x):
            return x @ self.weight

    _, _, (node,) = run(XW(), torch.randn(3, K))
    assert dict(counters["flashllm"]) == {"linear_found": 1, "rewritten": 1, "sliced_rows": 1, "sliced_cols": 1}
    assert op_shape(node) == (N - len(ZERO_ROWS), K - len(ZERO_COLS))


def test_fused_siblings_sliced_together():
    """q has zero rows; columns are sliced only where every sibling's column is zero."""

    class QK(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = make_linear(ZERO_ROWS, ZERO_COLS)
            self.k = make_linear([], ZERO_COLS[:3], n=41)

        def forward(self, x):
            return self.q(x) - self.k(x).sum(-1, keepdim=True)

    _, hits, (node,) = run(QK(), torch.randn(4, K))
    assert dict(counters["flashllm"]) == {"linear_found": 2, "rewritten": 2, "fused_siblings": 1, "fused_linears": 2,
                                          "sliced_rows": 1, "sliced_cols": 1}
    assert op_shape(node) == (N + 41 - len(ZERO_ROWS), K - 3) and hits == 1


def test_sliced_weight_cached_and_watched():
    lin = make_linear()
    x = torch.randn(3, K)
    before = cache.STATS["compressions"]
    with torch.no_grad():
        torch.compile(lin, backend="flashllm")(x)
        torch._dynamo.reset()
        compiled = torch.compile(lin, backend="flashllm")
        compiled(x)
        assert cache.STATS["compressions"] == before + 1
        lin.weight.mul_(3)
        with pytest.raises(RuntimeError, match="modified in place"):
            compiled(x)


def test_structured_slice_indices():
    w = make_linear().weight.detach()
    s = structured_slice([w[:30], w[30:]], 64)  # two siblings: the same as one weight
    assert (s.zero_rows, s.zero_cols) == (len(ZERO_ROWS), len(ZERO_COLS))
    assert torch.equal(s.fmt.to_dense(), w[s.rows][:, s.cols])
    assert not s.row_keep[ZERO_ROWS].any() and s.row_keep.sum() == s.fmt.n
    assert torch.equal(s.row_pos[s.rows], torch.arange(s.fmt.n))
    assert structured_slice([torch.randn(8, 8)], 32) is None


def test_replaced_parameter_of_a_sliced_weight_raises():
    lin = make_linear()
    x = torch.randn(3, K)
    with torch.no_grad():
        compiled = torch.compile(lin, backend="flashllm")
        compiled(x)
        lin.weight = nn.Parameter(make_linear().weight.detach().clone())
        with pytest.raises(RuntimeError, match="got another weight tensor"):
            compiled(x)
    assert counters["flashllm"]["sliced_rows"] == 1


@pytest.mark.parametrize("case", ["rows", "cols", "both"])
def test_sliced_dense_fallback_runs_the_full_weight_in_place(case):
    """With the dense weights kept, a sliced op's dense fallback is the unsliced GEMM on the module's own weight,
    rows picked after it: the graph copies no W[rows][:, cols] per call (that copy made a LLaMA-7B layer 2.8x
    slower on the H100, benchmarks/RESULTS.md), and x reaches the op whole (its kernels gather the kept columns)."""
    rows, cols = (ZERO_ROWS if case != "cols" else []), (ZERO_COLS if case != "rows" else [])
    lin = make_linear(rows, cols)
    out, hits, (node,) = run(lin, torch.randn(2, 3, K), kernel="dense")
    assert op_shape(node) == (N - len(rows), K - len(cols)) and hits == 1
    assert node.args[5] is None, "no dense weight operand: the op runs its member weights in place"
    assert (node.kwargs["in_cols"] is not None) == bool(cols) and (node.kwargs["out_rows"] is not None) == bool(rows)
    graph = node.graph
    selects = [n for n in graph.nodes if n.target in (torch.index_select, torch.ops.aten.index_select.default)]
    assert node.args[0] not in selects, "the op receives the full input: x is not gathered in the graph"
    members = node.args[12] if len(node.args) > 12 else node.kwargs["weights"]  # the parameters, run in place
    assert members and not any(n.args[0] in members for n in selects), "no per-call slice of the weight"
    assert torch.equal(out[..., rows], lin.bias[rows].expand(2, 3, len(rows)))
