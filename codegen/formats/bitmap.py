"""Bitmap format: one bit per weight element plus the nonzero values, row-major, with per-chunk row offsets.

Layout of a weight W: [N, K] (N output features, K input features), with K cut into C chunks of
CHUNK_K columns (K padded with zero columns up to a multiple of CHUNK_K), KW = C * CHUNK_K / 32 words a row:

    bitmap  int32 [N, KW]      bit j of word w of row n <=> W[n, 32*w + j] != 0
    offsets int32 [C + 1, N]   offsets[c, n] = index in `values` of the run of row n's nonzeros in chunk c
                               (offsets[C, n] = the end of row n's values: of its row block when tile-major)
    values  dtype [nnz]        the nonzeros, each (row, chunk) run in column order, the runs in one of two orders
                               (`tile_rows`); `from_dense` leaves VALUES_TAIL zero elements allocated after them (a
                               view of a longer buffer), so 16-byte copies may overrun it

The two orders of the runs:
  row-major (tile_rows = 0)   (row, chunk): a bit-walking kernel lane (the row walk) follows one row through a long
                              run of K with no jumps (next word = next address, next value = next address), which
                              keeps its loop short and its work balanced.
  tile-major (TILE_ROWS = 16) (block of 16 rows, chunk, row): the runs of one fmma warp's 16 rows in one chunk are
                              one contiguous segment, which the warp stages with full 512-byte copies instead of 16
                              separate runs (H100: 1.14x faster at 50-60%, benchmarks/RESULTS.md idea 51).
Tile kernels find each run through offsets[c, n] and work with either order; the row walk needs row-major.
Bytes per weight element: 1/8 (bitmap) + 4/CHUNK_K (offsets) + 2*density (fp16/bf16 values), e.g. 0.53 B at 80%
sparsity against 2 B dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WORD_BITS = 32
DEFAULT_CHUNK_K = 128
VALUES_TAIL = 8  # zero elements allocated after the values: the fmma kernel's 16-byte copies need no bounds checks
TILE_ROWS = 16  # rows of a tile-major block: one fmma warp's rows
ROW_WALK_MIN_SPARSITY = 0.75  # the row walk, which needs row-major values, won only from 80% sparsity (RESULTS.md);
# below, where fmma runs, the compiler stores the values tile-major (`compiler_tile_rows`)
OP_PARAM_TILE = 1 << 16  # op_param = chunk_k + tile_rows * OP_PARAM_TILE
COMPILER_ORDER = None  # from_dense's `tile_rows` for the order the compiler picks (`compiler_tile_rows`), from the
# count of nonzeros it makes anyway


def compiler_tile_rows(zeros: int, numel: int) -> int:
    """The values order the compiler stores a weight with `zeros` of its `numel` elements zero in: tile-major below
    ROW_WALK_MIN_SPARSITY, where the row walk never wins and fmma's staging is faster on it; row-major above, where
    the row walk competes."""
    return TILE_ROWS if zeros < ROW_WALK_MIN_SPARSITY * numel else 0


def values_slack_bytes(values: torch.Tensor) -> int:
    """Bytes of the values' storage after their last element (kernels that copy 16-byte blocks check this)."""
    return values.untyped_storage().nbytes() - (values.storage_offset() + values.numel()) * values.element_size()


@dataclass(frozen=True)
class BitmapWeight:
    """A compressed [N, K] weight. Tensors live on the weight's device; `n`, `k`, `chunk_k` are static."""

    bitmap: torch.Tensor  # int32 [N, KW], KW = C * CHUNK_K // 32
    offsets: torch.Tensor  # int32 [C + 1, N]
    values: torch.Tensor  # dtype [nnz]
    n: int
    k: int
    chunk_k: int
    tile_rows: int = 0  # the runs' order: 0 row-major, TILE_ROWS tile-major (module docstring)

    LAYOUT = "bitmap"  # sparse_linear's `layout` argument

    @property
    def num_chunks(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def op_param(self) -> int:
        """sparse_linear's integer format argument: chunk_k and the values order (`from_op_param`)."""
        return self.chunk_k + self.tile_rows * OP_PARAM_TILE

    @classmethod
    def from_op_param(cls, bitmap: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, n: int, k: int,
                      param: int) -> BitmapWeight:
        """The format an op call carries: its three tensors and its integer format argument (`op_param`)."""
        return cls(bitmap, offsets, values, n, k, param % OP_PARAM_TILE, param // OP_PARAM_TILE)

    def parts(self) -> dict[str, torch.Tensor]:
        """The op's three tensor operands, by buffer name."""
        return {"bitmap": self.bitmap, "offsets": self.offsets, "values": self.values}

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bitmap, self.offsets, self.values))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.bitmap, self.offsets, self.values

    @classmethod
    def from_dense(cls, weight: torch.Tensor, chunk_k: int = DEFAULT_CHUNK_K,
                   tile_rows: int | None = 0) -> BitmapWeight:
        """Compress a dense [N, K] weight, its values in the order `tile_rows` (0, TILE_ROWS, or COMPILER_ORDER:
        `compiler_tile_rows`' pick); vectorised on the weight's device, exact (NaN/Inf kept)."""
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
        if chunk_k % WORD_BITS or chunk_k <= 0:
            raise ValueError(f"chunk_k must be a positive multiple of {WORD_BITS}, got {chunk_k}")
        if not weight.dtype.is_floating_point:
            raise ValueError(f"expected a floating-point weight, got {weight.dtype}")
        if tile_rows not in (0, TILE_ROWS, COMPILER_ORDER):
            raise ValueError(f"tile_rows must be 0 (row-major), {TILE_ROWS} (tile-major) or COMPILER_ORDER (the "
                             f"compiler's pick), got {tile_rows}")
        w = weight.detach()
        n, k = w.shape
        num_chunks = max(1, -(-k // chunk_k))
        w = torch.nn.functional.pad(w, (0, num_chunks * chunk_k - k))  # [N, C*CK]
        mask = w != 0
        nonzeros = w[mask]  # boolean indexing yields (row, column) order
        counts = mask.view(n, num_chunks, chunk_k).sum(dim=2, dtype=torch.int32)  # [N, C]
        if tile_rows is COMPILER_ORDER:
            tile_rows = compiler_tile_rows(n * k - nonzeros.numel(), n * k)
        if tile_rows:
            starts, row_ends = _tile_major_starts(counts, tile_rows)
            dest = torch.arange(nonzeros.numel(), device=w.device) + _run_shift(mask, counts, starts, chunk_k)
            values = nonzeros.new_zeros(nonzeros.numel() + VALUES_TAIL)
            values[dest] = nonzeros
            values = values[: nonzeros.numel()]
            offsets = torch.cat([starts.t(), row_ends[None]]).contiguous()  # [C+1, N]
        else:
            values = torch.cat([nonzeros, nonzeros.new_zeros(VALUES_TAIL)])[: nonzeros.numel()]
            ends = counts.flatten().cumsum(0, dtype=torch.int32).view(n, num_chunks)  # end of (row, chunk)
            offsets = torch.cat([(ends - counts).t(), ends[:, -1:].t()]).contiguous()  # [C+1, N]

        bits = mask.view(n, -1, WORD_BITS).to(torch.int64)
        weights = torch.ones(WORD_BITS, dtype=torch.int64, device=w.device) << torch.arange(WORD_BITS, device=w.device)
        words = (bits * weights).sum(dim=-1)  # [N, KW], values in [0, 2**32)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return cls(words.contiguous(), offsets, values, n, k, chunk_k, tile_rows)

    def to_dense(self) -> torch.Tensor:
        """Exact inverse of `from_dense`: returns the [N, K] weight."""
        device = self.bitmap.device
        shifts = torch.arange(WORD_BITS, device=device, dtype=torch.int32)
        mask = ((self.bitmap.unsqueeze(-1) >> shifts) & 1).bool().view(self.n, -1)  # [N, C*CK]
        dense = torch.zeros(mask.shape, dtype=self.dtype, device=device)
        if self.tile_rows:  # the values in row-major order: each nonzero's run moved back
            counts = mask.view(self.n, self.num_chunks, self.chunk_k).sum(dim=2, dtype=torch.int32)
            starts = self.offsets[:-1].t().to(torch.int64)
            dense[mask] = self.values[torch.arange(self.nnz, device=device)
                                      + _run_shift(mask, counts, starts, self.chunk_k)]
        else:
            dense[mask] = self.values
        return dense[:, : self.k].contiguous()


def _tile_major_starts(counts: torch.Tensor, tile_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts: [N, C] nonzeros of each (row, chunk) -> (int32 [N, C] start of each run in the tile-major order,
    int32 [N] end of each row's block)."""
    n, c = counts.shape
    blocks = -(-n // tile_rows)
    padded = counts.new_zeros(blocks * tile_rows, c)
    padded[:n] = counts
    order = padded.view(blocks, tile_rows, c).permute(0, 2, 1).reshape(-1).to(torch.int64)  # (block, chunk, row)
    starts = (order.cumsum(0) - order).view(blocks, c, tile_rows).permute(0, 2, 1).reshape(-1, c)[:n]
    block_ends = order.view(blocks, -1).sum(1).cumsum(0)
    return starts.to(torch.int32), block_ends.repeat_interleave(tile_rows)[:n].to(torch.int32)


def _run_shift(mask: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor, chunk_k: int) -> torch.Tensor:
    """int64 [nnz], for each nonzero in row-major order: its index in the order whose runs start at `starts`
    ([N, C]) minus its row-major index (mask: [N, C * chunk_k], counts: [N, C])."""
    n, c = counts.shape
    row_major = (counts.flatten().to(torch.int64).cumsum(0) - counts.flatten()).view(n, c)
    shift = starts.to(torch.int64) - row_major  # [N, C]
    return shift[:, :, None].expand(n, c, chunk_k)[mask.view(n, c, chunk_k)]
