"""Bitmap format: exact round trip for any shape / sparsity / dtype, and the byte accounting."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashllm_compile.codegen.formats.bitmap import (
    COMPILER_ORDER,
    TILE_ROWS,
    BitmapWeight,
    compiler_tile_rows,
    values_slack_bytes,
)


def random_sparse(n, k, sparsity, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    return w.masked_fill(torch.rand(n, k, generator=g) < sparsity, 0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), k=st.integers(1, 300), sparsity=st.floats(0, 1), chunk_k=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), seed=st.integers(0, 2**16))
def test_round_trip_exact(n, k, sparsity, chunk_k, dtype, seed):
    w = random_sparse(n, k, sparsity, dtype, seed)
    fmt = BitmapWeight.from_dense(w, chunk_k)
    assert fmt.nnz == int((w != 0).sum())
    assert fmt.bitmap.shape == (n, -(-k // chunk_k) * chunk_k // 32)
    assert fmt.offsets.shape == (-(-k // chunk_k) + 1, n)
    assert fmt.offsets[-1, -1].item() == fmt.nnz
    assert torch.equal(fmt.to_dense(), w)


def test_nan_inf_and_negative_zero_kept_exactly():
    w = random_sparse(8, 40, 0.5, torch.float32)
    w[0, 1], w[1, 2], w[2, 3], w[3, 4] = float("nan"), float("inf"), -float("inf"), -0.0
    dense = BitmapWeight.from_dense(w).to_dense()
    assert torch.equal(torch.isnan(dense), torch.isnan(w))
    assert torch.equal(dense.nan_to_num(0), w.nan_to_num(0))


@pytest.mark.parametrize("sparsity, max_ratio", [(0.5, 0.59), (0.8, 0.29), (0.9, 0.19)])
def test_bytes_follow_1_plus_16_density_bits(sparsity, max_ratio):
    w = random_sparse(512, 1024, sparsity)
    fmt = BitmapWeight.from_dense(w)
    # bitmap 1 bit + offsets 32/128 bits + 16*density bits per element, over 16 bits dense
    expected = (1 + 32 / 128 + 16 * (1 - sparsity)) / 16
    assert fmt.nbytes / w.nbytes == pytest.approx(expected, rel=0.03)
    assert fmt.nbytes / w.nbytes < max_ratio


def test_values_are_row_major_with_chunk_offsets():
    w = torch.zeros(2, 64)
    w[0, 40], w[1, 1], w[0, 2] = 1.0, 2.0, 3.0
    fmt = BitmapWeight.from_dense(w, chunk_k=32)
    # row 0: col 2 then col 40; row 1: col 1
    assert fmt.values.tolist() == [3.0, 1.0, 2.0]
    # offsets[c, n]: row n's first value at column >= 32*c; offsets[2, n]: end of row n
    assert fmt.offsets.tolist() == [[0, 2], [1, 3], [2, 3]]
    assert fmt.bitmap.tolist() == [[1 << 2, 1 << 8], [1 << 1, 0]]


@pytest.mark.parametrize("bad, match", [(torch.zeros(3), "2-D"), (torch.zeros(2, 2, dtype=torch.int32), "floating")])
def test_bad_input_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        BitmapWeight.from_dense(bad)


def test_bad_chunk_raises():
    with pytest.raises(ValueError, match="multiple of 32"):
        BitmapWeight.from_dense(torch.ones(2, 2), chunk_k=48)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), k=st.integers(1, 300), sparsity=st.floats(0, 1), chunk_k=st.sampled_from([32, 128]),
       seed=st.integers(0, 2**16))
def test_tile_major_round_trip_and_segments(n, k, sparsity, chunk_k, seed):
    """Tile-major values: the same runs as row-major (offsets[c, n] finds each), one contiguous segment per 16-row
    block and chunk (what fmma stages whole), offsets[C, n] the end of row n's block."""
    w = random_sparse(n, k, sparsity, torch.float16, seed)
    row_major, tiled = BitmapWeight.from_dense(w, chunk_k), BitmapWeight.from_dense(w, chunk_k, TILE_ROWS)
    assert torch.equal(tiled.to_dense(), w) and torch.equal(tiled.bitmap, row_major.bitmap)
    assert tiled.nnz == row_major.nnz and values_slack_bytes(tiled.values) >= 16
    counts = (row_major.offsets[1:] - row_major.offsets[:-1]).t()  # [N, C]
    for row in range(n):
        for c in range(tiled.num_chunks):
            a, b = int(row_major.offsets[c, row]), int(tiled.offsets[c, row])
            assert torch.equal(tiled.values[b: b + counts[row, c]], row_major.values[a: a + counts[row, c]])
    expected = 0
    for block in range(0, n, TILE_ROWS):  # segments in (block, chunk, row) order, back to back
        for c in range(tiled.num_chunks):
            for row in range(block, min(block + TILE_ROWS, n)):
                assert int(tiled.offsets[c, row]) == expected
                expected += int(counts[row, c])
        assert all(int(tiled.offsets[-1, row]) == expected for row in range(block, min(block + TILE_ROWS, n)))
    assert expected == tiled.nnz


def test_op_param_carries_chunk_k_and_the_values_order():
    w = random_sparse(20, 100, 0.5)
    for tile_rows in (0, TILE_ROWS):
        fmt = BitmapWeight.from_dense(w, 64, tile_rows)
        back = BitmapWeight.from_op_param(*fmt.tensors(), fmt.n, fmt.k, fmt.op_param)
        assert (back.chunk_k, back.tile_rows) == (64, tile_rows) and torch.equal(back.to_dense(), w)
    with pytest.raises(ValueError, match="tile_rows must be 0"):
        BitmapWeight.from_dense(w, 64, 8)


def test_compiler_stores_tile_major_values_only_below_the_row_walks_sparsity():
    assert compiler_tile_rows(3071, 4096) == TILE_ROWS and compiler_tile_rows(3072, 4096) == 0  # the bound: 75%
    assert BitmapWeight.from_dense(random_sparse(64, 64, 0.5), 128, COMPILER_ORDER).tile_rows == TILE_ROWS
    # the row walk competes at 90% and needs row-major values
    assert BitmapWeight.from_dense(random_sparse(64, 200, 0.9), 128, COMPILER_ORDER).tile_rows == 0
