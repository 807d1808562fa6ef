"""Triton kernels (TRITON_INTERPRET=1 on CPU) against dense F.linear on the same pruned weight (fp32 reference).

Outputs are poisoned: with deterministic algorithms on, torch.empty fills new tensors with NaN, so an
element the kernel fails to write shows up as NaN."""

import os

import pytest
import torch

from flashllm_compile.codegen.autotune import LAUNCHERS, candidate_configs, default_config, untuned_choice
from flashllm_compile.codegen.formats.bitmap import TILE_ROWS, BitmapWeight
from flashllm_compile.codegen.kernels.bitmap_mma import bitmap_mma, get_bitmap_mma_configs
from flashllm_compile.codegen.kernels.bitmap_rowwalk import bitmap_rowwalk, get_bitmap_rowwalk_configs
from flashllm_compile.codegen.kernels.bitmap_unpack import get_bitmap_unpack_configs, unpack_weight
from flashllm_compile.codegen.kernels.common import TileConfig

pytestmark = [
    pytest.mark.usefixtures("poison_outputs"),  # tests/conftest.py
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-5}


def make_case(n, k, m, sparsity, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).masked_fill(torch.rand(n, k, generator=g) < sparsity, 0).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    return w.to(DEVICE), x.to(DEVICE), None if b is None else b.to(DEVICE), ref


def rel_err(y, ref):
    return ((y.float().cpu() - ref).norm() / ref.norm()).item()


# family -> (token counts, (N, K, sparsity) cases, split-K values): rowwalk is the small-M family
FAMILY_CASES = {
    "mma": ([1, 2, 3, 8, 16, 33], [(70, 200, 0.8), (33, 300, 0.5), (64, 128, 0.9)], (1, 3)),
    "rowwalk": ([1, 3, 8], [(70, 200, 0.8), (33, 300, 0.5), (40, 330, 0.97)], (1, 3)),
    "unpack": ([16, 33], [(70, 200, 0.8), (33, 300, 0.5), (16, 64, 0.0)], (1,)),
}
CONFIGS = {"mma": get_bitmap_mma_configs, "rowwalk": get_bitmap_rowwalk_configs, "unpack": get_bitmap_unpack_configs}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family, n, k, sparsity, m", [
    (family, n, k, sparsity, m)
    for family, (ms, cases, _) in FAMILY_CASES.items() for n, k, sparsity in cases for m in ms
])
def test_family_matches_dense(family, n, k, sparsity, m, dtype):
    w, x, b, ref = make_case(n, k, m, sparsity, dtype)
    fmt = BitmapWeight.from_dense(w, chunk_k=64)
    for split_k in FAMILY_CASES[family][2]:
        config = CONFIGS[family](m)[0]._replace(split_k=split_k)
        y = LAUNCHERS[family](x, fmt, b, config)
        assert y.shape == (m, n) and y.dtype == dtype
        assert rel_err(y, ref) < TOL[dtype], config


def test_every_tuned_config_is_correct_on_an_odd_shape():
    """The autotuner may pick any config: each one must be right (odd N, K not a multiple of the chunk)."""
    w, x, b, ref = make_case(37, 161, 5, 0.7, torch.float16, bias=False)
    fmt = BitmapWeight.from_dense(w, chunk_k=32)
    configs = candidate_configs(5)
    assert {c.family for c in configs} == {"mma", "rowwalk"}
    for config in configs:
        launch = LAUNCHERS[config.family]
        assert rel_err(launch(x, fmt, b, config), ref) < 1e-2, config


@pytest.mark.parametrize("family, m", [("mma", 3), ("mma", 16), ("unpack", 17)])
def test_tile_families_run_tile_major_values(family, m):
    """Tile kernels find each (row, chunk) run through offsets[c, n]: the tile-major order gives the same result,
    bit for bit (same values, same sums)."""
    w, x, b, ref = make_case(37, 300, m, 0.5, torch.float16)
    row_major, tiled = BitmapWeight.from_dense(w, 128), BitmapWeight.from_dense(w, 128, TILE_ROWS)
    config = CONFIGS[family](m)[0]._replace(split_k=2)
    y = LAUNCHERS[family](x, tiled, b, config)
    assert rel_err(y, ref) < 1e-2 and torch.equal(y, LAUNCHERS[family](x, row_major, b, config))


def test_row_walk_refuses_tile_major_values_and_is_not_offered_there():
    w, x, b, _ = make_case(37, 300, 3, 0.5, torch.float16)
    tiled = BitmapWeight.from_dense(w, 128, TILE_ROWS)
    with pytest.raises(ValueError, match="row walk needs the bitmap's values row-major"):
        bitmap_rowwalk(x, tiled, b, get_bitmap_rowwalk_configs(3)[0])
    assert not any(c.family == "rowwalk" for c in candidate_configs(3, tiled))
    assert any(c.family == "rowwalk" for c in candidate_configs(3, BitmapWeight.from_dense(w, 128)))
    assert untuned_choice(3, False, tiled).family == "mma" and default_config(3).family == "rowwalk"


def test_all_zero_and_fully_dense_weights():
    for sparsity in (1.0, 0.0):
        w, x, b, ref = make_case(20, 40, 4, sparsity, torch.float16)
        fmt = BitmapWeight.from_dense(w, chunk_k=32)
        y = bitmap_mma(x, fmt, b, TileConfig("mma", 64, 16, 1, 4, 2))
        assert torch.allclose(y.float().cpu(), ref, atol=1e-2, rtol=1e-2)


def test_nan_in_input_propagates_like_dense():
    w, x, _, _ = make_case(16, 64, 2, 0.5, torch.float16, bias=False)
    x[0, 3] = float("nan")
    y = bitmap_mma(x, BitmapWeight.from_dense(w, 32), None, TileConfig("mma", 64, 16, 1, 4, 2))
    dense = torch.nn.functional.linear(x.float(), w.float())
    # a NaN input meets zeros that the sparse kernel never multiplies: where dense is NaN only because of
    # 0 * NaN the sparse result is finite; everything else must agree
    assert torch.isnan(y[1]).sum() == 0 and torch.allclose(y[1].float(), dense[1], atol=1e-2, rtol=1e-2)
    assert torch.isnan(y[0]).any()


@pytest.mark.parametrize("launch, config", [(bitmap_mma, TileConfig("mma", 64, 16, 1, 4, 2)),
                                            (bitmap_rowwalk, TileConfig("rowwalk", 32, 4, 1, 4, 1, 4))])
def test_bad_inputs_raise_clearly(launch, config):
    w, x, b, _ = make_case(16, 64, 2, 0.5, torch.float16)
    fmt = BitmapWeight.from_dense(w, 32)
    with pytest.raises(TypeError, match="dtype"):
        launch(x.float(), fmt, b, config)
    with pytest.raises(ValueError, match="shape"):
        launch(x[:, :10], fmt, b, config)
    with pytest.raises(ValueError, match="bias"):
        launch(x, fmt, b[:3], config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_unpack_weight_is_exact(dtype):
    """The prefill family's unpack pass reproduces the pruned weight bit for bit (odd N, K, a chunk tail)."""
    w, _, _, _ = make_case(37, 161, 1, 0.7, dtype, bias=False)
    fmt = BitmapWeight.from_dense(w, chunk_k=64)
    assert torch.equal(unpack_weight(fmt, block_n=32).cpu(), w.cpu())


@pytest.mark.parametrize("family, m", [("rowwalk", 3), ("mma", 5), ("unpack", 17)])
def test_outputs_are_bitwise_deterministic(family, m):
    """No atomics anywhere: split-K partials are summed in a fixed order, so repeated calls agree bit for bit."""
    w, x, b, _ = make_case(70, 300, m, 0.8, torch.float16)
    fmt = BitmapWeight.from_dense(w, chunk_k=64)
    config = CONFIGS[family](m)[0]._replace(split_k=3)
    first = LAUNCHERS[family](x, fmt, b, config)
    for _ in range(5):
        assert torch.equal(LAUNCHERS[family](x, fmt, b, config), first)
