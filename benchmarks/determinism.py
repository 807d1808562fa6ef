"""Deterministic mode on the GPU: bitwise-identical outputs over 100 calls, and what the untuned choice costs.

    python benchmarks/determinism.py            # LLaMA-7B qkv and down, 80% sparse, M 1 / 8 / 16 / 64

Per (shape, M): every sparse family's untuned default config (what options={"deterministic": True} runs when
no dense weight is kept) and cuBLAS are called 100 times on the same input; the outputs must be bitwise equal.
Then the default config is timed against the autotuner's pick (CUDA-graph replays, L2 flushed), which is the
cost of deterministic mode where the dense weight was released (with the dense weight kept it runs cuBLAS).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import gpu_info

from flashllm_compile.codegen.autotune import AUTOTUNER, LAUNCHERS, bench_us, default_config
from flashllm_compile.codegen.formats.bitmap import BitmapWeight

SHAPES = {"qkv": (12288, 4096), "down": (4096, 11008)}
CALLS = 100


def check(name: str, w: torch.Tensor, fmt: BitmapWeight, m: int) -> str:
    """One table row: bitwise repeatability of the default config and of cuBLAS, default vs tuned time."""
    x = torch.randn(m, fmt.k, device="cuda", dtype=torch.float16)
    config = default_config(m)
    launch = LAUNCHERS[config.family]
    first = launch(x, fmt, None, config)
    same = all(torch.equal(first, launch(x, fmt, None, config)) for _ in range(CALLS))
    dense_first = torch.nn.functional.linear(x, w)
    dense_same = all(torch.equal(dense_first, torch.nn.functional.linear(x, w)) for _ in range(CALLS))
    t_default = bench_us(lambda: launch(x, fmt, None, config))
    choice = AUTOTUNER.choose(fmt, m, None, allow_dense=False, tune=True,
                              cache_dir=os.environ.get("FLASHLLM_CACHE_DIR", "/tmp/flashllm_determinism"))
    t_tuned = bench_us(lambda: LAUNCHERS[choice.family](x, fmt, None, choice.config))
    return (f"{name:<6} {m:>3} {config.short():<46} {same!s:>12} {dense_same!s:>11} {t_default:>10.1f} "
            f"{t_tuned:>8.1f} {choice.config.short()}")


def main() -> None:
    torch.manual_seed(0)
    print(gpu_info())
    print(f"{'shape':<6} {'M':>3} {'default config':<46} {'bitwise x100':>12} {'cuBLAS x100':>11} "
          f"{'default us':>10} {'tuned us':>8} {'tuned pick'}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        w = w * (torch.rand_like(w, dtype=torch.float32) >= 0.8)
        fmt = BitmapWeight.from_dense(w)
        for m in (1, 8, 16, 64):
            print(check(name, w, fmt, m), flush=True)


if __name__ == "__main__":
    main()
