"""Autotuner: picks the fastest measured candidate (dense included), caches on disk, survives bad cache files."""

import json

import pytest
import torch

from flashllm_compile.codegen import autotune
from flashllm_compile.codegen.formats.bitmap import BitmapWeight


@pytest.fixture
def fmt():
    w = torch.randn(40, 70).masked_fill(torch.rand(40, 70) < 0.8, 0).half()
    return BitmapWeight.from_dense(w, 32), w


def fake_bench(times):
    """Replace do_bench: run the candidate once (proves it runs) and return a chosen time per family."""
    calls = []

    def bench(fn):
        calls.append(fn())
        return times(len(calls))

    return bench, calls


def test_fastest_sparse_config_wins_and_is_cached(fmt, tmp_path, monkeypatch):
    fmt, w = fmt
    bench, calls = fake_bench(lambda i: 100.0 if i == 1 else 50.0 - 0.01 * i)  # 1st call = dense
    monkeypatch.setattr(autotune, "bench_us", bench)
    tuner = autotune.Autotuner()
    choice = tuner.choose(fmt, 3, w, allow_dense=True, tune=True, cache_dir=str(tmp_path))
    n_candidates = len(autotune.candidate_configs(4)) + 1
    assert len(calls) == n_candidates and tuner.tunings == 1
    assert choice.family == "mma" and choice.dense_us == 100.0  # the last candidate was the fastest
    # same bucket (M=4), second process: answered from disk, nothing measured
    again = autotune.Autotuner()
    assert again.choose(fmt, 4, w, allow_dense=True, tune=True, cache_dir=str(tmp_path)) == choice
    assert again.hits == 1 and again.tunings == 0 and len(calls) == n_candidates


def test_dense_wins_when_sparse_is_slower(fmt, tmp_path, monkeypatch):
    fmt, w = fmt
    bench, _ = fake_bench(lambda i: 10.0 if i == 1 else 11.0)
    monkeypatch.setattr(autotune, "bench_us", bench)
    choice = autotune.Autotuner().choose(fmt, 16, w, allow_dense=True, tune=True, cache_dir=str(tmp_path))
    assert choice.family == "dense" and choice.config is None


@pytest.mark.parametrize("sparse_us, family", [(9.8, "dense"), (9.0, "mma")])
def test_near_tie_keeps_dense(fmt, tmp_path, monkeypatch, sparse_us, family):
    """A sparse kernel must beat dense by SPARSE_MIN_GAIN (5%) to be picked; without a dense weight it always is."""
    fmt, w = fmt
    bench, _ = fake_bench(lambda i: 10.0 if i == 1 else sparse_us)
    monkeypatch.setattr(autotune, "bench_us", bench)
    choice = autotune.Autotuner().choose(fmt, 16, w, allow_dense=True, tune=True, cache_dir=str(tmp_path))
    assert choice.family == family
    bench, _ = fake_bench(lambda i: sparse_us)
    monkeypatch.setattr(autotune, "bench_us", bench)
    no_dense = autotune.Autotuner().choose(fmt, 16, None, allow_dense=False, tune=True, cache_dir=str(tmp_path / "b"))
    assert no_dense.family == "mma"


def test_untuned_defaults(fmt, tmp_path):
    fmt, w = fmt
    tuner = autotune.Autotuner()
    assert tuner.choose(fmt, 2, w, allow_dense=True, tune=False, cache_dir=str(tmp_path)).family == "dense"
    assert tuner.choose(fmt, 2, None, allow_dense=False, tune=False, cache_dir=str(tmp_path)).family == "rowwalk"
    assert tuner.choose(fmt, 40, None, allow_dense=False, tune=False, cache_dir=str(tmp_path)).family == "mma"


def test_corrupt_cache_warns_and_retunes(fmt, tmp_path, monkeypatch):
    fmt, w = fmt
    tuner = autotune.Autotuner()
    path = tuner.cache_file(str(tmp_path), fmt.values.device)
    path.write_text("{not json")
    bench, calls = fake_bench(lambda i: 1.0)
    monkeypatch.setattr(autotune, "bench_us", bench)
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        tuner.choose(fmt, 1, w, allow_dense=True, tune=True, cache_dir=str(tmp_path))
    assert calls and json.loads(path.read_text())  # rewritten as valid JSON


def test_clear_removes_files(fmt, tmp_path, monkeypatch):
    fmt, w = fmt
    monkeypatch.setattr(autotune, "bench_us", fake_bench(lambda i: 1.0)[0])
    tuner = autotune.Autotuner()
    tuner.choose(fmt, 1, w, allow_dense=True, tune=True, cache_dir=str(tmp_path))
    assert list(tmp_path.glob("autotune-*.json"))
    tuner.clear(str(tmp_path))
    assert not list(tmp_path.glob("autotune-*.json"))


def test_m_buckets():
    assert [autotune.m_bucket(m) for m in (0, 1, 2, 3, 5, 9, 33, 64, 65, 10000)] == [1, 1, 2, 4, 8, 16, 64, 64, 128,
                                                                                      4096]


def test_hit_path_touches_no_file(fmt, tmp_path, monkeypatch):
    """The op asks the tuner on every call: a hit must be a dict lookup (no cache-file path, no hashing)."""
    fmt, w = fmt
    monkeypatch.setattr(autotune, "bench_us", fake_bench(lambda i: 1.0)[0])
    tuner = autotune.Autotuner()
    first = tuner.choose(fmt, 3, w, allow_dense=True, tune=True, cache_dir=str(tmp_path))

    def no_io(*args):
        raise AssertionError("cache_file called on the hot path")

    monkeypatch.setattr(autotune.Autotuner, "cache_file", no_io)
    assert tuner.choose(fmt, 4, w, allow_dense=True, tune=True, cache_dir=str(tmp_path)) == first


def test_host_cdiv_and_next_power_of_2_match_triton():
    """The host-side helpers that replace triton.cdiv / triton.next_power_of_2 on the per-call path (those are
    ConstexprFunctions in Triton 3.6, ~2.5 us a call) give the same numbers."""
    import triton

    from flashllm_compile.codegen.kernels.host_math import cdiv, next_power_of_2

    for n in range(600):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 7, 16, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(1 << 40) == 1 << 40 and next_power_of_2((1 << 40) + 1) == 1 << 41
