"""Tensor-parallel decode benchmark: backend="flashllm" vs backend="inductor" with the same TP (issue 9).

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py                      # LLaMA-2-13B dims, 40 layers, 80%
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --layers 8 --batch 1 8 16
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --device cpu --tiny  # gloo smoke test, no GPU needed

Every rank builds the same model from a config with random weights (same seed; LLaMA-2-13B dims: hidden 5120,
intermediate 13824, 40 heads, vocab 32000; --layers of them), magnitude-prunes every linear but lm_head to
--sparsity, then shards it with `torch.distributed.tensor.parallel.parallelize_module` (TP = the world size):
q/k/v/gate/up ColwiseParallel, o/down RowwiseParallel (each rank keeps its own chunk: no scatter).  Embedding,
norms and lm_head stay replicated.  Collectives are PyTorch's: NCCL on CUDA, gloo on CPU.

For each batch size a random prompt of --prompt-len tokens is decoded greedily for exactly --new-tokens tokens
with `model.generate(..., cache_implementation="static")` (the static cache sizes itself from the local k/v
shards) under the configurations:

  eager     the TP model as is: one warm-up generate, one timed generate
  inductor  model.forward = torch.compile(forward, backend="inductor", mode=--mode)
  flashllm  model.forward = torch.compile(forward, backend="flashllm", options={"mode": --mode, "kernel": ...}):
            each rank compresses its own shards and runs torch.ops.flashllm.sparse_linear on them

For the compiled configurations the first generate is timed as compile_s, a second warms up, a third is timed.
Every forward call of the timed generate is clocked (the device synchronised after each: generate synchronises
every step anyway to test for stopping): call 0 is the prefill, the others are decode steps.

Output (rank 0; --out, default $OUT or benchmarks/out): bench_tp.csv (one row per batch x config) and a table
printed last.  Columns:
  decode_tokens_per_s   batch * decode steps / seconds from the start of the first decode call to the end of the
                        last one (prefill excluded; generate's own per-step work included); rank 0's clock
  speedup_vs_inductor   decode_tokens_per_s / the inductor row's
  prefill_s             the prefill call of the timed generate
  weight_mem_gb_per_gpu parameter bytes held by one rank (its shards + the replicated embedding, norms, lm_head);
                        flashllm adds the compressed bytes of its rewritten shards (dense kept for the fallback)
  weight_mem_if_released_gb_per_gpu  flashllm only: parameters - rewritten dense shards + compressed shards (what
                        options={"release_dense_weights": True} with flashllm_compile.sparsify_ would hold)
  peak_mem_gb_per_gpu   torch.cuda.max_memory_allocated() during the timed generate
  rewritten             flashllm only: linears rewritten per rank (unique layers over the compiled graphs)
  token_match           fraction of generated tokens equal to the inductor row's (eager, flashllm)
  kernel_hits           flashllm only: flashllm_compile.ops.KERNEL_HITS increments on rank 0 over all generates
  error                 the exception of a configuration that failed on any rank (the benchmark goes on)
Memory columns are the maximum over ranks.  A failure on one rank only can leave the others waiting in a
collective until the process-group timeout (--timeout-min).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import _fmt, ensure_flashllm_backend, gpu_info, reset_compiled_state, write_csv

# hidden, intermediate, layers, heads, kv heads, vocab, max positions
LLAMA2_13B = {"hidden": 5120, "intermediate": 13824, "layers": 40, "heads": 40, "kv_heads": 40, "vocab": 32000,
              "max_pos": 4096}
TINY = {"hidden": 128, "intermediate": 256, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128, "max_pos": 256}
TP_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
           "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
           "mlp.down_proj": "rowwise"}
CONFIGS = ("eager", "inductor", "flashllm")
COLUMNS = ["gpu", "torch", "triton", "world", "layers", "hidden", "intermediate", "dtype", "sparsity", "batch",
           "prompt_len", "new_tokens", "mode", "config", "decode_tokens_per_s", "speedup_vs_inductor", "prefill_s",
           "compile_s", "weight_mem_gb_per_gpu", "weight_mem_if_released_gb_per_gpu", "peak_mem_gb_per_gpu",
           "rewritten", "token_match", "kernel_hits", "error"]
GB = 1e9


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------


def build_model(dims: dict, dtype: torch.dtype, device: torch.device):
    """A LLaMA causal LM with `dims` and random weights (seed 0: the same on every rank), on `device`, eval."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=dims["hidden"], intermediate_size=dims["intermediate"], num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"], vocab_size=dims["vocab"],
        max_position_embeddings=dims["max_pos"])
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def parallelize(model, mesh) -> None:
    """The usual LLaMA TP plan on every decoder layer; every rank built the same weights, so each keeps its own
    chunk (src_data_rank=None: no scatter from rank 0)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in model.model.layers:
        parallelize_module(layer, mesh, {name: styles[style]() for name, style in TP_PLAN.items()},
                           src_data_rank=None)


def local_param_bytes(model) -> int:
    """Bytes of parameters this rank holds: the local shard of DTensor parameters, the whole of the others."""
    from flashllm_compile.passes.dtensor_linears import local_shard

    return sum(local_shard(p).numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# one configuration at one batch size
# ----------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocked(forward, device: torch.device, calls: list):
    """`forward` that appends (start, end) of every call to `calls`, synchronising the device before the end."""
    @functools.wraps(forward)  # generate() inspects the forward's signature
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        _sync(device)
        calls.append((start, time.perf_counter()))
        return out

    return wrapper


def generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of exactly `new_tokens` tokens with a static KV cache."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                          pad_token_id=model.config.eos_token_id or 0,
                          disable_compile=True)  # transformers must not compile the forward a second time


def _hits(counter: collections.Counter) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counter.items()) if v > 0) or "-"


def _gather_max(value):
    """max over ranks of a number (None where any rank has None)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return None if any(v is None for v in values) else max(values)


def bench_config(model, orig_forward, config: str, ids: torch.Tensor, new_tokens: int, mode: str | None,
                 kernel: str) -> dict:
    """Time one configuration on every rank; returns rank-agreed results (and this rank's tokens)."""
    from flashllm_compile import ops
    from flashllm_compile.report import record_decisions

    device = ids.device
    dense = local_param_bytes(model)
    row = {"config": config, "decode_tokens_per_s": None, "prefill_s": None, "compile_s": None,
           "weight_mem_gb_per_gpu": dense / GB, "weight_mem_if_released_gb_per_gpu": None,
           "peak_mem_gb_per_gpu": None, "rewritten": None, "kernel_hits": "", "error": "", "_tokens": None}
    decisions: list = []
    hits_start = collections.Counter(ops.KERNEL_HITS)
    forward = orig_forward
    try:
        if config != "eager":
            if config == "flashllm":
                kwargs = {"backend": "flashllm", "options": {"mode": mode, "kernel": kernel}}
            else:
                kwargs = {"backend": config} if mode is None else {"backend": config, "mode": mode}
            forward = torch.compile(orig_forward, **kwargs)
            with record_decisions() as decisions:  # filled by the flashllm compiles during the first generate
                model.forward = forward
                dist.barrier()
                start = time.perf_counter()
                generate(model, ids, new_tokens)
                _sync(device)
                row["compile_s"] = time.perf_counter() - start
        model.forward = forward
        generate(model, ids, new_tokens)  # warm-up (compiled: CUDA graphs recorded, autotuning done)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        calls: list[tuple[float, float]] = []
        model.forward = clocked(forward, device, calls)
        dist.barrier()
        tokens = generate(model, ids, new_tokens)
        if device.type == "cuda":
            row["peak_mem_gb_per_gpu"] = torch.cuda.max_memory_allocated(device) / GB
        row["prefill_s"] = calls[0][1] - calls[0][0]
        if len(calls) > 1:
            row["decode_tokens_per_s"] = ids.shape[0] * (len(calls) - 1) / (calls[-1][1] - calls[1][0])
        row["_tokens"] = tokens[:, ids.shape[1]:].cpu()
    except Exception as e:  # noqa: BLE001 -- e.g. OOM, CUDA graphs + collectives unsupported: record, go on
        traceback.print_exc()
        message = str(e).strip().splitlines()
        row["error"] = f"rank {dist.get_rank()}: {type(e).__name__}: {message[0] if message else ''}"[:300]
    finally:
        model.forward = orig_forward
        reset_compiled_state(device)
    if config == "flashllm":
        rewritten = {d.name: d for d in decisions if d.rewritten}  # graphs (prefill, decode) share compressions
        compressed = sum(d.compressed_bytes for d in rewritten.values())
        row["weight_mem_gb_per_gpu"] = (dense + compressed) / GB
        row["weight_mem_if_released_gb_per_gpu"] = (
            dense - sum(d.dense_bytes for d in rewritten.values()) + compressed) / GB
        row["rewritten"] = len(rewritten)
        row["kernel_hits"] = _hits(collections.Counter(ops.KERNEL_HITS) - hits_start)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, row["error"])
    row["error"] = "; ".join(e for e in errors if e)
    for key in ("weight_mem_gb_per_gpu", "weight_mem_if_released_gb_per_gpu", "peak_mem_gb_per_gpu"):
        row[key] = _gather_max(row[key])
    if row["error"]:
        row["decode_tokens_per_s"] = None
    return row


def run(dims: dict, sparsity: float, batches, prompt_len: int, new_tokens: int, device: torch.device,
        dtype: torch.dtype, mode: str | None, kernel: str, configs, on_row=None) -> list[dict]:
    """The whole benchmark on every rank; returns the rows (complete on rank 0)."""
    from torch.distributed.device_mesh import init_device_mesh

    from flashllm_compile.prune import magnitude_prune_

    ensure_flashllm_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    info = gpu_info()
    t0 = time.perf_counter()
    model = build_model(dims, dtype, device)
    magnitude_prune_(model, sparsity, progress=False)  # on the full weights, identically on every rank
    parallelize(model, mesh)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    orig_forward = model.forward
    if rank == 0:
        print(f"LLaMA {dims['layers']} layers (hidden {dims['hidden']}), TP={world}: "
              f"{local_param_bytes(model) / GB:.2f} GB of {dtype} parameters per rank, built, pruned to {sparsity} "
              f"and sharded in {time.perf_counter() - t0:.0f} s", flush=True)
    rows: list[dict] = []
    for batch in batches:
        generator = torch.Generator().manual_seed(1000 + batch)  # the same prompt on every rank and config
        ids = torch.randint(0, dims["vocab"], (batch, prompt_len), generator=generator).to(device)
        results = {c: bench_config(model, orig_forward, c, ids, new_tokens, mode, kernel) for c in configs}
        ref = results.get("inductor")
        for config, row in results.items():
            row["speedup_vs_inductor"] = row["token_match"] = None
            if ref is not None and row["decode_tokens_per_s"] and ref["decode_tokens_per_s"]:
                row["speedup_vs_inductor"] = row["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
            if ref is not None and config != "inductor" and row["_tokens"] is not None and ref["_tokens"] is not None:
                row["token_match"] = (row["_tokens"] == ref["_tokens"]).float().mean().item()
        for config, row in results.items():
            row.pop("_tokens")
            rows.append({**info, "world": world, "layers": dims["layers"], "hidden": dims["hidden"],
                         "intermediate": dims["intermediate"], "dtype": str(dtype).removeprefix("torch."),
                         "sparsity": sparsity, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                         "mode": mode or "default", **row})
            if rank == 0:
                print(f"  batch={batch} {config}: {_fmt(row['decode_tokens_per_s'], 1)} decode tok/s, compile "
                      f"{_fmt(row['compile_s'], 1)} s {row['kernel_hits']} {row['error']}", flush=True)
        if on_row is not None and rank == 0:
            on_row(rows)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    r = rows[0]
    print(f"\n{r['gpu']} x {r['world']} (TP={r['world']}), torch {r['torch']}, triton {r['triton']}; LLaMA with "
          f"{r['layers']} layers, hidden {r['hidden']}, {r['dtype']}, sparsity {r['sparsity']}; prompt "
          f"{r['prompt_len']}, {r['new_tokens']} new tokens, mode {r['mode']}; memory in GB per GPU; match = "
          "tokens equal to inductor's")
    print(f"{'batch':>5} {'config':<8} {'dec tok/s':>9} {'x ind':>6} {'prefill':>7} {'comp s':>7} {'weights':>7} "
          f"{'if rel':>6} {'peak':>6} {'match':>5}  kernels / error")
    for r in rows:
        print(f"{r['batch']:>5} {r['config']:<8} {_fmt(r['decode_tokens_per_s'], 1):>9} "
              f"{_fmt(r['speedup_vs_inductor']):>6} {_fmt(r['prefill_s'], 3):>7} {_fmt(r['compile_s'], 1):>7} "
              f"{_fmt(r['weight_mem_gb_per_gpu']):>7} {_fmt(r['weight_mem_if_released_gb_per_gpu']):>6} "
              f"{_fmt(r['peak_mem_gb_per_gpu']):>6} {_fmt(r['token_match']):>5}  {r['error'] or r['kernel_hits']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: one GPU per rank (LOCAL_RANK), NCCL; cpu: gloo (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (hidden 128, 2 layers, vocab 128), a "
                        "short prompt and few tokens: a smoke test of the whole path, e.g. on CPU")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 40, the full 13B; "
                        "fewer for a quick run)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="fraction of each linear weight zeroed "
                        "(default: %(default)s)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 1 8; tiny: 1 2)")
    parser.add_argument("--prompt-len", type=int, default=None, help="random prompt tokens (default: 128; tiny: 8)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per sequence, exactly, at least 2 (default: 128; tiny: 4)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="configurations to run (default: %(default)s)")
    parser.add_argument("--mode", default=None, help="torch.compile mode of both compiled configs ('default': "
                        "no CUDA graphs; default: reduce-overhead on cuda, default on cpu)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "triton", "dense", "emulated"],
                        help="flashllm kernel preference (default: %(default)s)")
    parser.add_argument("--timeout-min", type=float, default=30, help="process-group timeout (default: %(default)s)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"),
                        help="output folder (default: $OUT, else benchmarks/out; now %(default)s)")
    args = parser.parse_args()

    dims = dict(TINY if args.tiny else LLAMA2_13B)
    if args.layers is not None:
        if args.layers < 1:
            parser.error("--layers must be at least 1")
        dims["layers"] = args.layers
    batches = args.batch or ([1, 2] if args.tiny else [1, 8])
    prompt_len = args.prompt_len or (8 if args.tiny else 128)
    new_tokens = args.new_tokens or (4 if args.tiny else 128)
    if new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one prefill and one decode step)")
    if not 0 <= args.sparsity < 1:
        parser.error("--sparsity must satisfy 0 <= s < 1")
    mode = args.mode or ("reduce-overhead" if args.device == "cuda" else "default")
    mode = None if mode == "default" else mode
    if "RANK" not in os.environ:
        parser.error("run under torchrun, e.g. torchrun --nproc-per-node 2 benchmarks/bench_tp.py ...")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_tp.py --device cuda needs CUDA GPUs; nothing was run (--device cpu --tiny runs on CPU).",
              file=sys.stderr)
        sys.exit(2)

    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, dtype, backend = torch.device("cuda", local_rank), torch.float16, "nccl"
    else:
        device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=args.timeout_min))
    try:
        rank = dist.get_rank()
        csv_path = os.path.join(args.out, "bench_tp.csv")
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
        rows = run(dims, args.sparsity, batches, prompt_len, new_tokens, device, dtype, mode, args.kernel,
                   args.configs, on_row=lambda rows: write_csv(rows, csv_path, COLUMNS))  # partial runs count
        if rank == 0:
            write_csv(rows, csv_path, COLUMNS)
            print(f"\nwrote {csv_path}")
            print_table(rows)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
