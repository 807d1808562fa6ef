"""Sparse linear kernels vs cuBLAS on real LLM shapes, side by side in one run on one GPU.

    python benchmarks/bench_kernels.py                       # LLaMA-7B shapes, M 1..64, sparsity 50..90%
    python benchmarks/bench_kernels.py --models llama70b opt66b --m 1 16 --sparsity 0.8
    python benchmarks/bench_kernels.py --tables part1/bench_kernels.csv part2/bench_kernels.csv   # no GPU

Per (shape, sparsity, M): the autotuner's best sparse kernel on the bitmap format (rowwalk / fmma / smma / mma /
unpack) and, from 65% sparsity up to M = 64, on the Tiled-CSL format (cmma), the faster of the two as the product's
compile-time dispatch picks it (`ours`; CSL must win by CSL_MIN_GAIN), tile configs measured as the tuner does (CUDA
graphs, L2 flushed), and the references, each timed as CUDA-graph replays over ROTATIONS weight copies so
weights stream from HBM: cuBLAS F.linear on the same pruned weight, cuSPARSE CSR (torch.sparse), and 2:4
semi-structured sparsity (cuSPARSELt) on a 2:4-pruned weight at 50%.  Every call is timed as in a decode step,
after a small kernel that writes its x (`*_us`, `speedup`), and ours and cuBLAS also back to back (`*_b2b_us`,
`speedup_b2b`), where a kernel launched with programmatic dependent launch overlaps its own previous call: the two
rank tile configs differently, and the tuner's ranking matches the first (benchmarks/RESULTS.md, idea 43).  Also
the bytes floor (our format's bytes at the measured copy bandwidth), the read floor (the time to stream the same
bytes read-only, which is slower per byte for fewer bytes: read_floor.py) with the best ratio over cuBLAS it allows,
and the bandwidth each kernel achieves on the bytes it must move.
Writes bench_kernels.csv and bench_kernels.png under --out and prints a table (geo-means per sparsity) last.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from read_floor import read_floor_us
from timing import ROTATIONS, csl_copies, gpu_info, graph_time_us, input_writer, pruned, write_csv

from flashllm_compile.codegen import autotune
from flashllm_compile.codegen.formats.bitmap import COMPILER_ORDER, BitmapWeight
from flashllm_compile.codegen.kernels.csl_mma import CMMA_MAX_M
from flashllm_compile.passes.rewrite_sparse_linear import CSL_MAX_DENSITY, CSL_MIN_GAIN

SHAPES = {  # model -> {layer: (N, K)}
    "llama7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)},
    "llama13b": {"qkv": (15360, 5120), "o": (5120, 5120), "gate_up": (13824, 5120), "down": (5120, 13824)},
    "llama70b": {"qkv": (10240, 8192), "o": (8192, 8192), "up": (28672, 8192), "down": (8192, 28672)},
    "opt30b": {"qkv": (21504, 7168), "o": (7168, 7168), "fc1": (28672, 7168), "fc2": (7168, 28672)},
    "opt66b": {"qkv": (27648, 9216), "o": (9216, 9216), "fc1": (36864, 9216), "fc2": (9216, 36864)},
}


TEXT_COLUMNS = ("gpu", "torch", "triton", "model", "layer", "dtype", "kernel", "config")
TARGETS = {0.5: 1.3, 0.7: 2.0, 0.8: 2.8, 0.9: 4.5}  # issue 4: geo-mean over the shapes and M = 1..64, fp16


def geo(values) -> float:
    """Geometric mean; nan for no values (a cell a cut-off run did not reach)."""
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy bandwidth, bytes read + written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)])
    return 2 * src.numel() / us / 1e3


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive weights (the pattern cuSPARSELt needs)."""
    groups = w.view(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    return torch.zeros_like(groups).scatter_(1, keep, groups.gather(1, keep)).view_as(w)


def both_times(calls, before) -> tuple[float, float]:
    """(us in a decode step: every call after `before`, the kernel writing x; us back to back) of rotated calls."""
    return graph_time_us(calls, before=before), graph_time_us(calls)


def try_time(make_calls, before) -> float:
    try:
        return graph_time_us(make_calls(), before=before)
    except Exception as e:  # noqa: BLE001 -- a library path that does not support this dtype/shape: reported as nan
        print(f"    (reference skipped: {type(e).__name__}: {str(e)[:120]})")
        return float("nan")


def best_of_format(fmts, x, ref, where: str, before):
    """(tuner's Choice, rotation-timed (decode step, back to back) us, rel err) of the best sparse kernel on one
    format (dense excluded)."""
    choice = autotune.Autotuner()._measure(fmts[0], x.shape[0], None)
    launch = autotune.LAUNCHERS[choice.family]
    err = ((launch(x, fmts[0], None, choice.config).float() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        raise AssertionError(f"{where} {choice.config.short()}: rel err {err}")
    return choice, both_times([lambda f=f: launch(x, f, None, choice.config) for f in fmts], before), err


def bench_point(model, layer, n, k, sparsity, m, dtype, copy_gbps, references):
    weights = [pruned(n, k, sparsity, dtype) for _ in range(ROTATIONS)]
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    write_x = input_writer(x)
    ref = torch.nn.functional.linear(x.float(), weights[0].float())
    where = f"{model}.{layer} M={m} s={sparsity}"
    fmts = [BitmapWeight.from_dense(w, tile_rows=COMPILER_ORDER) for w in weights]
    choice, (ours, ours_b2b), err = best_of_format(fmts, x, ref, where, write_x)
    bitmap_us, csl_us = ours, float("nan")
    if 1 - sparsity <= CSL_MAX_DENSITY and m <= CMMA_MAX_M and dtype in (torch.float16, torch.bfloat16):
        csls = csl_copies(weights)
        csl_choice, (csl_us, csl_b2b), csl_err = best_of_format(csls, x, ref, where, write_x)
        if csl_choice.time_us * CSL_MIN_GAIN < choice.time_us:  # the compile-time dispatch's rule
            fmts, choice, ours, ours_b2b, err = csls, csl_choice, csl_us, csl_b2b, csl_err
    dense, dense_b2b = both_times([lambda w=w: torch.nn.functional.linear(x, w) for w in weights], write_x)
    io_bytes = 2 * (x.numel() + m * n) * x.element_size()
    ours_floor = read_floor_us(fmts[0].nbytes + io_bytes)  # streaming the same bytes read-only (read_floor.py)
    row = {**gpu_info(), "model": model, "layer": layer, "n": n, "k": k, "m": m, "sparsity": sparsity,
           "dtype": str(dtype).removeprefix("torch."), "kernel": choice.family, "config": choice.config.short(),
           "ours_us": ours, "cublas_us": dense, "speedup": dense / ours, "bitmap_us": bitmap_us, "csl_us": csl_us,
           "dispatched_speedup": dense / min(dense, ours),  # what the product runs: dense where sparse loses
           # the same calls back to back (the protocol of the first fifteen sessions' tables)
           "ours_b2b_us": ours_b2b, "cublas_b2b_us": dense_b2b, "speedup_b2b": dense_b2b / ours_b2b,
           "dispatched_speedup_b2b": dense_b2b / min(dense_b2b, ours_b2b),
           "ours_bytes_floor_us": (fmts[0].nbytes + io_bytes) / copy_gbps / 1e3,  # bytes at the copy rate
           # and the best ratio over cuBLAS that floor allows
           "ours_read_floor_us": ours_floor, "read_floor_speedup": read_floor_us(weights[0].nbytes + io_bytes) / ours_floor,
           "ours_GBps": (fmts[0].nbytes + io_bytes) / ours / 1e3,
           "cublas_GBps": (weights[0].nbytes + io_bytes) / dense / 1e3, "rel_err": err}
    if "csr" in references:
        csrs = [w.to_sparse_csr() for w in weights[:2]]
        row["cusparse_csr_us"] = try_time(lambda: [lambda c=c: torch.sparse.mm(c, x.t()) for c in csrs], write_x)
    if "2:4" in references and sparsity == 0.5 and m >= 8:
        from torch.sparse import to_sparse_semi_structured

        semis = [to_sparse_semi_structured(prune_2_4(w)) for w in weights[:2]]
        row["semi_2_4_us"] = try_time(lambda: [lambda s=s: torch.nn.functional.linear(x, s) for s in semis], write_x)
    del weights, fmts
    torch.cuda.empty_cache()
    return row


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["model"], r["layer"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, (model, layer) in zip(axes[0], shapes):
        for m in sorted({r["m"] for r in rows}):
            pts = sorted((r["sparsity"], r["speedup"]) for r in rows if (r["model"], r["layer"], r["m"]) ==
                         (model, layer, m))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"M={m}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"{model} {layer}", xlabel="sparsity", ylabel="speedup over cuBLAS")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sparse kernel vs cuBLAS, {rows[0]['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_tables(rows: list[dict]) -> None:
    """The geo-mean tables of a run's rows (or of several runs' CSVs, --tables): per shape, per M, and issue 4's
    table (one geo-mean a sparsity over every shape and M, next to its target)."""
    print("geo-mean speedup of the best sparse kernel over cuBLAS (dispatched: dense where sparse loses)")
    sparsities = sorted({r["sparsity"] for r in rows})
    print(f"{'shape':<16}" + "".join(f"{s:>12.0%}" for s in sparsities))
    for model, layer in dict.fromkeys((r["model"], r["layer"]) for r in rows):
        cells = []
        for s in sparsities:
            sel = [r for r in rows if (r["model"], r["layer"], r["sparsity"]) == (model, layer, s)]
            cells.append(f"{geo(r['speedup'] for r in sel):5.2f}/{geo(r['dispatched_speedup'] for r in sel):5.2f}")
        print(f"{model + '.' + layer:<16}" + "".join(f"{c:>12}" for c in cells))
    for key, what in (("dispatched_speedup", "in a decode step: each call after the kernel that writes x"),
                      ("dispatched_speedup_b2b", "back to back: each call after the previous call")):
        print(f"\n{'M':>4}" + "".join(f"{s:>8.0%}" for s in sparsities) + f"   (dispatched, geo-mean over shapes; {what})")
        for m in sorted({r["m"] for r in rows}):
            cells = [geo(r[key] for r in rows if r["m"] == m and r["sparsity"] == s) for s in sparsities]
            print(f"{m:>4}" + "".join(f"{c:8.2f}" for c in cells))

    # issue 4's table, next to the ratio of the dense weight's read floor to the format's (ceiling.py measures the
    # ratio against cuBLAS itself)
    print(f"\n{'sparsity':>8} {'ours':>6} {'target':>7} {'read-floor bound':>17}   (dispatched, in a decode step, "
          f"geo-mean over {len({(r['model'], r['layer']) for r in rows})} shapes x M {sorted({r['m'] for r in rows})})")
    for s in sparsities:
        sel = [r for r in rows if r["sparsity"] == s]
        print(f"{s:>8.0%} {geo(r['dispatched_speedup'] for r in sel):6.2f} {TARGETS.get(s, '-'):>7} "
              f"{geo(r['read_floor_speedup'] for r in sel):17.2f}")


def read_rows(paths: list[str]) -> list[dict]:
    """Rows of bench_kernels.csv files (several runs: a run is cut at 10 minutes on the lent GPUs), numbers parsed."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key not in TEXT_COLUMNS:  # "" where a run did not time that column (a reference)
                        row[key] = int(value) if key in ("n", "k", "m") else float(value) if value else math.nan
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama7b"], choices=SHAPES)
    parser.add_argument("--layers", nargs="+", default=None, help="subset of layer names")
    parser.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--references", nargs="*", default=["csr", "2:4"], help="extra baselines: csr, 2:4")
    parser.add_argument("--tune-rep-ms", type=float, default=5, help="do_bench time per tuned config")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--tables", nargs="+", metavar="CSV", help="print the tables of earlier runs' CSVs together "
                        "(no GPU needed) instead of running")
    args = parser.parse_args()
    if args.tables:
        print_tables(read_rows(args.tables))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    autotune.TUNE_REP_MS = args.tune_rep_ms
    os.makedirs(args.out, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    copy_gbps = copy_bandwidth_gbps()
    print(f"{gpu_info()} copy bandwidth {copy_gbps:.0f} GB/s (read+write)", flush=True)
    rows = []
    for model in args.models:
        for layer, (n, k) in SHAPES[model].items():
            if args.layers and layer not in args.layers:
                continue
            for sparsity in args.sparsity:
                for m in args.m:
                    rows.append(bench_point(model, layer, n, k, sparsity, m, dtype, copy_gbps, args.references))
                    r = rows[-1]
                    print(f"{model}.{layer} {n}x{k} s={sparsity} M={m}: ours {r['ours_us']:.1f} us "
                          f"({r['kernel']} {r['config']}), cuBLAS {r['cublas_us']:.1f} us, x{r['speedup']:.2f}, "
                          f"{r['ours_GBps']:.0f} GB/s, {r['ours_read_floor_us'] / r['ours_us']:.0%} of its read floor "
                          f"(x{r['read_floor_speedup']:.2f} at most)", flush=True)
                    write_csv(rows, os.path.join(args.out, "bench_kernels.csv"))  # so far: a cut-off run keeps it
    plot(rows, os.path.join(args.out, "bench_kernels.png"))

    print(f"\n{gpu_info()}, {args.dtype}, copy bandwidth {copy_gbps:.0f} GB/s")
    print_tables(rows)


if __name__ == "__main__":
    main()
