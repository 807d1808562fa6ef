"""Launch every kernel family and tile config on real and odd shapes, check each result, and do it again under
NVIDIA compute-sanitizer (memcheck, racecheck, initcheck).

    python benchmarks/sanitize.py                          # set "full": all configs, LLaMA-7B + odd shapes,
                                                           # M 1,3,8,17,64, fp16 + bf16; checks every result
    python benchmarks/sanitize.py --under-sanitizer        # warm the Triton cache, then re-run itself under
                                                           # compute-sanitizer --tool memcheck|racecheck|initcheck
    python benchmarks/sanitize.py --under-sanitizer --tools memcheck --set sanitize-small
    python benchmarks/sanitize.py --interpret              # tiny set on CPU through TRITON_INTERPRET=1 (smoke test)
    python benchmarks/sanitize.py --dry-run [--under-sanitizer]   # list the cases (and commands); runs nothing
    python benchmarks/sanitize.py --under-sanitizer --families cmma   # the Tiled-CSL kernel (on its own: the
                                                           # sanitizer's kernel filter takes one name)
    python benchmarks/sanitize.py --under-sanitizer --families cmma --configs jump --m 3   # a subset that fits
                                                           # one device command (racecheck of every cmma config
                                                           # does not)

Per case (shape, chunk width, dtype, M, tile config): the launcher's output against the fp32 dense reference on
the same pruned weight, element by element (bound: output rounding + fp32 accumulation), and no NaN.  Without a
sanitizer, outputs are poisoned (torch.empty fills NaN), so an unwritten element fails the check.  Under
initcheck they are not (the poison would hide uninitialised reads), and under every tool the caching allocator
is off (PYTORCH_NO_CUDA_MEMORY_CACHING=1), so each tensor is its own allocation and an out-of-bounds access
cannot land silently in a neighbour inside a cached block; weights and references are built on the CPU, so the
sanitizer checks (with --kernel-name kns=_bitmap where supported) only our kernels.  A summary table (tool,
cases, mismatches, sanitizer errors, exit code, seconds) is printed last and written to $OUT or benchmarks/out.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import zlib

if "--interpret" in sys.argv:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import gpu_info

from flashllm_compile.codegen.autotune import LAUNCHERS, candidate_configs
from flashllm_compile.codegen.formats.bitmap import BitmapWeight
from flashllm_compile.codegen.formats.csl import CslWeight
from flashllm_compile.codegen.kernels.csl_mma import get_csl_mma_configs

TOOLS = ("memcheck", "racecheck", "initcheck")
LLAMA_7B = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)}
ODD = {"odd_4097x4095": (4097, 4095), "odd_4095x4097": (4095, 4097), "odd_257x11": (257, 11),
       "odd_11x2560": (11, 2560), "vocab_50257x1025": (50257, 1025)}
# set -> (shapes {name: (N, K)}, chunk widths, M values, dtypes, configs: "all" or "family" (a few per family))
CASE_SETS = {
    "full": ({**LLAMA_7B, **ODD}, (128, 64), (1, 3, 8, 17, 64), ("float16", "bfloat16"), "all"),
    "sanitize": ({"o": LLAMA_7B["o"], "odd_4097x4095": (4097, 4095), "odd_257x11": (257, 11)}, (128, 64),
                 (1, 3, 17), ("float16", "bfloat16"), "all"),
    "sanitize-small": ({"odd_1025x1023": (1025, 1023), "odd_257x11": (257, 11)}, (128,), (1, 3, 17),
                       ("float16", "bfloat16"), "all"),
    "tiny": ({"odd_33x70": (33, 70), "odd_17x130": (17, 130)}, (32,), (1, 3, 17), ("float16", "bfloat16"), "family"),
}
TOOL_SET = {"memcheck": "sanitize", "initcheck": "sanitize", "racecheck": "sanitize-small"}
OUT_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}


# ----------------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------------


CSL_FAMILY = "cmma"  # on the Tiled-CSL format; only where asked for (--families), see the module docstring
CSL_CASE_GROUPS = 16  # word registers a lane the configs are offered for: the Tiled-CSL case weights (85%, not
# skewed: a dense row in every 4th would need 24, and two tiles a warp would then not be offered) stay within it


def configs_for(m: int, which: str, families: list[str] | None = None) -> list:
    """Every config of every family for M tokens ("all"), or per family its first config at the smallest and the
    largest split-K ("family": the interpreter's smoke test); `families`: only those (default: the bitmap's)."""
    configs = candidate_configs(m) + (get_csl_mma_configs(m, CSL_CASE_GROUPS) if families and CSL_FAMILY in families else [])
    configs = [c for c in configs if (c.family in families if families else c.family != CSL_FAMILY)]
    if which == "all":
        return configs
    picked = []
    for family in sorted({c.family for c in configs}):
        mine = [c for c in configs if c.family == family]
        picked += [mine[0], max(mine, key=lambda c: c.split_k)]
    return picked


def case_plan(set_name: str, m_values=None, dtypes=None, families=None, config_filter=None) -> list[tuple]:
    """[(shape name, N, K, chunk_k, dtype name, M, config)] of a case set (cmma: fp16 / bf16 only); config_filter:
    only configs whose short name contains it (e.g. "jump", "SK=1")."""
    shapes, chunks, ms, dts, which = CASE_SETS[set_name]
    plan = []
    for name, (n, k) in shapes.items():
        for chunk_k in chunks if name.startswith("odd") else chunks[:1]:  # odd shapes also at a second width
            for dtype in dtypes or dts:
                for m in m_values or ms:
                    plan += [(name, n, k, chunk_k, dtype, m, c) for c in configs_for(m, which, families)
                             if (c.family != CSL_FAMILY or dtype != "float32")
                             and (not config_filter or config_filter in c.short())]
    return plan


def pruned(n: int, k: int, sparsity: float, skewed: bool, device: str, seed: int) -> torch.Tensor:
    """fp32 [N, K]: uniform zeros; `skewed`: also every 4th row empty and every 4th (+1) row fully dense."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device)
    keep = torch.rand(n, k, generator=g, device=device) >= sparsity
    if skewed:
        rows = torch.arange(n, device=device) % 4
        keep = torch.where((rows == 0)[:, None], False, torch.where((rows == 1)[:, None], True, keep))
    return torch.where(w == 0, 1.0, w) * keep


def reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 x @ w^T, sum of |terms|) on x's device; fp32 matmul, never tf32 (torch's default)."""
    xf, wf = x.float(), w.float()
    return torch.nn.functional.linear(xf, wf), torch.nn.functional.linear(xf.abs(), wf.abs())


def bad_elements(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, b: torch.Tensor | None, k: int) -> int:
    """Elements of y outside the rounding bound of the fp32 dense reference (+ bias); NaN counts as bad."""
    if b is not None:
        ref, bound = ref + b.float(), bound + b.float().abs()
    tol = OUT_EPS[y.dtype] * ref.abs() + (k + 2) * 2.0**-23 * bound + 1e-6
    return int((~((y.float().to(ref.device) - ref).abs() <= tol)).sum())


def run_cases(plan: list[tuple], device: str, build_on_cpu: bool, log) -> tuple[int, int]:
    """Launch every case of `plan`; returns (cases, mismatching cases).  One weight and input per (shape, chunk,
    dtype, M); bias on every other config (both HAS_BIAS variants of each family)."""
    cases = mismatches = 0
    weights: dict[tuple, tuple] = {}
    inputs: dict[tuple, tuple] = {}
    make_on = "cpu" if build_on_cpu else device
    for index, (name, n, k, chunk_k, dtype_name, m, config) in enumerate(plan):
        dtype = getattr(torch, dtype_name)
        csl = config.family == CSL_FAMILY
        key = (name, chunk_k, dtype_name, csl)
        if key not in weights:
            weights.clear()  # one weight alive at a time (LLaMA shapes, no caching allocator under the sanitizer)
            inputs.clear()
            odd = name.startswith("odd")
            # the Tiled-CSL cases: 85%, uniform (CSL_CASE_GROUPS); the bitmap's odd shapes: 50%, skewed
            sparsity = 0.85 if csl else 0.5 if odd else 0.8
            w = pruned(n, k, sparsity, odd and not csl, make_on, zlib.crc32(name.encode())).to(dtype)
            bias = torch.randn(n, device=make_on).to(dtype)
            if csl:
                fmt = CslWeight.from_dense(w)
                if fmt.max_groups > CSL_CASE_GROUPS:
                    raise RuntimeError(f"{name}: the Tiled-CSL case weight needs {fmt.max_groups} word registers, "
                                       f"the configs are offered for {CSL_CASE_GROUPS}")
                fmt = CslWeight(*(t.to(device) for t in fmt.parts().values()), fmt.n, fmt.k, fmt.max_groups)
            else:
                fmt = BitmapWeight.from_dense(w, chunk_k)
                fmt = BitmapWeight(*(t.to(device) for t in fmt.tensors()), fmt.n, fmt.k, fmt.chunk_k)
            weights[key] = (w, fmt, bias, bias.to(device))
        w, fmt, bias_ref, bias = weights[key]
        if (key, m) not in inputs:
            x_ref = torch.randn(m, k, device=make_on).to(dtype)
            inputs[(key, m)] = (x_ref, x_ref.to(device), *reference(x_ref, w))
        x_ref, x, ref, bound = inputs[(key, m)]
        with_bias = index % 2 == 0
        y = LAUNCHERS[config.family](x, fmt, bias if with_bias else None, config)
        bad = bad_elements(y, ref, bound, bias_ref if with_bias else None, k)
        cases += 1
        mismatches += bad > 0
        line = f"{name} ck{chunk_k} {dtype_name} M={m} {config.short()} bias={int(with_bias)}: " + (
            "ok" if bad == 0 else f"{bad} WRONG elements")
        print(line, file=log, flush=True)
        if bad:
            print(line, file=sys.stderr, flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return cases, mismatches


# ----------------------------------------------------------------------------------------------------------------
# compute-sanitizer wrapper
# ----------------------------------------------------------------------------------------------------------------


def child_command(set_name: str, args, tool: str | None = None) -> list[str]:
    child = [sys.executable, os.path.abspath(__file__), "--child", "--set", set_name, "--out", args.out]
    if tool:
        child += ["--tool", tool]
    if args.m:
        child += ["--m", *map(str, args.m)]
    if args.dtypes:
        child += ["--dtypes", *args.dtypes]
    if args.families:
        child += ["--families", *args.families]
    if args.configs:
        child += ["--configs", args.configs]
    return child


def sanitizer_command(tool: str, exe: str, set_name: str, args, supports_kernel_filter: bool) -> list[str]:
    cmd = [exe, "--tool", tool, "--error-exitcode", "1", "--print-limit", "50"]
    # only our Triton kernels where one name filter covers them (_bitmap_<family>_kernel, or _csl_mma_kernel alone;
    # the filter takes one substring, so cmma next to bitmap families runs unfiltered); initcheck also watches the
    # split-K epilogue kernel, which is what reads the fp32 partials a kernel might have left unwritten
    families = args.families or []
    if supports_kernel_filter and not args.all_kernels and tool != "initcheck":
        if families == [CSL_FAMILY]:
            cmd += ["--kernel-name", "kns=_csl_mma"]
        elif CSL_FAMILY not in families:
            cmd += ["--kernel-name", "kns=_bitmap"]
    if tool == "racecheck":
        cmd += ["--racecheck-report", "all"]
    return cmd + child_command(set_name, args, tool)


def parse_errors(tool: str, output: str) -> int | None:
    """Error count from compute-sanitizer's summary line (None when there is none, e.g. it crashed)."""
    if tool == "racecheck":
        found = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", output)
        if found:
            return sum(int(e) for e, _ in found)
    found = re.findall(r"ERROR SUMMARY: (\d+) errors?", output)
    return sum(int(e) for e in found) if found else None


def under_sanitizer(args) -> int:
    exe = shutil.which(args.sanitizer) or args.sanitizer
    help_text = "--kernel-name (assumed in a dry run)"
    if not args.dry_run:
        if shutil.which(exe) is None and not os.path.exists(exe):
            print(f"compute-sanitizer not found ({args.sanitizer}); pass --sanitizer /usr/local/cuda/bin/...")
            return 2
        help_text = subprocess.run([exe, "--help"], check=False, capture_output=True, text=True).stdout
    rows, warmed = [], set()
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    env.pop("TRITON_INTERPRET", None)
    for tool in args.tools:
        set_name = args.set or TOOL_SET[tool]
        n_cases = len(case_plan(set_name, args.m, args.dtypes, args.families, args.configs))
        cmd = sanitizer_command(tool, exe, set_name, args, "--kernel-name" in help_text)
        print(" ".join(cmd), flush=True)
        if args.dry_run:
            rows.append((tool, n_cases, "-", "-", "-", 0.0))
            continue
        if set_name not in warmed:
            # the same cases without a sanitizer first: JIT-compiles every kernel into Triton's cache (the
            # sanitizer run then only loads them) and checks the results with poisoned outputs
            warmed.add(set_name)
            start = time.time()
            warm = subprocess.run(child_command(set_name, args), check=False, capture_output=True, text=True)
            warm_mismatch = re.findall(r"CASES (\d+) MISMATCHES (\d+)", warm.stdout)
            rows.append((f"(no tool) {set_name}", n_cases, warm_mismatch[-1][1] if warm_mismatch else "?", "-",
                         warm.returncode, time.time() - start))
        start = time.time()
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=args.timeout)
            output, returncode = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            output, returncode = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {args.timeout} s", "timeout"
            output = output if isinstance(output, str) else str(output)
        with open(os.path.join(args.out, f"sanitize_{tool}.log"), "w") as f:
            f.write(" ".join(cmd) + "\n" + output)
        errors = parse_errors(tool, output)
        mismatch = re.findall(r"CASES (\d+) MISMATCHES (\d+)", output)
        rows.append((tool, int(mismatch[-1][0]) if mismatch else n_cases, mismatch[-1][1] if mismatch else "?",
                     "?" if errors is None else errors, returncode, time.time() - start))
    table = summary_table(rows)
    print(table)
    if not args.dry_run:
        with open(os.path.join(args.out, "sanitize_summary.txt"), "w") as f:
            f.write(f"{gpu_info()}\n{table}\n")
    failed = [r for r in rows if r[4] not in (0, "-") or r[2] not in (0, "0", "-") or r[3] not in (0, "-")]
    return 1 if failed else 0


def summary_table(rows) -> str:
    lines = [f"{'tool':<26} {'cases':>6} {'mismatches':>10} {'errors':>7} {'exit':>7} {'seconds':>8}"]
    for tool, cases, mismatches, errors, code, seconds in rows:
        lines.append(f"{tool:<26} {cases:>6} {mismatches!s:>10} {errors!s:>7} {code!s:>7} {seconds:8.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(CASE_SETS), default=None,
                        help="case set (default: full; under the sanitizer per tool: memcheck/initcheck 'sanitize', "
                             "racecheck 'sanitize-small'; with --interpret 'tiny')")
    parser.add_argument("--m", nargs="+", type=int, default=None, help="token counts (default: the set's)")
    parser.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16", "float32"], default=None)
    parser.add_argument("--families", nargs="+", default=None,
                        help="only these kernel families (default: the bitmap's; cmma, the Tiled-CSL one, runs only "
                             "when named: the sanitizer's kernel filter takes one name)")
    parser.add_argument("--configs", default=None, help="only tile configs whose short name contains this")
    parser.add_argument("--under-sanitizer", action="store_true", help="re-run under compute-sanitizer, per tool")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--sanitizer", default=os.environ.get("COMPUTE_SANITIZER", "compute-sanitizer"))
    parser.add_argument("--all-kernels", action="store_true", help="sanitize torch's kernels too (slower)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per sanitizer run")
    parser.add_argument("--interpret", action="store_true", help="CPU, TRITON_INTERPRET=1, set 'tiny' by default")
    parser.add_argument("--dry-run", action="store_true", help="list cases / commands only")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one run of the cases
    parser.add_argument("--tool", default=None, help=argparse.SUPPRESS)  # the sanitizer tool around this child
    args = parser.parse_args()

    if args.under_sanitizer:
        return under_sanitizer(args)
    set_name = args.set or ("tiny" if args.interpret else "full")
    plan = case_plan(set_name, args.m, args.dtypes, args.families, args.configs)
    if args.dry_run:
        families = sorted({c.family for *_, c in plan})
        print(f"set {set_name}: {len(plan)} cases; families {families}; "
              f"shapes {sorted({(name, n, k) for name, n, k, *_ in plan})}")
        for case in plan[:5]:
            print("  ", case[:6], case[6].short())
        return 0
    device = "cpu" if args.interpret else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: use --interpret (CPU, Triton interpreter) or --dry-run")
        return 2
    poison = args.tool != "initcheck"  # initcheck must see the kernels' own (un)initialised reads
    torch.use_deterministic_algorithms(poison, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = poison
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    log_name = f"sanitize_cases_{args.tool or ('interpret' if args.interpret else 'plain')}.log"
    with open(os.path.join(args.out, log_name), "w") as log:
        print(gpu_info(), file=log)
        cases, mismatches = run_cases(plan, device, build_on_cpu=args.tool is not None or args.interpret, log=log)
    print(f"CASES {cases} MISMATCHES {mismatches}  ({set_name}, {time.time() - start:.1f} s, log {log_name})")
    if not args.child:
        print(summary_table([(args.tool or ("interpret" if args.interpret else "plain"), cases, mismatches, "-",
                              int(mismatches > 0), time.time() - start)]))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
