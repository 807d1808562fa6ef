"""Replace each chosen linear node with `torch.ops.flashllm.sparse_linear` on the compressed weight.

The compressed tensors become buffers of the GraphModule, read through get_attr nodes: AOTAutograd lifts
module buffers as static inputs, so CUDA graphs (mode="reduce-overhead") neither copy them per replay nor
guard on them, and Inductor freezing can treat them as constants.  The rewrite edits Dynamo's GraphModule in
place (Dynamo hands it over; Inductor's own passes edit in place too): a deep copy would drop the
`_dynamo_source` of placeholders that AOTAutograd needs to find parameters.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from torch import fx
from torch._dynamo.utils import counters

import flashllm_compile.ops  # noqa: F401  (registers torch.ops.flashllm)
from flashllm_compile.codegen.formats.cache import compress_weight, watch_weight
from flashllm_compile.options import FlashLLMOptions
from flashllm_compile.passes.find_sparse_linears import LinearMatch, find_sparse_linears
from flashllm_compile.report import LinearDecision, publish

log = logging.getLogger("flashllm_compile")
BUFFER_PREFIX = "_flashllm_w"


def _fake_like(gm: fx.GraphModule, example_val: torch.Tensor | None, tensor: torch.Tensor):
    """meta['val'] for a new get_attr node, made in the graph's fake mode (keeps meta['val'] valid)."""
    fake_mode = getattr(example_val, "fake_mode", None)
    return fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor


def _register_compressed(gm: fx.GraphModule, match: LinearMatch, options: FlashLLMOptions,
                         registered: dict[int, tuple[str, ...]]):
    """Compress the weight (once per process) and register its tensors as gm buffers (once per graph)."""
    fmt = compress_weight(match.weight, options.chunk_k, transposed=match.transposed)
    if id(fmt) not in registered:
        index = len(registered)
        names = tuple(f"{BUFFER_PREFIX}{index}_{part}" for part in ("bitmap", "offsets", "values"))
        for name, tensor in zip(names, fmt.tensors()):
            gm.register_buffer(name, tensor)
            if hasattr(gm, "_param_name_to_source"):  # AOTAutograd requires a source per lifted buffer
                gm._param_name_to_source[name] = torch._dynamo.source.ConstantSource(name)
        registered[id(fmt)] = names
    return fmt, registered[id(fmt)]


def _rewrite_one(gm: fx.GraphModule, match: LinearMatch, options: FlashLLMOptions,
                 registered: dict[int, tuple[str, ...]]):
    fmt, names = _register_compressed(gm, match, options, registered)
    graph, node = gm.graph, match.node
    x_val = match.x.meta.get("val", match.x.meta.get("example_value"))
    with graph.inserting_before(node):
        tensor_nodes = []
        for name, tensor in zip(names, fmt.tensors()):
            get = graph.get_attr(name)
            get.meta["val"] = get.meta["example_value"] = _fake_like(gm, x_val, tensor)
            tensor_nodes.append(get)
        dense = None
        if not options.release_dense_weights:
            dense = match.weight_node
            if match.transposed:  # Conv1D stores [K, N]; the fallback wants an [N, K] view
                dense = graph.call_function(torch.t, (match.weight_node,))
                for key in ("val", "example_value"):
                    if key in match.weight_node.meta:
                        dense.meta[key] = match.weight_node.meta[key].t()
        new = graph.call_function(torch.ops.flashllm.sparse_linear.default, (
            match.x, *tensor_nodes, match.bias, dense, fmt.n, fmt.k, fmt.chunk_k, options.kernel.value,
            match.name, watch_weight(match.weight)))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", "stack_trace", "nn_module_stack",
                                                                 "source_fn_stack", "tensor_meta")})
    node.replace_all_uses_with(new)
    old_operands = [a for a in node.all_input_nodes if a.op in ("call_function", "call_method")]
    graph.erase_node(node)
    # Only the weight transpose the old node used can become dead. No global DCE: FX treats in-place methods
    # such as a KV-cache `index_copy_` as pure and would delete them.
    for operand in old_operands:
        if not operand.users:
            graph.erase_node(operand)
    return fmt


PROGRESS_MIN_LAYERS = 8


def _progress(matches: list[LinearMatch]):
    """A tqdm bar over `matches` while compressing, when >= PROGRESS_MIN_LAYERS are rewritable, stderr is a TTY,
    and the environment does not set FLASHLLM_PROGRESS=0; otherwise the list itself."""
    rewritable = sum(m.skip_reason is None for m in matches)
    if rewritable < PROGRESS_MIN_LAYERS or os.environ.get("FLASHLLM_PROGRESS") == "0" or not sys.stderr.isatty():
        return matches
    from tqdm.auto import tqdm

    return tqdm(matches, desc="flashllm: compressing linears", unit="layer", file=sys.stderr, leave=False)


def rewrite_sparse_linears(gm: fx.GraphModule, example_inputs, options: FlashLLMOptions) -> int:
    """Rewrite every eligible linear of `gm` in place; returns how many were rewritten.

    Counters: counters["flashllm"]["linear_found"], ["rewritten"], ["skip_<reason>"].  With many rewritable
    layers a progress bar is shown on a TTY stderr; FLASHLLM_PROGRESS=0 turns it off (see `_progress`)."""
    registered: dict[int, tuple[str, ...]] = {}
    rewritten = 0
    for match in _progress(list(find_sparse_linears(gm, example_inputs, options))):
        counters["flashllm"]["linear_found"] += 1
        op_name = getattr(match.node.target, "__name__", str(match.node.target))
        if match.skip_reason is None:
            fmt = _rewrite_one(gm, match, options, registered)
            rewritten += 1
            counters["flashllm"]["rewritten"] += 1
            log.info("flashllm: %s [%dx%d] %.1f%% zeros -> sparse_linear (%s), %.1f MB -> %.1f MB", match.name,
                     fmt.n, fmt.k, 100 * match.sparsity, options.kernel.value, match.weight.nbytes / 1e6, fmt.nbytes / 1e6)
        else:
            counters["flashllm"][f"skip_{match.skip_reason}"] += 1
            log.info("flashllm: %s left dense: %s", match.name, match.skip_reason)
            fmt = None
        publish(LinearDecision(
            name=match.name, out_features=match.out_features if match.weight.dim() == 2 else 0,
            in_features=match.in_features if match.weight.dim() == 2 else 0,
            dtype=str(match.weight.dtype).removeprefix("torch."), sparsity=match.sparsity,
            rewritten=fmt is not None, reason=match.skip_reason or "rewritten",
            kernel=options.kernel.value if fmt is not None else "", dense_bytes=match.weight.nbytes,
            compressed_bytes=fmt.nbytes if fmt is not None else 0, op=op_name))
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
