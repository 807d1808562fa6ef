"""Shared test setup.

TRITON_INTERPRET=1 lets the Triton kernels run on CPU (tests/test_kernels.py); it must be set before triton is
imported. Every test starts with a fresh Dynamo cache, empty flashllm counters / kernel hits and a fixed seed.
"""

from __future__ import annotations

import os

if not os.environ.get("FLASHLLM_TEST_GPU"):  # FLASHLLM_TEST_GPU=1: run tests/gpu with the real compiler
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _fresh_dynamo_state():
    import torch._dynamo
    import torch._dynamo.utils

    import flashllm_compile.ops

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flashllm_compile.ops.KERNEL_HITS.clear()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture
def poison_outputs():
    """torch.empty returns NaN-filled memory while it runs: an output element a kernel fails to write shows up as
    NaN.  Used by the kernel tests (`pytest.mark.usefixtures("poison_outputs")`)."""
    import torch

    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]
