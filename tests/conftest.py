"""Shared test setup: every test starts with a fresh Dynamo cache, empty counters and a fixed seed."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import flashllm_compile.ops

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flashllm_compile.ops.KERNEL_HITS.clear()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
