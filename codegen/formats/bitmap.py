"""Chunked bitmap format: one bit per weight element plus the nonzero values, packed chunk-major.

Layout of a weight W: [N, K] (N output features, K input features), with K cut into chunks of
CHUNK_K columns (K padded with zero columns up to a multiple of CHUNK_K):

    bitmap  int32 [C, N, CHUNK_K // 32]   bit j of word w of (chunk c, row n) <=> W[n, c*CHUNK_K + 32*w + j] != 0
    offsets int32 [C * N + 1]             start of (chunk c, row n)'s values in `values`
    values  dtype [nnz]                   the nonzeros, in (chunk, row, column) order

Why chunk-major: a kernel tile [BLOCK_N rows, one chunk] then reads one contiguous run of bitmap words
and one contiguous run of values, so every HBM sector it touches is fully used.  Bytes per weight
element: 1/8 (bitmap) + 4/CHUNK_K (offsets) + 2*density (fp16/bf16 values), e.g. 0.53 B at 80% sparsity
against 2 B dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WORD_BITS = 32
DEFAULT_CHUNK_K = 128


@dataclass(frozen=True)
class BitmapWeight:
    """A compressed [N, K] weight. Tensors live on the weight's device; `n`, `k`, `chunk_k` are static."""

    bitmap: torch.Tensor  # int32 [C, N, CHUNK_K // 32]
    offsets: torch.Tensor  # int32 [C * N + 1]
    values: torch.Tensor  # dtype [nnz]
    n: int
    k: int
    chunk_k: int

    @property
    def num_chunks(self) -> int:
        return self.bitmap.shape[0]

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
        w = torch.nn.functional.pad(w, (0, num_chunks * chunk_k - k))
        # [N, C*CK] -> [C, N, CK]: chunk-major order, so boolean indexing yields (chunk, row, col) order.
        w = w.view(n, num_chunks, chunk_k).transpose(0, 1)
        mask = w != 0
        values = w[mask].contiguous()

        counts = mask.sum(dim=2, dtype=torch.int32).flatten()  # [C*N]
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=w.device)
        torch.cumsum(counts, dim=0, out=offsets[1:])

        bits = mask.view(num_chunks, n, chunk_k // WORD_BITS, WORD_BITS).to(torch.int64)
        weights = torch.ones(WORD_BITS, dtype=torch.int64, device=w.device) << torch.arange(WORD_BITS, device=w.device)
        words = (bits * weights).sum(dim=-1)  # [C, N, CK/32], values in [0, 2**32)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return cls(words.contiguous(), offsets, values, n, k, chunk_k)

    def to_dense(self) -> torch.Tensor:
        """Exact inverse of `from_dense`: returns the [N, K] weight."""
        device = self.bitmap.device
        shifts = torch.arange(WORD_BITS, device=device, dtype=torch.int32)
        mask = ((self.bitmap.unsqueeze(-1) >> shifts) & 1).bool()  # [C, N, CK/32, 32]
        mask = mask.view(self.num_chunks, self.n, self.chunk_k)
        dense = torch.zeros(mask.shape, dtype=self.dtype, device=device)
        dense[mask] = self.values
        return dense.transpose(0, 1).reshape(self.n, -1)[:, : self.k].contiguous()
