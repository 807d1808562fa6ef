"""The Tiled-CSL format through the op and the compile-time dispatch (passes/rewrite_sparse_linear.static_dispatch):
for a graph with a static token count the pass compresses the weight in both formats, asks the autotuner for each,
and gives the op the faster one (or leaves the linear to Inductor where cuBLAS beats both).  The tuner is a stub
(the CPU has no kernels to time); the op runs its emulated path here, so outputs are checked against eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from flashllm_compile.codegen.autotune import Choice
from flashllm_compile.codegen.formats import cache
from flashllm_compile.codegen.formats.csl import CslWeight
from flashllm_compile.codegen.kernels.common import TileConfig
from flashllm_compile.passes import rewrite_sparse_linear as rsl
from flashllm_compile.report import decision_table, record_decisions

HIDDEN, INTER = 64, 128
CMMA = TileConfig("cmma", 32, 8, 1, 2, 1)
FMMA = TileConfig("fmma", 32, 8, 1, 2, 2)


def op_call(x, fmt: CslWeight, bias=None, dense=None, kernel="auto"):
    return torch.ops.flashllm.sparse_linear(x, *fmt.parts().values(), bias, dense, fmt.n, fmt.k, fmt.op_param,
                                            kernel, "layer", -1, layout="csl")


def pruned(n, k, sparsity=0.8, dtype=torch.float16):
    torch.manual_seed(n + k)
    w = torch.randn(n, k).to(dtype)
    return w.masked_fill_(torch.rand(n, k) < sparsity, 0)


def test_op_runs_the_csl_format():
    w, bias = pruned(96, 300), torch.randn(96).half()
    x = torch.randn(2, 5, 300).half()
    fmt = CslWeight.from_dense(w)
    ref = F.linear(x.float(), w.float(), bias.float())
    for kernel in ("auto", "emulated", "dense"):  # CPU: emulated, or the weight rebuilt from the format
        torch.testing.assert_close(op_call(x, fmt, bias, kernel=kernel).float(), ref, rtol=1e-2, atol=1e-2)
    torch.library.opcheck(torch.ops.flashllm.sparse_linear.default,
                          (x, *fmt.parts().values(), None, w, fmt.n, fmt.k, fmt.op_param, "emulated", "l", -1),
                          {"layout": "csl"}, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="unknown weight layout"):
        torch.ops.flashllm.sparse_linear(x, *fmt.parts().values(), None, None, fmt.n, fmt.k, fmt.op_param,
                                         "emulated", "l", -1, layout="coo")


def test_op_backward_on_the_csl_format():
    w = pruned(32, 256, dtype=torch.float32).to(torch.float16)
    fmt = CslWeight.from_dense(w)
    x = torch.randn(3, 256, dtype=torch.float16, requires_grad=True)
    op_call(x, fmt, kernel="emulated").float().sum().backward()
    torch.testing.assert_close(x.grad.float(), w.float().sum(0).expand(3, -1), rtol=1e-2, atol=1e-2)


class MLP(nn.Module):
    """up [HIDDEN -> INTER], relu, down [INTER -> HIDDEN], fp16."""

    def __init__(self, sparsity=0.8):
        super().__init__()
        self.up = nn.Linear(HIDDEN, INTER, bias=False).half()
        self.down = nn.Linear(INTER, HIDDEN, bias=False).half()
        with torch.no_grad():
            self.up.weight.copy_(pruned(INTER, HIDDEN, sparsity))
            self.down.weight.copy_(pruned(HIDDEN, INTER, sparsity))

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def tuner(monkeypatch):
    """Pretend the weights live where the tuner measures; each format's sparse pick takes `times[layout]` us,
    dense 3 us.  Records (layout, N, M, allow_dense)."""
    asked, times = [], {"csl": 1.0, "bitmap": 2.0}

    def choose(fmt, m, dense, *, allow_dense, tune, cache_dir):
        asked.append((fmt.LAYOUT, fmt.n, m, allow_dense))
        config = CMMA if fmt.LAYOUT == "csl" else FMMA
        return Choice(config.family, config, times[fmt.LAYOUT], 3.0 if allow_dense else float("nan"))

    monkeypatch.setattr(rsl, "_tuned_on_device", lambda weight: True)
    monkeypatch.setattr(rsl.AUTOTUNER, "choose", choose)
    return asked, times


def compile_run(model, x, options=None):
    with torch.no_grad(), record_decisions() as decisions:
        ref = model(x)
        out = torch.compile(model, backend="flashllm", options=options)(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    return {d.name.split(".")[-1].split("_")[-1]: d for d in decisions}


def test_faster_csl_is_chosen_and_the_bitmap_dropped(tuner):
    asked, _ = tuner
    model = MLP()
    decisions = compile_run(model, torch.randn(3, HIDDEN).half())
    assert [d.layout for d in decisions.values()] == ["csl", "csl"]
    assert counters["flashllm"]["csl"] == 2 and counters["flashllm"]["rewritten"] == 2
    assert "sparse_linear csl" in decision_table(list(decisions.values()))  # what the demo / explain print
    # both formats measured at the static M = 3 with the dense fallback allowed
    assert sorted(asked) == [("bitmap", HIDDEN, 3, True), ("bitmap", INTER, 3, True),
                             ("csl", HIDDEN, 3, True), ("csl", INTER, 3, True)]
    # the bitmap was compressed only to be measured: no cache keeps it; the graph holds the Tiled-CSL format
    assert id(model.up.weight) not in cache._CACHE
    held = [v[-1] for v in cache._DERIVED.values()]
    assert sum(isinstance(f, CslWeight) for f in held) == 2
    assert decisions["up"].compressed_bytes == next(f.nbytes for f in held if isinstance(f, CslWeight) and f.n == INTER)


def test_faster_bitmap_is_kept(tuner):
    _, times = tuner
    times["csl"] = 1.97  # within CSL_MIN_GAIN of the bitmap's 2.0: the smaller format stays
    model = MLP()
    decisions = compile_run(model, torch.randn(3, HIDDEN).half())
    assert [d.layout for d in decisions.values()] == ["bitmap", "bitmap"] and counters["flashllm"]["csl"] == 0
    assert not any(isinstance(v[-1], CslWeight) for v in cache._DERIVED.values())


@pytest.mark.parametrize("options, allowed", [({"csl": False}, []), ({"release_dense_weights": True}, []),
                                              ({"release_dense_weights": True, "csl": True}, ["csl", "csl"])])
def test_csl_options(tuner, options, allowed):
    asked, _ = tuner
    decisions = compile_run(MLP(), torch.randn(3, HIDDEN).half(), options)
    chosen = [d.layout for d in decisions.values() if d.layout == "csl"]
    assert chosen == allowed
    if options.get("release_dense_weights"):  # no dense fallback to measure against
        assert all(not allow_dense for *_, allow_dense in asked)
        assert asked or not allowed  # release without csl: nothing to decide at compile time


def test_too_dense_or_symbolic_keeps_the_bitmap(tuner):
    asked, _ = tuner
    decisions = compile_run(MLP(sparsity=0.6), torch.randn(3, HIDDEN).half())
    assert [d.layout for d in decisions.values()] == ["bitmap", "bitmap"]
    assert {layout for layout, *_ in asked} == {"bitmap"}  # 40% nonzeros: more bytes than the bitmap's
    asked.clear()
    torch._dynamo.reset()
    x = torch.randn(3, HIDDEN).half()
    torch._dynamo.mark_dynamic(x, 0)
    decisions = compile_run(MLP(), x)
    assert [d.layout for d in decisions.values()] == ["bitmap", "bitmap"] and asked == []
