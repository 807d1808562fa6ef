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
    # The sparse_linear call this linear runs in, when it differs from the linear itself (fused siblings, sliced
    # structured zeros): its [N, K] and nonzero density (autotune results are keyed by them) and its name.
    op_shape: tuple[int, int] | None = None
    op_density: float | None = None
    group: str = ""
    epilogue: str = ""  # pointwise ops folded into that op (passes/fuse_epilogues.py), e.g. "+silu*up +residual"
    layout: str = ""  # the compressed format of rewritten layers: "bitmap" or "csl" (Tiled-CSL)


_RECORDERS: list[list[LinearDecision]] = []


@contextlib.contextmanager
def record_decisions():
    """Collect the decisions of every flashllm compile inside the block: `with record_decisions() as d: ...`."""
    decisions: list[LinearDecision] = []
    _RECORDERS.append(decisions)
    try:
        yield decisions
    finally:
        # by identity: list.remove compares by ==, and a nested recorder (the backend's own) holds equal lists
        del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is decisions)]


def publish(decision: LinearDecision) -> None:
    for recorder in _RECORDERS:
        recorder.append(decision)


def note_epilogues(decisions: list[LinearDecision], folded: dict[str, str]) -> None:
    """Set `epilogue` on the decisions of one compile from fuse_epilogues' {op name: folded}.  In place: the same
    objects were published to every recorder."""
    for d in decisions:
        d.epilogue = folded.get(d.group or d.name, "") if d.rewritten else ""


def _result(d: LinearDecision) -> str:
    """"sparse_linear", "sparse_linear [NxK]" when run inside a fused / sliced op of that shape, or "dense: why";
    " csl" when the op runs the Tiled-CSL format; then the folded epilogue, e.g. "sparse_linear [256x64] +silu*up"."""
    if not d.rewritten:
        return "dense: " + d.reason
    op = f"sparse_linear [{d.op_shape[0]}x{d.op_shape[1]}]" if d.op_shape else "sparse_linear"
    op += " csl" if d.layout == "csl" else ""
    return f"{op} {d.epilogue}" if d.epilogue else op


def decision_table(decisions: list[LinearDecision], kernels: dict[str, str] | None = None) -> str:
    """A readable table of `decisions` (one line per linear) and a summary line.

    kernels: optional {layer name: text} shown in an extra "kernel" column (e.g. the autotuned choice)."""
    w = max([40, *(len(d.name) for d in decisions)])  # full names: they are what users grep for
    rw = max([22, *(len(_result(d)) for d in decisions)])  # e.g. "sparse_linear [1376x256] +silu*up"
    header = f"{'layer':<{w}} {'shape':>12} {'zeros':>6}  {'result':<{rw}} {'MB before':>9} {'MB after':>8}"
    lines = [header + ("  kernel" if kernels is not None else "")]
    for d in decisions:
        after = f"{d.compressed_bytes / 1e6:8.2f}" if d.rewritten else "       -"
        line = (f"{d.name:<{w}} {f'{d.out_features}x{d.in_features}':>12} {d.sparsity:6.1%}  "
                f"{_result(d):<{rw}} {d.dense_bytes / 1e6:9.2f} {after}")
        lines.append(line + (f"  {kernels.get(d.name, '')}" if kernels is not None else ""))
    rewritten = [d for d in decisions if d.rewritten]
    before, after = sum(d.dense_bytes for d in rewritten), sum(d.compressed_bytes for d in rewritten)
    lines.append(f"\n{len(rewritten)}/{len(decisions)} linears rewritten; their weights: {before / 1e6:.1f} MB dense -> "
                 f"{after / 1e6:.1f} MB compressed ({after / max(before, 1):.1%})")
    return "\n".join(lines)
