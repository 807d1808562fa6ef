"""CPU checks of the benchmark helpers: MLP channel zeroing (benchmarks/structured_prune.py, used by bench_e2e.py
--structured), a smoke run of benchmarks/bench_passes.py on a tiny layer (no timing), and the kernel categories
of benchmarks/profile_e2e.py, and the decode-step timing and rotated Tiled-CSL copies of benchmarks/timing.py."""

from __future__ import annotations

import csv
import math
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_e2e
import bench_passes
import profile_e2e
from structured_prune import weakest_channels, zero_fraction, zero_mlp_channels_

from flashllm_compile.codegen.formats.csl import CslWeight

LAYERS, HIDDEN, INTERMEDIATE = 2, 64, 128


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64))


def tiny_opt():
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=2, vocab_size=128,
        max_position_embeddings=64, word_embed_proj_dim=HIDDEN))


def test_llama_channels_zeroed_everywhere():
    """25% of each layer's channels: all-zero gate/up rows and down columns, the lowest-norm ones, no others."""
    model = tiny_llama()
    bench_e2e.prune(model, 0.5)  # the unstructured zeros first, as the benchmarks do
    norms = {i: layer.mlp.gate_proj.weight.float().square().sum(1) + layer.mlp.up_proj.weight.float().square().sum(1)
             for i, layer in enumerate(model.model.layers)}  # [I] before the channels are zeroed
    zeroed = zero_mlp_channels_(model, 0.25)
    assert sorted(zeroed) == [f"model.layers.{i}.mlp" for i in range(LAYERS)]
    for i, layer in enumerate(model.model.layers):
        channels = zeroed[f"model.layers.{i}.mlp"]
        assert channels.numel() == int(INTERMEDIATE * 0.25)
        kept = torch.ones(INTERMEDIATE, dtype=torch.bool)
        kept[channels] = False
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        assert not gate[channels].any() and not up[channels].any() and not down[:, channels].any()
        assert (gate[kept] != 0).any(1).all() and (down[:, kept] != 0).any(0).all()  # nothing else all-zero
        assert norms[i][channels].max() <= norms[i][kept].min()  # the weakest channels
    # attention untouched by the channel zeroing: still exactly the 50% per row of the magnitude pruning
    q = model.model.layers[0].self_attn.q_proj.weight
    assert ((q == 0).sum(1) == HIDDEN // 2).all()


def test_deterministic_and_honest_fraction():
    """Same weights, same channels; ties go by index; the reported zero fraction counts the channels."""
    first, second = tiny_llama(), tiny_llama()
    zeros = [bench_e2e.prune(m, 0.5, structured=0.25) for m in (first, second)]
    assert zeros[0] == zeros[1]
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    # MLP: 50% + 25% of the other half; attention: 50%  ->  element-weighted over all seven linears
    mlp, attn = 3 * HIDDEN * INTERMEDIATE, 4 * HIDDEN * HIDDEN
    assert zeros[0] == pytest.approx((mlp * (0.5 + 0.25 * 0.5) + attn * 0.5) / (mlp + attn), abs=0.01)
    assert zero_fraction(tiny_llama()) == 0.0
    ties = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        ties.weight.fill_(1.0)
    assert weakest_channels([ties], 3).tolist() == [0, 1, 2]


def test_opt_bias_and_kept_down_columns():
    """OPT: fc1 rows and their bias entries zeroed, fc2 columns zeroed; zero_output_columns=False keeps fc2."""
    model = tiny_opt()
    layer = model.model.decoder.layers[0]
    with torch.no_grad():  # HF initialises biases to 0: make them visible
        layer.fc1.bias.fill_(0.1)
        layer.fc2.bias.fill_(0.1)
    zeroed = zero_mlp_channels_(model, 0.5)
    channels = zeroed["model.decoder.layers.0"]
    assert channels.numel() == INTERMEDIATE // 2
    assert not layer.fc1.weight[channels].any() and not layer.fc1.bias[channels].any()
    assert not layer.fc2.weight[:, channels].any() and (layer.fc2.bias == 0.1).all()
    assert (layer.fc1.bias != 0).sum() == INTERMEDIATE // 2
    kept = tiny_opt()
    before = kept.model.decoder.layers[0].fc2.weight.clone()
    zero_mlp_channels_(kept, 0.5, zero_output_columns=False)
    assert torch.equal(kept.model.decoder.layers[0].fc2.weight, before)
    with pytest.raises(ValueError, match="fraction"):
        zero_mlp_channels_(kept, 1.0)


def test_speedups_and_counts():
    rows = [{"m": 1, "variant": "inductor", "us_per_layer": 200.0}, {"m": 1, "variant": "all", "us_per_layer": 100.0},
            {"m": 16, "variant": "all", "us_per_layer": 50.0}, {"m": 1, "variant": "no_slice", "us_per_layer": None}]
    bench_passes.add_speedups(rows)
    assert [r["speedup_vs_inductor"] for r in rows] == [1.0, 2.0, None, None]
    assert bench_passes.parse_counts("rewritten=7 sliced_rows=1") == {"rewritten": 7, "sliced_rows": 1}
    assert bench_passes.parse_counts("-") == {}


def test_bench_passes_cpu_smoke(tmp_path):
    """The script end to end on the tiny layer: a CSV row per variant, outputs equal to Inductor's, the slicing
    counters nonzero with structured zeros and zero with the pass off, weights unchanged by compiling."""
    bench_passes.main(["--device", "cpu", "--m", "1", "--structured", "0.25", "--variants", "all", "no_slice",
                       "--out", str(tmp_path)])
    with open(tmp_path / "bench_passes.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["all", "inductor", "no_slice"]
    for r in rows.values():
        assert r["error"] == "" and float(r["max_rel_err"]) < 1e-5 and r["us_per_layer"] == ""
        assert r["structured"] == "0.25" and float(r["zero_fraction"]) > 0.8
    sliced = bench_passes.parse_counts(rows["all"]["counters"])
    assert sliced["sliced_rows"] >= 1 and sliced["sliced_cols"] >= 1 and sliced["rewritten"] == 7
    off = bench_passes.parse_counts(rows["no_slice"]["counters"])
    assert off["rewritten"] == 7 and off.get("sliced_rows", 0) == off.get("sliced_cols", 0) == 0
    assert "[192x64]" in rows["all"]["ops"]  # gate/up fused and sliced: 2 x (128 - 32) rows


def test_bench_passes_cpu_propagation(tmp_path):
    """--keep-down-columns: down_proj's columns are not zero, only its inputs are, so only the propagation pass
    (passes/propagate_structured_zeros.py) drops them."""
    bench_passes.main(["--device", "cpu", "--m", "1", "--structured", "0.25", "--keep-down-columns", "--variants",
                       "all", "--out", str(tmp_path)])
    with open(tmp_path / "bench_passes.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert rows["all"]["down_zeroed"] == "0" and rows["all"]["error"] == ""
    assert bench_passes.parse_counts(rows["all"]["counters"])["propagated_cols"] == 1
    assert "mlp.down_proj [64x96]" in rows["all"]["ops"]


@pytest.mark.parametrize("name, expected", [
    ("_bitmap_smma_kernel", "sparse"), ("_fused_epilogue_kernel", "sparse"), ("_bitmap_rowwalk_kernel", "sparse"),
    ("nvjet_hsh_128x64_64x4_1x2_h_bz_coopA_NTT", "gemm"), ("sm90_xmma_gemm_f16f16_f16f32", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_f16>", "gemm"), ("flash_fwd_splitkv_kernel", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"), ("triton_red_fused__to_copy_add_mean_mul_pow", "other"),
    ("void at::native::elementwise_kernel<128, 4>", "other")])
def test_profile_categories(name, expected):
    assert profile_e2e.category(name) == expected


def test_reused_static_cache_keeps_addresses_and_tokens(monkeypatch):
    """bench_e2e --reuse-cache: the same greedy tokens as generate()'s own static cache, and the reused cache's
    tensors keep their addresses from one generate to the next (what lets CUDA graphs replay instead of record)."""
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    fresh = bench_e2e.generate(model, ids, 4)
    monkeypatch.setattr(bench_e2e, "REUSE_CACHE", True)
    first = bench_e2e.generate(model, ids, 4)
    (cache,) = bench_e2e._CACHES.values()
    addresses = [layer.keys.data_ptr() for layer in cache.layers]
    second = bench_e2e.generate(model, ids, 4)
    assert torch.equal(first, fresh) and torch.equal(second, fresh)
    assert [layer.keys.data_ptr() for layer in cache.layers] == addresses
    bench_e2e.reset_compiled_state(ids.device)
    assert not bench_e2e._CACHES


def test_cmma_breakdown_fit_recovers_fixed_part_and_bandwidth():
    """benchmarks/cmma_breakdown.py's line fit: main kernel us = fixed + MB / (TB/s), per (layer, M)."""
    import cmma_breakdown

    rows = [{"layer": "o", "m": 8, "weight_mb": mb, "main_kernel_us": 3.0 + mb / 2.5} for mb in (0.1, 7.0, 14.0)]
    rows += [{"layer": "o", "m": 32, "weight_mb": 5.0, "main_kernel_us": 9.0}]  # one point: no fit
    ((layer, m, fixed, tb_s),) = cmma_breakdown.fit(rows)
    assert (layer, m) == ("o", 8) and fixed == pytest.approx(3.0) and tb_s == pytest.approx(2.5)


@pytest.mark.parametrize("families, expected", [(None, "kns=_bitmap"), (["rowwalk"], "kns=_bitmap"),
                                                (["cmma"], "kns=_csl_mma"), (["cmma", "rowwalk"], None)])
def test_sanitizer_filter_never_hides_a_requested_family(families, expected):
    """benchmarks/sanitize.py: compute-sanitizer's --kernel-name takes one substring, so cmma next to a bitmap family
    runs unfiltered (a `_bitmap` filter once left its cmma cases unchecked)."""
    import argparse

    import sanitize

    args = argparse.Namespace(all_kernels=False, families=families, m=None, dtypes=None, out="out", configs=None)
    cmd = sanitize.sanitizer_command("memcheck", "compute-sanitizer", "tiny", args, True)
    found = cmd[cmd.index("--kernel-name") + 1] if "--kernel-name" in cmd else None
    assert found == expected


def test_sanitizer_config_filter_reaches_the_child():
    """benchmarks/sanitize.py --configs: only the tile configs whose short name contains it, in the plan and in the
    command the sanitizer runs (the child builds its own plan)."""
    import argparse

    import sanitize

    everything = sanitize.case_plan("tiny")
    some = sanitize.case_plan("tiny", config_filter="rowwalk")
    assert some and len(some) < len(everything) and all("rowwalk" in c.short() for *_, c in some)
    args = argparse.Namespace(all_kernels=False, families=None, m=None, dtypes=None, out="out", configs="rowwalk")
    cmd = sanitize.sanitizer_command("racecheck", "compute-sanitizer", "tiny", args, True)
    assert cmd[cmd.index("--configs") + 1] == "rowwalk"


def test_graph_time_after_a_producer_subtracts_it_and_takes_the_median(monkeypatch):
    """graph_time_us(calls, before=...): every call follows `before`, whose own time is subtracted; the median of 3
    such differences, so one slow replay of either graph does not give an absurd time."""
    import timing

    def call():
        pass

    def write_x():
        pass

    cost = {call: 10.0, write_x: 2.0}
    slow = iter([50.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # the first graph (calls after producers) replays 50 us slow once
    seqs = []

    def fake_replayed_us(seq, replays):
        seqs.append(list(seq))
        return sum(cost[f] for f in seq) + next(slow, 0.0)

    monkeypatch.setattr(timing, "_replayed_us", fake_replayed_us)
    assert timing.graph_time_us([call] * 4, before=write_x) == pytest.approx(10.0)
    assert seqs[0] == [write_x, call] * 4 and seqs[1] == [write_x] * 4  # each call after the producer; it alone
    assert len(seqs) == 6
    seqs.clear()
    assert timing.graph_time_us([call] * 4) == pytest.approx(10.0)  # back to back: one graph of the calls
    assert seqs == [[call] * 4]


def test_input_writer_rewrites_x_in_place():
    """timing.input_writer(x): the producer the decode-step timing puts before each call writes the same tensor (a
    CUDA graph replays fixed addresses) back to its first values."""
    import timing

    x = torch.randn(3, 5)
    first = x.clone()
    write = timing.input_writer(x)
    x.zero_()
    write()
    assert torch.equal(x, first)


def test_csl_copies_share_the_largest_group_bound():
    """timing.csl_copies: rotated Tiled-CSL copies whose own bounds differ all carry the largest one (so a config tuned
    on the first runs every copy), and still decode to their weights."""
    import timing

    weights = []
    for seed, sparsity in ((0, 0.9), (1, 0.5)):  # bounds 8 and 36 on their own
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(32, 256, generator=g).half()
        weights.append(w.masked_fill_(torch.rand(32, 256, generator=g) < sparsity, 0))
    own = [CslWeight.from_dense(w).max_groups for w in weights]
    copies = timing.csl_copies(weights)
    assert own[0] < own[1] and [f.max_groups for f in copies] == [own[1]] * 2
    assert all(torch.equal(f.to_dense(), w) for f, w in zip(copies, weights))


def test_read_floor_kernel_reads_every_element_once():
    """read_floor.sum_tiles (the read-only kernel timed as the size-aware bytes floor), under the interpreter: each
    program sums its own tile, the last one partial."""
    import read_floor

    src = torch.randint(-50, 50, (2 * read_floor.READ_BLOCK + 77,), dtype=torch.int32)
    out = torch.full((8,), -1, dtype=torch.int32)
    sums = read_floor.sum_tiles(src, out)
    expect = torch.stack([chunk.sum() for chunk in src.split(read_floor.READ_BLOCK)]).to(torch.int32)
    assert torch.equal(sums, expect) and (out[3:] == -1).all()


def test_ceiling_entropy_bytes_is_values_plus_position_entropy():
    """ceiling.entropy_bytes: 2 bytes a nonzero plus H(density) bits an element (1 bit at 50%, 0.469 at 90%); a
    dense or empty weight has no position information to store."""
    import ceiling

    assert ceiling.entropy_bytes(64, 128, 0.5) == 64 * 128 * (1 + 1 / 8)
    assert abs(ceiling.entropy_bytes(1000, 1000, 0.9) / 1e6 - (0.2 + 0.46900 / 8)) < 1e-4
    assert ceiling.entropy_bytes(64, 128, 0.0) == 64 * 128 * 2 and ceiling.entropy_bytes(64, 128, 1.0) == 0


def test_ceiling_floor_curve_interpolates_in_log_log(monkeypatch):
    """ceiling.FloorCurve times its grid once and reads between grid points on straight log-log lines: exact for a
    power law, between the neighbours otherwise, and extrapolated past the last point."""
    import ceiling

    timed = []

    def power_law(nbytes):
        timed.append(nbytes)
        return 3.0 * nbytes ** 0.8, (2048, 4, False)

    monkeypatch.setattr(ceiling, "stream_floor_us", power_law)
    curve = ceiling.FloorCurve(4 << 20, 700 << 20)
    assert timed == curve.sizes and curve.sizes[0] == 4 << 20 and curve.sizes[-1] >= 700 << 20
    for nbytes in (4 << 20, 5_123_457, 99_999_999, 700 << 20, 900 << 20):
        assert curve(nbytes) == pytest.approx(3.0 * nbytes ** 0.8, rel=1e-9)
    assert len(timed) == len(curve.sizes)  # reading the curve times nothing more


def test_ceiling_stream_kernel_reads_every_element_once():
    """ceiling's readers (read_floor's kernel) without PDL (what the interpreter can run): each program sums its own
    tile."""
    import ceiling

    src = torch.randint(-50, 50, (2 * 2048 + 5,), dtype=torch.int32)
    out = torch.full((4,), -1, dtype=torch.int32)
    ceiling._reader_calls([src], out, 2048, 4, False)[0]()
    expect = torch.stack([chunk.sum() for chunk in src.split(2048)]).to(torch.int32)
    assert torch.equal(out[:3], expect) and out[3] == -1


def test_bench_tables_of_several_runs_give_issue_4s_geo_means(tmp_path, capsys):
    """bench_kernels.py --tables: rows of two runs' CSVs (a long measurement is cut into runs of 10 minutes) are
    read back with their numbers parsed and summarised together: issue 4's line a sparsity is the geo-mean over
    every shape and M of both runs, next to its target."""
    import bench_kernels
    from timing import write_csv

    def row(model, m, sparsity, speedup):
        return {"gpu": "H100", "model": model, "layer": "qkv", "n": 64, "k": 128, "m": m, "sparsity": sparsity,
                "kernel": "cmma", "config": "cmma[BN=32]", "speedup": speedup, "dispatched_speedup": max(speedup, 1.0),
                "dispatched_speedup_b2b": 1.0, "read_floor_speedup": 2.0}

    write_csv([row("llama7b", 1, 0.8, 2.0), {**row("llama7b", 64, 0.8, 0.5), "csr_us": 9.0}], tmp_path / "a.csv")
    # run b was cut off after one 90% point: cells it did not reach read nan instead of failing the summary
    write_csv([row("opt66b", 1, 0.8, 4.0), row("opt66b", 64, 0.8, 2.0), row("opt66b", 1, 0.9, 3.0)],
              tmp_path / "b.csv")
    rows = bench_kernels.read_rows([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert len(rows) == 5 and rows[0]["m"] == 1 and rows[0]["speedup"] == 2.0 and rows[0]["config"] == "cmma[BN=32]"
    assert rows[1]["csr_us"] == 9.0 and math.isnan(rows[0]["csr_us"])  # a column only one row of a run has
    bench_kernels.print_tables(rows)
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in out if line.startswith("llama7b.qkv")] == ["nan"]
    issue_line = [line for line in out if line.strip().startswith("80%")][-1]
    # dispatched: 2, 1 (dense where 0.5), 4, 2 -> geo-mean 2; target 2.8; read-floor bound 2
    assert issue_line.split() == ["80%", "2.00", "2.8", "2.00"]
