"""sparsify_: dense weights freed, results unchanged eagerly and compiled, shared weights left alone."""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from flashllm_compile import ops
from flashllm_compile.prune import magnitude_prune_
from flashllm_compile.sparsify import SparseLinear, sparsify_


def tiny_llama(tie: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval()
    magnitude_prune_(model, 0.8, progress=False)
    return model


def test_sparsify_frees_dense_weights_and_keeps_results():
    model = tiny_llama(tie=False)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        saved = sparsify_(model)
        after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert len(saved) == 14 and before - after == sum(saved.values()) > 0
        assert not any(type(m) is nn.Linear for n, m in model.named_modules() if "layers" in n)
        assert type(model.lm_head) is nn.Linear  # not pruned (and filtered out by default)
        ops.KERNEL_HITS.clear()
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)  # eager through the op
        assert ops.KERNEL_HITS["emulated"] == 14
        compiled = torch.compile(model, backend="flashllm")(ids).logits
        torch.testing.assert_close(compiled, ref, rtol=1e-4, atol=1e-4)
    assert counters["flashllm"]["rewritten"] == 0  # SparseLinear already calls the op: nothing left to rewrite


def test_weight_property_rebuilds_dense():
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.masked_fill_(torch.rand(32, 64) < 0.7, 0)
    dense = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    sparsify_(model)
    assert isinstance(model[0], SparseLinear)
    assert torch.equal(model[0].weight, dense)


def test_shared_and_dense_weights_stay():
    shared = nn.Linear(64, 64)
    with torch.no_grad():
        shared.weight.masked_fill_(torch.rand(64, 64) < 0.9, 0)
    dense = nn.Linear(64, 64)
    model = nn.ModuleDict({"a": shared, "b": nn.Linear(64, 64), "c": dense})
    model["b"].weight = shared.weight  # tied
    assert sparsify_(model) == {}
