"""Tiled-CSL format (Flash-LLM's): each nonzero stored with its position in a 16-row tile, in an order chosen for
a conflict-free shared-memory scatter.

Why a second format: the bitmap format moves the fewest bytes, but building MMA fragments from it costs ~27
instructions per 4 columns (fmma, RESULTS.md idea 17), which leaves the H100 instruction-bound at ~1.2x cuBLAS.
Here a nonzero is one 32-bit word `offset << 16 | value bits`: a lane scatters it into a zeroed tile in shared
memory with three instructions (shift, add, 16-bit store), and the tensor cores read the tile with ldmatrix, so
the decode cost is per nonzero and is shared by every token tile.  It costs 4 bytes a nonzero (bitmap: 2 + 1/8
per element), so it only pays from ~70% sparsity.

Layout of a weight W: [N, K], rows cut into R = ceil(N / 16) row tiles, K into C chunks of 128 columns.  Segment
s = r * C + c holds the nonzeros of tile r, chunk c, in G_s groups of 32 words (one per lane of a warp):

    items      int32 [32 * sum G_s]   word `lane` of group g of segment s is items[32 * (seg_start[s] + g) + lane]
    seg_start  int32 [R * C + 1]      first group of each segment (seg_start[R * C] = all groups)
    offset     byte offset of the nonzero in the [16, 128] tile as the kernel lays it out: row * TILE_ROW_BYTES
               + 2 * column (rows padded to 272 bytes so that ldmatrix reads 8 rows from distinct banks)

Within a segment the nonzeros are ordered by the rank of their 32-bit tile word among the words of its bank (the
first word of every bank, then the second of every bank, ...), then by bank, and dealt out 32 to a group in that
order.  A group's stores then hit distinct banks, one word each, until the segment's emptier banks run out of
words; only its last groups mix ranks, and the two halves of one word sit side by side (one word, no conflict).
Mean wavefronts per group store (`bank_conflicts`, random weights): 1.37 / 1.58 / 2.00 at 70 / 80 / 90%, against
2.00 / 2.07 / 2.20 for round robin over a bank-sorted order (the tenth session's change; same bytes).  Unused words
of a segment's last group store a zero into the tile's padding, lane t into its own bank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CSL_ROWS = 16  # rows of a tile: one warp's m16 MMA operand
CSL_CHUNK = 128  # columns of a tile
TILE_ROW_BYTES = 2 * CSL_CHUNK + 16  # 272: 68 words, so 8 consecutive rows start 4 banks apart
TILE_BYTES = CSL_ROWS * TILE_ROW_BYTES
TILE_WORDS = TILE_BYTES // 4
LANES = 32
BANKS = 32


def padding_offsets(device) -> torch.Tensor:
    """int64 [32]: where lane t's unused words store (the padding after column 127 of row t // 4, word t % 4):
    bank (68 (t // 4) + 64 + t % 4) % 32 = t, so the filler stores conflict neither with each other nor twice."""
    lane = torch.arange(LANES, device=device)
    return (lane // 4) * TILE_ROW_BYTES + 2 * CSL_CHUNK + 4 * (lane % 4)


@dataclass(frozen=True)
class CslWeight:
    """A compressed [N, K] weight (layout in the module docstring); `max_groups` = max G_s rounded up to a multiple
    of 4 (static: the kernel holds that many words a lane)."""

    items: torch.Tensor  # int32 [32 * groups]
    seg_start: torch.Tensor  # int32 [R * C + 1]
    like: torch.Tensor  # [0] tensor of the weight's dtype on its device: what the op's `values` operand carries
    n: int
    k: int
    max_groups: int

    LAYOUT = "csl"  # sparse_linear's `layout` argument
    chunk_k = CSL_CHUNK

    @property
    def num_chunks(self) -> int:
        return -(-self.k // CSL_CHUNK)

    @property
    def dtype(self) -> torch.dtype:
        return self.like.dtype

    @property
    def device(self) -> torch.device:
        return self.items.device

    @property
    def nnz(self) -> int:
        """Stored words, nonzeros plus each segment's filler (the op cannot count the nonzeros without a sync)."""
        return self.items.numel()

    @property
    def nbytes(self) -> int:
        return self.items.numel() * 4 + self.seg_start.numel() * 4

    @property
    def op_param(self) -> int:
        """sparse_linear's integer format argument (`chunk_k` for the bitmap): max_groups."""
        return self.max_groups

    def parts(self) -> dict[str, torch.Tensor]:
        """The op's three tensor operands, by buffer name."""
        return {"items": self.items, "seg_start": self.seg_start, "like": self.like}

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> CslWeight:
        """Compress a dense fp16 / bf16 [N, K] weight; vectorised on its device, exact."""
        if weight.dim() != 2 or weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"expected a 2-D fp16 / bf16 weight, got {tuple(weight.shape)} {weight.dtype}")
        w = weight.detach()
        n, k = w.shape
        tiles, chunks = -(-n // CSL_ROWS), max(1, -(-k // CSL_CHUNK))
        rows, cols = w.nonzero(as_tuple=True)  # row-major order
        values = w[rows, cols].view(torch.int16).to(torch.int64) & 0xFFFF
        seg = (rows // CSL_ROWS) * chunks + cols // CSL_CHUNK
        offset = (rows % CSL_ROWS) * TILE_ROW_BYTES + 2 * (cols % CSL_CHUNK)
        word = offset // 4  # the 32-bit tile word the nonzero lands in, and its bank
        bank = word % BANKS
        order = torch.sort((seg * BANKS + bank) * TILE_WORDS + word).indices  # by segment, bank, word
        seg, offset, values, word, bank = seg[order], offset[order], values[order], word[order], bank[order]
        run = seg * BANKS + bank
        starts_run = torch.ones_like(run, dtype=torch.bool)  # first nonzero of a (segment, bank)
        starts_run[1:] = run[1:] != run[:-1]
        starts_word = starts_run.clone()  # first nonzero of a word
        starts_word[1:] |= word[1:] != word[:-1]
        words_so_far = starts_word.cumsum(0)
        word_rank = words_so_far - words_so_far[starts_run][starts_run.cumsum(0) - 1]  # 0, 1, ... within its bank
        order = torch.sort((seg * TILE_WORDS + word_rank) * BANKS + bank, stable=True).indices
        seg, offset, values = seg[order], offset[order], values[order]
        num_segs = tiles * chunks
        count = torch.bincount(seg, minlength=num_segs)  # nonzeros per segment
        groups = (count + LANES - 1) // LANES
        seg_start = torch.zeros(num_segs + 1, dtype=torch.int64, device=w.device)
        seg_start[1:] = groups.cumsum(0)
        first = torch.zeros_like(count)
        first[1:] = count.cumsum(0)[:-1]
        position = torch.arange(seg.numel(), device=w.device) - first[seg]  # within the segment: group, lane
        slot = seg_start[seg] * LANES + position
        total = int(seg_start[-1])
        items = (padding_offsets(w.device) << 16).repeat(total)
        items[slot] = offset << 16 | values
        items = torch.where(items >= 2**31, items - 2**32, items).to(torch.int32)
        # registers a lane holds per chunk, rounded up to a multiple of 4 so that few kernel variants are built
        max_groups = -(-int(groups.max()) // 4) * 4 if seg.numel() else 0
        return cls(items, seg_start.to(torch.int32), w.new_empty(0), n, k, max_groups)

    def to_dense(self) -> torch.Tensor:
        """Exact inverse of `from_dense`: the [N, K] weight (the filler words land in the padding and are dropped)."""
        tiles, chunks = -(-self.n // CSL_ROWS), self.num_chunks
        items = self.items.to(torch.int64) & 0xFFFFFFFF
        groups = (self.seg_start[1:] - self.seg_start[:-1]).to(torch.int64)
        seg = torch.repeat_interleave(torch.arange(tiles * chunks, device=items.device), groups * LANES)
        offset, bits = items >> 16, items & 0xFFFF
        keep = offset % TILE_ROW_BYTES < 2 * CSL_CHUNK
        seg, offset, bits = seg[keep], offset[keep], bits[keep]
        rows = (seg // chunks) * CSL_ROWS + offset // TILE_ROW_BYTES
        cols = (seg % chunks) * CSL_CHUNK + (offset % TILE_ROW_BYTES) // 2
        dense = torch.zeros(tiles * CSL_ROWS, chunks * CSL_CHUNK, dtype=torch.int16, device=items.device)
        dense[rows, cols] = torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16)
        return dense.view(self.dtype)[: self.n, : self.k].contiguous()

    def bank_conflicts(self) -> float:
        """Mean over group stores of the most distinct 32-bit words one bank is asked for: the scatter's shared-memory
        wavefronts per store (1.0: conflict-free)."""
        words = ((self.items.to(torch.int64) & 0xFFFFFFFF) >> 18).view(-1, LANES).sort(dim=1).values  # [groups, 32]
        first = torch.ones_like(words, dtype=torch.bool)  # count each distinct word once
        first[:, 1:] = words[:, 1:] != words[:, :-1]
        hist = torch.zeros(words.shape[0], BANKS, dtype=torch.int64, device=words.device)
        hist.scatter_add_(1, words % BANKS, first.to(torch.int64))
        return hist.max(dim=1).values.float().mean().item() if words.numel() else 1.0
