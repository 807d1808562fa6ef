"""GPU-size fuzzing (H100): the properties of tests/test_fuzz.py with the real Triton compiler, at sizes the
interpreter cannot afford: N and K up to LLaMA-7B's and odd ones around them (4095, 4097, 11008, 50257 rows),
M up to 256, every tile config of every family, fp16 / bf16 / fp32, six zero patterns.  Derandomized.

    FLASHLLM_TEST_GPU=1 python -m pytest -q tests/gpu/test_fuzz_gpu.py      # ~5-10 min (one JIT per new config)
    FLASHLLM_FUZZ_EXAMPLES=1000 FLASHLLM_TEST_GPU=1 python -m pytest -q tests/gpu/test_fuzz_gpu.py   # longer
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the CPU fuzz test's helpers
from test_fuzz import DTYPES, FUZZ, PATTERNS, run_case

from flashllm_compile.codegen.autotune import GPU_ONLY_FAMILIES, LAUNCHERS, candidate_configs
from flashllm_compile.codegen.kernels.csl_mma import get_csl_mma_configs


def family_configs(m: int, family: str) -> list:
    """The tuning space of `family` for M tokens (cmma: on the Tiled-CSL format, every other: the bitmap's)."""
    # cmma: every config for any weight (run_case expects a refusal where the weight needs more registers)
    configs = get_csl_mma_configs(m, 0) if family == "cmma" else candidate_configs(m)
    return [c for c in configs if c.family == family]

pytestmark = [
    pytest.mark.usefixtures("poison_outputs"),  # tests/conftest.py
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA GPU and the real Triton compiler (FLASHLLM_TEST_GPU=1)"),
]
EXAMPLES = int(os.environ.get("FLASHLLM_FUZZ_EXAMPLES", "150"))
ODD = [1, 2, 3, 31, 33, 127, 129, 255, 257, 1023, 1025, 2560, 4095, 4097, 11008, 11009]
LLAMA_7B = [(12288, 4096), (4096, 4096), (11008, 4096), (4096, 11008)]


@st.composite
def gpu_cases(draw, family: str):
    ms = [m for m in range(257) if family_configs(m, family)]
    m = draw(st.one_of(st.sampled_from([m for m in (1, 2, 3, 4, 5, 8, 16, 17, 33, 64, 65, 128, 256) if m in ms]),
                       st.integers(min(ms), max(ms))))
    if draw(st.booleans()):
        n, k = draw(st.sampled_from(LLAMA_7B))
    else:
        n = draw(st.one_of(st.sampled_from(ODD + [50257]), st.integers(1, 8192)))
        k = draw(st.one_of(st.sampled_from(ODD), st.integers(1, 8192)))
    smma = family in GPU_ONLY_FAMILIES  # their PTX handles 128-column chunks of 16-bit values only
    return {
        "m": m, "n": n, "k": k,
        "config": draw(st.sampled_from(family_configs(m, family))),
        "chunk_k": 128 if smma else draw(st.sampled_from([32, 64, 128, 256])),
        "dtype": draw(st.sampled_from([d for d in DTYPES if d != torch.float32] if smma else DTYPES)),
        "bias": draw(st.booleans()),
        "sparsity": draw(st.one_of(st.sampled_from([0.5, 0.8, 0.9, 0.99]), st.floats(0.0, 1.0))),
        "pattern": draw(st.sampled_from(PATTERNS)),
        "seed": draw(st.integers(0, 2**16)),
    }


def llama_corner(family: str, m: int) -> dict:
    m = min(mm for mm in range(m, 257) if family_configs(mm, family))  # >= the family's smallest M
    config = family_configs(m, family)[0]
    return {"m": m, "n": 12288, "k": 4096, "config": config, "chunk_k": 128, "dtype": torch.float16, "bias": False,
            "sparsity": 0.8, "pattern": "uniform", "seed": 0}


@pytest.fixture(autouse=True)
def _no_tf32():
    """The fp32 reference must be a true fp32 matmul."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("family", sorted(LAUNCHERS))
def test_family_matches_dense_at_gpu_sizes(family):
    @settings(FUZZ, max_examples=EXAMPLES)
    @given(case=gpu_cases(family))
    @example(case=llama_corner(family, 1))
    def fuzz(case):
        run_case(case, device="cuda")

    fuzz()
