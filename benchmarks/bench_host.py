"""Host (Python) time of one sparse_linear call and of its parts, against F.linear: what a CUDA-graph recording pays
per op (under mode="reduce-overhead", generate() records the decode graph again for every new static cache).

    python benchmarks/bench_host.py                  # 4096 x 4096 at 80%, M = 8, Tiled-CSL (cmma)

Each row: microseconds of host time per call, the mean of --calls calls issued back to back after warm-up, without
synchronising (the GPU queue does not fill at these counts, so this is the Python and launch cost).  Writes
bench_host.csv under --out and prints the table last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from timing import gpu_info, write_csv

import flashllm_compile.ops  # noqa: F401 -- registers torch.ops.flashllm
from flashllm_compile.codegen.formats.cache import watch_weight
from flashllm_compile.codegen.formats.csl import CslWeight
from flashllm_compile.codegen.kernels.csl_mma import cmma_default_config, csl_mma
from flashllm_compile.codegen.kernels.epilogue import fused_epilogue


def host_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_host.py needs a CUDA GPU")

    torch.manual_seed(0)
    w = torch.randn(args.n, args.k, device="cuda", dtype=torch.float16)
    w.masked_fill_(torch.rand_like(w, dtype=torch.float32) < args.sparsity, 0)
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.float16)
    fmt = CslWeight.from_dense(w)
    op_args = (x, *fmt.parts().values(), None, w, fmt.n, fmt.k, fmt.op_param, "triton", "layer", watch_weight(w))
    ref = F.linear(x.float(), w.float())
    partials = torch.randn(4, args.m, args.n, device="cuda")
    config = cmma_default_config(args.m)  # the untuned default
    rows = {}
    with torch.no_grad():  # as generate() runs
        checks = {"sparse_linear": torch.ops.flashllm.sparse_linear.default,
                  "sparse_linear_nograd": torch.ops.flashllm.sparse_linear_nograd.default}
        for name, op in checks.items():  # correctness first (and the first call tunes M if it is new)
            err = ((op(*op_args, layout="csl").float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                sys.exit(f"{name}: relative error {err:.2e}")
        cases = {
            "F.linear (cuBLAS)": lambda: F.linear(x, w),
            "sparse_linear (custom_op wrappers)": lambda: checks["sparse_linear"](*op_args, layout="csl"),
            "sparse_linear_nograd (Inductor's calls)": lambda: checks["sparse_linear_nograd"](*op_args, layout="csl"),
            "csl_mma, split-K 1": lambda: csl_mma(x, fmt, None, config._replace(split_k=1)),
            "csl_mma, split-K 4 (+ epilogue kernel)": lambda: csl_mma(x, fmt, None, config._replace(split_k=4)),
            "epilogue kernel (split-K sum)": lambda: fused_epilogue(partials, None, None, torch.float16),
            "torch.empty": lambda: torch.empty(args.m, args.n, device="cuda", dtype=torch.float16),
        }
        for name, fn in cases.items():
            rows[name] = host_us(fn, args.calls)
    info = gpu_info()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_host.csv")
    write_csv([{**info, "n": args.n, "k": args.k, "m": args.m, "sparsity": args.sparsity, "case": name,
                "host_us": f"{us:.1f}"} for name, us in rows.items()], path)
    print(f"wrote {path}\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}; {args.n} x {args.k} at "
          f"{args.sparsity:.0%}, M = {args.m}: host us per call")
    for name, us in rows.items():
        print(f"{name:42s} {us:7.1f}")


if __name__ == "__main__":
    main()
