"""The best speedup over cuBLAS that any sparse kernel can reach on a shape, measured: cuBLAS's time / the time to
stream the format's bytes and nothing else, both timed as in a decode step (each call after the kernel that writes
x, as bench_kernels.py times ours).

    python benchmarks/ceiling.py                                   # LLaMA-7B, M 1..64, sparsity 50..90%
    python benchmarks/ceiling.py --models llama7b llama70b opt66b

Why: issue 4's targets were set against the ratio of bytes (dense 2 bytes an element over the bitmap's 1 bit + 2
bytes a nonzero: 1.78 / 2.76 / 3.81 / 6.15x at 50 / 70 / 80 / 90%), but a GPU streams fewer bytes at a lower rate
(read_floor.py), and cuBLAS itself does not stream at its read floor.  The ceiling here is what a kernel whose decode,
MMAs and stores cost nothing would measure.  Per format:
  bitmap    the product's bitmap format (codegen/formats/bitmap.py) as built, offsets included;
  csl       Tiled-CSL (codegen/formats/csl.py), 4 bytes a nonzero, which the product runs from 65% sparsity;
  entropy   no format can be smaller without losing information: the values (2 bytes a nonzero) plus H(density) bits
            an element for the positions (random unstructured sparsity), with no offsets or padding.
The floor of a byte count is the fastest of a few read-only streaming kernels (tile sizes, warps, programmatic
dependent launch on or off), each call after the same x-writing kernel, timed on a grid of byte counts and
interpolated (FloorCurve).  Also: the read floor of the dense weight's bytes over cuBLAS's time (how close the
vendor's kernel, with no decode at all, comes to its floor; H100: 84-87%, benchmarks/RESULTS.md, twenty-second
session).  Writes ceiling.csv and floor_curve.csv under --out and prints, per sparsity, the geo-mean ceilings over
shapes x M next to the targets.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import SHAPES, TARGETS, geo
from read_floor import _sum_tiles, rotated_buffers
from timing import ROTATIONS, csl_copies, gpu_info, graph_time_us, input_writer, pruned, write_csv

from flashllm_compile.codegen.formats.bitmap import COMPILER_ORDER, BitmapWeight

READERS = [(block, warps, pdl) for block in (2048, 8192) for warps in (4, 8) for pdl in (False, True)]


def stream_floor_us(nbytes: int) -> tuple[float, tuple]:
    """(us, reader) of the fastest reader (READERS: block, warps, pdl) of `nbytes` (rotated copies, so from HBM),
    each call after a kernel that writes a decode step's x."""
    bufs = rotated_buffers(nbytes)
    out = torch.empty(triton.cdiv(bufs[0].numel(), min(b for b, _, _ in READERS)), dtype=torch.int32, device="cuda")
    writer = input_writer(torch.randn(1, 4096, device="cuda", dtype=torch.float16))
    best = min((graph_time_us(_reader_calls(bufs, out, *reader), before=writer), reader) for reader in READERS)
    del bufs
    torch.cuda.empty_cache()
    return best


class FloorCurve:
    """stream_floor_us on a geometric grid of byte counts (POINTS_PER_OCTAVE a doubling), read between its points
    by log-log interpolation: the floor is smooth in the byte count, and timing every count a table needs (each M
    adds its x and output bytes) would take ~50x longer."""

    POINTS_PER_OCTAVE = 4

    def __init__(self, lo: int, hi: int):
        octaves = math.ceil(math.log2(hi / lo) * self.POINTS_PER_OCTAVE) + 1
        self.sizes = [int(lo * 2 ** (i / self.POINTS_PER_OCTAVE)) for i in range(octaves + 1)]
        self.points = [stream_floor_us(size) for size in self.sizes]

    def __call__(self, nbytes: int) -> float:
        i = max(1, min(len(self.sizes) - 1, next((j for j, s in enumerate(self.sizes) if s >= nbytes), len(self.sizes))))
        (x0, (y0, _)), (x1, (y1, _)) = (self.sizes[i - 1], self.points[i - 1]), (self.sizes[i], self.points[i])
        t = (math.log(nbytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))


def _reader_calls(bufs: list[torch.Tensor], out: torch.Tensor, block: int, warps: int, pdl: bool) -> list:
    """One streaming call (read_floor's kernel) per rotated buffer."""
    grid, options = (triton.cdiv(bufs[0].numel(), block),), {"launch_pdl": True} if pdl else {}
    return [functools.partial(_sum_tiles[grid], b, out, b.numel(), BLOCK=block, PDL=pdl, num_warps=warps, **options)
            for b in bufs]


def cublas_us(weights: list[torch.Tensor], m: int) -> float:
    """F.linear on the rotated weights at M tokens, in a decode step."""
    x = torch.randn(m, weights[0].shape[1], device="cuda", dtype=weights[0].dtype)
    return graph_time_us([functools.partial(torch.nn.functional.linear, x, w) for w in weights], before=input_writer(x))


def entropy_bytes(n: int, k: int, sparsity: float) -> int:
    """Values (2 bytes a nonzero) + H(density) bits an element for the positions of random unstructured zeros."""
    d = 1 - sparsity
    h = -(d * math.log2(d) + sparsity * math.log2(sparsity)) if 0 < d < 1 else 0.0
    return int(n * k * (2 * d + h / 8))


def shape_rows(model: str, layer: str, n: int, k: int, sparsities, ms, floor: FloorCurve) -> list[dict]:
    weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(ROTATIONS)]
    cublas = {m: cublas_us(weights, m) for m in ms}
    dense_bytes = weights[0].nbytes
    del weights
    rows = []
    for s in sparsities:
        w = pruned(n, k, s, torch.float16)
        formats = {"bitmap": BitmapWeight.from_dense(w, tile_rows=COMPILER_ORDER).nbytes,
                   "csl": csl_copies([w])[0].nbytes, "entropy": entropy_bytes(n, k, s)}
        del w
        for m in ms:
            io = 2 * 2 * (m * k + m * n)  # x read, out written (fp16)
            row = {**gpu_info(), "model": model, "layer": layer, "n": n, "k": k, "sparsity": s, "m": m,
                   "cublas_us": cublas[m], "dense_floor_us": floor(dense_bytes + io)}
            row["cublas_of_floor"] = row["dense_floor_us"] / cublas[m]
            for name, nbytes in formats.items():
                us = floor(nbytes + io)
                row.update({f"{name}_bytes": nbytes, f"{name}_floor_us": us,
                            f"{name}_bytes_ratio": dense_bytes / nbytes, f"{name}_ceiling": cublas[m] / us})
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama7b"], choices=SHAPES)
    parser.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ceiling.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    shapes = [(model, layer, n, k) for model in args.models for layer, (n, k) in SHAPES[model].items()]
    floor = FloorCurve(min(entropy_bytes(n, k, max(args.sparsity)) for *_, n, k in shapes),
                       max(2 * n * k + 4 * max(args.m) * (n + k) for *_, n, k in shapes))
    write_csv([{**gpu_info(), "bytes": size, "floor_us": us, "GBps": size / us / 1e3, "reader": reader}
               for size, (us, reader) in zip(floor.sizes, floor.points)], os.path.join(args.out, "floor_curve.csv"))
    print("read floor (decode step):", ", ".join(f"{size / 2**20:.0f} MiB {us:.1f} us {reader}"
                                                 for size, (us, reader) in zip(floor.sizes, floor.points)), flush=True)
    rows = []
    for model, layer, n, k in shapes:
        rows += shape_rows(model, layer, n, k, args.sparsity, args.m, floor)
        print(f"{model}.{layer} {n}x{k} done", flush=True)
        write_csv(rows, os.path.join(args.out, "ceiling.csv"))
    print(f"\n{gpu_info()}, fp16, models {' '.join(args.models)}, M {args.m}")
    print("cuBLAS time over the read floor of the dense bytes (geo-mean over shapes x M): "
          f"{geo(1 / r['cublas_of_floor'] for r in rows):.3f} (it streams at "
          f"{geo(r['cublas_of_floor'] for r in rows):.0%} of its floor); by M: " + ", ".join(
              f"M={m} {geo(r['cublas_of_floor'] for r in rows if r['m'] == m):.0%}" for m in args.m))
    print("geo-mean over shapes x M of cuBLAS time / read floor of each format's bytes (ratio of bytes in brackets)")
    print(f"{'sparsity':>8} {'target':>7} {'bitmap':>14} {'csl':>14} {'entropy':>14}   target / ceiling (bitmap, "
          "entropy)")
    for s in args.sparsity:
        sel = [r for r in rows if r["sparsity"] == s]
        cells = [f"{geo(r[f + '_ceiling'] for r in sel):5.2f} ({geo(r[f + '_bytes_ratio'] for r in sel):5.2f})"
                 for f in ("bitmap", "csl", "entropy")]
        target = TARGETS.get(s)
        share = ", ".join(f"{target / geo(r[f + '_ceiling'] for r in sel):.0%}" for f in ("bitmap", "entropy")) \
            if target else "-"
        print(f"{s:>8.0%} {target or '-':>7} " + " ".join(f"{c:>14}" for c in cells) + f"   {share}")
    for s in args.sparsity:
        print(f"{s:.0%} bitmap ceiling by M: " + ", ".join(
            f"M={m} {geo(r['bitmap_ceiling'] for r in rows if r['sparsity'] == s and r['m'] == m):.2f}"
            for m in args.m))


if __name__ == "__main__":
    main()
