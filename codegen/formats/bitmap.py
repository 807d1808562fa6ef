"""Bitmap format: one bit per weight element plus the nonzero values, row-major, with per-chunk row offsets.

Layout of a weight W: [N, K] (N output features, K input features), with K cut into C chunks of
CHUNK_K columns (K padded with zero columns up to a multiple of CHUNK_K), KW = C * CHUNK_K / 32 words a row:

    bitmap  int32 [N, KW]      bit j of word w of row n <=> W[n, 32*w + j] != 0
    offsets int32 [C + 1, N]   offsets[c, n] = index in `values` of row n's first nonzero at column >= c*CHUNK_K
                               (offsets[C, n] = the end of row n)
    values  dtype [nnz]        the nonzeros, in (row, column) order; `from_dense` leaves VALUES_TAIL zero elements
                               allocated after them (a view of a longer buffer), so 16-byte copies may overrun it

Why row-major: a bit-walking kernel lane follows one row through a long run of K with no jumps (next word
= next address, next value = next address), which keeps its loop short and its work balanced.  The chunk
offsets still give a tile kernel [BLOCK_N rows, one chunk] the start of each row's contiguous run of values
in that chunk.  Bytes per weight element: 1/8 (bitmap) + 4/CHUNK_K (offsets) + 2*density (fp16/bf16
values), e.g. 0.53 B at 80% sparsity against 2 B dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WORD_BITS = 32
DEFAULT_CHUNK_K = 128
VALUES_TAIL = 8  # zero elements allocated after the values: the fmma kernel's 16-byte copies need no bounds checks


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

    LAYOUT = "bitmap"  # sparse_linear's `layout` argument

    @property
    def num_chunks(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def op_param(self) -> int:
        """sparse_linear's integer format argument: chunk_k."""
        return self.chunk_k

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
    def from_dense(cls, weight: torch.Tensor, chunk_k: int = DEFAULT_CHUNK_K) -> BitmapWeight:
        """Compress a dense [N, K] weight; vectorised on the weight's device, exact (NaN/Inf kept)."""
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
        if chunk_k % WORD_BITS or chunk_k <= 0:
            raise ValueError(f"chunk_k must be a positive multiple of {WORD_BITS}, got {chunk_k}")
        if not weight.dtype.is_floating_point:
            raise ValueError(f"expected a floating-point weight, got {weight.dtype}")
        w = weight.detach()
        n, k = w.shape
        num_chunks = max(1, -(-k // chunk_k))
        w = torch.nn.functional.pad(w, (0, num_chunks * chunk_k - k))  # [N, C*CK]
        mask = w != 0
        nonzeros = w[mask]  # boolean indexing yields (row, column) order
        values = torch.cat([nonzeros, nonzeros.new_zeros(VALUES_TAIL)])[: nonzeros.numel()]

        counts = mask.view(n, num_chunks, chunk_k).sum(dim=2, dtype=torch.int32)  # [N, C]
        ends = counts.flatten().cumsum(0, dtype=torch.int32).view(n, num_chunks)  # end of (row, chunk)
        offsets = torch.cat([(ends - counts).t(), ends[:, -1:].t()]).contiguous()  # [C+1, N]

        bits = mask.view(n, -1, WORD_BITS).to(torch.int64)
        weights = torch.ones(WORD_BITS, dtype=torch.int64, device=w.device) << torch.arange(WORD_BITS, device=w.device)
        words = (bits * weights).sum(dim=-1)  # [N, KW], values in [0, 2**32)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return cls(words.contiguous(), offsets, values, n, k, chunk_k)

    def to_dense(self) -> torch.Tensor:
        """Exact inverse of `from_dense`: returns the [N, K] weight."""
        device = self.bitmap.device
        shifts = torch.arange(WORD_BITS, device=device, dtype=torch.int32)
        mask = ((self.bitmap.unsqueeze(-1) >> shifts) & 1).bool().view(self.n, -1)  # [N, C*CK]
        dense = torch.zeros(mask.shape, dtype=self.dtype, device=device)
        dense[mask] = self.values
        return dense[:, : self.k].contiguous()
