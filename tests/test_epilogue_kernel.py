"""The epilogue kernel (codegen/kernels/epilogue.py) against the plain-torch reference (codegen/epilogue_spec.py),
and the sparse launchers with an epilogue against dense F.linear + the reference (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashllm_compile.codegen.autotune import LAUNCHERS
from flashllm_compile.codegen.epilogue_spec import ACTIVATIONS, Epilogue, apply_epilogue, parse_epilogue
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.kernels.common import TileConfig
from flashllm_compile.codegen.kernels.epilogue import fused_epilogue

# numpy's exp overflows to inf inside sigmoid for large negative inputs (the intended result, 0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
EPILOGUES = ["", *ACTIVATIONS, *(f"{a}*up" for a in ACTIVATIONS)]


def make_case(s: int, m: int, n_out: int, text: str, dtype: torch.dtype, bias: bool, residual: bool):
    """fp32 partials [S, M, N] (N = N_out, 2 N_out for a GLU), bias [N] and an Epilogue with a residual
    [M, N_out] (random, scaled so that activations see both signs and their non-linear range)."""
    act, glu = parse_epilogue(text)
    n = 2 * n_out if glu else n_out
    partials = torch.randn(s, m, n) * 2
    b = torch.randn(n).to(dtype) if bias else None
    res = torch.randn(m, n_out).to(dtype) if residual else None
    return partials, b, Epilogue(act, glu, res)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("text", EPILOGUES)
@pytest.mark.parametrize("s, m, n_out", [(1, 1, 37), (3, 5, 33), (3, 0, 8), (1, 7, 601)])
@pytest.mark.parametrize("dtype, bias, residual", [(torch.float32, True, True), (torch.float16, False, True),
                                                   (torch.bfloat16, True, False)])
def test_kernel_matches_reference(text, s, m, n_out, dtype, bias, residual):
    partials, b, epilogue = make_case(s, m, n_out, text, dtype, bias, residual)
    out = fused_epilogue(partials, b, epilogue, dtype)
    ref = apply_epilogue(partials, b, epilogue, dtype)
    assert out.shape == ref.shape == (m, n_out) and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_reference_is_the_torch_math():
    """The reference itself, spelled out once: sum, bias, SwiGLU, residual, cast."""
    partials, b, epilogue = make_case(3, 4, 5, "silu*up", torch.float32, True, True)
    y = partials.sum(0) + b
    expected = F.silu(y[:, :5]) * y[:, 5:] + epilogue.residual
    torch.testing.assert_close(apply_epilogue(partials, b, epilogue, torch.float32), expected)


@pytest.mark.parametrize("text", ["silu", "gelu", "gelu_tanh", "relu", "silu*up"])
def test_nan_propagates(text):
    """A NaN partial gives NaN where the reference has it (relu must not turn NaN into 0), and nowhere else."""
    partials, b, epilogue = make_case(3, 2, 8, text, torch.float32, True, True)
    partials[1, 0, 3] = float("nan")
    partials[0, 1, -1] = float("nan")  # in the up half under GLU
    out = fused_epilogue(partials, b, epilogue, torch.float32)
    ref = apply_epilogue(partials, b, epilogue, torch.float32)
    assert out.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out, ref, equal_nan=True)


def test_finished_output_in_its_own_dtype():
    """The dense path's input: a [1, M, N] fp16 output of F.linear (not fp32 partials), non-contiguous rows."""
    y = torch.randn(6, 2 * 40).half()[::2]  # [3, 80], row stride 160
    epilogue = Epilogue("gelu_tanh", True, torch.randn(3, 40).half())
    torch.testing.assert_close(fused_epilogue(y[None], None, epilogue, torch.float16),
                               apply_epilogue(y[None], None, epilogue, torch.float16), rtol=1e-3, atol=1e-3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown epilogue"):
        parse_epilogue("tanh")
    with pytest.raises(ValueError, match="even N"):
        fused_epilogue(torch.randn(1, 2, 7), None, Epilogue("silu", True), torch.float32)
    with pytest.raises(ValueError, match="residual must be"):
        fused_epilogue(torch.randn(1, 2, 8), None, Epilogue("silu", True, torch.randn(2, 8)), torch.float32)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("config", [
    TileConfig("rowwalk", 32, 4, 1, 8, 1, 8), TileConfig("rowwalk", 32, 1, 4, 8, 1, 8),
    TileConfig("mma", 64, 16, 1, 4, 2), TileConfig("mma", 64, 16, 3, 4, 2), TileConfig("unpack", 32, 16, 1, 4, 1),
], ids=lambda c: c.short())
@pytest.mark.parametrize("text", ["silu*up", "gelu"])
def test_launchers_with_epilogue(config, text):
    """Each family with an epilogue (split_k 1: forced fp32 partials; split_k > 1: the reduction carries it)
    equals dense F.linear followed by the reference epilogue."""
    m, n, k = min(config.block_m, 3), 2 * 45, 300
    w = torch.randn(n, k) * (torch.rand(n, k) > 0.8)
    x, b = torch.randn(m, k), torch.randn(n)
    act, glu = parse_epilogue(text)
    epilogue = Epilogue(act, glu, torch.randn(m, n // 2 if glu else n))
    out = LAUNCHERS[config.family](x, BitmapWeight.from_dense(w, 128), b, config, epilogue)
    ref = apply_epilogue(F.linear(x, w)[None], b, epilogue, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
