"""Hypothesis fuzzing of every Triton kernel family against dense F.linear (fp32 reference on the same weight).

Drawn per example: M, N, K, chunk width, dtype, bias, sparsity, a zero pattern and one tile config of the family
(any of `candidate_configs(M)`, so every block size / split-K the autotuner may pick is reachable):

    uniform      each element zero with probability `sparsity`
    row_skewed   some rows fully dense, some empty, the rest uniform (load imbalance across row blocks)
    col_skewed   the same per column (some chunks / bitmap words full, others empty)
    block        zero blocks of random size (whole words and chunks empty, others dense)
    all_zero     no nonzero at all (empty `values`)
    dense        no zero at all

Runs through the Triton interpreter on CPU (tests/conftest.py), so sizes are small; `derandomize=True` makes
CI reproducible (same examples every run).  Outputs are poisoned (NaN-filled by torch.empty), and every
element is compared with a bound derived from the dtype, so a single unwritten or wrong element fails.
tests/gpu/test_fuzz_gpu.py runs the same properties at GPU sizes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from flashllm_compile.codegen.autotune import GPU_ONLY_FAMILIES, LAUNCHERS, candidate_configs
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.formats.csl import CslWeight
from flashllm_compile.codegen.kernels.csl_mma import CMMA_MAX_GROUPS, cmma_words_ok

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytestmark = [
    pytest.mark.usefixtures("poison_outputs"),  # tests/conftest.py
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU"),
]
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
PATTERNS = ("uniform", "row_skewed", "col_skewed", "block", "all_zero", "dense")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# relative rounding of the output dtype (the kernels accumulate in fp32 and round once at the store)
OUT_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def make_weight(n: int, k: int, sparsity: float, pattern: str, seed: int, device: str = "cpu") -> torch.Tensor:
    """fp32 [N, K] weight with exact zeros laid out by `pattern` (see the module docstring), made on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device)
    w = torch.where(w == 0, 1.0, w)  # only the pattern decides where the zeros are
    if pattern == "dense":
        return w
    if pattern == "all_zero":
        return torch.zeros_like(w)
    if pattern == "uniform":
        keep = torch.rand(n, k, generator=g, device=device) >= sparsity
    elif pattern in ("row_skewed", "col_skewed"):
        lines = n if pattern == "row_skewed" else k
        kind = torch.randint(0, 3, (lines,), generator=g, device=device)  # 0: empty, 1: fully dense, 2: uniform
        keep = torch.rand(n, k, generator=g, device=device) >= sparsity
        keep_t = keep if pattern == "row_skewed" else keep.t()
        keep_t = torch.where((kind == 0)[:, None], False, torch.where((kind == 1)[:, None], True, keep_t))
        keep = keep_t if pattern == "row_skewed" else keep_t.t()
    elif pattern == "block":
        bn = int(torch.randint(1, 17, (1,), generator=g, device=device))
        bk = int(torch.randint(1, 65, (1,), generator=g, device=device))
        blocks = torch.rand(-(-n // bn), -(-k // bk), generator=g, device=device) >= sparsity
        keep = blocks.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    else:
        raise ValueError(pattern)
    return w * keep


def check_against_dense(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Every element of y within the rounding bound of the dense fp32 reference on the same (dtype) weight."""
    m, n = x.shape[0], w.shape[0]
    assert y.shape == (m, n) and y.dtype == x.dtype and y.device == x.device
    xf, wf = x.float(), w.float()  # on x's device (fp32 matmul, never tf32: torch's default)
    bf = None if b is None else b.float()
    ref = F.linear(xf, wf, bf)
    bound = F.linear(xf.abs(), wf.abs(), None if bf is None else bf.abs())  # sum of |terms|
    tol = OUT_EPS[x.dtype] * ref.abs() + (x.shape[1] + 2) * 2.0**-23 * bound + 1e-6
    err = (y.float() - ref).abs()
    bad = ~(err <= tol)  # NaN (an unwritten, poisoned element) counts as bad
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {y.numel()} elements wrong, e.g. [{i}, {j}]: "
                             f"got {y[i, j].item()}, dense {ref[i, j].item()} (tol {tol[i, j].item():.3g})")


@st.composite
def cases(draw, family: str, max_m: int, max_n: int, max_k: int, min_m: int = 1):
    m = draw(st.integers(min_m, max_m))  # M = 0 is one of the explicit corners
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    configs = [c for c in candidate_configs(m) if c.family == family]
    return {
        "m": m, "n": n, "k": k, "config": draw(st.sampled_from(configs)),
        "chunk_k": draw(st.sampled_from([32, 64, 128])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "bias": draw(st.booleans()),
        "sparsity": draw(st.one_of(st.sampled_from([0.5, 0.8, 0.9, 0.99]), st.floats(0.0, 1.0))),
        "pattern": draw(st.sampled_from(PATTERNS)),
        "seed": draw(st.integers(0, 2**16)),
    }


def run_case(case: dict, device: str = DEVICE) -> None:
    """Build the case's weight / input / bias on `device`, compress, launch the config, compare every element."""
    w = make_weight(case["n"], case["k"], case["sparsity"], case["pattern"], case["seed"], device).to(case["dtype"])
    g = torch.Generator(device=device).manual_seed(case["seed"] + 1)
    x = torch.randn(case["m"], case["k"], generator=g, device=device).to(case["dtype"])
    b = torch.randn(case["n"], generator=g, device=device).to(case["dtype"]) if case["bias"] else None
    config = case["config"]
    if config.family == "cmma":  # the Tiled-CSL format: a weight too dense for it is refused, never wrong
        fmt = CslWeight.from_dense(w)
        assert torch.equal(fmt.to_dense(), w)
        if fmt.max_groups > CMMA_MAX_GROUPS:
            with pytest.raises(ValueError, match="too dense"):
                LAUNCHERS[config.family](x, fmt, b, config)
            return
        if not cmma_words_ok(config.row_tiles(), config.block_m // 8, fmt.max_groups):  # too few registers
            with pytest.raises(ValueError, match="weight tiles a warp"):
                LAUNCHERS[config.family](x, fmt, b, config)
            return
    else:
        fmt = BitmapWeight.from_dense(w, case["chunk_k"])
        assert torch.equal(fmt.to_dense(), w)
    y = LAUNCHERS[config.family](x, fmt, b, config)
    if config.family == "unpack":
        # unpack is F.linear (cuBLAS) on the expanded weight: it must match the dense op on the same weight.  Its
        # error against fp32 is cuBLAS's own, which for bf16 (reduced-precision split-K reductions, torch's
        # default) can exceed the per-element bound below (H100: 2% on one element of a K=1023 product)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))  # dtype-default tolerances
        return
    check_against_dense(y, x, w, b)


def max_m_of(family: str, limit: int = 64) -> int:
    """Largest M (<= limit) for which the family has configs (the small-M families stop at 8)."""
    return max(m for m in range(limit + 1) if any(c.family == family for c in candidate_configs(m)))


def min_m_of(family: str, limit: int = 64) -> int:
    """Smallest M >= 1 for which the family has configs (the prefill family starts at 16)."""
    return min(m for m in range(1, limit + 1) if any(c.family == family for c in candidate_configs(m)))


# family -> (examples, max N, max K): the interpreter runs programs one after another, so families with more
# programs per launch (small BLOCK_N, bit walking) get fewer and smaller examples
BUDGET = {"rowwalk": (20, 48, 160), "mma": (60, 96, 192)}
DEFAULT_BUDGET = (20, 48, 160)  # a family added later is fuzzed too
FAMILIES = sorted(set(LAUNCHERS) - GPU_ONLY_FAMILIES)  # the interpreter cannot run inline-PTX programs


def corners(family: str) -> list[dict]:
    """Explicit examples run whatever Hypothesis draws: empty input, 1x1, odd N/K, every split-K extreme, all
    patterns at least once, each dtype."""
    lo, top = min_m_of(family, 40), max_m_of(family, 40)
    raw = [(0, 5, 40, 2, "uniform", torch.float16, True, 32), (1, 1, 1, 1, "dense", torch.float16, True, 32),
           (min(3, top), 17, 97, 4, "all_zero", torch.float32, True, 32),
           (top, 33, 100, 8, "col_skewed", torch.bfloat16, True, 64),
           (min(5, top), 50, 11, 3, "row_skewed", torch.float16, False, 128),
           (top, 65, 130, 2, "block", torch.float16, True, 32)]
    out = []
    for m, n, k, split_k, pattern, dtype, bias, chunk_k in raw:
        m = 0 if m == 0 else min(max(m, lo), top)
        config = next(c for c in candidate_configs(max(m, lo)) if c.family == family)._replace(split_k=split_k)
        out.append({"m": m, "n": n, "k": k, "config": config, "chunk_k": chunk_k, "dtype": dtype, "bias": bias,
                    "sparsity": 0.5, "pattern": pattern, "seed": 0})
    return out


def fuzzer(family: str):
    """The Hypothesis test of one family (called from the parametrized pytest test below)."""
    examples, max_n, max_k = BUDGET.get(family, DEFAULT_BUDGET)

    @settings(FUZZ, max_examples=examples)
    @given(case=cases(family, max_m=max_m_of(family, 40), max_n=max_n, max_k=max_k, min_m=min_m_of(family, 40)))
    def fuzz(case):
        run_case(case)

    for case in corners(family):
        fuzz = example(case=case)(fuzz)
    return fuzz


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_dense(family):
    assert min_m_of(family) <= max_m_of(family), "every family must serve some M"
    fuzzer(family)()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_have_the_zeros_they_claim(pattern):
    """The generator itself: all_zero / dense are exact, skewed patterns really contain empty and full lines."""
    w = make_weight(64, 96, 0.7, pattern, seed=3)
    zeros = (w == 0).float()
    if pattern == "all_zero":
        assert zeros.mean() == 1
    elif pattern == "dense":
        assert zeros.mean() == 0
    elif pattern in ("row_skewed", "col_skewed"):
        per_line = zeros.mean(1 if pattern == "row_skewed" else 0)
        assert (per_line == 1).any() and (per_line == 0).any()
    else:
        assert 0.4 < zeros.mean() < 0.95
