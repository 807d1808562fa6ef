"""Helpers shared by the benchmarks: CUDA-graph replays over rotated copies, GPU / version info, the CSV writer."""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections.abc import Callable, Sequence

import torch

from flashllm_compile.codegen.autotune import replay_us
from flashllm_compile.codegen.formats.csl import CslWeight

# Enough distinct weight copies that the working set (>= 6 x 25 MB for the LLaMA-7B qkv weight) overflows
# the H100's 50 MB L2: every replayed call reads its weight from HBM.
ROTATIONS = 6


def graph_time_us(calls: Sequence[Callable[[], object]], replays: int = 20,
                  before: Callable[[], object] | None = None) -> float:
    """Median time of one call, in microseconds: the calls (one per rotated copy) are captured once into a
    CUDA graph, which is replayed `replays` times.

    Back to back (`before` None), a kernel launched with programmatic dependent launch overlaps the previous call
    of the same kernel.  In a decode step an op follows the kernel that produced its input instead (a norm, rope,
    attention), so with `before` (a small call that writes the op's input, e.g. `input_writer(x)`, launched
    without PDL) every call follows one `before`, and the time of the `before` calls alone is subtracted."""
    if before is None:
        return _replayed_us(calls, replays) / len(calls)
    # the median of 3 differences, each of two graphs timed next to each other: one replay of either graph that ran
    # slow or fast by a few us made the difference absurd (one call at 2.9 us, below its bytes floor)
    seq = [step for call in calls for step in (before, call)]
    return statistics.median(_replayed_us(seq, replays) - _replayed_us([before] * len(calls), replays)
                             for _ in range(3)) / len(calls)


def input_writer(x: torch.Tensor) -> Callable[[], object]:
    """A call that rewrites `x` in place from a copy of it (one small kernel, launched without PDL): the kernel that
    produced an op's input, which the op follows in a decode step (`graph_time_us`'s `before`)."""
    x_src = x.clone()
    return lambda: x.copy_(x_src)


def _replayed_us(seq: Sequence[Callable[[], object]], replays: int) -> float:
    """Median time of one replay of a CUDA graph of `seq`, run once first (warm-up) on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in seq:  # warm-up: compile, allocate, autotune outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in seq:
            call()
    return replay_us(graph, replays)


def pruned(n: int, k: int, sparsity: float, dtype: torch.dtype) -> torch.Tensor:
    """A random [N, K] weight on the GPU with each entry zeroed with probability `sparsity` (unstructured)."""
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    return w.masked_fill_(torch.rand(n, k, device="cuda") < sparsity, 0)


def csl_copies(weights: Sequence[torch.Tensor]) -> list[CslWeight]:
    """The rotated copies in Tiled-CSL, all with the largest copy's max_groups (a bound on every copy's groups), so
    that one kernel and one tuned config run them all: random copies of one shape can round to different bounds
    (LLaMA-13B qkv at 80%: 16 and 20), and a config tuned for 16 may not hold 20 (cmma_words_ok)."""
    fmts = [CslWeight.from_dense(w) for w in weights]
    bound = max(f.max_groups for f in fmts)
    return [dataclasses.replace(f, max_groups=bound) for f in fmts]


def gpu_info() -> dict[str, str]:
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def write_csv(rows: list[dict], path: str) -> None:
    """One row per dict; the columns are every key of any row, in first-seen order."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
