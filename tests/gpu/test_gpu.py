"""GPU checks (H100): every kernel family on real LLaMA-7B shapes, fp16 and bf16, and a compiled transformers
model.  Run with `FLASHLLM_TEST_GPU=1 python -m pytest -q tests/gpu` (skipped without a GPU)."""

import functools

import pytest
import torch

from flashllm_compile.codegen.autotune import LAUNCHERS, candidate_configs
from flashllm_compile.codegen.formats.bitmap import TILE_ROWS, BitmapWeight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LLAMA_7B = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)}


def pruned(n, k, sparsity, dtype):
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    return w.masked_fill_(torch.rand(n, k, device="cuda") < sparsity, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer", LLAMA_7B)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_every_family_on_llama7b_shapes(layer, dtype, sparsity):
    n, k = LLAMA_7B[layer]
    w = pruned(n, k, sparsity, dtype)
    fmt = BitmapWeight.from_dense(w)
    assert torch.equal(fmt.to_dense(), w)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    for m in (1, 3, 8, 16, 33, 64):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
        seen = set()
        for config in candidate_configs(m):
            key = config.family  # one config per family: compile time is the limit
            if key in seen:
                continue
            seen.add(key)
            y = LAUNCHERS[config.family](x, fmt, bias, config)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (layer, m, config, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, sparsity", [(1040, 4200, 0.5), (333, 1000, 0.0), (200, 4200, 0.97), (4096, 4096, 0.6)])
def test_fmma_every_config_on_tile_major_values(n, k, sparsity, dtype):
    """fmma's linear staging (tile-major values): every config, values with and without 16 bytes of slack after them
    (the bounded copies), odd N (a partial 16-row block) and K (a partial chunk)."""
    import dataclasses

    from flashllm_compile.codegen.kernels.bitmap_fmma import bitmap_fmma, get_bitmap_fmma_configs

    w = pruned(n, k, sparsity, dtype)
    tiled = BitmapWeight.from_dense(w, tile_rows=TILE_ROWS)
    tight = dataclasses.replace(tiled, values=tiled.values.clone())  # no slack: every copy bounded
    for m in (1, 5, 16, 33, 64):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = torch.nn.functional.linear(x.float(), w.float())
        for config in get_bitmap_fmma_configs(m):
            for fmt in (tiled, tight):
                y = bitmap_fmma(x, fmt, None, config)
                err = ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                assert torch.isfinite(y).all() and err < 1e-2, (n, k, sparsity, m, config, err)


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_compiled_llama_fp16_matches_eager_and_uses_sparse_kernels(sparsity):
    """At 80% the compiler keeps the bitmap's values row-major (the row walk is a candidate); at 50% tile-major,
    where the row walk must not run."""
    transformers = pytest.importorskip("transformers")
    from torch._dynamo.utils import counters

    from flashllm_compile.backend import flashllm_backend
    from flashllm_compile.ops import KERNEL_HITS
    from flashllm_compile.prune import magnitude_prune_

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=1000)
    model = transformers.LlamaForCausalLM(config).cuda().half().eval()
    magnitude_prune_(model, sparsity, progress=False)
    ids = torch.randint(0, 1000, (1, 12), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
        eager_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        counters.clear()
        KERNEL_HITS.clear()
        # the function itself: works from a source checkout too (the entry point is tested in tests/)
        backend = functools.partial(flashllm_backend, options={"kernel": "triton"})
        model.forward = torch.compile(model.forward, backend=backend)
        out = model(ids).logits.float()
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert counters["flashllm"]["rewritten"] >= 14
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    assert sum(KERNEL_HITS[f] for f in LAUNCHERS) > 0 and KERNEL_HITS["dense"] == 0
    assert KERNEL_HITS["rowwalk"] == 0 if sparsity < 0.75 else KERNEL_HITS["rowwalk"] + KERNEL_HITS["mma"] > 0
    assert (tokens == eager_tokens).float().mean().item() > 0.9  # fp16 rounding may flip a rare argmax tie


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.7, 0.9, 1.0])
def test_cmma_every_config_on_odd_and_llama_shapes(dtype, sparsity):
    """The Tiled-CSL kernel: every config (warps, split-K, token tiles), odd shapes, bias and epilogues."""
    from flashllm_compile.codegen.epilogue_spec import Epilogue
    from flashllm_compile.codegen.formats.csl import CslWeight
    from flashllm_compile.codegen.kernels.csl_mma import csl_mma, get_csl_mma_configs

    for n, k in ((37, 300), (1000, 130), LLAMA_7B["down"]):
        w = pruned(n, k, sparsity, dtype)
        fmt = CslWeight.from_dense(w)
        assert torch.equal(fmt.to_dense(), w)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        for m in (1, 8, 29, 64):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
            for config in get_csl_mma_configs(m, fmt.max_groups):
                y = csl_mma(x, fmt, bias, config).float()
                scale = ref.norm().clamp_min(1e-3)
                assert ((y - ref).norm() / scale).item() < 1e-2, (n, k, m, config)
            residual = torch.randn(m, n, device="cuda", dtype=dtype)
            y = csl_mma(x, fmt, bias, get_csl_mma_configs(m, fmt.max_groups)[0], Epilogue("silu", False, residual)).float()
            expect = torch.nn.functional.silu(ref) + residual.float()
            assert ((y - expect).norm() / expect.norm()).item() < 1e-2


def test_compiled_static_decode_step_dispatches_formats():
    """A static token count (M = 8): the pass measures both formats and dense per linear at compile time; whatever
    it picks, outputs match eager and every rewritten op reports its format."""
    from torch._dynamo.utils import counters

    from flashllm_compile.backend import flashllm_backend
    from flashllm_compile.report import record_decisions

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4096, 11008, bias=False), torch.nn.SiLU(),
                              torch.nn.Linear(11008, 4096, bias=False)).cuda().half().eval()
    with torch.no_grad():
        for lin in (mlp[0], mlp[2]):
            lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.9, 0)
        x = torch.randn(8, 4096, device="cuda", dtype=torch.float16)
        ref = mlp(x).float()
        counters.clear()
        with record_decisions() as decisions:
            out = torch.compile(mlp, backend=flashllm_backend)(x).float()  # works from a source checkout too
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    layouts = [d.layout for d in decisions if d.rewritten]
    assert layouts and set(layouts) <= {"bitmap", "csl"}
    assert counters["flashllm"]["csl"] == layouts.count("csl")
    print("formats chosen at M = 8, 90%:", layouts, "dense:", counters["flashllm"]["skip_dense_faster"])


def test_direct_launch_matches_jit_and_keys_on_alignment():
    """codegen/kernels/launch.py: the second launch of a specialisation skips the JIT; it must equal the JIT's result,
    and an x that is not 16-byte aligned (Triton specialises on that) must get its own compiled kernel."""
    from flashllm_compile.codegen.kernels import launch as launch_mod
    from flashllm_compile.codegen.kernels.epilogue import fused_epilogue

    torch.manual_seed(0)
    bias = torch.randn(4096, device="cuda", dtype=torch.float16)
    buf = torch.randn(2 * 8 * 4096 + 1, device="cuda")
    launch_mod._COMPILED.clear()
    outs = []
    for offset in (0, 0, 1, 1):  # aligned twice, then fp32 partials starting 4 bytes in (not 16-byte aligned)
        partials = buf[offset:offset + 2 * 8 * 4096].view(2, 8, 4096)
        out = fused_epilogue(partials, bias, None, torch.float16)
        ref = (partials.sum(0) + bias.float()).half()
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])
    assert len(launch_mod._COMPILED) == 2  # one entry per alignment


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pdl_chain_is_exact_over_replays(dtype, monkeypatch):
    """Programmatic dependent launch (cmma, fmma, the row walk, the epilogue kernel): in a CUDA graph where each op
    reads the previous op's output through a torch kernel, 30 replays with PDL give bitwise the result without it (a
    kernel that read x or wrote before `griddepcontrol.wait` would race), and the launches really carry the
    attribute."""
    from flashllm_compile.codegen.formats.csl import CslWeight
    from flashllm_compile.codegen.kernels import launch
    from flashllm_compile.codegen.kernels.bitmap_fmma import bitmap_fmma, get_bitmap_fmma_configs
    from flashllm_compile.codegen.kernels.bitmap_rowwalk import bitmap_rowwalk, get_bitmap_rowwalk_configs
    from flashllm_compile.codegen.kernels.csl_mma import csl_mma, get_csl_mma_configs

    weights = [pruned(4096, 4096, 0.8, dtype) for _ in range(4)]
    csl = [CslWeight.from_dense(w) for w in weights]
    bitmap = [BitmapWeight.from_dense(w) for w in weights]
    tile_major = [BitmapWeight.from_dense(w, 128, TILE_ROWS) for w in weights]
    for m in (1, 8, 32):
        x0 = torch.randn(m, 4096, device="cuda", dtype=dtype)
        cmma = next(c for c in get_csl_mma_configs(m, max(f.max_groups for f in csl)) if c.split_k > 1)
        fmma = [c for c in get_bitmap_fmma_configs(m) if c.split_k in (1, 3)]  # stores by the program or the epilogue
        walk = get_bitmap_rowwalk_configs(m)[-1:] if m <= 8 else []

        def chain(x0=x0, cmma=cmma, fmma=fmma, walk=walk):
            x = x0
            for i in range(4):
                x = csl_mma(x, csl[i], None, cmma) * 0.02
                x = bitmap_fmma(x, tile_major[i], None, fmma[i % len(fmma)]) * 0.05
                if walk:
                    x = bitmap_rowwalk(x, bitmap[i], None, walk[0]) * 0.05
            return x

        results = {}
        for pdl in ("0", "1"):
            monkeypatch.setenv("FLASHLLM_PDL", pdl)
            assert launch.pdl_enabled(x0.device) == (pdl == "1" and torch.cuda.get_device_capability() >= (9, 0))
            chain()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            runs = []
            for _ in range(30):
                out.fill_(float("nan"))
                graph.replay()
                runs.append(out.clone())
            results[pdl] = runs
        assert all(torch.equal(r, results["0"][0]) for r in results["0"] + results["1"])
        assert torch.isfinite(results["1"][0]).all()
        if torch.cuda.get_device_capability() >= (9, 0):  # what the compiled launcher reads at every launch
            launched = {(key[0].fn.__name__, compiled.metadata.launch_pdl) for key, (compiled, _) in
                        launch._COMPILED.items()}
            kernels = {"_csl_mma_kernel", "_epilogue_kernel", "_bitmap_smma_kernel"} | (
                {"_bitmap_rowwalk_kernel"} if walk else set())
            assert {(name, True) for name in kernels} <= launched and {(name, False) for name in kernels} <= launched
