"""What the backend decided for every linear it saw: the data behind `explain()` and the TORCH_LOGS output."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass
class LinearDecision:
    name: str  # module path of the weight, e.g. "model.layers.0.mlp.down_proj"
    out_features: int
    in_features: int
    dtype: str
    sparsity: float  # exact-zero fraction (nan when not measured)
    rewritten: bool
    reason: str  # "rewritten" or the skip reason
    kernel: str  # KernelPreference value for rewritten layers, "" otherwise
    dense_bytes: int
    compressed_bytes: int  # 0 when not rewritten
    op: str  # the FX target that was matched


_RECORDERS: list[list[LinearDecision]] = []


@contextlib.contextmanager
def record_decisions():
    """Collect the decisions of every flashllm compile inside the block: `with record_decisions() as d: ...`."""
    decisions: list[LinearDecision] = []
    _RECORDERS.append(decisions)
    try:
        yield decisions
    finally:
        _RECORDERS.remove(decisions)


def publish(decision: LinearDecision) -> None:
    for recorder in _RECORDERS:
        recorder.append(decision)
