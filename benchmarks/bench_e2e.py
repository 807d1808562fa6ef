"""End-to-end decode benchmark: eager vs backend="inductor" vs backend="flashllm" on a pruned 7B-sized LLM.

    python benchmarks/bench_e2e.py --arch llama --layers 8 --sparsity 0.8 --batch 1 8
    python benchmarks/bench_e2e.py --arch opt                      # full OPT-6.7B dims, every default point
    python benchmarks/bench_e2e.py --layers 8 --sparsity 0.8 --batch 1 16 --structured 0.2   # + MLP channels

The model is built ONCE from a config with random weights (never downloaded; fp16, CUDA, eval):
  --arch llama  LLaMA-2-7B dims: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000
  --arch opt    OPT-6.7B dims:   hidden 4096, ffn 16384, 32 layers, 32 heads, vocab 50272
and magnitude-pruned (every linear but lm_head) to each --sparsity in increasing order.  --structured FRACTION
then also zeroes that fraction of every MLP's intermediate channels (gate/up rows and down columns; OPT: fc1 rows
and bias entries, fc2 columns; the smallest-norm channels, benchmarks/structured_prune.py), as structured pruning
(SliceGPT) would leave them, so that the structured-zero slicing passes have rows and columns to drop; the model
is then rebuilt for every sparsity (see `run`).  For each batch size
a random prompt of --prompt-len tokens is decoded greedily for exactly --new-tokens tokens with
`model.generate(..., cache_implementation="static")` under three configurations:

  eager     the plain model: one warm-up generate, TIMED_RUNS timed generates (median)
  inductor  generate(..., compile_config=CompileConfig(backend="inductor", mode="reduce-overhead"))
  flashllm  generate(..., compile_config=CompileConfig(backend="flashllm", mode="reduce-overhead"))
            (transformers compiles the decode step, CUDA graphs included; the prefill runs eager)

--flashllm-options '{"fuse_epilogues": false}' passes backend options (flashllm_compile.options.FlashLLMOptions
fields, JSON) to the flashllm configuration, e.g. to measure one pass on and off; they are recorded in the
flashllm_options column.  (torch.compile refuses mode= together with options=, so the mode then travels as the
backend's own "mode" option.)

For the compiled configurations the first generate is timed as compile_s (tracing, Inductor, CUDA-graph
recording and flashllm autotuning), a second one warms up, then TIMED_RUNS more are timed (median).
Dynamo is reset between configurations, so every point compiles afresh; by default Inductor's on-disk caches
and the flashllm autotune cache stay on, so later points may compile faster (--cold-compile turns them off).

Output (--out, default $OUT or benchmarks/out): bench_e2e.csv (one row per sparsity x batch x config),
bench_e2e.png (tokens/s against batch, one panel per sparsity) and a table printed last.  Columns:
  tokens_per_s          batch * new_tokens / seconds of the timed generate (prefill included)
  speedup_vs_inductor   tokens_per_s / the inductor row's tokens_per_s at the same point
  weight_mem_gb         parameter bytes; flashllm adds the compressed bytes of its rewritten linears (it keeps
                        the dense weights for its dense fallback by default)
  weight_mem_if_released_gb  flashllm only: parameters - rewritten dense weights + compressed weights, what
                        options={"release_dense_weights": True} with flashllm_compile.sparsify_ would hold
  peak_mem_gb           torch.cuda.max_memory_allocated() during the timed generate (weights, KV cache,
                        activations, CUDA-graph pools)
  token_match           fraction of generated tokens equal to the inductor row's (same prompt); eager and
                        flashllm rows (greedy decoding of random weights: fp16 rounding can flip near-ties)
  kernel_hits           flashllm only: flashllm_compile.ops.KERNEL_HITS increments (dense/mma/rowwalk/...)
                        over all three generates, then over the timed one; under CUDA graphs the timed run
                        replays graphs and runs no Python, so its count is normally empty
  error                 the exception of a configuration that failed (the benchmark goes on)
  flashllm_options      the --flashllm-options JSON of the run ("" for the defaults)
  structured            the --structured fraction of MLP channels zeroed after the magnitude pruning
  zero_fraction         exact zeros / elements of all pruned linears as benchmarked: `sparsity` plus what the
                        zeroed channels add (at --structured 0 equal to `sparsity` up to rounding)

Needs a CUDA GPU, transformers and matplotlib.  A full default run (4 sparsities x 3 batches x 2 compiled
configurations of a 32-layer model) takes a long time: use --layers and fewer points for a quick look.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

# hidden, intermediate (ffn), layers, heads, vocab, max positions
ARCHS = {
    "llama": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "vocab": 32000, "max_pos": 4096},
    "opt": {"hidden": 4096, "intermediate": 16384, "layers": 32, "heads": 32, "vocab": 50272, "max_pos": 2048},
}
CONFIGS = ("eager", "inductor", "flashllm")
TIMED_RUNS = 3  # timed generates per configuration; tokens/s uses their median (one run varied by ~10%)
COLUMNS = ["gpu", "torch", "triton", "arch", "layers", "sparsity", "batch", "config", "tokens_per_s",
           "speedup_vs_inductor", "compile_s", "weight_mem_gb", "weight_mem_if_released_gb", "peak_mem_gb",
           "token_match", "kernel_hits", "error", "flashllm_options", "structured", "zero_fraction"]
GB = 1e9


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------


def _benchmarks_on_path() -> None:
    """Sibling modules (timing, structured_prune) import by name: benchmarks/ is a folder of scripts."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


def gpu_info() -> dict[str, str]:
    """gpu, torch and triton versions, from benchmarks/timing.py."""
    _benchmarks_on_path()
    from timing import gpu_info as info

    return info()


def prune(model, sparsity: float, structured: float = 0.0) -> float:
    """Magnitude-prune every linear but lm_head to `sparsity`, then zero the `structured` fraction of every MLP's
    channels (benchmarks/structured_prune.py); returns the exact-zero fraction of the pruned linears."""
    from flashllm_compile.prune import magnitude_prune_

    _benchmarks_on_path()
    from structured_prune import zero_fraction, zero_mlp_channels_

    magnitude_prune_(model, sparsity, progress=False)
    if structured:
        zero_mlp_channels_(model, structured)
    return zero_fraction(model)


def build_model(arch: str, dims: dict, dtype: torch.dtype, device: str):
    """A causal LM with `dims` and random weights, created directly on `device` in `dtype`, in eval mode."""
    import transformers

    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=dims["hidden"], intermediate_size=dims["intermediate"], num_hidden_layers=dims["layers"],
            num_attention_heads=dims["heads"], num_key_value_heads=dims["heads"], vocab_size=dims["vocab"],
            max_position_embeddings=dims["max_pos"])
    elif arch == "opt":
        config = transformers.OPTConfig(
            hidden_size=dims["hidden"], ffn_dim=dims["intermediate"], num_hidden_layers=dims["layers"],
            num_attention_heads=dims["heads"], vocab_size=dims["vocab"], max_position_embeddings=dims["max_pos"],
            word_embed_proj_dim=dims["hidden"], do_layer_norm_before=True)
    else:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 7B model on the CPU in fp32 would take minutes
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() skips tied duplicates


def ensure_flashllm_backend() -> None:
    """`backend="flashllm"` comes from the package's entry point; register it by hand when running from a
    source checkout that was never pip-installed (PYTHONPATH=.)."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("flashllm")
    except Exception:  # noqa: BLE001 -- torch raises InvalidBackend (its module moved between releases)
        from flashllm_compile.backend import flashllm_backend

        register_backend(flashllm_backend, name="flashllm")


# ----------------------------------------------------------------------------------------------------------------
# one configuration at one point
# ----------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --reuse-cache: one StaticCache per (model, batch, length), reset before each generate; dropped with the compiled
# state (reset_compiled_state), so every configuration records its CUDA graphs on its own cache.
REUSE_CACHE = False
_CACHES: dict[tuple, object] = {}


def _static_cache(model, ids: torch.Tensor, new_tokens: int):
    """The reused cache of this shape, reset (zeroed in place: its tensors keep their addresses)."""
    from transformers import StaticCache

    key = (id(model), ids.shape[0], ids.shape[1] + new_tokens)
    if key not in _CACHES:
        _CACHES[key] = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
    cache = _CACHES[key]
    cache.reset()
    return cache


def generate(model, ids: torch.Tensor, new_tokens: int, compile_config=None) -> torch.Tensor:
    """Greedy decoding of exactly `new_tokens` tokens (min_new_tokens = max_new_tokens: no early EOS stop).

    With a transformers `CompileConfig`, generate() compiles the decode step itself (the prefill runs eager)
    and owns the CUDA-graph bookkeeping of the static cache; without one it runs eager (`disable_compile`:
    transformers would otherwise compile with Inductor whenever the cache is static on a GPU).
    generate() allocates a new static cache per call by default, so the compiled step's CUDA graphs are recorded
    again on every call (the cache tensors are static inputs whose addresses changed); with REUSE_CACHE one
    cache is reset and passed instead, and the graphs are replayed from the first token."""
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.eos_token_id
    cache = {"past_key_values": _static_cache(model, ids, new_tokens)} if REUSE_CACHE else {
        "cache_implementation": "static"}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                          disable_compile=compile_config is None, compile_config=compile_config, **cache)


def timed_generate(model, ids: torch.Tensor, new_tokens: int, compile_config=None) -> tuple[torch.Tensor, float]:
    _sync(ids.device)
    start = time.perf_counter()
    out = generate(model, ids, new_tokens, compile_config)
    _sync(ids.device)
    return out, time.perf_counter() - start


def _format_hits(counter: collections.Counter) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counter.items()) if v > 0) or "-"


def reset_compiled_state(device: torch.device) -> None:
    """Forget every compiled graph and what it holds (CUDA-graph pools, compressed weights)."""
    from flashllm_compile.codegen.formats.cache import clear_compression_cache

    torch._dynamo.reset()
    _CACHES.clear()
    if device.type == "cuda":
        with contextlib.suppress(Exception):  # part of torch._dynamo.reset() in newer releases
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
    clear_compression_cache()  # keyed by weight identity: would keep the last sparsity's compression alive
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_config(model, orig_forward, config: str, ids: torch.Tensor, new_tokens: int, mode: str | None,
                 cold_cache_dir: str | None = None, flashllm_options: dict | None = None) -> dict:
    """Time one configuration ("eager", "inductor" or "flashllm") at one (sparsity, batch) point.

    Returns a dict with tokens_per_s, compile_s, weight_mem_gb, weight_mem_if_released_gb, peak_mem_gb,
    kernel_hits, error and the generated tokens under "_tokens" (None where the configuration failed).
    `cold_cache_dir`: the flashllm autotune cache folder (FLASHLLM_CACHE_DIR), emptied before the compile.
    `flashllm_options`: backend options of the flashllm configuration (FlashLLMOptions fields)."""
    from flashllm_compile import ops
    from flashllm_compile.report import record_decisions

    device = ids.device
    batch = ids.shape[0]
    dense = param_bytes(model)
    row = {"config": config, "tokens_per_s": None, "compile_s": None, "weight_mem_gb": dense / GB,
           "weight_mem_if_released_gb": None, "peak_mem_gb": None, "kernel_hits": "", "error": "", "_tokens": None}
    decisions: list = []
    hits_start = collections.Counter(ops.KERNEL_HITS)
    hits_timed = collections.Counter()
    try:
        if config != "eager":
            if cold_cache_dir is not None and config == "flashllm":
                from flashllm_compile.codegen.autotune import AUTOTUNER

                AUTOTUNER.clear(cold_cache_dir)  # forget (in memory and on disk) every earlier tuning
            from transformers import CompileConfig

            compile_config = CompileConfig(backend=config, mode=mode, fullgraph=False)
            if config == "flashllm" and flashllm_options:  # torch.compile refuses mode= with options=
                compile_config = CompileConfig(backend=config, mode=None, fullgraph=False,
                                               options={**flashllm_options, "mode": mode})
            with record_decisions() as decisions:  # filled by the flashllm compiles during the first generate
                _, row["compile_s"] = timed_generate(model, ids, new_tokens, compile_config)
        else:
            compile_config = None
        generate(model, ids, new_tokens, compile_config)  # warm-up (compiled: CUDA graphs recorded, caches hot)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        hits_before = collections.Counter(ops.KERNEL_HITS)
        runs = [timed_generate(model, ids, new_tokens, compile_config) for _ in range(TIMED_RUNS)]
        tokens, seconds = runs[0][0], statistics.median(t for _, t in runs)
        hits_timed = collections.Counter(ops.KERNEL_HITS) - hits_before
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / GB
        row["tokens_per_s"] = batch * new_tokens / seconds
        row["_tokens"] = tokens[:, ids.shape[1]:].cpu()
    except Exception as e:  # noqa: BLE001 -- e.g. static cache + CUDA graphs unsupported, OOM: record, go on
        traceback.print_exc()
        message = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {message[0] if message else ''}"[:300]
    finally:
        model.forward = orig_forward
        for attr in ("_compiled_call", "_last_compile_config"):  # transformers' cached compiled decode step
            if hasattr(model, attr):
                delattr(model, attr)
        reset_compiled_state(device)
    if config == "flashllm":
        # The compression is cached per weight, so the graphs of one compile (prefill, decode) share it:
        # count each rewritten linear once.
        rewritten = {d.name: d for d in decisions if d.rewritten}
        compressed = sum(d.compressed_bytes for d in rewritten.values())
        row["weight_mem_gb"] = (dense + compressed) / GB
        row["weight_mem_if_released_gb"] = (dense - sum(d.dense_bytes for d in rewritten.values()) + compressed) / GB
        hits_all = collections.Counter(ops.KERNEL_HITS) - hits_start
        row["kernel_hits"] = f"all: {_format_hits(hits_all)}; timed: {_format_hits(hits_timed)}"
        if not rewritten and not row["error"]:
            row["kernel_hits"] += f"; no linear rewritten ({len(decisions)} seen)"
    return row


def variant_label(variant: dict) -> str:
    """'flashllm' + the variant's options, e.g. flashllm{fuse_epilogues=0}."""
    return "flashllm{" + ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in variant.items()) + "}"


def bench_point(model, orig_forward, ids: torch.Tensor, new_tokens: int, mode: str | None,
                cold_cache_dir: str | None = None, flashllm_options: dict | None = None,
                variants: list[dict] = ()) -> list[dict]:
    """All configurations at one (sparsity, batch) point, with speedup and token match vs inductor; each of
    `variants` (options on top of flashllm_options) adds one more flashllm row, e.g. a pass turned off."""
    results = {c: bench_config(model, orig_forward, c, ids, new_tokens, mode, cold_cache_dir, flashllm_options)
               for c in CONFIGS}
    for variant in variants:
        row = bench_config(model, orig_forward, "flashllm", ids, new_tokens, mode, cold_cache_dir,
                           {**(flashllm_options or {}), **variant})
        results[variant_label(variant)] = {**row, "config": variant_label(variant)}
    ref = results["inductor"]
    for config, row in results.items():
        row["speedup_vs_inductor"] = None
        row["token_match"] = None
        if row["tokens_per_s"] is not None and ref["tokens_per_s"] is not None:
            row["speedup_vs_inductor"] = row["tokens_per_s"] / ref["tokens_per_s"]
        if config != "inductor" and row["_tokens"] is not None and ref["_tokens"] is not None:
            row["token_match"] = (row["_tokens"] == ref["_tokens"]).float().mean().item()
    return list(results.values())


def run(arch: str, dims: dict, sparsities, batches, prompt_len: int, new_tokens: int, device: str = "cuda",
        dtype: torch.dtype = torch.float16, mode: str | None = "reduce-overhead", cold_cache_dir: str | None = None,
        on_point=None, flashllm_options: dict | None = None, variants: list[dict] = (),
        structured: float = 0.0) -> list[dict]:
    """The whole benchmark; returns the CSV rows.  `on_point(rows)` is called after every point."""
    ensure_flashllm_backend()
    device = torch.device(device)
    info = gpu_info()
    t0 = time.perf_counter()
    model = build_model(arch, dims, dtype, str(device))
    orig_forward = model.forward
    print(f"{arch}: {dims['layers']} layers, {param_bytes(model) / GB:.2f} GB of {dtype} parameters, built in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    rows: list[dict] = []
    # Pruned progressively, in increasing sparsity, instead of from a copy of the original weights (a copy of
    # 13.5 GB, or a rebuild, per sparsity).  Same result: magnitude_prune_ zeroes the int(K * s) smallest |w| of
    # each row, and the zeros left by a lower sparsity are the smallest magnitudes, so pruning the pruned weight
    # to a higher sparsity zeroes exactly the int(K * s) smallest entries of the original row (up to ties).
    # Not with --structured: a down_proj row [I] would then count the zeroed channel columns among its
    # int(I * s) smallest, i.e. keep original values the prune-then-zero order drops.  The model is rebuilt
    # instead (same seed: the same original weights), in place of the previous one (one model in memory).
    for i, sparsity in enumerate(sorted(sparsities)):
        if structured and i:
            model = orig_forward = None
            reset_compiled_state(device)
            model = build_model(arch, dims, dtype, str(device))
            orig_forward = model.forward
        zeros = prune(model, sparsity, structured)
        print(f"sparsity {sparsity}, structured {structured}: {zeros:.2%} of the pruned weights are zeros", flush=True)
        for batch in batches:
            generator = torch.Generator().manual_seed(1000 + batch)  # the same prompt for every config/sparsity
            ids = torch.randint(0, dims["vocab"], (batch, prompt_len), generator=generator).to(device)
            for row in bench_point(model, orig_forward, ids, new_tokens, mode, cold_cache_dir, flashllm_options,
                                   variants):
                row.pop("_tokens")
                rows.append({**info, "arch": arch, "layers": dims["layers"], "sparsity": sparsity, "batch": batch,
                             **row, "flashllm_options": json.dumps(flashllm_options) if flashllm_options else "",
                             "structured": structured, "zero_fraction": zeros})
                print(f"  s={sparsity} batch={batch} {row['config']}: {_fmt(row['tokens_per_s'], 1)} tok/s, "
                      f"compile {_fmt(row['compile_s'], 1)} s {row['kernel_hits']} {row['error']}", flush=True)
            if on_point is not None:
                on_point(rows)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_csv(rows: list[dict], path: str, columns=None) -> None:
    columns = columns or COLUMNS

    def cell(v):
        return "" if v is None else round(v, 5) if isinstance(v, float) else v

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: cell(r.get(k)) for k in columns} for r in rows)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsities = sorted({r["sparsity"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4.5 * len(sparsities), 4), squeeze=False,
                             sharey=True)
    for ax, sparsity in zip(axes[0], sparsities, strict=True):
        for config in CONFIGS:
            points = sorted((r["batch"], r["tokens_per_s"]) for r in rows
                            if r["sparsity"] == sparsity and r["config"] == config and r["tokens_per_s"])
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=config)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(f"sparsity {sparsity:.0%}")
        ax.set_xlabel("batch")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("decode tokens/s")
    axes[0][0].legend()
    r = rows[0]
    fig.suptitle(f"{r['arch']} ({r['layers']} layers), {r['gpu']}, torch {r['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict], prompt_len: int, new_tokens: int) -> None:
    r = rows[0]
    print(f"\n{r['gpu']}, torch {r['torch']}, triton {r['triton']}; {r['arch']} with {r['layers']} layers; "
          f"prompt {prompt_len}, {new_tokens} new tokens; memory in GB; match = tokens equal to inductor's")
    if r["structured"]:
        print(f"plus {r['structured']:.1%} of MLP channels zeroed; exact zeros of the pruned linears: "
              + ", ".join(sorted({f"{x['sparsity']} -> {x['zero_fraction']:.1%}" for x in rows})))
    print(f"{'sp':>4} {'batch':>5} {'config':<8} {'tok/s':>9} {'x ind':>6} {'comp s':>7} {'weights':>7} "
          f"{'if rel':>6} {'peak':>6} {'match':>5}  kernels / error")
    for r in rows:
        print(f"{r['sparsity']:>4} {r['batch']:>5} {r['config']:<8} {_fmt(r['tokens_per_s'], 1):>9} "
              f"{_fmt(r['speedup_vs_inductor']):>6} {_fmt(r['compile_s'], 1):>7} {_fmt(r['weight_mem_gb']):>7} "
              f"{_fmt(r['weight_mem_if_released_gb']):>6} {_fmt(r['peak_mem_gb']):>6} {_fmt(r['token_match']):>5}"
              f"  {r['error'] or r['kernel_hits']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama",
                        help="llama: LLaMA-2-7B dims; opt: OPT-6.7B dims (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (default: 32, the full "
                        "model); fewer layers for a quick run")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9],
                        help="fractions of each linear weight zeroed (run in increasing order; default: %(default)s)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128,
                        help="tokens generated per sequence, exactly (default: %(default)s)")
    parser.add_argument("--cold-compile", action="store_true",
                        help="compile_s without warm caches: Inductor's FX-graph and AOTAutograd caches off, the "
                        "flashllm autotune cache in a fresh temporary folder, cleared before every compile")
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for both compiled configs "
                        "('default' turns CUDA graphs off; default: %(default)s)")
    parser.add_argument("--flashllm-options", type=json.loads, default=None, metavar="JSON",
                        help="backend options of the flashllm configuration, e.g. '{\"fuse_epilogues\": false}' "
                        "(FlashLLMOptions fields; default: none, the backend's defaults)")
    parser.add_argument("--variants", type=json.loads, nargs="*", default=[], metavar="JSON",
                        help="extra flashllm rows, one per JSON object of options, e.g. '{\"fuse_epilogues\": false}'"
                             " '{\"deterministic\": true}': each pass / mode measured against the default")
    parser.add_argument("--structured", type=float, default=0.0, metavar="FRACTION",
                        help="after the magnitude pruning, also zero this fraction of every MLP's intermediate "
                             "channels (whole gate/up rows and down columns; default: %(default)s, none)")
    parser.add_argument("--reuse-cache", action="store_true",
                        help="pass one StaticCache per configuration to every generate (reset in place) instead of "
                        "generate() allocating one per call: CUDA graphs are then recorded once, not per generate")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"),
                        help="output folder (default: $OUT, else benchmarks/out; now %(default)s)")
    args = parser.parse_args()

    from flashllm_compile.options import FlashLLMOptions

    given = [("--flashllm-options", args.flashllm_options)] if args.flashllm_options is not None else []
    for flag, options in given + [("--variants", v) for v in args.variants]:
        if not isinstance(options, dict):
            parser.error(f"{flag} must be a JSON object, e.g. '{{\"fuse_epilogues\": false}}'")
        try:  # unknown or invalid options fail now, not after building and pruning a 7B model
            FlashLLMOptions.from_any({**(args.flashllm_options or {}), **options})
        except (TypeError, ValueError) as e:
            parser.error(f"{flag}: {e}")

    if not torch.cuda.is_available():
        print("bench_e2e.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.", file=sys.stderr)
        sys.exit(2)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    if any(not 0 <= s < 1 for s in args.sparsity):
        parser.error("--sparsity values must satisfy 0 <= s < 1")
    if not 0 <= args.structured < 1:
        parser.error("--structured must satisfy 0 <= FRACTION < 1")
    global REUSE_CACHE
    REUSE_CACHE = args.reuse_cache
    cold_cache_dir = None
    if args.cold_compile:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
        cold_cache_dir = os.environ["FLASHLLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="flashllm_autotune_")

    dims = dict(ARCHS[args.arch])
    if args.layers is not None:
        dims["layers"] = args.layers
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "bench_e2e.csv"), os.path.join(args.out, "bench_e2e.png")
    rows = run(args.arch, dims, args.sparsity, args.batch, args.prompt_len, args.new_tokens,
               mode=None if args.mode == "default" else args.mode, cold_cache_dir=cold_cache_dir,
               on_point=lambda rows: write_csv(rows, csv_path),  # rewritten after every point: partial runs count
               flashllm_options=args.flashllm_options, variants=args.variants, structured=args.structured)
    write_csv(rows, csv_path)
    try:
        plot(rows, png_path)
    except Exception as e:  # noqa: BLE001 -- a missing matplotlib must not lose the table
        print(f"no plot: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"\nwrote {csv_path} and {png_path}")
    print_table(rows, args.prompt_len, args.new_tokens)


if __name__ == "__main__":
    main()
