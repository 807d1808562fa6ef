"""Real `transformers` models from tiny configs (random weights, no hub), pruned, through backend="flashllm" on CPU."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from flashllm_compile import ops
from flashllm_compile.prune import magnitude_prune_
from flashllm_compile.report import record_decisions

transformers = pytest.importorskip("transformers")
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB, LAYERS = 128, 2


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=64))


def tiny_opt():
    return OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                                    vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1))  # default 50256 > vocab


# name: (factory, projections per layer, options, name of the unpruned head's decision). Llama's k/v projections are [32, 64] = 2048 elements (2 kv
# heads of 16), below the default min_weight_numel (4096), so the threshold is lowered for it.
MODELS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              {"min_weight_numel": 1024}, "lm_head"),
    "opt": (tiny_opt, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], None, "model.decoder.embed_tokens"),
    "gpt2": (tiny_gpt2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], None, "transformer.wte"),
}


# sibling projections (same input) fused into one sparse_linear per layer (passes/fuse_sibling_linears.py)
FUSED = {"llama": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")], "opt": [("q_proj", "k_proj", "v_proj")],
         "gpt2": []}


# pointwise ops folded into the ops per layer (passes/fuse_epilogues.py): Llama's SwiGLU and both residual adds,
# OPT's fc1 relu (its residual adds follow a dropout; GPT-2's gelu_new is spelled out with tanh: neither folds)
EPILOGUES = {"llama": {"epilogue_glu": 1, "epilogue_residual": 2}, "opt": {"epilogue_act": 1}, "gpt2": {}}


def fusion_counters(name: str, graphs: int = 1) -> dict[str, int]:
    """The sibling-fusion and epilogue counters of `graphs` compiled graphs of model `name`."""
    groups, folds = FUSED[name], EPILOGUES[name]
    siblings = {"fused_siblings": graphs * LAYERS * len(groups),
                "fused_linears": graphs * LAYERS * sum(map(len, groups))} if groups else {}
    epilogues = {"fused_epilogues": graphs * LAYERS * sum(folds.values()),  # each fold on its own op here
                 **{k: graphs * LAYERS * v for k, v in folds.items()}} if folds else {}
    return {**siblings, **epilogues}


def op_calls(name: str) -> int:
    """sparse_linear calls per forward: one per projection, one per fused group."""
    return LAYERS * (len(MODELS[name][1]) - sum(len(g) - 1 for g in FUSED[name]))


def build(name: str, dtype: torch.dtype = torch.float32):
    factory, projections, options, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    report = magnitude_prune_(model, 0.8, progress=False)
    assert len(report) == LAYERS * len(projections)
    assert all(abs(s - 0.8) < 0.02 for s in report.values()), report
    model = model.to(dtype).eval()
    compile_kwargs = {"backend": "flashllm", **({"options": options} if options else {})}
    return model, projections, compile_kwargs


def inputs(batch: int = 2, seq: int = 8):
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_eager_and_every_projection_rewritten(name):
    model, projections, compile_kwargs = build(name)
    ids, mask = inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        compiled = torch.compile(model, **compile_kwargs)
        with record_decisions() as decisions:
            out = compiled(ids, attention_mask=mask, use_cache=False).logits
    assert rel_err(out, ref) < 1e-4
    assert ops.KERNEL_HITS["emulated"] >= op_calls(name)

    expected_rewrites = LAYERS * len(projections)
    # lm_head is left unpruned by magnitude_prune_ (lm_head / tied to the embedding), so it stays dense
    assert dict(counters["flashllm"]) == {"linear_found": expected_rewrites + 1, "rewritten": expected_rewrites,
                                          "skip_too_dense": 1, **fusion_counters(name)}
    rewritten = sorted(d.name for d in decisions if d.rewritten)
    assert len(rewritten) == expected_rewrites
    for layer in range(LAYERS):
        for proj in projections:
            assert sum(f".{layer}." in n and n.endswith(proj) for n in rewritten) == 1, (layer, proj, rewritten)
    (head,) = [d for d in decisions if not d.rewritten]
    assert (head.out_features, head.in_features, head.reason) == (VOCAB, 64, "too_dense")
    # Llama does not tie its head (the decision is named "lm_head"); OPT and GPT-2 tie it to the token embedding,
    # and the decision carries the name under which Dynamo first saw that shared parameter.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (name != "llama")
    assert head.name == MODELS[name][3]
    assert head.sparsity < 0.01 and head.compressed_bytes == 0


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generate_matches_eager(name):
    model, projections, compile_kwargs = build(name)
    expected = LAYERS * len(projections)
    ids, mask = inputs()
    gen_kwargs = {"attention_mask": mask, "max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False,
                  "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(ids, **gen_kwargs)
        model.forward = torch.compile(model.forward, **compile_kwargs)
        before = sum(ops.KERNEL_HITS.values())
        out = model.generate(ids, **gen_kwargs)
    assert ref.shape == (2, 8 + 6)
    assert torch.equal(out, ref)
    # prefill and decode graphs (and a dynamic-shape recompile): each rewrote every projection, skipped the head
    graphs = counters["flashllm"]["skip_too_dense"]
    assert graphs >= 2
    assert dict(counters["flashllm"]) == {"linear_found": graphs * (expected + 1), "rewritten": graphs * expected,
                                          "skip_too_dense": graphs, **fusion_counters(name, graphs)}
    assert sum(ops.KERNEL_HITS.values()) - before >= 6 * op_calls(name)  # one prefill + five decode forwards


def test_llama_bf16_logits():
    model, projections, compile_kwargs = build("llama", torch.bfloat16)
    ids, mask = inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        out = torch.compile(model, **compile_kwargs)(ids, attention_mask=mask, use_cache=False).logits
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2
    assert counters["flashllm"]["rewritten"] == LAYERS * len(projections)
    assert ops.KERNEL_HITS["emulated"] >= op_calls("llama")
