"""Per-layer cost of each flashllm graph pass: one LLaMA-2-7B decoder layer, one decode step, each pass toggled.

    python benchmarks/bench_passes.py                          # 80%, M = 1 and 16, every variant
    python benchmarks/bench_passes.py --structured 0.2         # + 20% of the MLP channels zeroed (slicing works)
    python benchmarks/bench_passes.py --structured 0.2 --keep-down-columns   # down_proj sliced by propagation only
    python benchmarks/bench_passes.py --device cpu             # smoke test only: tiny layer, no timing

The layer is transformers' LlamaDecoderLayer with LLaMA-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads,
head_dim 128; random weights, fp16, CUDA, eval), magnitude-pruned (flashllm_compile.prune.magnitude_prune_) to
--sparsity; --structured FRACTION then zeroes that fraction of the MLP's channels (gate/up rows, down columns;
benchmarks/structured_prune.py), else the structured-zero passes find nothing to slice.

One decode step of M sequences: hidden states [M, 1, 4096], rotary (cos, sin) [M, 1, 128] at position POSITION,
attention_mask None and no KV cache, so attention runs over the step's own token only.  The seven linears (what
the passes change) are the step's cost; a real step's attention over its cache would add the same time to every
variant.  Variants, each compiled afresh per M (torch._dynamo.reset(), static shapes):

    inductor           backend="inductor", dense: the baseline of speedup_vs_inductor and the reference output
    all                backend="flashllm" with every pass on (the defaults)
    no_fuse_siblings   fuse_siblings off: q/k/v and gate/up stay separate sparse_linear ops
    no_fuse_epilogues  fuse_epilogues off: SwiGLU silu(gate) * up and the residual adds stay Inductor kernels
    no_slice           slice_structured_zeros off (its propagation to down_proj too)
    no_passes          all three off: one sparse_linear per linear, nothing fused, folded or sliced

Compiling keeps the weights as they are (checked after every variant against a copy; a variant that changed
them is marked in `error` and the weights are restored), so one layer serves every variant.

Timing (CUDA only): the compiled call CALLS_PER_GRAPH times in one CUDA graph (benchmarks/timing.graph_time_us),
median of REPLAYS replays, divided by the calls.  A graph of several calls, as a decode step's graph of 32
layers, keeps the replay's launch cost out of the per-layer time; the layer's ~405 MB of fp16 weights (~115 MB
compressed at 80%) overflow the H100's 50 MB L2, so every call reads its weights from HBM.  flashllm's autotuning
runs in the first call (compile_s), outside the graph.

Output (--out, default $OUT or benchmarks/out): bench_passes.csv, one row per M x variant, and a table printed
last.  Columns:
  sparsity, structured  the unstructured fraction, and the MLP channel fraction zeroed after it
  down_zeroed           1: down_proj's channel columns were zeroed too; 0: --keep-down-columns, or no --structured
  zero_fraction         exact zeros / elements of the layer's seven linears as compiled
  us_per_layer          median microseconds of one call of the compiled layer (empty on CPU: never a result)
  speedup_vs_inductor   inductor's us_per_layer / this row's, same M
  max_rel_err           max |out - inductor out| / max |inductor out| (fp32); the inductor row: against eager,
                        the fp16 noise level
  compile_s             wall time of the first call: tracing, passes, compression, Inductor, autotuning
  counters              torch._dynamo.utils.counters["flashllm"] of the compile: rewritten, fused_siblings,
                        fused_epilogues, epilogue_*, sliced_rows / sliced_cols, propagated_cols, ...
  kernel_hits           flashllm_compile.ops.KERNEL_HITS of one steady-state call (which kernels ran)
  ops                   the sparse_linear ops of the compile: name [N x K] of the op (sliced / fused) + epilogue
  error                 an exception, changed weights, or an output off by more than MAX_REL_ERR

--device cpu is a smoke test of this script (tests/test_bench_helpers.py): a tiny layer (hidden 64, intermediate
128, 2 heads, fp32), kernel="emulated", no CUDA graphs and no timing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling scripts: bench_e2e, structured_prune, timing

import bench_e2e
from structured_prune import zero_fraction, zero_mlp_channels_

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "heads": 32}
TINY = {"hidden": 64, "intermediate": 128, "heads": 2}  # --device cpu only
POSITION = 255  # rotary position of the decoded token (a step after a 256-token context)
CALLS_PER_GRAPH = 8
REPLAYS = 50
MAX_REL_ERR = 1e-2  # fp16 kernels vs cuBLAS differ by ~1e-3 of the output's range; more is a wrong result
ALL_OFF = {"fuse_siblings": False, "fuse_epilogues": False, "slice_structured_zeros": False}
VARIANTS = {  # name: flashllm options on top of the base options; None: backend="inductor"
    "inductor": None,
    "all": {},
    "no_fuse_siblings": {"fuse_siblings": False},
    "no_fuse_epilogues": {"fuse_epilogues": False},
    "no_slice": {"slice_structured_zeros": False},
    "no_passes": ALL_OFF,
}
# counters["flashllm"] keys shown in the table (all of them go to the CSV), with their column titles
PASS_COUNTERS = {"rewritten": "rw", "fused_siblings": "sib", "fused_epilogues": "epi", "sliced_rows": "rows",
                 "sliced_cols": "cols", "propagated_cols": "prop"}
COLUMNS = ["gpu", "torch", "triton", "device", "hidden", "intermediate", "sparsity", "structured", "down_zeroed",
           "zero_fraction", "m", "variant", "us_per_layer", "speedup_vs_inductor", "max_rel_err", "compile_s",
           "counters", "kernel_hits", "ops", "error"]


# ----------------------------------------------------------------------------------------------------------------
# the layer and its input
# ----------------------------------------------------------------------------------------------------------------


def llama_config(dims: dict):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=dims["hidden"], intermediate_size=dims["intermediate"], num_hidden_layers=1,
        num_attention_heads=dims["heads"], num_key_value_heads=dims["heads"], max_position_embeddings=4096,
        attn_implementation="sdpa")


def build_layer(config, dtype: torch.dtype, device: str, sparsity: float, structured: float,
                zero_down: bool = True) -> torch.nn.Module:
    """A pruned LlamaDecoderLayer (layer 0) with random weights, in eval mode and without grad."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from flashllm_compile.prune import magnitude_prune_

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: ~0.8 GB of fp32 on the CPU would be slow
        layer = LlamaDecoderLayer(config, layer_idx=0).to(dtype).eval().requires_grad_(False)
    magnitude_prune_(layer, sparsity, progress=False)  # first the unstructured zeros ...
    if structured:
        zero_mlp_channels_(layer, structured, zero_output_columns=zero_down)  # ... then whole channels
    return layer


def step_inputs(config, m: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, tuple]:
    """hidden states [m, 1, hidden] and the rotary (cos, sin), each [m, 1, head_dim], of one decode step."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    generator = torch.Generator().manual_seed(m)
    x = torch.randn(m, 1, config.hidden_size, generator=generator).to(device, dtype)
    rope = LlamaRotaryEmbedding(config).to(device)
    position_ids = torch.full((m, 1), POSITION, device=device)
    return x, rope(x, position_ids)


# ----------------------------------------------------------------------------------------------------------------
# one variant
# ----------------------------------------------------------------------------------------------------------------


def _format_counts(counter) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counter.items()) if v) or "-"


def parse_counts(text: str) -> dict[str, int]:
    """The inverse of the counters / kernel_hits cells: "a=1 b=2" -> {"a": 1, "b": 2}."""
    return {k: int(v) for k, v in (item.split("=") for item in text.split() if "=" in item)}


def describe_ops(decisions) -> str:
    """'name [NxK] epilogue' of every sparse_linear op of a compile (a fused group once), '; '-joined."""
    ops = {}
    for d in decisions:
        if d.rewritten:
            n, k = d.op_shape or (d.out_features, d.in_features)
            ops[d.group or d.name] = f"{d.group or d.name} [{n}x{k}]{' ' + d.epilogue if d.epilogue else ''}"
    return "; ".join(ops.values())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in fp32 (elementwise relative errors blow up at ref ~ 0)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def changed_weights(layer: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in layer.state_dict().items() if not torch.equal(t, snapshot[name])]


def bench_variant(layer, x: torch.Tensor, pe: tuple, name: str, options: dict | None, ref: torch.Tensor,
                  snapshot: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor | None]:
    """Compile `layer` as variant `name` (options None: Inductor), check and time it; returns (row, output)."""
    from torch._dynamo.utils import counters

    from flashllm_compile import ops
    from flashllm_compile.report import record_decisions

    device = x.device
    row = {"variant": name, "us_per_layer": None, "max_rel_err": None, "compile_s": None, "counters": "",
           "kernel_hits": "", "ops": "", "error": ""}
    out = None
    bench_e2e.reset_compiled_state(device)
    counters["flashllm"].clear()
    try:
        if options is None:
            compiled = torch.compile(layer, backend="inductor", dynamic=False)
        else:
            compiled = torch.compile(layer, backend="flashllm", options=options, dynamic=False)

        def call() -> torch.Tensor:
            return compiled(x, attention_mask=None, position_embeddings=pe)

        with record_decisions() as decisions:
            bench_e2e._sync(device)
            start = time.perf_counter()
            out = call()  # compiles; flashllm also compresses and autotunes here
            bench_e2e._sync(device)
            row["compile_s"] = time.perf_counter() - start
        row["counters"] = _format_counts(counters["flashllm"])
        row["ops"] = describe_ops(decisions)
        hits = collections.Counter(ops.KERNEL_HITS)
        out = call()  # steady state: the kernels every later call runs
        row["kernel_hits"] = _format_counts(collections.Counter(ops.KERNEL_HITS) - hits)
        row["max_rel_err"] = rel_err(out, ref)
        if row["max_rel_err"] > MAX_REL_ERR:
            row["error"] = f"max_rel_err {row['max_rel_err']:.2e} > {MAX_REL_ERR}"
        if device.type == "cuda":
            from timing import graph_time_us

            row["us_per_layer"] = graph_time_us([call] * CALLS_PER_GRAPH, replays=REPLAYS)
    except Exception as e:  # noqa: BLE001 -- one failing variant must not lose the others
        traceback.print_exc()
        message = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {message[0] if message else ''}"[:300]
    finally:
        bench_e2e.reset_compiled_state(device)
    changed = changed_weights(layer, snapshot)
    if changed:  # the next variants must see the pruned weights, not what this compile left
        row["error"] = (row["error"] + "; " if row["error"] else "") + f"weights changed in place: {changed}"
        with torch.no_grad():
            for key, t in layer.state_dict().items():
                t.copy_(snapshot[key])
    return row, out


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_inductor of every row: the inductor row's us_per_layer (same M) / its own."""
    base = {r["m"]: r["us_per_layer"] for r in rows if r["variant"] == "inductor"}
    for r in rows:
        ref = base.get(r["m"])
        r["speedup_vs_inductor"] = ref / r["us_per_layer"] if ref and r["us_per_layer"] else None


# ----------------------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------------------


def run(device: str, ms: list[int], variants: list[str], sparsity: float, structured: float, zero_down: bool,
        base_options: dict, on_rows=None) -> list[dict]:
    """Every (M, variant) point; returns the CSV rows (`on_rows(rows)` after every M)."""
    bench_e2e.ensure_flashllm_backend()
    dims, dtype = (LLAMA_7B, torch.float16) if device == "cuda" else (TINY, torch.float32)
    config = llama_config(dims)
    layer = build_layer(config, dtype, device, sparsity, structured, zero_down)
    snapshot = {k: t.detach().clone() for k, t in layer.state_dict().items()}
    info = {**bench_e2e.gpu_info(), "device": device, "hidden": dims["hidden"],
            "intermediate": dims["intermediate"], "sparsity": sparsity, "structured": structured,
            "down_zeroed": int(bool(structured) and zero_down), "zero_fraction": zero_fraction(layer)}
    print(f"layer: hidden {dims['hidden']}, intermediate {dims['intermediate']}, {dtype}; sparsity {sparsity}, "
          f"structured {structured}: {info['zero_fraction']:.2%} of the linears' weights are zeros", flush=True)
    rows: list[dict] = []
    with torch.no_grad():
        for m in ms:
            x, pe = step_inputs(config, m, dtype, device)
            eager = layer(x, attention_mask=None, position_embeddings=pe)
            ref = None
            for name in ["inductor", *(v for v in variants if v != "inductor")]:  # the reference first
                options = None if VARIANTS[name] is None else {**base_options, **VARIANTS[name]}
                row, out = bench_variant(layer, x, pe, name, options, eager if ref is None else ref, snapshot)
                if name == "inductor":
                    ref = out  # None if inductor failed: the variants are then checked against eager
                rows.append({**info, "m": m, **row})
                print(f"  M={m} {name}: {_us(row['us_per_layer'])} us, err {bench_e2e._fmt(row['max_rel_err'])}, "
                      f"compile {bench_e2e._fmt(row['compile_s'], 1)} s; {row['counters']} {row['error']}", flush=True)
            add_speedups(rows)
            if on_rows is not None:
                on_rows(rows)
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    """bench_e2e's CSV writer (floats to 5 decimals), with max_rel_err in scientific notation (~1e-4 in fp16)."""
    rows = [{**r, "max_rel_err": None if r["max_rel_err"] is None else f"{r['max_rel_err']:.3e}"} for r in rows]
    bench_e2e.write_csv(rows, path, COLUMNS)


def _us(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(rows: list[dict]) -> None:
    r = rows[0]
    print(f"\n{r['gpu']}, torch {r['torch']}, triton {r['triton']}; LLaMA decoder layer hidden {r['hidden']}, "
          f"intermediate {r['intermediate']}; sparsity {r['sparsity']}, structured {r['structured']} "
          f"(down columns {'zeroed' if r['down_zeroed'] else 'kept'}): {r['zero_fraction']:.1%} zeros")
    if r["device"] != "cuda":
        print("CPU smoke test: no timings (never report CPU numbers)")
    head = " ".join(f"{t:>4}" for t in PASS_COUNTERS.values())
    print(f"{'M':>3} {'variant':<18} {'us/layer':>9} {'x ind':>6} {'rel err':>8} {'comp s':>7} {head}  error")
    for r in rows:
        counts = parse_counts(r["counters"])
        cells = " ".join(f"{counts.get(k, 0):>4}" for k in PASS_COUNTERS)
        err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        print(f"{r['m']:>3} {r['variant']:<18} {_us(r['us_per_layer']):>9} "
              f"{bench_e2e._fmt(r['speedup_vs_inductor']):>6} {err:>8} {bench_e2e._fmt(r['compile_s'], 1):>7} "
              f"{cells}  {r['error']}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16], help="decode batch sizes M (default: %(default)s)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="magnitude-pruned fraction (default: %(default)s)")
    parser.add_argument("--structured", type=float, default=0.0, metavar="FRACTION",
                        help="then zero this fraction of the MLP's channels (default: %(default)s, none)")
    parser.add_argument("--keep-down-columns", action="store_true",
                        help="with --structured: zero only the gate/up rows, so down_proj's columns are dropped "
                             "only by the propagation pass (counter propagated_cols)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to run; inductor always runs, first (default: all)")
    parser.add_argument("--flashllm-options", type=json.loads, default=None, metavar="JSON",
                        help="base options of every flashllm variant (default: {\"autotune\": true}; on CPU "
                             "{\"kernel\": \"emulated\"})")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: smoke test with a tiny layer, no timing (default: %(default)s)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"),
                        help="output folder (default: $OUT, else benchmarks/out; now %(default)s)")
    args = parser.parse_args(argv)

    from flashllm_compile.options import FlashLLMOptions

    base = {"autotune": True} if args.device == "cuda" else {"kernel": "emulated"}
    if args.flashllm_options is not None:
        if not isinstance(args.flashllm_options, dict):
            parser.error("--flashllm-options must be a JSON object")
        base.update(args.flashllm_options)
    try:
        for variant in VARIANTS.values():
            if variant is not None:
                FlashLLMOptions.from_any({**base, **variant})
    except (TypeError, ValueError) as e:
        parser.error(f"--flashllm-options: {e}")
    if not 0 <= args.sparsity < 1 or not 0 <= args.structured < 1:
        parser.error("--sparsity and --structured must be in [0, 1)")
    if min(args.m) < 1:
        parser.error("--m values must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_passes.py needs a CUDA GPU (or --device cpu for a smoke test); nothing was run.", file=sys.stderr)
        sys.exit(2)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_passes.csv")
    rows = run(args.device, args.m, args.variants, args.sparsity, args.structured, not args.keep_down_columns, base,
               on_rows=lambda rows: write_csv(rows, path))  # rewritten after every M: partial runs count
    write_csv(rows, path)
    print(f"\nwrote {path}")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
