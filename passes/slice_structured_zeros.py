"""Structured zeros (SliceGPT's observation): all-zero rows and columns of a weight need no compute.

For a weight W [N, K] chosen for rewriting (fused siblings: their row-concatenation) with all-zero output rows
and/or all-zero input columns, keep rows = its nonzero rows (N' of N) and cols = its nonzero columns (K' of K):

    y[..., N] = x[..., K] @ W^T + b
    y'        = sparse_linear(x, compress(W[rows][:, cols]), in_cols=cols, out_rows=rows)   [..., N']
                (the op's kernels read x[..., cols]; its dense fallback runs the full W in place and keeps rows)
    y         = where(row_keep, y'[..., row_pos], 0) + b                   [..., N]    row_pos[n] = index of n
                                                                                        in rows (0 if all-zero)
Exact for finite inputs: the dropped terms are x * 0.  Rows (columns) are sliced only when at least
MIN_SLICE_FRACTION of them are all-zero, so that the gather of x and the scatter of y pay off.  The analysis and
the compressed slice are cached per set of parameters (identities + versions).

Propagated to the next layer (passes/propagate_structured_zeros.py): input features that are exact zeros because
an upstream linear's zero rows make them so (through silu, relu, `* up`, ...) count as zero columns here
(`zero_inputs`), where the weight column is finite: it only ever multiplies exact zeros.  A row whose nonzeros
all sit in such columns is then an all-zero row.  Exact for finite activations, as above (0 * Inf = NaN in
dense math, a dropped term here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from flashllm_compile.codegen.formats.bitmap import COMPILER_ORDER, BitmapWeight
from flashllm_compile.codegen.formats.cache import STATS, derive_once
from flashllm_compile.passes.fx_meta import call_with_meta

MIN_SLICE_FRACTION = 1 / 64  # slice rows (columns) only when at least this fraction of them is all-zero


@dataclass(frozen=True)
class StructuredSlice:
    """The compressed nonzero block of a weight [N, K] and where it sits in the full weight."""

    fmt: BitmapWeight  # W[rows][:, cols]: [N', K']
    n: int  # N of the full weight
    k: int  # K of the full weight
    rows: torch.Tensor | None  # int64 [N'] kept rows (None: all N)
    row_pos: torch.Tensor | None  # int64 [N]: position of row n in the sliced output (0 for an all-zero row)
    row_keep: torch.Tensor | None  # bool [N]: row n is not all-zero
    cols: torch.Tensor | None  # int64 [K'] kept columns (None: all K)
    propagated_cols: int = 0  # dropped columns that are not all-zero in W: their inputs are exact zeros

    @property
    def zero_rows(self) -> int:
        return self.n - self.fmt.n

    @property
    def zero_cols(self) -> int:
        return self.k - self.fmt.k


def _kept(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the True entries of a keep-mask [L], or None when too few are False to be worth slicing."""
    dropped = mask.numel() - int(mask.sum())
    if dropped == 0 or dropped < MIN_SLICE_FRACTION * mask.numel():
        return None
    return mask.nonzero().flatten()


def dropped_inputs(w: torch.Tensor, zero_inputs: torch.Tensor) -> torch.Tensor:
    """bool [K]: the columns of w [N, K] that may be dropped because their input features are exact zeros
    (`zero_inputs`, bool [K]): those whose weight column is finite (NaN * 0 and Inf * 0 are NaN)."""
    return zero_inputs.to(w.device) & torch.isfinite(w).all(0)


def structured_slice(weights: Sequence[torch.Tensor], chunk_k: int, transposed: bool = False,
                     zero_inputs: torch.Tensor | None = None) -> StructuredSlice | None:
    """The sliced, compressed row-concatenation of `weights` (each [N_i, K]; [K, N_i] when `transposed`), or None
    when it has too few all-zero rows and columns (or no nonzero at all).  zero_inputs: bool [K], input features
    known to be exact zeros (passes/propagate_structured_zeros.py), whose finite columns count as all-zero.
    Cached per set of parameters (and zero_inputs)."""
    tag = ("slice", chunk_k, transposed)
    if zero_inputs is not None and not zero_inputs.any():
        zero_inputs = None
    if zero_inputs is not None:
        tag += (tuple(zero_inputs.nonzero().flatten().tolist()),)

    def build() -> StructuredSlice | None:
        with torch.no_grad():
            w = [t.t() if transposed else t for t in weights]
            w = torch.cat(w) if len(w) > 1 else w[0]  # [N, K]
            nonzero = w != 0  # NaN counts as nonzero
            propagated = 0
            if zero_inputs is not None:  # used only where it lets columns be sliced
                dropped = dropped_inputs(w, zero_inputs) & nonzero.any(0)  # [K] nonzero columns meeting zeros
                if dropped.any() and _kept(nonzero.any(0) & ~dropped) is not None:
                    nonzero, propagated = nonzero & ~dropped, int(dropped.sum())
            rows, cols = _kept(nonzero.any(1)), _kept(nonzero.any(0))
            if (rows is None and cols is None) or not nonzero.any():
                return None
            row_pos = row_keep = None
            if rows is not None:
                w = w[rows]  # [N', K]
                row_keep = nonzero.any(1)
                row_pos = torch.zeros(nonzero.shape[0], dtype=torch.int64, device=w.device)
                row_pos[rows] = torch.arange(rows.numel(), device=w.device)
            if cols is not None:
                w = w[:, cols]  # [N', K']
            fmt = BitmapWeight.from_dense(w, chunk_k, COMPILER_ORDER)
        STATS["compressions"] += 1
        return StructuredSlice(fmt, *nonzero.shape, rows, row_pos, row_keep, cols, propagated)

    return derive_once(weights, tag, build)


def scatter_rows(graph: fx.Graph, y: fx.Node, row_pos: fx.Node, row_keep: fx.Node, bias: fx.Node | None) -> fx.Node:
    """y' [..., N'] -> y [..., N]: the op's rows in place, zeros for all-zero rows, then + bias [N] (one pointwise
    kernel after Inductor's fusion; no padding op, which would specialise a symbolic M)."""
    gathered = call_with_meta(graph, torch.index_select, y, -1, row_pos)  # [..., N]
    out = call_with_meta(graph, torch.where, row_keep, gathered, 0.0)  # exact zeros (no 0 * y)
    return out if bias is None else call_with_meta(graph, torch.add, out, bias)
