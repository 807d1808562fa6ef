"""Sweep every tile config of every kernel family on the GPU and compare the best against cuBLAS.

    python benchmarks/sweep_configs.py --shapes 12288x4096 4096x11008 --m 1 4 16 64 --sparsity 0.5 0.8 0.9

Per (shape, M, sparsity): the best config of each family (the autotuner's timing: CUDA-graph replays, L2 flushed
before every call), then the winner and cuBLAS timed side by side as CUDA-graph replays over rotated weight copies,
each call after a small kernel that writes x, as in a decode step (timing.graph_time_us).  Also checks every
timed config against dense F.linear on the same pruned weight (fp32 reference).  Prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import ROTATIONS, gpu_info, graph_time_us, input_writer, pruned

from flashllm_compile.codegen.autotune import LAUNCHERS, bench_us, candidate_configs
from flashllm_compile.codegen.formats.bitmap import BitmapWeight


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def sweep_point(n, k, m, sparsity, dtype, chunk_ks, families, log):
    weights = [pruned(n, k, sparsity, dtype) for _ in range(ROTATIONS)]
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    write_x = input_writer(x)
    ref = torch.nn.functional.linear(x.float(), weights[0].float())
    best = {}
    for chunk_k in chunk_ks:
        fmts = [BitmapWeight.from_dense(w, chunk_k) for w in weights]
        for cfg in candidate_configs(m):
            if families and cfg.family not in families:
                continue
            launch = LAUNCHERS[cfg.family]
            try:
                err = rel_err(launch(x, fmts[0], None, cfg), ref)
                t = bench_us(lambda l=launch, f=fmts[0], c=cfg: l(x, f, None, c))
            except Exception as e:  # noqa: BLE001 -- a config that fails to compile (e.g. out of shared memory) is skipped
                print(f"  {cfg.short()} CK={chunk_k}: {type(e).__name__}: {str(e)[:100]}", file=log)
                continue
            print(f"  {n}x{k} M={m} s={sparsity} CK={chunk_k} {cfg.short()} {t:.1f}us err={err:.1e}", file=log)
            if err > 1e-2:
                raise AssertionError(f"{cfg.short()} CK={chunk_k} wrong: rel err {err}")
            if cfg.family not in best or t < best[cfg.family][0]:
                best[cfg.family] = (t, cfg, chunk_k)
    dense_us = graph_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in weights], before=write_x)
    row = {"n": n, "k": k, "m": m, "sparsity": sparsity, "dtype": str(dtype).split(".")[-1], "cublas_us": dense_us}
    for family, (_, cfg, chunk_k) in best.items():
        fmts = [BitmapWeight.from_dense(w, chunk_k) for w in weights]
        us = graph_time_us([lambda f=f, c=cfg: LAUNCHERS[c.family](x, f, None, c) for f in fmts], before=write_x)
        row[f"{family}_us"] = us
        row[f"{family}_cfg"] = f"{cfg.short()}CK={chunk_k}"
        row[f"{family}_speedup"] = dense_us / us
        row[f"{family}_GBps"] = (fmts[0].nbytes + 2 * x.numel() * x.element_size()) / us / 1e3
    row["dense_GBps"] = n * k * weights[0].element_size() / dense_us / 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["12288x4096", "4096x11008"])
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.8, 0.9])
    parser.add_argument("--chunk-k", nargs="+", type=int, default=[128])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--families", nargs="*", default=None, help="only these kernel families (default: all)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    rows = []
    with open(os.path.join(args.out, "sweep_log.txt"), "w") as log:
        print(gpu_info(), file=log)
        for shape in args.shapes:
            n, k = map(int, shape.split("x"))
            for sparsity in args.sparsity:
                for m in args.m:
                    rows.append(sweep_point(n, k, m, sparsity, dtype, args.chunk_k, args.families, log))
                    log.flush()
                    print(rows[-1], flush=True)
    keys = sorted({key for row in rows for key in row}, key=lambda s: (s not in ("n", "k", "m", "sparsity"), s))
    with open(os.path.join(args.out, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    print(gpu_info())
    families = sorted({key[:-3] for row in rows for key in row if key.endswith("_us") and key != "cublas_us"})
    print(f"{'shape':>12} {'M':>3} {'sp':>4} {'cuBLAS':>7} " + " ".join(f"{f:>9} {'x':>5}" for f in families)
          + "  GB/s: dense " + " ".join(families))
    for r in rows:
        cells = " ".join(f"{r.get(f + '_us', float('nan')):9.1f} {r.get(f + '_speedup', float('nan')):5.2f}"
                         for f in families)
        rates = " ".join(f"{r.get(f + '_GBps', float('nan')):.0f}" for f in families)
        print(f"{r['n']}x{r['k']:<6} {r['m']:>3} {r['sparsity']:>4} {r['cublas_us']:7.1f} {cells}  "
              f"{r['dense_GBps']:.0f} {rates}")


if __name__ == "__main__":
    main()
