"""sparse_linear_nograd (the op without an autograd layer) and passes/nograd_ops.py, which calls it where grad mode
is off: same results, the path proven by its counter and Inductor's code, and gradients never silently dropped."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from flashllm_compile import ops
from flashllm_compile.backend import flashllm_backend
from flashllm_compile.codegen.formats.bitmap import BitmapWeight


def make(n=48, k=96, sparsity=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).masked_fill(torch.rand(n, k, generator=g) < sparsity, 0)
    return w, torch.randn(n, generator=g), BitmapWeight.from_dense(w, 64)


def args(x, fmt, b, w, kernel="auto"):
    return (x, *fmt.tensors(), b, w, fmt.n, fmt.k, fmt.chunk_k, kernel, "layer", -1)


@pytest.mark.parametrize("kernel", ["auto", "emulated", "dense"])
def test_twin_matches_op(kernel):
    w, b, fmt = make()
    x = torch.randn(2, 3, 96)
    ops.KERNEL_HITS.clear()
    with torch.no_grad():
        y = torch.ops.flashllm.sparse_linear_nograd(*args(x, fmt, b, w, kernel))
    assert sum(ops.KERNEL_HITS.values()) == 1
    torch.testing.assert_close(y, torch.ops.flashllm.sparse_linear(*args(x, fmt, b, w, kernel)))
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4)


def test_twin_schema_and_fake():
    w, b, fmt = make()
    torch.library.opcheck(torch.ops.flashllm.sparse_linear_nograd.default, args(torch.randn(5, 96), fmt, b, w),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_twin_refuses_a_gradient():
    w, b, fmt = make()
    with pytest.raises(RuntimeError, match="no backward"):
        torch.ops.flashllm.sparse_linear_nograd(*args(torch.randn(4, 96, requires_grad=True), fmt, b, w))
    with pytest.raises(RuntimeError, match="no backward"):
        torch.ops.flashllm.sparse_linear_nograd(*args(torch.randn(4, 96), fmt, b, w.requires_grad_()))
    x = torch.randn(4, 96, requires_grad=True)
    with torch.no_grad():  # grad mode off: nothing can flow, so it runs
        torch.ops.flashllm.sparse_linear_nograd(*args(x, fmt, b, w))


def _pruned_mlp():
    model = torch.nn.Sequential(torch.nn.Linear(96, 48), torch.nn.ReLU(), torch.nn.Linear(48, 96))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.masked_fill_(torch.rand_like(layer.weight) < 0.8, 0)
    return model


@pytest.mark.parametrize("grad", [False, True])
def test_inductor_code_calls_the_twin(grad):
    """Inference graphs and training forward graphs alike (AOTAutograd runs them without autograd): the generated
    code calls the twin, the backend's own graph keeps sparse_linear, and gradients still flow."""
    torch._dynamo.reset()
    counters.clear()
    model = _pruned_mlp().requires_grad_(False)  # weights that require grad are not rewritten in grad mode
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return flashllm_backend(gm, example_inputs, options={"autotune": False})

    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 96, requires_grad=grad)
    ops.KERNEL_HITS.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), torch.set_grad_enabled(grad):
        out, code = run_and_get_code(compiled, x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    assert counters["flashllm_nograd"]["ops"] == 2 and sum(ops.KERNEL_HITS.values()) == 2
    assert "torch.ops.flashllm.sparse_linear_nograd.default(" in "\n".join(code)
    assert sum(n.target is torch.ops.flashllm.sparse_linear.default for n in graphs[0].graph.nodes) == 2
    if grad:
        out.sum().backward()
        xr = x.detach().clone().requires_grad_()
        model(xr).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
