"""Compile-time dispatch (passes/rewrite_sparse_linear.dense_wins): where the autotuner picks cuBLAS over every
sparse kernel at the graph's static token count, the linears are left to Inductor untouched (no op, no compressed
buffers); elsewhere they are rewritten.  The tuner is replaced by a stub (the CPU has no kernels to time) that
makes the down projection (N = 64) lose and the up projection (N = 128) win."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from flashllm_compile import ops
from flashllm_compile.codegen.autotune import Choice
from flashllm_compile.codegen.formats import cache
from flashllm_compile.passes import rewrite_sparse_linear as rsl
from flashllm_compile.report import record_decisions

HIDDEN, INTER = 64, 128


class MLP(nn.Module):
    """up [HIDDEN -> INTER], relu, down [INTER -> HIDDEN]; both weights 80% zeros."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(HIDDEN, INTER, bias=False)
        self.down = nn.Linear(INTER, HIDDEN, bias=False)
        with torch.no_grad():
            for lin in (self.up, self.down):
                lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.8, 0)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def tuner(monkeypatch):
    """Pretend the weights live where the tuner measures; record the (N, K, M, dense rows) it is asked about."""
    asked = []
    original = rsl.AUTOTUNER.choose

    def choose(fmt, m, dense, *, allow_dense, tune, cache_dir):
        if not (allow_dense and tune):  # the op's own runtime call (kernel="triton" in the interpreter)
            return original(fmt, m, dense, allow_dense=allow_dense, tune=tune, cache_dir=cache_dir)
        asked.append((fmt.n, fmt.k, m, sum(w.shape[0] for w in dense)))
        return Choice("dense" if fmt.n == HIDDEN else "rowwalk", None, 1.0, 2.0)

    monkeypatch.setattr(rsl, "_tuned_on_device", lambda weight: True)
    monkeypatch.setattr(rsl.AUTOTUNER, "choose", choose)
    return asked


def run(model, x, **compile_kwargs):
    """Compile with flashllm, run once; returns (output, eager output, decisions, sparse_linear calls made)."""
    with torch.no_grad(), record_decisions() as decisions:
        ref = model(x)
        before = sum(ops.KERNEL_HITS.values())
        out = torch.compile(model, backend="flashllm", **compile_kwargs)(x)
        calls = sum(ops.KERNEL_HITS.values()) - before
    return out, ref, decisions, calls


def test_losing_linear_left_to_inductor(tuner):
    model = MLP()
    out, ref, decisions, calls = run(model, torch.randn(3, 5, HIDDEN))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    by_name = {d.name.split(".")[-1].split("_")[-1]: d for d in decisions}
    assert not by_name["down"].rewritten and by_name["down"].reason == rsl.DENSE_FASTER
    assert by_name["up"].rewritten
    assert counters["flashllm"]["skip_dense_faster"] == 1 and counters["flashllm"]["rewritten"] == 1
    assert calls == 1  # only the up projection runs the op
    # asked once per linear, at the graph's static M = 3 * 5 tokens, with the linear's own dense weight
    assert sorted(tuner) == [(HIDDEN, INTER, 15, HIDDEN), (INTER, HIDDEN, 15, INTER)]
    # the down projection was compressed only to be measured: the compression cache does not keep it alive
    assert id(model.down.weight) not in cache._CACHE and id(model.up.weight) in cache._CACHE


def test_format_held_by_a_graph_stays_cached(tuner):
    """A format some compiled graph holds is not dropped when another graph leaves the same linear dense."""
    model = MLP()
    fmt = cache.compress_weight(model.down.weight, 128)
    cache.adopt(fmt)
    run(model, torch.randn(3, 5, HIDDEN))
    assert cache._CACHE[id(model.down.weight)][-1] is fmt
    cache.forget_unless_adopted(fmt)  # still adopted: kept
    assert id(model.down.weight) in cache._CACHE


def test_symbolic_token_count_keeps_the_runtime_dispatch(tuner):
    _, _, decisions, calls = run(MLP(), torch.randn(3, 5, HIDDEN), dynamic=True)
    assert all(d.rewritten for d in decisions) and calls == 2
    assert tuner == []


@pytest.mark.parametrize("options", [{"kernel": "triton"}, {"release_dense_weights": True}, {"autotune": False},
                                     {"deterministic": True}])
def test_options_without_a_measured_dense_choice_rewrite_everything(tuner, options):
    """Only where the op itself could measure and pick dense: kernel auto, dense weights kept, autotune on."""
    model = MLP()
    with torch.no_grad(), record_decisions() as decisions:
        torch.compile(model, backend="flashllm", options=options)(torch.randn(2, HIDDEN))
    assert all(d.rewritten for d in decisions) and len(decisions) == 2
    assert tuner == []


def test_static_tokens_reads_the_leading_dims():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, 3, 7)
    assert rsl.static_tokens(x) == 6
    del x.meta["val"]
    assert rsl.static_tokens(x) is None
