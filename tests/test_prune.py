"""Tests for flashllm_compile.prune (CPU only, random weights, no hub downloads)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flashllm_compile.prune import magnitude_prune_, sparsity_report, wanda_prune_

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------------------------
# fixtures / helpers
# ----------------------------------------------------------------------------------------------------------------


def tiny_seq(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16, bias=False)).to(dtype)


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF init is N(0, 0.02); make it a bit less uniform, still continuous (no ties)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def check_rows(w_before: torch.Tensor, w_after: torch.Tensor, score: torch.Tensor, sparsity: float) -> None:
    """``[N, K]``: exactly int(K*s) zeros per row, at the lowest-score positions; kept entries unchanged."""
    k = w_after.shape[1]
    n_zero = int(k * sparsity)
    zero = w_after == 0
    assert (zero.sum(1) == n_zero).all()
    assert torch.equal(w_after[~zero], w_before[~zero])
    if 0 < n_zero < k:
        inf = torch.tensor(math.inf, dtype=score.dtype)
        max_pruned = torch.where(zero, score, -inf).amax(1)
        min_kept = torch.where(~zero, score, inf).amin(1)
        assert (min_kept >= max_pruned).all()


def wanda_reference(w: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Hand-computed Wanda on ``w`` ``[N, K]`` with inputs ``x`` ``[..., K]``: returns the pruned copy."""
    k = w.shape[1]
    norm = (x.reshape(-1, k).double() ** 2).sum(0).sqrt()  # [K]
    score = w.double().abs() * norm[None, :]  # [N, K]
    order = score.argsort(dim=1)  # ascending
    out = w.clone()
    out.scatter_(1, order[:, : int(k * sparsity)], 0)
    return out


def no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0 for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# magnitude
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_exact_row_counts_and_keeps_largest(sparsity):
    model = tiny_seq()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = magnitude_prune_(model, sparsity, progress=False)
    assert set(report) == {"0", "2"}
    for fqn, w0 in before.items():
        w = model.get_submodule(fqn).weight.detach()
        check_rows(w0, w, w0.abs(), sparsity)
        assert report[fqn] == pytest.approx(int(w.shape[1] * sparsity) / w.shape[1])
    assert sparsity_report(model) == report


def test_magnitude_keeps_parameter_identity_dtype_device():
    model = tiny_seq()
    params = {n: (p, p.data_ptr(), p.dtype, p.device) for n, p in model.named_parameters()}
    bias = model[0].bias.detach().clone()
    magnitude_prune_(model, 0.5, progress=False)
    for n, p in model.named_parameters():
        p0, ptr, dtype, device = params[n]
        assert p is p0 and p.data_ptr() == ptr and p.dtype == dtype and p.device == device
        assert isinstance(p, nn.Parameter) and p.requires_grad
    assert torch.equal(model[0].bias, bias)  # biases are never touched


def test_works_inside_no_grad_and_with_grad():
    for ctx in (torch.no_grad(), torch.enable_grad()):
        model = tiny_seq()
        with ctx:
            report = magnitude_prune_(model, 0.5, progress=False)
        assert all(v == pytest.approx(0.5) for v in report.values())
        assert model[0].weight.grad is None


@pytest.mark.parametrize("tie", [True, False])
def test_llama_lm_head_and_embedding_untouched(tie):
    model = tiny_llama(tie)
    emb0 = model.model.embed_tokens.weight.detach().clone()
    head0 = model.lm_head.weight.detach().clone()
    report = magnitude_prune_(model, 0.5, progress=False)

    expected = {
        f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}"
        for i in range(2)
        for n in LLAMA_LINEARS
    }
    assert set(report) == expected
    assert all(v == pytest.approx(0.5) for v in report.values())
    assert torch.equal(model.model.embed_tokens.weight, emb0)
    assert torch.equal(model.lm_head.weight, head0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    for fqn in expected:
        w = model.get_submodule(fqn).weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    model(ids())  # still runs


def test_weight_tied_to_embedding_is_skipped_by_data_ptr():
    class TiedOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.mid = nn.Linear(16, 16)
            self.out_proj = nn.Linear(16, 20, bias=False)  # not called lm_head, but tied
            self.out_proj.weight = self.emb.weight

        def forward(self, x):
            return self.out_proj(self.mid(self.emb(x)))

    torch.manual_seed(0)
    model = TiedOut()
    emb0 = model.emb.weight.detach().clone()
    assert set(magnitude_prune_(model, 0.5, progress=False)) == {"mid"}
    assert torch.equal(model.emb.weight, emb0)
    assert set(wanda_prune_(model, 0.5, torch.randint(0, 20, (2, 5)), progress=False)) == {"mid"}
    assert torch.equal(model.emb.weight, emb0)


def test_filter_fn_honoured():
    model = tiny_llama(tie=False)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen = []

    def only_mlp(module, fqn):
        seen.append((type(module), fqn))
        return ".mlp." in fqn

    report = magnitude_prune_(model, 0.25, filter_fn=only_mlp, progress=False)
    assert set(report) == {f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")}
    assert all(t is nn.Linear for t, _ in seen)  # only linears are offered to filter_fn
    assert "lm_head" in {f for _, f in seen}
    for fqn, w0 in before.items():
        w = model.get_submodule(fqn).weight
        if fqn in report:
            assert ((w == 0).sum(1) == w.shape[1] // 4).all()
        else:
            assert torch.equal(w, w0)
    assert set(sparsity_report(model, filter_fn=lambda m, f: ".mlp." in f)) == set(report)

    # a custom filter replaces the default one entirely: it may select lm_head
    head = magnitude_prune_(model, 0.5, filter_fn=lambda m, f: f == "lm_head", progress=False)
    assert head == {"lm_head": pytest.approx(0.5)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_kept(dtype):
    model = tiny_seq(dtype)
    w0 = model[0].weight.detach().clone()
    magnitude_prune_(model, 0.5, progress=False)
    assert model[0].weight.dtype == dtype and model[2].weight.dtype == dtype
    assert ((model[0].weight == 0).sum(1) == 16).all()
    check_rows(w0, model[0].weight.detach(), w0.float().abs(), 0.5)

    model = tiny_seq(dtype)
    wanda_prune_(model, 0.5, torch.randn(3, 7, 32).to(dtype), progress=False)
    assert model[0].weight.dtype == dtype and model[2].weight.dtype == dtype
    assert ((model[2].weight == 0).sum(1) == 24).all()


def test_conv1d_prunes_per_output_feature():
    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs; weight [K=40, N=24]
    nn.init.normal_(conv.weight)
    model = nn.Sequential(conv)
    w0 = conv.weight.detach().clone()
    report = magnitude_prune_(model, 0.5, progress=False)
    assert report == {"0": pytest.approx(0.5)}
    check_rows(w0.t(), conv.weight.detach().t(), w0.t().abs(), 0.5)

    conv.weight.data.copy_(w0)
    x = torch.randn(2, 6, 40) * torch.linspace(0.1, 10, 40)
    wanda_prune_(model, 0.5, x, progress=False)
    assert torch.equal(conv.weight.detach().t(), wanda_reference(w0.t(), x, 0.5))


# ----------------------------------------------------------------------------------------------------------------
# wanda
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5, 32), (11, 32)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_wanda_matches_reference_on_single_linear(shape, sparsity):
    torch.manual_seed(0)
    lin = nn.Linear(32, 12)
    w0 = lin.weight.detach().clone()
    x = torch.randn(shape) * torch.linspace(0.05, 5.0, 32)  # non-uniform feature norms
    report = wanda_prune_(lin, sparsity, x, progress=False)
    assert report == {"": pytest.approx(int(32 * sparsity) / 32)}
    assert torch.equal(lin.weight.detach(), wanda_reference(w0, x, sparsity))
    assert no_hooks(lin)


def test_wanda_differs_from_magnitude_with_nonuniform_norms():
    torch.manual_seed(0)
    w0 = torch.randn(16, 32)
    x = torch.randn(4, 8, 32)
    x[..., :16] *= 100.0  # first half of the features dominate the activations

    mag, wan = nn.Linear(32, 16, bias=False), nn.Linear(32, 16, bias=False)
    mag.weight.data.copy_(w0)
    wan.weight.data.copy_(w0)
    magnitude_prune_(mag, 0.5, progress=False)
    wanda_prune_(wan, 0.5, x, progress=False)
    assert not torch.equal(mag.weight == 0, wan.weight == 0)
    # with dominant features, wanda keeps (almost) only those
    assert (wan.weight[:, :16] != 0).float().mean() > 0.9
    # uniform norms: wanda degenerates to magnitude
    wan.weight.data.copy_(w0)
    wanda_prune_(wan, 0.5, torch.ones(3, 32), progress=False)
    assert torch.equal(mag.weight, wan.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_wanda_on_llama(tie):
    model = tiny_llama(tie)
    model.train()  # wanda calibrates in eval mode and restores training flags afterwards
    emb0 = model.model.embed_tokens.weight.detach().clone()
    head0 = model.lm_head.weight.detach().clone()
    params = {n: p for n, p in model.named_parameters()}

    report = wanda_prune_(model, 0.5, ids(), progress=False)
    assert len(report) == 14 and all(v == pytest.approx(0.5) for v in report.values())
    assert no_hooks(model)
    assert all(m.training for m in model.modules())
    assert torch.equal(model.model.embed_tokens.weight, emb0)
    assert torch.equal(model.lm_head.weight, head0)
    assert all(p is params[n] for n, p in model.named_parameters())
    for fqn in report:
        w = model.get_submodule(fqn).weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()

    # the result differs from magnitude pruning of the same weights
    ref = tiny_llama(tie)
    magnitude_prune_(ref, 0.5, progress=False)
    assert any(not torch.equal(model.get_submodule(f).weight == 0, ref.get_submodule(f).weight == 0) for f in report)


def test_wanda_unreached_module_raises_and_removes_hooks():
    class PartlyUsed(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    model = PartlyUsed()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="unused"):
        wanda_prune_(model, 0.5, torch.randn(4, 8), progress=False)
    assert no_hooks(model)
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())  # nothing pruned


def test_wanda_removes_hooks_when_forward_fails():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        wanda_prune_(model, 0.5, torch.randn(4, 8), progress=False)
    assert no_hooks(model)
    assert model.training and model.lin.training


# ----------------------------------------------------------------------------------------------------------------
# validation / progress
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_invalid_sparsity_raises(bad):
    model = tiny_seq()
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune_(model, bad, progress=False)
    with pytest.raises(ValueError, match="sparsity"):
        wanda_prune_(model, bad, torch.randn(2, 32), progress=False)
    assert torch.equal(model[0].weight, w0)
    assert no_hooks(model)


def test_wanda_rejects_empty_calibration():
    with pytest.raises(ValueError, match="calibration"):
        wanda_prune_(tiny_seq(), 0.5, torch.empty(0, 32), progress=False)


def test_progress_bar(capsys):
    magnitude_prune_(tiny_seq(), 0.5, progress=True)
    assert "magnitude prune" in capsys.readouterr().err
    wanda_prune_(tiny_seq(), 0.5, torch.randn(2, 32), progress=True)
    assert "wanda prune" in capsys.readouterr().err
    magnitude_prune_(tiny_seq(), 0.5, progress=False)
    magnitude_prune_(tiny_seq(), 0.5)  # None: captured stderr is not a TTY, so no bar
    assert capsys.readouterr().err == ""
