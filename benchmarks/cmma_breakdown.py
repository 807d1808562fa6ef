"""Where a Tiled-CSL (cmma) call's time goes on the GPU: the part that streams the weight's words, the part that does
not shrink with sparsity, and the split-K epilogue kernel.

    python benchmarks/cmma_breakdown.py                       # LLaMA-7B shapes, 70 / 80 / 90 / 100%, M = 8 and 32

Per (layer, sparsity, M): every cmma config of the tuning space timed as CUDA-graph replays over ROTATIONS weight
copies (weights from HBM); for the fastest, the device time of each of its kernels (torch.profiler: the main
kernel and, with split-K, the epilogue kernel that sums the partials), next to cuBLAS on the same pruned weight.
Sparsity 1.0 is an all-zero weight: no words to load or scatter, so its main kernel time is what every call pays
for the tile reads, the MMAs, x and the barriers whatever the sparsity.  A line fit of the main kernel time
against the bytes the call moves gives, per layer and M, that fixed part and the marginal bandwidth of the words.
Also: one empty Triton launch in a graph (the gap a kernel costs there) and the epilogue kernel alone.
Writes cmma_breakdown.csv under --out and prints the tables last.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import SHAPES
from timing import ROTATIONS, csl_copies, gpu_info, graph_time_us, pruned, write_csv

from flashllm_compile.codegen.kernels.csl_mma import csl_mma, get_csl_mma_configs
from flashllm_compile.codegen.kernels.epilogue import fused_epilogue


@triton.jit
def _empty_kernel(ptr):
    pass


def kernel_times_us(fn, calls: int = 5) -> dict[str, float]:
    """Mean device time per call of each kernel `fn` launches, by kernel name (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.device_time / calls
    return times


def point(name: str, n: int, k: int, sparsity: float, m: int, dtype: torch.dtype) -> dict:
    weights = [pruned(n, k, sparsity, dtype) for _ in range(ROTATIONS)]
    fmts = csl_copies(weights)
    max_groups = fmts[0].max_groups
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = x.float() @ weights[0].float().t()
    dense_us = graph_time_us([lambda w=w: F.linear(x, w) for w in weights])
    timed = []
    for config in get_csl_mma_configs(m, max_groups):
        if sparsity < 1.0:
            err = ((csl_mma(x, fmts[0], None, config).float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                raise AssertionError(f"{name} {sparsity} M={m} {config.short()}: relative error {err:.2e}")
        timed.append((graph_time_us([lambda f=f, c=config: csl_mma(x, f, None, c) for f in fmts]), config))
    best_us, best = min(timed, key=lambda t: t[0])
    kernels = kernel_times_us(lambda: csl_mma(x, fmts[0], None, best))
    main_us = sum(t for kname, t in kernels.items() if "csl_mma" in kname)
    epilogue_us = sum(t for kname, t in kernels.items() if "epilogue" in kname)
    nbytes = sum(f.nbytes for f in fmts) / len(fmts)
    return {"layer": name, "n": n, "k": k, "sparsity": sparsity, "m": m, "config": best.short(),
            "cublas_us": dense_us, "cmma_us": best_us, "speedup": dense_us / best_us, "main_kernel_us": main_us,
            "epilogue_kernel_us": epilogue_us, "graph_overhead_us": best_us - main_us - epilogue_us,
            "weight_mb": nbytes / 1e6, "main_gb_s": nbytes / main_us / 1e3}


def fit(rows: list[dict]) -> list[tuple]:
    """Per (layer, M): least-squares main_us = fixed + MB / bandwidth over the sparsities measured."""
    out = []
    for key in sorted({(r["layer"], r["m"]) for r in rows}):
        pts = [(r["weight_mb"], r["main_kernel_us"]) for r in rows if (r["layer"], r["m"]) == key]
        if len(pts) < 2:
            continue
        mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
        sxx = sum((p[0] - mx) ** 2 for p in pts)
        slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")
        out.append((*key, my - slope * mx, 1 / slope if slope > 0 else float("nan")))  # us, TB/s (MB / us)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama7b"], choices=SHAPES)
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--m", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cmma_breakdown.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    info = gpu_info()
    buf = torch.empty(1, device="cuda")
    empty_us = graph_time_us([lambda: _empty_kernel[(1,)](buf)] * ROTATIONS)
    partials = torch.randn(4, 8, 4096, device="cuda")
    epilogue_alone_us = graph_time_us([lambda: fused_epilogue(partials, None, None, dtype)] * ROTATIONS)
    rows = []
    for model in args.models:
        for name, (n, k) in SHAPES[model].items():
            for sparsity in args.sparsity:
                for m in args.m:
                    rows.append({**info, "model": model, "dtype": args.dtype, **point(name, n, k, sparsity, m, dtype)})
                    r = rows[-1]
                    print(f"{name} {sparsity:.0%} M={m}: cmma {r['cmma_us']:.1f} us ({r['config']}), cuBLAS "
                          f"{r['cublas_us']:.1f} us", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cmma_breakdown.csv")
    write_csv(rows, path)
    print(f"wrote {path}\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}, {args.dtype}")
    print(f"one empty launch in a CUDA graph: {empty_us:.1f} us; the epilogue kernel alone (S = 4, 8 x 4096): "
          f"{epilogue_alone_us:.1f} us")
    print(f"{'layer':8s} {'sp':>4s} {'M':>3s} {'cuBLAS':>7s} {'cmma':>6s} {'x':>5s} {'main':>6s} {'epil.':>6s} "
          f"{'gaps':>5s} {'MB':>6s} {'GB/s':>6s}  config")
    for r in rows:
        print(f"{r['layer']:8s} {r['sparsity']:4.0%} {r['m']:3d} {r['cublas_us']:7.1f} {r['cmma_us']:6.1f} "
              f"{r['speedup']:5.2f} {r['main_kernel_us']:6.1f} {r['epilogue_kernel_us']:6.1f} "
              f"{r['graph_overhead_us']:5.1f} {r['weight_mb']:6.1f} {r['main_gb_s']:6.0f}  {r['config']}")
    print("\nmain kernel = fixed + bytes / bandwidth (least squares over the sparsities):")
    for layer, m, fixed_us, tb_s in fit(rows):
        print(f"{layer:8s} M={m:3d}: fixed {fixed_us:5.1f} us, words at {tb_s:4.2f} TB/s")


if __name__ == "__main__":
    main()
