"""torch.ops.flashllm.sparse_linear: registration, fake impl, kernel preferences, fallbacks, autograd, errors."""

import pytest
import torch

from flashllm_compile import ops
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.formats.cache import watch_weight


def make(n=48, k=96, sparsity=0.8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).masked_fill(torch.rand(n, k, generator=g) < sparsity, 0).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return w, b, BitmapWeight.from_dense(w, 64)


def call(x, fmt, b, w, kernel="auto", token=-1):
    return torch.ops.flashllm.sparse_linear(x, *fmt.tensors(), b, w, fmt.n, fmt.k, fmt.chunk_k, kernel, "layer", token)


def test_opcheck():
    w, b, fmt = make()
    x = torch.randn(3, 5, 96)
    torch.library.opcheck(torch.ops.flashllm.sparse_linear.default,
                          (x, *fmt.tensors(), b, w, fmt.n, fmt.k, fmt.chunk_k, "emulated", "layer", -1))


@pytest.mark.parametrize("kernel, family", [("auto", "emulated"), ("emulated", "emulated"), ("dense", "dense"),
                                            ("triton", "mma")])
@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 96), (2, 2, 2, 96), (0, 96)])
def test_preferences_match_dense(kernel, family, shape):
    w, b, fmt = make(dtype=torch.float16 if kernel == "triton" else torch.float32)
    x = torch.randn(shape).to(w.dtype)
    ops.KERNEL_HITS.clear()
    y = call(x, fmt, b, w, kernel)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert y.shape == (*shape[:-1], 48)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    m = x.numel() // 96
    assert ops.KERNEL_HITS[family if m > 8 or family != "mma" else "rowwalk"] == 1  # untuned default for M <= 8


def test_non_contiguous_input():
    w, b, fmt = make()
    x = torch.randn(96, 7).t()  # [7, 96], not contiguous
    torch.testing.assert_close(call(x, fmt, b, w), torch.nn.functional.linear(x, w, b))


def test_dense_preference_without_dense_weight_reconstructs():
    w, b, fmt = make()
    x = torch.randn(4, 96)
    torch.testing.assert_close(call(x, fmt, b, None, "dense"), torch.nn.functional.linear(x, w, b))


def test_triton_preference_on_wrong_dtype_raises():
    w, b, fmt = make(dtype=torch.float16)
    with pytest.raises(RuntimeError, match="kernel='triton'"):
        call(torch.randn(2, 96), fmt, b, w, "triton")


def test_wrong_feature_count_raises():
    w, b, fmt = make()
    with pytest.raises(ValueError, match="features"):
        call(torch.randn(2, 95), fmt, b, w)


def test_autograd_dense_backward():
    w, b, fmt = make()
    w.requires_grad_(True)
    b.requires_grad_(True)
    x = torch.randn(2, 3, 96, requires_grad=True)
    call(x, fmt, b, w).square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    torch.nn.functional.linear(x, w, b).square().sum().backward()
    for got, t in zip(grads, (x, w, b)):
        torch.testing.assert_close(got, t.grad)


def test_stale_weight_detected():
    w, b, fmt = make()
    token = watch_weight(w)
    x = torch.randn(2, 96)
    call(x, fmt, b, w, token=token)
    w.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        call(x, fmt, b, w, token=token)


def test_deterministic_option_ignores_tuned_choices(monkeypatch, tmp_path):
    """options={"deterministic": True}: the kernel choice comes from no timing (nor from the autotune cache), so
    it is the same in every process; without it the (here planted) tuned choice runs."""
    from flashllm_compile.codegen import autotune
    from flashllm_compile.codegen.kernels.common import TileConfig

    w, b, fmt = make(dtype=torch.float16)
    x = torch.randn(2, 96, dtype=torch.float16)
    tuner = autotune.Autotuner()
    key = autotune._key(fmt, 2, False)
    tuner._choices[key] = autotune.Choice("mma", TileConfig("mma", 64, 16, 1, 4, 2), 1.0, float("nan"))
    tuner._loaded_files.add(tuner.cache_file(str(tmp_path), x.device))
    monkeypatch.setattr(ops, "AUTOTUNER", tuner)
    monkeypatch.setitem(ops.RUNTIME, "cache_dir", str(tmp_path))
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    for deterministic, family in ((False, "mma"), (True, "rowwalk")):
        monkeypatch.setitem(ops.RUNTIME, "deterministic", deterministic)
        ops.KERNEL_HITS.clear()
        torch.testing.assert_close(call(x, fmt, b, w, "triton").float(), ref, rtol=1e-2, atol=1e-2)
        assert ops.KERNEL_HITS == {family: 1}


def test_compiled_ops_carry_their_own_runtime_options():
    """Each compile passes its options to its ops (`runtime`), so two models compiled with different options
    in one process do not share the last one's, and the process defaults (RUNTIME) are left alone."""
    import json

    from flashllm_compile.backend import flashllm_backend

    before = dict(ops.RUNTIME)
    specs = []
    for deterministic in (True, False):
        graphs = []

        def backend(gm, ex, deterministic=deterministic, graphs=graphs):
            graphs.append(gm)
            return flashllm_backend(gm, ex, options={"deterministic": deterministic, "autotune": False})

        torch._dynamo.reset()
        model = torch.nn.Linear(96, 48)
        with torch.no_grad():
            model.weight.copy_(make()[0])  # 80% zeros
            torch.compile(model, backend=backend)(torch.randn(2, 96))
        (node,) = [n for n in graphs[0].graph.nodes if n.target is torch.ops.flashllm.sparse_linear.default]
        specs.append(json.loads(node.kwargs["runtime"]))
    torch._dynamo.reset()
    assert [s["deterministic"] for s in specs] == [True, False] and not any(s["autotune"] for s in specs)
    assert ops.RUNTIME == before
    assert ops._runtime(json.dumps({"deterministic": True}))["deterministic"] is True
    assert ops._runtime(None) is ops.RUNTIME
