"""Tensor parallelism: DTensor-sharded linears through backend="flashllm", 2 CPU processes over gloo.

Each rank builds the same pruned model, parallelises it with `parallelize_module` (TP=2), compiles it and saves
its outputs, counters and decisions; the test process compares them with the single-process eager model.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORLD = 2
VOCAB, LAYERS = 128, 2
PROJECTIONS = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
               "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
               "mlp.down_proj": "rowwise"}
NEW_TOKENS = 2  # prefill + one decode step: two graphs (a third token would add a dynamic-shape recompile)


def tiny_llama():
    """Pruned to 80%, with biases so both the Shard(0) bias (colwise) and the Replicate bias (rowwise) are used.
    hidden 128, 4 heads, 2 kv heads: the smallest local shard (k/v: [32, 128]) reaches min_weight_numel."""
    from flashllm_compile.prune import magnitude_prune_

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attention_bias=True, mlp_bias=True))
    magnitude_prune_(model, 0.8, progress=False)
    return model.eval()


def inputs():
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def generate(model, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding: (tokens [2, 8 + NEW_TOKENS], logits of every step [NEW_TOKENS, 2, VOCAB])."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def tiny_mlp(hidden: int = 256):
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.Linear(128, hidden), nn.ReLU(), nn.Linear(hidden, 128))
    with torch.no_grad():
        for lin in (mlp[0], mlp[2]):
            lin.weight.mul_(torch.rand_like(lin.weight) > 0.8)
    return mlp.eval()


class ReplicatedLinear(nn.Module):
    """A linear with a Replicate DTensor weight: no supported placement pair, must stay dense."""

    def __init__(self, weight: torch.Tensor, mesh):
        super().__init__()
        from torch.distributed.tensor import Replicate, distribute_tensor

        self.mesh = mesh
        self.weight = nn.Parameter(distribute_tensor(weight, mesh, [Replicate()]))

    def forward(self, x):
        from torch.distributed.tensor import DTensor, Replicate

        return F.linear(DTensor.from_local(x, self.mesh, [Replicate()], run_check=False), self.weight).to_local()


def _flashllm_state():
    from torch._dynamo.utils import counters

    from flashllm_compile import ops

    state = {"counters": dict(counters["flashllm"]), "hits": dict(ops.KERNEL_HITS)}
    counters.clear()
    ops.KERNEL_HITS.clear()
    torch._dynamo.reset()
    return state


def _worker(rank: int, store: str, out_dir: str) -> None:
    """One rank: the four cases, results saved to out_dir/rank{rank}.pt (asserted by the test process)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from flashllm_compile.report import record_decisions

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        styles = {"colwise": ColwiseParallel(), "rowwise": RowwiseParallel()}
        result = {}
        _flashllm_state()

        # 1. LLaMA, TP=2 with the usual plan, kernel AUTO (EMULATED on CPU): greedy decoding (prefill, decode)
        model = tiny_llama()
        for layer in model.model.layers:
            parallelize_module(layer, mesh, {name: styles[style] for name, style in PROJECTIONS.items()})
        ids, mask = inputs()
        with torch.no_grad(), record_decisions() as decisions:
            model.forward = torch.compile(model.forward, backend="flashllm")
            result["tokens"], result["logits"] = generate(model, ids, mask)
            result["generate"] = _flashllm_state()
        result["decisions"] = [(d.name, d.out_features, d.in_features, d.rewritten, d.reason) for d in decisions]

        # 2. a biased MLP (colwise up, rowwise down) on the Triton kernels (interpreter): the kernel path on shards
        mlp = tiny_mlp()
        parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            result["mlp"] = torch.compile(mlp, backend="flashllm", options={"kernel": "triton"})(x)
        result["mlp_state"] = _flashllm_state()

        # 3. a Replicate DTensor weight: left dense with a counted reason, still correct
        replicated = ReplicatedLinear(tiny_mlp()[0].weight.detach(), mesh)
        with torch.no_grad():
            result["replicated"] = torch.compile(replicated, backend="flashllm")(x)
        result["replicated_state"] = _flashllm_state()

        # 4. uneven shards (129 output features over 2 ranks: 65 + 64): left dense with a counted reason
        uneven = tiny_mlp(hidden=129)[0]
        parallelize_module(uneven, mesh, ColwiseParallel())
        with torch.no_grad():
            result["uneven"] = torch.compile(uneven, backend="flashllm")(x)  # this rank's output columns
        result["uneven_state"] = _flashllm_state()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def test_llama_tp2_decode_matches_single_process_eager(rank_results):
    model = tiny_llama()
    ids, mask = inputs()
    with torch.no_grad():
        ref_tokens, ref_logits = generate(model, ids, mask)
    projections = LAYERS * len(PROJECTIONS)
    for rank, result in enumerate(rank_results):
        # the logits of the prefill step and of every decode step (M = 1 per sequence)
        torch.testing.assert_close(result["logits"], ref_logits, rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
        assert torch.equal(result["tokens"], ref_tokens), rank
        # both graphs (prefill, decode) rewrote every projection on this rank's shard; lm_head (unpruned, not
        # parallelised) stays dense
        assert result["generate"]["counters"] == {"linear_found": 2 * (projections + 1), "rewritten": 2 * projections,
                                                  "skip_too_dense": 2}, rank
        assert result["generate"]["hits"] == {"emulated": NEW_TOKENS * projections}, rank
        # decisions carry the local shard shapes: colwise halves the out features, rowwise the in features
        shapes = {name.split("layers.")[1]: (n, k) for name, n, k, rewritten, _ in result["decisions"] if rewritten}
        assert shapes["0.self_attn.q_proj"] == (64, 128)
        assert shapes["0.self_attn.k_proj"] == (32, 128)
        assert shapes["0.self_attn.o_proj"] == (128, 64)
        assert shapes["1.mlp.up_proj"] == (128, 128)
        assert shapes["1.mlp.down_proj"] == (128, 128)


def test_mlp_tp2_triton_kernels_on_shards(rank_results):
    mlp = tiny_mlp()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = mlp(x)
    for rank, result in enumerate(rank_results):
        torch.testing.assert_close(result["mlp"], ref, rtol=1e-4, atol=1e-4, msg=f"rank {rank}")
        assert result["mlp_state"]["counters"] == {"linear_found": 2, "rewritten": 2}, rank
        hits = result["mlp_state"]["hits"]
        assert sum(hits.values()) == 2 and not {"dense", "emulated"} & hits.keys(), hits


def test_unsupported_dtensor_layouts_left_dense_and_counted(rank_results):
    weight = tiny_mlp()[0].weight.detach()
    uneven = tiny_mlp(hidden=129)[0]
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        uneven_ref = uneven(x).chunk(WORLD, dim=-1)  # DTensor's Shard(-1): torch.chunk sizes, 65 + 64
    for rank, result in enumerate(rank_results):
        torch.testing.assert_close(result["replicated"], F.linear(x, weight), rtol=1e-5, atol=1e-5)
        assert result["replicated_state"]["counters"] == {"linear_found": 1, "skip_dtensor_placement": 1}, rank
        assert result["replicated_state"]["hits"] == {}, rank
        torch.testing.assert_close(result["uneven"], uneven_ref[rank], rtol=1e-5, atol=1e-5)
        assert result["uneven_state"]["counters"] == {"linear_found": 1, "skip_dtensor_uneven_shard": 1}, rank
        assert result["uneven_state"]["hits"] == {}, rank
