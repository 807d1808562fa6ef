"""`flashllm_compile.explain`: the report on a tiny pruned transformers Llama (CPU), and TORCH_LOGS output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import flashllm_compile
from flashllm_compile.prune import magnitude_prune_

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pruned_llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    magnitude_prune_(model, 0.8, progress=False)
    return model


@pytest.fixture(scope="module")
def report_and_state(pruned_llama):
    before = {k: v.clone() for k, v in pruned_llama.state_dict().items()}
    ids = torch.randint(0, 128, (1, 8))
    report = flashllm_compile.explain(pruned_llama, ids, min_weight_numel=1024)
    return report, before


def test_rows_names_reasons_and_bytes(report_and_state):
    report, _ = report_and_state
    rows = {layer.decision.name: layer for layer in report.layers}
    assert len(report.layers) == 8  # 7 projections + lm_head
    down = rows["model.layers.0.mlp.down_proj"]
    assert down.decision.rewritten and down.decision.reason == "rewritten"
    assert (down.decision.out_features, down.decision.in_features) == (64, 128)
    assert down.decision.sparsity == pytest.approx(0.8, abs=0.01)
    assert down.format == "bitmap(chunk_k=128)"
    assert down.decision.dense_bytes == 64 * 128 * 4 > down.decision.compressed_bytes > 0
    assert down.note == "emulated (CPU)" and down.kernels == []
    q = rows["model.layers.0.self_attn.q_proj"]  # fused with k and v: one op on the stacked [64+32+32, 64] weight
    assert q.decision.op_shape == (128, 64) and q.decision.group == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"
    assert q.format == "bitmap(chunk_k=128, op 128x64) fused model.layers.0.self_attn.{q_proj,k_proj,v_proj}"
    head = rows["lm_head"]  # not pruned
    assert not head.decision.rewritten and head.decision.reason == "too_dense" and head.format == ""
    assert len(report.rewritten) == 7


def test_model_is_unchanged(report_and_state, pruned_llama):
    _, before = report_and_state
    after = pruned_llama.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert "forward" not in vars(pruned_llama)  # explain compiled a wrapper, never patched the model


def test_str_has_table_and_triton_source(report_and_state):
    report, _ = report_and_state
    text = str(report)
    assert "layer" in text and "MB before" in text and "kernel" in text
    assert "model.layers.0.mlp.down_proj" in text and "emulated (CPU)" in text
    assert "7/8 linears rewritten" in text
    assert set(report.kernel_sources) == {"rowwalk", "fmma", "cmma", "smma", "mma", "unpack"}
    cmma = report.kernel_sources["cmma"]  # the Tiled-CSL family: its own kernel module and PTX program
    assert "def _csl_mma_kernel(" in cmma and "def store_elements(" in cmma and "ldmatrix.sync" in cmma
    mma = report.kernel_sources["mma"]
    assert "@triton.jit" in mma and "def _bitmap_mma_kernel(" in mma
    assert "def decode_bitmap_tile(" in mma and "def popcount(" in mma and "def store_output(" in mma
    rowwalk = report.kernel_sources["rowwalk"]
    assert "def decode_bitmap_tile(" not in rowwalk  # only what the kernel calls
    assert "def _run_start(" in rowwalk and "def _ptx_walk(" in rowwalk and "def apply_act(" in rowwalk
    assert "# bfind.u32 %j, %low;" in rowwalk  # the inline PTX of its inner loop
    fmma = report.kernel_sources["fmma"]
    assert "def _bitmap_smma_kernel(" in fmma  # the Triton program around the PTX is smma's
    assert "# prmt.b32 %s01A0, %tlo, %thi, %kA0;" in fmma and "# mma.sync.aligned.m16n8k16" in fmma  # its PTX body


def test_to_dict_is_json(report_and_state):
    report, _ = report_and_state
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["device"] == "cpu" and data["options"]["kernel"] == "auto"
    down = next(row for row in data["layers"] if row["name"] == "model.layers.0.mlp.down_proj")
    assert down["rewritten"] and down["format"] == "bitmap(chunk_k=128)" and down["note"] == "emulated (CPU)"


def test_autotuner_choices_for_reads_keys():
    from flashllm_compile.codegen.autotune import AUTOTUNER, Choice
    from flashllm_compile.codegen.kernels.common import TileConfig

    choice = Choice("mma", TileConfig("mma", 64, 16, 1, 4, 3), 10.0, 20.0)
    AUTOTUNER._choices["float16:96x160:ck128:d0.2:m16:dense1"] = choice
    AUTOTUNER._choices["float16:96x160:ck128:d0.5:m1:dense1"] = choice
    try:
        assert AUTOTUNER.choices_for(96, 160, 128, torch.float16, density=0.21) == {16: choice}
        assert set(AUTOTUNER.choices_for(96, 160, 128, "float16")) == {1, 16}
        assert AUTOTUNER.choices_for(96, 160, 64, torch.float16) == {}
    finally:
        AUTOTUNER.clear()


LINEAR_SCRIPT = """
import torch
from torch import nn
lin = nn.Linear(128, 64)
with torch.no_grad():
    lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.8, 0)
    torch.compile(lin, backend="flashllm")(torch.randn(2, 128))
"""


def _run_with_torch_logs(setting: str) -> str:
    env = {**os.environ, "TORCH_LOGS": setting, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", LINEAR_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_torch_logs_flashllm_compile_shows_layer_lines():
    stderr = _run_with_torch_logs("+flashllm_compile")
    assert "flashllm: weight [64x128]" in stderr and "-> sparse_linear" in stderr


def test_torch_logs_output_code_shows_the_custom_op():
    assert "torch.ops.flashllm.sparse_linear" in _run_with_torch_logs("output_code")


def test_register_torch_logs_is_idempotent_and_enables_set_logs():
    import logging

    from torch._logging import _internal

    from flashllm_compile.backend import register_torch_logs

    register_torch_logs()
    register_torch_logs()
    assert _internal.log_registry.log_alias_to_log_qnames["flashllm"] == ["flashllm_compile"]
    try:
        torch._logging.set_logs(modules={"flashllm": logging.INFO})
        assert logging.getLogger("flashllm_compile").getEffectiveLevel() == logging.INFO
    finally:
        torch._logging.set_logs()


def test_compression_progress_bar_only_on_tty_with_many_layers(monkeypatch):
    from types import SimpleNamespace

    from flashllm_compile.passes import rewrite_sparse_linear as rw

    many = [SimpleNamespace(skip_reason=None)] * rw.PROGRESS_MIN_LAYERS
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("FLASHLLM_PROGRESS", raising=False)
    assert rw._progress(many) is not many  # a tqdm bar
    assert rw._progress(many[:-1]) == many[:-1]
    monkeypatch.setenv("FLASHLLM_PROGRESS", "0")
    assert rw._progress(many) is many
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.delenv("FLASHLLM_PROGRESS")
    assert rw._progress(many) is many


@pytest.mark.parametrize("source", [
    "L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']._modules['up_proj']._parameters['weight']",
    "L['args'][0]._modules['model']._modules['layers']._modules['0']._modules['mlp']._modules['up_proj']._parameters['weight']",
])
def test_weight_names_from_dynamo_sources(source):
    """Reports name a weight by its module path, whether Dynamo saw the module as `self` or, for a forward wrapped as
    f(*args) (transformers >= 5.24), as args[0]."""
    from flashllm_compile.passes.find_sparse_linears import clean_source_name

    assert clean_source_name(source) == "model.layers.0.mlp.up_proj.weight"
