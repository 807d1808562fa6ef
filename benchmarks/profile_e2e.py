"""Where a decode token's time goes, inductor vs flashllm, measured with torch.profiler.

    python benchmarks/profile_e2e.py                            # 32 LLaMA-2-7B-sized layers, 80%, batch 1 and 8
    python benchmarks/profile_e2e.py --layers 2 --device cpu --tiny   # smoke test of the script only
    python benchmarks/profile_e2e.py --arch opt --reuse-cache          # OPT-6.7B dims, one cache for every generate

The model, pruning and compilation are bench_e2e.py's (random weights, magnitude pruning, static cache, generate()
compiling the decode step with mode="reduce-overhead" on both sides).  After the compile and a warm-up generate,
one generate of --new-tokens tokens runs under torch.profiler; GPU kernel time is summed per category:
  sparse     flashllm's Triton kernels (_bitmap_*, _csl_mma and the split-K / epilogue kernel)
  gemm       cuBLAS / CUTLASS GEMMs: inductor's linears, flashllm's dense picks and lm_head
  attention  scaled-dot-product attention kernels
  other      the rest: Inductor's fused pointwise kernels (norms, rotary, SwiGLU, residual adds), copies
per generated token (all sequences of the batch together), next to the wall time per token.  Wall minus the GPU's
busy time is host work (generate()'s Python per token, graph launches) that no kernel can remove.
Writes profile_e2e.csv under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_e2e
from timing import write_csv

CATEGORIES = ("sparse", "gemm", "attention", "other")


def category(kernel_name: str) -> str:
    name = kernel_name.lower()
    if "_bitmap_" in name or "_csl_mma" in name or "fused_epilogue" in name or "_epilogue_kernel" in name:
        return "sparse"
    if any(key in name for key in ("flash", "fmha", "attention", "attn", "sdpa")):  # before gemm: fmha_cutlass*
        return "attention"
    if any(key in name for key in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
        return "gemm"
    return "other"


def profile_point(model, ids: torch.Tensor, new_tokens: int, backend: str, top: int = 0) -> dict:
    """Compile (first generate), warm up, then profile one generate: us per token per category, wall us per token;
    prints the `top` most expensive kernels (us per token)."""
    from transformers import CompileConfig

    bench_e2e.reset_compiled_state(ids.device)
    config = CompileConfig(backend=backend, mode="reduce-overhead", fullgraph=False)
    bench_e2e.generate(model, ids, new_tokens, config)  # compile (and flashllm's autotuning)
    bench_e2e.generate(model, ids, new_tokens, config)  # warm-up: CUDA graphs recorded
    activities = [torch.profiler.ProfilerActivity.CPU]
    if ids.is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _, seconds = bench_e2e.timed_generate(model, ids, new_tokens, config)
    totals, kernels = collections.Counter(), collections.Counter()
    for event in prof.events():
        if ids.is_cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            totals[category(event.name)] += event.device_time  # us
            kernels[event.name] += event.device_time
    row = {"backend": backend, "batch": ids.shape[0], "wall_us_per_token": seconds * 1e6 / new_tokens}
    for name, us in kernels.most_common(top):  # the kernels that cost most, for the log
        print(f"  {backend} batch {ids.shape[0]}: {us / new_tokens:8.1f} us/token  {name[:110]}", flush=True)
    for cat in CATEGORIES:
        row[f"{cat}_us_per_token"] = totals[cat] / new_tokens
    row["gpu_busy_us_per_token"] = sum(totals.values()) / new_tokens
    row["host_us_per_token"] = row["wall_us_per_token"] - row["gpu_busy_us_per_token"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(bench_e2e.ARCHS), default="llama",
                        help="llama: LLaMA-2-7B dims; opt: OPT-6.7B dims (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU smoke test)")
    parser.add_argument("--reuse-cache", action="store_true",
                        help="one StaticCache reused across generates (bench_e2e.py --reuse-cache)")
    parser.add_argument("--top", type=int, default=0, help="print the N most expensive kernels of each point")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    bench_e2e.REUSE_CACHE = args.reuse_cache
    os.makedirs(args.out, exist_ok=True)
    dims = dict(bench_e2e.ARCHS[args.arch], layers=args.layers)
    if args.tiny:
        dims.update(hidden=128, intermediate=256, heads=4, vocab=512, max_pos=512)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    bench_e2e.ensure_flashllm_backend()
    start = time.perf_counter()
    model = bench_e2e.build_model(args.arch, dims, dtype, args.device)
    bench_e2e.prune(model, args.sparsity)
    print(f"model ready in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for batch in args.batch:
        ids = torch.randint(0, dims["vocab"], (batch, args.prompt_len), device=args.device)
        for backend in ("inductor", "flashllm"):
            rows.append({**bench_e2e.gpu_info(), "layers": args.layers, "sparsity": args.sparsity,
                         **profile_point(model, ids, args.new_tokens, backend, args.top)})
            print(rows[-1], flush=True)
    write_csv(rows, os.path.join(args.out, "profile_e2e.csv"))
    print(f"\n{rows[0]['gpu']}; {args.layers} {args.arch} layers ({dims['hidden']} hidden), "
          f"{args.sparsity:.0%} sparse; us per token")
    print(f"{'batch':>5} {'backend':<9} {'wall':>8} {'gpu busy':>9} {'host':>7} "
          + " ".join(f"{c:>9}" for c in CATEGORIES))
    for r in rows:
        print(f"{r['batch']:>5} {r['backend']:<9} {r['wall_us_per_token']:8.0f} {r['gpu_busy_us_per_token']:9.0f} "
              f"{r['host_us_per_token']:7.0f} " + " ".join(f"{r[f'{c}_us_per_token']:9.0f}" for c in CATEGORIES))


if __name__ == "__main__":
    main()
