"""Command line: `python -m flashllm_compile` (installed as `flashllm-compile`).

    flashllm-compile explain --arch llama --config-size tiny --sparsity 0.8   # what the backend does to a model
    flashllm-compile cache-info                                                # where autotune results live
    flashllm-compile cache-clear [--cache-dir DIR]                             # forget them
    flashllm-compile bench kernels|e2e [ARGS...]                               # benchmarks/ of a source checkout
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

ARCHS = ("llama", "opt")
CONFIG_SIZES = ("test", "tiny", "1b", "7b")
OPT_SIZES = {  # hidden, ffn, layers, heads (1b ~ OPT-1.3b, 7b ~ OPT-6.7b)
    "test": (64, 256, 1, 4),
    "tiny": (256, 1024, 2, 8),
    "1b": (2048, 8192, 24, 32),
    "7b": (4096, 16384, 32, 32),
}
BENCH_SCRIPTS = {"kernels": "bench_kernels.py", "e2e": "bench_e2e.py"}


def build_opt(size: str, dtype, device: str):
    """A transformers OPTForCausalLM of `size` (OPT_SIZES) with random weights (no download)."""
    import torch
    import transformers

    hidden, ffn, layers, heads = OPT_SIZES[size]
    config = transformers.OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                                    num_attention_heads=heads, word_embed_proj_dim=hidden, vocab_size=32000,
                                    max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config).to(device=device, dtype=dtype).eval()


def build_model(arch: str, size: str, dtype, device: str):
    """A random-weight transformers model of architecture `arch` ("llama" or "opt") and `size`."""
    if arch == "opt":
        return build_opt(size, dtype, device)
    from flashllm_compile.demo import build_llama

    return build_llama(size, dtype, device)


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    import flashllm_compile
    from flashllm_compile.prune import magnitude_prune_

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = build_model(args.arch, args.config_size, dtype, device)
    print(f"{args.arch} '{args.config_size}' ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
          f"{dtype}, {device}); magnitude-pruning linears to {args.sparsity:.0%}", flush=True)
    magnitude_prune_(model, args.sparsity)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), device=device)
    options = {"min_sparsity": args.min_sparsity} if args.min_sparsity is not None else {}
    report = flashllm_compile.explain(model, ids, **options)
    print(report if args.source else report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1, allow_nan=False))
        print(f"wrote {args.json}")
    return 0


def _cache_dir(args: argparse.Namespace) -> Path:
    from flashllm_compile.options import default_cache_dir

    return Path(args.cache_dir or default_cache_dir())


def cmd_cache_clear(args: argparse.Namespace) -> int:
    from flashllm_compile.codegen.autotune import AUTOTUNER

    cache_dir = _cache_dir(args)
    files = sorted(cache_dir.glob("autotune-*.json"))
    AUTOTUNER.clear(str(cache_dir))
    print(f"removed {len(files)} autotune cache file(s) from {cache_dir}")
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    cache_dir = _cache_dir(args)
    files = sorted(cache_dir.glob("autotune-*.json"))
    print(f"autotune cache dir: {cache_dir} ({'exists' if cache_dir.is_dir() else 'does not exist'})")
    for path in files:
        try:
            entries = len(json.loads(path.read_text()))
        except (OSError, ValueError):
            entries = "unreadable"
        print(f"  {path.name}  {path.stat().st_size / 1e3:.1f} kB, {entries} entries")
    if not files:
        print("  (no autotune cache files)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / BENCH_SCRIPTS[args.which]
    if not script.is_file():
        print(f"error: {script} not found: the benchmarks ship with the source checkout only "
              "(git clone the repository and run from there)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashllm-compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ex = sub.add_parser("explain", help="prune a random-weight model, compile it, show what the backend did",
                        description="Build a transformers model from a config (random weights, no download), "
                        "magnitude-prune its linears, compile it with backend='flashllm' and print every linear: "
                        "rewritten or why not, format, bytes, and on CUDA the autotuned kernel per M bucket.")
    ex.add_argument("--arch", choices=ARCHS, default="llama", help="model architecture (default: llama)")
    ex.add_argument("--config-size", choices=CONFIG_SIZES, default="tiny",
                    help="test: hidden 64, 1 layer; tiny: hidden 256, 2 layers; 1b / 7b: real sizes (default: tiny)")
    ex.add_argument("--sparsity", type=float, default=0.8, help="fraction of each linear to prune (default: 0.8)")
    ex.add_argument("--min-sparsity", type=float, default=None, help="backend option min_sparsity")
    ex.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    ex.add_argument("--batch", type=int, default=1, help="batch size of the example input (default: 1)")
    ex.add_argument("--tokens", type=int, default=16, help="tokens per sequence of the example input (default: 16)")
    ex.add_argument("--source", action="store_true", help="also print the Triton source (and PTX if compiled)")
    ex.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    ex.set_defaults(func=cmd_explain)

    for name, func, text in (("cache-clear", cmd_cache_clear, "delete the autotune cache files"),
                             ("cache-info", cmd_cache_info, "show the autotune cache directory and its files")):
        p = sub.add_parser(name, help=text, description=text.capitalize() + ".")
        p.add_argument("--cache-dir", metavar="DIR", default=None,
                       help="default: $FLASHLLM_CACHE_DIR or ~/.cache/flashllm_compile")
        p.set_defaults(func=func)

    bench = sub.add_parser("bench", help="run benchmarks/bench_kernels.py or bench_e2e.py (source checkout)",
                           description="Run a benchmark script of the source checkout; remaining arguments are "
                           "passed to it (e.g. `flashllm-compile bench e2e --help`).")
    bench.add_argument("which", choices=BENCH_SCRIPTS, help="kernels: bench_kernels.py, e2e: bench_e2e.py")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m flashllm_compile` and the `flashllm-compile` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
