"""Demo: prune a transformers LLaMA-architecture model, compile it with backend="flashllm", show what changed.

    python -m flashllm_compile.demo [--sparsity 0.8] [--size tiny|1b|7b] [--device cpu|cuda]

The model is built from a config with random weights (no download).  Prints every linear the backend saw
(rewritten or why not, bytes before/after), checks logits and greedy generate() against eager, and on a GPU
times decoding against backend="inductor" the way the README serves a model (generate() compiling its decode step
with CUDA graphs, on one reused static KV cache) and reports weight memory.
"""

from __future__ import annotations

import argparse
import time

import torch

from flashllm_compile.prune import magnitude_prune_
from flashllm_compile.report import decision_table, record_decisions

SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "test": (64, 128, 1, 4, 2),  # for fast CLI tests
    "tiny": (256, 688, 2, 8, 4),
    "1b": (2048, 5504, 8, 16, 16),
    "7b": (4096, 11008, 32, 32, 32),
}


def build_llama(size: str, dtype: torch.dtype, device: str):
    import transformers

    hidden, inter, layers, heads, kv = SIZES[size]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=32000,
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def print_decisions(decisions) -> None:
    print("\n" + decision_table(decisions))


def decode_tokens_per_s(model, ids, new_tokens: int, backend: str) -> float:
    """Greedy decode tokens/s with generate() compiling its decode step with `backend` and CUDA graphs
    (mode="reduce-overhead") on one static KV cache, reset before each call (so the graphs are recorded once).
    Without CUDA graphs a decode step is bound by host time (README, Use), which is not what the kernels change.
    The first generate (compile, autotune, graph recording) is not timed."""
    from transformers import CompileConfig, StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
    config = CompileConfig(backend=backend, mode="reduce-overhead", fullgraph=False)

    def generate() -> None:
        cache.reset()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id,
                       past_key_values=cache, compile_config=config)

    generate()
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate()
    torch.cuda.synchronize()
    return ids.shape[0] * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--size", choices=SIZES, default=None, help="default: tiny on CPU, 1b on GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    size = args.size or ("1b" if on_gpu else "tiny")
    dtype = torch.float16 if on_gpu else torch.float32

    model = build_llama(size, dtype, args.device)
    print(f"LLaMA-architecture model '{size}' ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params, "
          f"{dtype}, {args.device}); magnitude-pruning linears to {args.sparsity:.0%}")
    magnitude_prune_(model, args.sparsity, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=args.device)

    with torch.no_grad():
        reference = model(ids).logits
        eager_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        dense_forward = model.forward
        with record_decisions() as decisions:
            model.forward = torch.compile(dense_forward, backend="flashllm")
            t0 = time.perf_counter()
            logits = model(ids).logits
            compile_s = time.perf_counter() - t0
        print_decisions(decisions)
        err = ((logits.float() - reference.float()).norm() / reference.float().norm()).item()
        same = torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), eager_tokens)
        print(f"compile {compile_s:.1f} s; logits relative error vs eager {err:.2e}; greedy tokens identical: {same}")

        if on_gpu:
            from flashllm_compile.ops import KERNEL_HITS

            model.forward = dense_forward  # generate() compiles its decode step itself
            flash = decode_tokens_per_s(model, ids, args.new_tokens, "flashllm")
            print(f"kernel calls so far (CUDA-graph replays not counted): {dict(KERNEL_HITS)}")
            memory = torch.cuda.memory_allocated()
            torch._dynamo.reset()
            inductor = decode_tokens_per_s(model, ids, args.new_tokens, "inductor")
            print(f"decode tokens/s (CUDA graphs, static cache): flashllm {flash:.1f}, inductor {inductor:.1f} "
                  f"({flash / inductor:.2f}x); GPU memory allocated with flashllm {memory / 1e9:.2f} GB (dense "
                  "weights kept; see options release_dense_weights)")
        else:
            print("(no GPU: the rewritten linears ran the EMULATED path; speed is measured on a GPU)")


if __name__ == "__main__":
    main()
