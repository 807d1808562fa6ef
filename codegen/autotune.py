"""Pick the implementation of one sparse linear per (shape, density, M bucket) by measuring it on the GPU.

FlashDecoding++-style dispatch: for a given M the candidates are the row-walking CUDA-core kernel (M <= 8), the
tensor-core kernel, unpack-then-cuBLAS (M >= 16, prefill without a dense copy), and dense cuBLAS (when the dense
weight is kept).  Each is timed as CUDA-graph replays with L2 flushed before every call (weights from HBM, no
launch gaps: what a decode step under mode="reduce-overhead" sees; `bench_us`); the fastest wins, so a sparse
kernel that is slower than dense is never chosen.  Results persist in a JSON file keyed by GPU name,
torch/triton versions and a hash of the kernel sources, so a second compile does not re-tune.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from flashllm_compile.codegen.formats.csl import CslWeight
from flashllm_compile.codegen.kernels.bitmap_fmma import bitmap_fmma, get_bitmap_fmma_configs
from flashllm_compile.codegen.kernels.bitmap_mma import bitmap_mma, get_bitmap_mma_configs
from flashllm_compile.codegen.kernels.bitmap_rowwalk import ROWWALK_MAX_M, bitmap_rowwalk, get_bitmap_rowwalk_configs
from flashllm_compile.codegen.kernels.bitmap_smma import bitmap_smma, get_bitmap_smma_configs
from flashllm_compile.codegen.kernels.bitmap_unpack import bitmap_unpack, get_bitmap_unpack_configs
from flashllm_compile.codegen.kernels.common import CompressedWeight, TileConfig
from flashllm_compile.codegen.kernels.csl_mma import cmma_default_config, csl_mma, get_csl_mma_configs
from flashllm_compile.codegen.kernels.host_math import next_power_of_2
from flashllm_compile.codegen.kernels.launch import precompile

log = logging.getLogger(__name__)

LAUNCHERS = {"fmma": bitmap_fmma, "mma": bitmap_mma, "rowwalk": bitmap_rowwalk, "smma": bitmap_smma, "unpack": bitmap_unpack,
             "cmma": csl_mma}
GPU_ONLY_FAMILIES = frozenset({"fmma", "smma", "cmma"})  # whole programs in inline PTX: no interpreter path, fp16/bf16


def candidate_configs(m: int, fmt: CompressedWeight | None = None) -> list[TileConfig]:
    """Every sparse config worth timing for M tokens on `fmt`'s format (default: the bitmap's), all families."""
    if isinstance(fmt, CslWeight):
        return get_csl_mma_configs(m, fmt.max_groups)
    row_walk = get_bitmap_rowwalk_configs(m) if fmt is None or not fmt.tile_rows else []  # needs row-major values
    return (row_walk + get_bitmap_fmma_configs(m) + get_bitmap_smma_configs(m) + get_bitmap_mma_configs(m)
            + get_bitmap_unpack_configs(m))
DENSITY_STEP = 0.05  # densities within one step share a tuning result
MAX_M_BUCKET = 4096  # larger M reuses the 4096 decision
TUNE_WARMUP_MS, TUNE_REP_MS = 2, 10
# A sparse kernel replaces dense only when measured at least this much faster: the timing spread between runs is
# a few percent, and inside a model (an 8-layer LLaMA, batch 8, 80%) near-tie picks came out slower than cuBLAS.
SPARSE_MIN_GAIN = 1.05
# The fastest few candidates (and dense) are timed CONFIRM_REPEATS more times and ranked by their median: the pick
# is the minimum over dozens of single measurements, and one measured far too low (the flush graph's median, which is
# subtracted, came out high) won before.  H100: fmma measured below cmma on `o` at 80%, M = 8, and ran 15.9 us
# against cmma's 9.8 over rotated copies, while three later sweeps measured them at 14.4 and 10.1 us
# (benchmarks/RESULTS.md, fourteenth session).
CONFIRM_TOP, CONFIRM_REPEATS = 4, 2


@dataclass(frozen=True)
class Choice:
    """The implementation picked for one key; `config` is None for dense."""

    family: str  # "dense" or a LAUNCHERS family
    config: TileConfig | None
    time_us: float  # measured time of the choice (nan when not measured)
    dense_us: float  # measured dense time (nan when not measured / not allowed)


def dense_linear(x: torch.Tensor, dense: torch.Tensor | list[torch.Tensor], bias: torch.Tensor | None = None):
    """cuBLAS on the dense weight: one [N, K] tensor, or a fused op's member weights [N_i, K] (row blocks of the
    fused weight, used in place: no concatenated copy), whose outputs are concatenated.  x: [M, K] -> [M, N]."""
    if isinstance(dense, torch.Tensor) or len(dense) == 1:
        return torch.nn.functional.linear(x, dense if isinstance(dense, torch.Tensor) else dense[0], bias)
    out = torch.cat([torch.nn.functional.linear(x, w) for w in dense], dim=-1)
    return out if bias is None else out + bias


def m_bucket(m: int) -> int:
    """Next power of two >= m, capped at MAX_M_BUCKET."""
    return min(MAX_M_BUCKET, next_power_of_2(max(m, 1)))


def default_config(m: int, row_major: bool = True) -> TileConfig:
    """Untuned choice (autotune off, or M first seen inside a CUDA-graph capture) on a bitmap weight whose values
    are row-major or not (the row walk needs them row-major)."""
    # The configs the H100 tuner picked most often on LLaMA-7B shapes (benchmarks/RESULTS.md); the previous
    # defaults cost 1.06-1.45x the tuned pick (benchmarks/determinism.py); these were not re-measured.
    if m <= ROWWALK_MAX_M and row_major:
        return TileConfig("rowwalk", 16, next_power_of_2(max(m, 1)), 1, 16, 1, 32)
    if m <= 64:
        return TileConfig("mma", 128, max(16, next_power_of_2(m)), 4, 4, 2)
    return TileConfig("mma", 64, 64, 1, 4, 3)


def untuned_choice(m: int, allow_dense: bool, fmt: CompressedWeight | None = None) -> Choice:
    """What runs without a measurement: dense where allowed (never slower than the model's own op), else the
    default sparse config for M on `fmt`'s format."""
    if allow_dense:
        return Choice("dense", None, float("nan"), float("nan"))
    config = cmma_default_config(m) if isinstance(fmt, CslWeight) else default_config(
        m, fmt is None or not fmt.tile_rows)
    return Choice(config.family, config, float("nan"), float("nan"))


@functools.cache
def kernel_source_hash() -> str:
    """Changes whenever a kernel template changes, so stale tuning results are not reused."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "kernels").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def dense_shape(dense: torch.Tensor | list[torch.Tensor] | None) -> tuple[int, int] | None:
    """[N, K] of a dense fallback weight (a fused op's members: rows summed).  A sliced op's dense fallback is its
    full weight, larger than its compressed one (ops.sparse_linear, in_cols / out_rows)."""
    if dense is None:
        return None
    parts = [dense] if isinstance(dense, torch.Tensor) else dense
    return sum(p.shape[0] for p in parts), parts[0].shape[1]


def _key(fmt: CompressedWeight, m: int, allow_dense: bool, dense: tuple[int, int] | None = None) -> str:
    """The bitmap: "<dtype>:<N>x<K>:ck<chunk_k>[t<tile_rows>]:d<density>:m<M bucket>:dense<0|1>[:full<N>x<K>]"
    (t16: tile-major values); Tiled-CSL: the same
    with "csl:" in front and the kernel's word registers "g<max_groups>" for ck (density counts its filler words)."""
    density = round(round(fmt.nnz / max(1, fmt.n * fmt.k) / DENSITY_STEP) * DENSITY_STEP, 2)
    dtype = str(fmt.dtype).removeprefix("torch.")
    full = f":full{dense[0]}x{dense[1]}" if allow_dense and dense is not None and dense != (fmt.n, fmt.k) else ""
    layout = f"csl:{dtype}:{fmt.n}x{fmt.k}:g{fmt.max_groups}" if isinstance(fmt, CslWeight) else \
        f"{dtype}:{fmt.n}x{fmt.k}:ck{fmt.chunk_k}" + (f"t{fmt.tile_rows}" if fmt.tile_rows else "")
    return f"{layout}:d{density}:m{m_bucket(m)}:dense{int(allow_dense)}{full}"


class Autotuner:
    """Process-wide cache of choices, backed by one JSON file per (GPU, versions, kernel sources)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._choices: dict[str, Choice] = {}
        self._loaded_files: set[Path] = set()
        # hot path: (n, k, chunk_k, nnz, dtype, device, M bucket, allow_dense) -> Choice, no string building or I/O
        self._fast: dict[tuple, Choice] = {}
        self.hits = 0  # lookups answered from memory or disk
        self.tunings = 0  # keys measured in this process

    def cache_file(self, cache_dir: str, device: torch.device) -> Path:
        name = _device_name(device)
        tag = f"{name}-torch{torch.__version__}-triton{triton.__version__}-{kernel_source_hash()}"
        safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in tag)
        return Path(cache_dir) / f"autotune-{safe}.json"

    def _load(self, path: Path) -> None:
        if path in self._loaded_files:
            return
        self._loaded_files.add(path)
        if not path.exists():
            return
        try:
            for key, raw in json.loads(path.read_text()).items():
                config = TileConfig(*raw["config"]) if raw["config"] else None
                self._choices.setdefault(key, Choice(raw["family"], config, raw["time_us"], raw["dense_us"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"flashllm: ignoring unreadable autotune cache {path}: {e}", stacklevel=2)

    def _save(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {k: {**asdict(c), "config": list(c.config) if c.config else None} for k, c in self._choices.items()}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        except OSError as e:
            warnings.warn(f"flashllm: could not write autotune cache {path}: {e}", stacklevel=2)

    def choose(self, fmt: CompressedWeight, m: int, dense_weight: torch.Tensor | list[torch.Tensor] | None, *,
               allow_dense: bool, tune: bool, cache_dir: str) -> Choice:
        """The implementation to run for M tokens (`dense_weight` as in `dense_linear`). Tunes on first sight of a key, unless `tune` is False or a
        CUDA graph is being captured (then the untuned default).  Called on every op call: a hit costs one dict
        lookup."""
        full = dense_shape(dense_weight) if allow_dense else None
        fast_key = (fmt.LAYOUT, fmt.n, fmt.k, fmt.op_param, fmt.nnz, fmt.dtype, fmt.device, m_bucket(m), allow_dense,
                    full)
        choice = self._fast.get(fast_key)
        if choice is not None:
            self.hits += 1
            return choice
        key = _key(fmt, m, allow_dense, full)
        with self._lock:
            path = self.cache_file(cache_dir, fmt.device)
            self._load(path)
            if key in self._choices:
                self.hits += 1
                self._fast[fast_key] = self._choices[key]
                return self._choices[key]
            capturing = fmt.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            if not tune or capturing:
                return untuned_choice(m, allow_dense, fmt)
            choice = self._measure(fmt, m, dense_weight if allow_dense else None)
            self._choices[key] = self._fast[fast_key] = choice
            self.tunings += 1
            self._save(path)
            log.info("flashllm autotune %s -> %s", key, choice)
            return choice

    def _measure(self, fmt: CompressedWeight, m: int, dense_weight: torch.Tensor | list[torch.Tensor] | None) -> Choice:
        m = m_bucket(m)
        x = torch.randn(m, fmt.k, device=fmt.device, dtype=fmt.dtype)
        # on its own K: a sliced op's dense fallback runs the full weight on the full x
        x_dense = torch.randn(m, dense_shape(dense_weight)[1], device=x.device, dtype=x.dtype) \
            if dense_weight is not None else None

        def dense_call() -> torch.Tensor:
            return dense_linear(x_dense, dense_weight)

        def sparse_call(config: TileConfig) -> functools.partial:
            return functools.partial(LAUNCHERS[config.family], x, fmt, None, config)

        def time_of(config: TileConfig | None) -> float | None:
            """One measurement of a sparse config, or of dense (None); None where it cannot run (e.g. a config needing
            more shared memory than this GPU has)."""
            try:
                return bench_us(dense_call if config is None else sparse_call(config))
            except Exception as e:  # noqa: BLE001 -- reported; the candidate is dropped, or keeps what it measured
                log.debug("flashllm autotune: %s failed: %s", config.short() if config else "dense", e)
                return None

        candidates = candidate_configs(m, fmt)
        # every candidate's kernels compiled at once first, not one by one as each is first timed
        precompile([sparse_call(config) for config in candidates])
        timings: list[tuple[float, str, TileConfig | None]] = []
        if dense_weight is not None:  # dense not running is an error, not a dropped candidate
            timings.append((bench_us(dense_call), "dense", None))
        for config in candidates:
            t = time_of(config)
            if t is not None:
                timings.append((t, config.family, config))
        if not timings:
            raise RuntimeError(f"flashllm: no kernel config could run for {fmt.n}x{fmt.k}, M={m}")

        def confirmed(first: float, config: TileConfig | None) -> float:
            """The median of `first` and CONFIRM_REPEATS more measurements (those that run: it ran once)."""
            times = [first]
            for _ in range(CONFIRM_REPEATS):
                t = time_of(config)
                if t is None:
                    break
                times.append(t)
            return statistics.median(times)

        # the finalists (the CONFIRM_TOP fastest sparse candidates, and dense) by the median of 1 + CONFIRM_REPEATS
        sparse = sorted((t for t in timings if t[2] is not None), key=lambda t: t[0])
        finalists = sparse[:CONFIRM_TOP] + [t for t in timings if t[2] is None]
        timings = [(confirmed(t, config), family, config) for t, family, config in finalists]
        dense_us = next((t for t, _, config in timings if config is None), float("nan"))
        best = min(timings, key=lambda t: t[0])
        if best[1] != "dense" and best[0] * SPARSE_MIN_GAIN > dense_us:  # a near-tie: keep the dense op
            best = (dense_us, "dense", None)
        return Choice(best[1], best[2], best[0], dense_us)

    def choices_for(self, n: int, k: int, chunk_k: int, dtype: torch.dtype | str,
                    density: float | None = None, layout: str = "bitmap") -> dict[int, Choice]:
        """Read-only: {M bucket: Choice} known in memory for an [n, k] weight (all densities unless `density`
        is given, then the one of its DENSITY_STEP bin) in `layout` ("bitmap" with `chunk_k`, or "csl", whose
        density is that of its stored words).  For reports (`flashllm_compile.explain`)."""
        dtype = str(dtype).removeprefix("torch.")
        prefix = f"csl:{dtype}:{n}x{k}:" if layout == "csl" else f"{dtype}:{n}x{k}:ck{chunk_k}:"
        want_d = None if density is None else round(round(density / DENSITY_STEP) * DENSITY_STEP, 2)
        out: dict[int, Choice] = {}
        with self._lock:
            for key, choice in sorted(self._choices.items()):
                if not key.startswith(prefix):
                    continue
                fields = key[len(prefix):].split(":")
                d_part, m_part = fields[1:3] if layout == "csl" else fields[:2]
                if want_d is None or float(d_part[1:]) == want_d:
                    out[int(m_part[1:])] = choice
        return dict(sorted(out.items()))

    def clear(self, cache_dir: str | None = None) -> None:
        """Forget all choices in memory, and delete the cache files under `cache_dir` if given."""
        with self._lock:
            self._choices.clear()
            self._fast.clear()
            self._loaded_files.clear()
            if cache_dir is not None:
                for path in Path(cache_dir).glob("autotune-*.json"):
                    path.unlink(missing_ok=True)


GRAPH_CALLS = 8  # calls per captured CUDA graph when timing one candidate (more: less flush noise per call)
GRAPH_REPLAYS = 9  # replays of it; the median is taken
# > the H100's 50 MB L2: READ before each call so the weights come from HBM.  Writing it instead (zero_) left L2
# full of dirty lines whose write-back the timed call paid: cuBLAS measured 15-18% slower than over rotated weight
# copies, the sparse kernels (fewer bytes, fewer evictions) 0-10%, so the tuner picked sparse kernels that lose
# inside a model (H100, LLaMA-7B shapes; reading: within 3% of rotation for both; benchmarks/RESULTS.md).
FLUSH_BYTES = 128 << 20


def replay_us(graph: torch.cuda.CUDAGraph, replays: int = GRAPH_REPLAYS) -> float:
    """Median wall time of one replay of a captured CUDA graph, in microseconds (CUDA events)."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_us(fn) -> float:
    """Time of one call of `fn` in us, as a decode step under mode="reduce-overhead" sees it: CUDA-graph replays
    (no launch gaps; our op's extra launches, e.g. the split-K reduction, cost what they cost there) with L2
    flushed before every call (weights from HBM).  Like an op in a decode step, each call follows another kernel
    (the flush), not a call of itself: timed back to back instead, a kernel launched with programmatic dependent
    launch overlaps its own previous call, which ranks tile configs differently.  H100, LLaMA-7B shapes at 70-90%,
    M = 1 / 8, every cmma config: the picks of this timing (with the re-timed finalists) ran within 1.005x (at most
    1.06x) of the best config when each call followed a small kernel writing its x, against 1.08x (at most 1.33x)
    when calls ran back to back (benchmarks/RESULTS.md, sixteenth session).  do_bench instead charged eager launch
    gaps and picked sparse kernels that lose inside graphs (H100: an 8-layer LLaMA at 0.77x of inductor).  Falls
    back to do_bench when a graph cannot be captured."""
    # Allocated per call, not cached: tuning may run inside Inductor's CUDA-graph warm-up, whose memory pool must
    # hold no tensor that outlives the step.
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    try:
        fn()  # compile, allocate outside the capture
        graphs = {}
        for name, body in (("call", fn), ("flush", lambda: None)):
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name]):
                for _ in range(GRAPH_CALLS):
                    flush.amax()
                    body()
        return max(0.0, replay_us(graphs["call"]) - replay_us(graphs["flush"])) / GRAPH_CALLS
    except RuntimeError as e:  # e.g. a capture-unsafe call: measure eagerly instead
        log.debug("flashllm autotune: CUDA-graph timing failed (%s), using do_bench", e)
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, return_mode="median") * 1e3


AUTOTUNER = Autotuner()
