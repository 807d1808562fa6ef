"""Replace each chosen linear node with `torch.ops.flashllm.sparse_linear` on the compressed weight.

The compressed tensors become buffers of the GraphModule, read through get_attr nodes: AOTAutograd lifts
module buffers as static inputs, so CUDA graphs (mode="reduce-overhead") neither copy them per replay nor
guard on them, and Inductor freezing can treat them as constants.  The rewrite edits Dynamo's GraphModule in
place (Dynamo hands it over; Inductor's own passes edit in place too): a deep copy would drop the
`_dynamo_source` of placeholders that AOTAutograd needs to find parameters.

Siblings reading the same input share one op (passes/fuse_sibling_linears.py), and all-zero rows / columns of
a weight are sliced away (passes/slice_structured_zeros.py), as are the columns whose input features are exact
zeros made by an upstream linear's zero rows (passes/propagate_structured_zeros.py, analysed on the graph before
any rewrite); they all go through `_rewrite_fused`.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import torch
from torch import fx
from torch._dynamo.utils import counters

import flashllm_compile.ops  # noqa: F401  (registers torch.ops.flashllm)
from flashllm_compile.codegen.autotune import AUTOTUNER, Choice
from flashllm_compile.codegen.formats.cache import (
    adopt,
    compress_csl,
    compress_weight,
    compress_weights,
    forget_unless_adopted,
    watch_weight,
    watch_weights,
)
from flashllm_compile.codegen.kernels.common import CompressedWeight
from flashllm_compile.codegen.kernels.csl_mma import CMMA_MAX_GROUPS, CMMA_MAX_M
from flashllm_compile.options import FlashLLMOptions, KernelPreference
from flashllm_compile.passes.dtensor_linears import local_shard, sparse_linear_dtensor
from flashllm_compile.passes.find_sparse_linears import LinearMatch, find_sparse_linears
from flashllm_compile.passes.fuse_sibling_linears import concat_operands, find_sibling_groups, fused_name, split_outputs
from flashllm_compile.passes.fx_meta import call_with_meta, meta_val
from flashllm_compile.passes.propagate_structured_zeros import ZeroFeatures, zero_input_features
from flashllm_compile.passes.slice_structured_zeros import (
    StructuredSlice,
    scatter_rows,
    structured_slice,
)
from flashllm_compile.report import LinearDecision, publish

log = logging.getLogger("flashllm_compile")
BUFFER_PREFIX = "_flashllm_w"
DENSE_FASTER = "dense_faster"  # skip reason of linears left to Inductor by the compile-time dispatch (static_dispatch)


def _fake_like(gm: fx.GraphModule, example_val: torch.Tensor | None, tensor: torch.Tensor):
    """meta['val'] for a new get_attr node, made in the graph's fake mode (keeps meta['val'] valid)."""
    fake_mode = getattr(example_val, "fake_mode", None)
    return fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor


def _register_parts(gm: fx.GraphModule, owner: object, parts: dict[str, torch.Tensor],
                    registered: dict[int, tuple[str, ...]]) -> tuple[str, ...]:
    """Register `parts` (compressed tensors, slicing indices) as gm buffers, once per `owner` (the format or the
    slice they come from: adopted, so the compression cache keeps it) and graph."""
    adopt(owner)
    if id(owner) not in registered:
        index = len(registered)
        names = tuple(f"{BUFFER_PREFIX}{index}_{part}" for part in parts)
        for name, tensor in zip(names, parts.values()):
            gm.register_buffer(name, tensor)
            if hasattr(gm, "_param_name_to_source"):  # AOTAutograd requires a source per lifted buffer
                gm._param_name_to_source[name] = torch._dynamo.source.ConstantSource(name)
        registered[id(owner)] = names
    return registered[id(owner)]


def _layout_kwargs(fmt: CompressedWeight) -> dict:
    """sparse_linear's `layout` keyword for a format other than the bitmap (the default)."""
    return {} if fmt.LAYOUT == "bitmap" else {"layout": fmt.LAYOUT}


def _rewrite_one(gm: fx.GraphModule, match: LinearMatch, fmt: CompressedWeight, options: FlashLLMOptions,
                 registered: dict[int, tuple[str, ...]]):
    """Replace one linear by sparse_linear on `fmt`, its compressed weight (registered as gm buffers once per
    graph)."""
    names = _register_parts(gm, fmt, fmt.parts(), registered)
    graph, node = gm.graph, match.node
    x_val = local_shard(match.x.meta.get("val", match.x.meta.get("example_value")))  # DTensor: its fake local
    with graph.inserting_before(node):
        tensor_nodes = []
        for name, tensor in zip(names, fmt.parts().values()):
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
        op, extra = torch.ops.flashllm.sparse_linear.default, ()
        kwargs = {"runtime": options.runtime_spec(), **_layout_kwargs(fmt)}
        if match.dtensor is not None:  # tensor parallelism: the op on this rank's shard, DTensor in and out
            op, extra = sparse_linear_dtensor, (match.dtensor,)
        elif dense is None and match.weight_node.op == "placeholder":
            # No dense operand, but the parameter is a graph input anyway (no extra memory): pass it so the op can
            # still see a replaced parameter (identity check) and run cuBLAS on it in place where faster.  Not for
            # get_attr weights (Inductor freezing), whose constants would then stay alive.
            kwargs["weights"] = [match.weight_node]
        new = graph.call_function(op, (
            match.x, *tensor_nodes, match.bias, dense, fmt.n, fmt.k, fmt.op_param, options.kernel.value,
            match.name, watch_weight(match.weight), *extra), kwargs)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", "stack_trace", "nn_module_stack",
                                                                 "source_fn_stack", "tensor_meta")})
    _replace_node(graph, node, new)
    return fmt


def _replace_node(graph: fx.Graph, node: fx.Node, new: fx.Node) -> None:
    node.replace_all_uses_with(new)
    old_operands = [a for a in node.all_input_nodes if a.op in ("call_function", "call_method")]
    graph.erase_node(node)
    # Only the weight transpose the old node used can become dead. No global DCE: FX treats in-place methods
    # such as a KV-cache `index_copy_` as pure and would delete them.
    for operand in old_operands:
        if not operand.users:
            graph.erase_node(operand)


def _needs_dense(match: LinearMatch, options: FlashLLMOptions) -> bool:
    """Does a fused or sliced op get a dense fallback?  [N_i, K] members run in place (ops.py), but HF Conv1D
    members' [N, K] weight is built by the graph on every call (torch.t / torch.cat of the parameters: a copy), so
    only where the dense weights are kept and the op may run it: kernel DENSE, or AUTO on CUDA."""
    kernel = options.kernel
    return not options.release_dense_weights and (
        kernel is KernelPreference.DENSE or (kernel is KernelPreference.AUTO and match.weight.is_cuda))


def _guards(zeros: ZeroFeatures | None) -> tuple[list[fx.Node], list[torch.Tensor]]:
    """(graph inputs, tensors) a sliced op checks besides its own weights: the weights and biases of the upstream
    linears whose zero rows its dropped columns rely on (passes/propagate_structured_zeros.py).  Every tensor is
    watched for in-place updates; placeholders (parameters the graph receives anyway) are also passed to the op,
    checked to still be the same tensors (first in the list: the op pairs its watched tensors with them in order);
    get_attr constants are not (passing them would keep frozen constants alive)."""
    guards = sorted(zeros.guards if zeros is not None else (), key=lambda g: g[0].op != "placeholder")
    return [n for n, _ in guards if n.op == "placeholder"], [t for _, t in guards]


def _rewrite_fused(gm: fx.GraphModule, members: list[LinearMatch], fmt: CompressedWeight,
                   sliced: StructuredSlice | None, options: FlashLLMOptions, registered: dict[int, tuple[str, ...]],
                   zeros: ZeroFeatures | None = None) -> CompressedWeight:
    """Replace `members` (siblings reading the same x, passes/fuse_sibling_linears.py; or a single linear) by ONE
    sparse_linear on `fmt`, the compressed weight of their rows, or of the nonzero rows and columns of their weight
    when `sliced` (passes/slice_structured_zeros.py; fmt is then sliced.fmt; with the columns whose inputs are the
    exact zeros `zeros` when it used them):

        x [..., K] -> x[..., cols] [..., K'] -> sparse_linear -> [..., N'] -> scatter rows, + bias -> [..., N]
                   -> split -> one [..., N_i] view per member"""
    first, graph = members[0], gm.graph
    weights = [m.weight for m in members]
    guard_nodes, guard_tensors = _guards(zeros if sliced is not None and sliced.propagated_cols else None)
    with_dense = _needs_dense(first, options)
    op_parts = fmt.parts()
    parts = dict(op_parts)
    if sliced is not None:  # rows [N'] (the dense fallback's outputs to keep), rowpos [N], rowkeep [N], cols [K']
        parts.update({part: t for part, t in (("rows", sliced.rows), ("rowpos", sliced.row_pos),
                                              ("rowkeep", sliced.row_keep), ("cols", sliced.cols)) if t is not None})
    names = _register_parts(gm, sliced or fmt, parts, registered)
    x_val = meta_val(first.x)
    with graph.inserting_before(first.node):  # precedes every member's users; operands are available here
        get = {}
        for part, name in zip(parts, names):
            get[part] = graph.get_attr(name)
            get[part].meta["val"] = get[part].meta["example_value"] = _fake_like(gm, x_val, parts[part])
        # [N_i, K] members need no dense operand: the op's dense fallback runs on `weights` in place (ops.py); a
        # sliced op's too: it runs the full weight on the full x and keeps its rows (no per-call W[rows][:, cols])
        in_place = not first.transposed and (len(members) > 1 or sliced is not None)
        bias, dense = concat_operands(graph, members, with_dense and not in_place)  # [N] | None, [N, K] | None
        scatter = sliced is not None and sliced.row_pos is not None
        y = call_with_meta(graph, torch.ops.flashllm.sparse_linear.default, first.x, *(get[p] for p in op_parts),
                           None if scatter else bias, dense, fmt.n, fmt.k, fmt.op_param,
                           options.kernel.value, fused_name(members), watch_weights([*weights, *guard_tensors]),
                           [*(m.weight_node for m in members), *guard_nodes], runtime=options.runtime_spec(),
                           in_cols=get.get("cols"), out_rows=get.get("rows"), **_layout_kwargs(fmt))
        y.meta.update({k: v for k, v in first.node.meta.items() if k in ("stack_trace", "nn_module_stack",
                                                                         "source_fn_stack")})
        if scatter:
            y = scatter_rows(graph, y, get["rowpos"], get["rowkeep"], bias)  # [..., N]
        outs = split_outputs(graph, y, members) if len(members) > 1 else [y]
    for member, out in zip(members, outs):
        _replace_node(graph, member.node, out)
    return fmt


def static_tokens(x: fx.Node) -> int | None:
    """M, the rows of x [..., K] (the product of its leading dims) when they are all concrete ints: a graph
    compiled for static shapes, e.g. one decode step under mode="reduce-overhead"; None when any is symbolic."""
    val = local_shard(meta_val(x))
    if val is None or not all(isinstance(d, int) for d in val.shape[:-1]):
        return None
    return math.prod(val.shape[:-1])


def _tuned_on_device(weight: torch.Tensor) -> bool:
    """Where the autotuner measures (and so where the op's runtime dispatch can pick dense): CUDA."""
    return weight.is_cuda


CSL_MIN_GAIN = 1.03  # the Tiled-CSL format (4 bytes a nonzero) must beat the bitmap by this much: a near tie keeps
# the smaller format
CSL_MAX_DENSITY = 0.35  # denser weights move more bytes as Tiled-CSL (4 d per element) than as the bitmap (2 d + 1/8)
# by over 1.5x, and need more word registers than the kernel holds (CMMA_MAX_GROUPS)


def _csl_candidate(members: list[LinearMatch], fmt: CompressedWeight, sliced: StructuredSlice | None,
                   options: FlashLLMOptions, m: int):
    """The Tiled-CSL compression of the members' weight where the option allows it and its kernel can run (fp16 /
    bf16, not a sliced op, decode-sized M), else None."""
    if (not options.csl_allowed() or sliced is not None or m > CMMA_MAX_M or fmt.dtype not in (
            torch.float16, torch.bfloat16) or fmt.nnz > CSL_MAX_DENSITY * fmt.n * fmt.k):
        return None
    csl = compress_csl([mb.weight for mb in members], members[0].transposed)
    if csl.max_groups > CMMA_MAX_GROUPS:  # a tile too dense for the kernel's word registers (skewed sparsity)
        forget_unless_adopted(csl)
        return None
    return csl


def static_dispatch(members: list[LinearMatch], fmt: CompressedWeight, sliced: StructuredSlice | None,
                    options: FlashLLMOptions) -> CompressedWeight | Choice:
    """Compile-time dispatch at the graph's static token count M (every decode step under mode="reduce-overhead"):
    the format the op runs, `fmt` (the bitmap) or the Tiled-CSL compression of the same weight where its kernel
    measures faster (FlashLLMOptions.csl); or the autotuner's dense Choice where cuBLAS beats every sparse kernel
    of both formats.  Then the linears are left to Inductor as they are (cuBLAS with Inductor's own bias and
    activation fusions, no op boundary, no compressed buffers as graph inputs) instead of an op that would run
    cuBLAS inside anyway.  Only from a measurement (kernel="auto", autotune on, not deterministic, CUDA, no DTensor);
    dense only where the op could run it (dense weights kept); shapes that vary at run time (symbolic M) keep the
    bitmap and the runtime dispatch.  The measurements are the op's own (`AUTOTUNER.choose`, cached on disk), so
    the op and this pass agree."""
    first = members[0]
    with_dense = not options.release_dense_weights
    m = static_tokens(first.x)
    if (options.kernel is not KernelPreference.AUTO or not options.autotune or options.deterministic
            or getattr(first, "dtensor", None) is not None or not _tuned_on_device(first.weight) or not m
            or not (with_dense or options.csl_allowed())):
        return fmt
    dense = [mb.weight.t() if mb.transposed else mb.weight for mb in members] if with_dense else None  # [N_i, K]
    choice = AUTOTUNER.choose(fmt, m, dense, allow_dense=with_dense, tune=True, cache_dir=options.cache_dir)
    csl = _csl_candidate(members, fmt, sliced, options, m)
    if csl is not None:
        csl_choice = AUTOTUNER.choose(csl, m, dense, allow_dense=with_dense, tune=True, cache_dir=options.cache_dir)
        if csl_choice.family != "dense" and (choice.family == "dense"
                                             or csl_choice.time_us * CSL_MIN_GAIN < choice.time_us):
            forget_unless_adopted(fmt)
            return csl
        forget_unless_adopted(csl)
    return choice if choice.family == "dense" else fmt


def _rewrite_members(gm: fx.GraphModule, members: list[LinearMatch], options: FlashLLMOptions,
                     registered: dict[int, tuple[str, ...]],
                     zeros: ZeroFeatures | None = None) -> CompressedWeight | None:
    """Rewrite one linear, or a group of fused siblings, slicing structured zeros where the option allows;
    `zeros`: the exact-zero features of their shared input x (passes/propagate_structured_zeros.py).  Returns the
    format the op runs, or None when cuBLAS wins at the graph's static M (`static_dispatch`): the nodes are left as
    they are."""
    first = members[0]
    sliced = None
    if options.slice_structured_zeros and getattr(first, "dtensor", None) is None:
        sliced = structured_slice([m.weight for m in members], options.chunk_k, first.transposed,
                                  zeros.mask if zeros is not None else None)
    fmt = sliced.fmt if sliced is not None else (
        compress_weight(first.weight, options.chunk_k, transposed=first.transposed) if len(members) == 1 else
        compress_weights([m.weight for m in members], options.chunk_k, first.transposed))
    chosen = static_dispatch(members, fmt, sliced, options)
    if isinstance(chosen, Choice):
        log.info("flashllm: %s left to Inductor: cuBLAS (%.1f us) beats every sparse kernel at M=%s",
                 fused_name(members), chosen.dense_us, static_tokens(first.x))
        forget_unless_adopted(sliced if sliced is not None else fmt)
        return None
    if chosen is not fmt:
        counters["flashllm"]["csl"] += 1
        log.info("flashllm: %s runs the Tiled-CSL format: its kernel measures faster at M=%s (%.1f MB, bitmap %.1f MB)",
                 fused_name(members), static_tokens(first.x), chosen.nbytes / 1e6, fmt.nbytes / 1e6)
        fmt = chosen
    if len(members) == 1 and sliced is None:
        return _rewrite_one(gm, first, fmt, options, registered)
    name = fused_name(members)
    if len(members) > 1:
        counters["flashllm"]["fused_siblings"] += 1
        counters["flashllm"]["fused_linears"] += len(members)
        log.info("flashllm: %s fused into one sparse_linear", name)
    if sliced is not None:
        for axis, what, count, own, total in (
                ("rows", "rows", sliced.zero_rows, sliced.zero_rows, sliced.n),
                ("cols", "columns", sliced.zero_cols, sliced.zero_cols - sliced.propagated_cols, sliced.k)):
            if count:
                counters["flashllm"][f"sliced_{axis}"] += 1
            if own:
                log.info("flashllm: %s: %d of %d %s all-zero, sliced away", name, own, total, what)
        if sliced.propagated_cols:
            counters["flashllm"]["propagated_cols"] += 1
            log.info("flashllm: %s: %d of %d input columns only multiply exact zeros (zero rows of %s), sliced away",
                     name, sliced.propagated_cols, sliced.k, ", ".join(p.name for p in zeros.producers))
    return _rewrite_fused(gm, members, fmt, sliced, options, registered, zeros)


def _compressed_bytes(fmt: CompressedWeight, members: list[LinearMatch], match: LinearMatch) -> int:
    """The share of a fused format attributed to `match`: its rows of bitmap/offsets plus its nonzeros (Tiled-CSL:
    its share of the nonzeros)."""
    if len(members) == 1:
        return fmt.nbytes
    if fmt.LAYOUT == "csl":
        nnz = [mb.weight.numel() * (1 - mb.sparsity) for mb in members]
        return round(fmt.nbytes * match.weight.numel() * (1 - match.sparsity) / max(1.0, sum(nnz)))
    values = fmt.values.element_size()
    meta = fmt.nbytes - fmt.nnz * values
    nnz = round(match.weight.numel() * (1 - match.sparsity))
    return meta * match.out_features // sum(m.out_features for m in members) + nnz * values


PROGRESS_MIN_LAYERS = 8


def _progress(matches: list[LinearMatch]):
    """A tqdm bar over `matches` while compressing, when >= PROGRESS_MIN_LAYERS are rewritable, stderr is a TTY,
    and the environment does not set FLASHLLM_PROGRESS=0; otherwise the list itself."""
    rewritable = sum(m.skip_reason is None for m in matches)
    if rewritable < PROGRESS_MIN_LAYERS or os.environ.get("FLASHLLM_PROGRESS") == "0" or not sys.stderr.isatty():
        return matches
    from tqdm.auto import tqdm

    return tqdm(matches, desc="flashllm: compressing linears", unit="layer", file=sys.stderr, leave=False)


def _op_fields(fmt: CompressedWeight | None, match: LinearMatch, members_of: dict) -> dict:
    """LinearDecision fields naming the sparse_linear call a fused or sliced linear runs in ({} otherwise)."""
    if fmt is None or (fmt.n, fmt.k) == (match.out_features, match.in_features) and match.node not in members_of:
        return {}
    members = members_of.get(match.node, [match])
    return {"op_shape": (fmt.n, fmt.k), "op_density": fmt.nnz / max(1, fmt.n * fmt.k),
            "group": fused_name(members) if len(members) > 1 else ""}


def rewrite_sparse_linears(gm: fx.GraphModule, example_inputs, options: FlashLLMOptions) -> int:
    """Rewrite every eligible linear of `gm` in place; returns how many were rewritten.

    Counters: counters["flashllm"]["linear_found"], ["rewritten"], ["skip_<reason>"]; with the options
    fuse_siblings / slice_structured_zeros also ["fused_siblings"] (groups), ["fused_linears"] (linears in them),
    ["sliced_rows"] / ["sliced_cols"] (sparse_linear calls computing only the nonzero rows / columns),
    ["propagated_cols"] (those of them dropping columns that are not all-zero, because their input features are
    exact zeros made by upstream zero rows: passes/propagate_structured_zeros.py); ["skip_dense_faster"]: linears
    left to Inductor because cuBLAS beats the sparse kernels at the graph's static M (`static_dispatch`); ["csl"]:
    ops given the Tiled-CSL format there.  With many
    rewritable layers a progress bar is shown on a TTY stderr; FLASHLLM_PROGRESS=0 turns it off (see `_progress`)."""
    registered: dict[int, tuple[str, ...]] = {}
    rewritten = 0
    matches = list(find_sparse_linears(gm, example_inputs, options))
    groups = find_sibling_groups(gm, matches) if options.fuse_siblings else []
    members_of = {m.node: group for group in groups for m in group}
    # analysed before any rewrite: it reads the original graph (node -> zero features of the linear's input)
    zeros = zero_input_features(gm, matches, example_inputs) if options.slice_structured_zeros else {}
    fmts: dict[fx.Node, CompressedWeight | None] = {}  # first member's node -> its group's op format (None: left dense)
    for match in _progress(matches):
        counters["flashllm"]["linear_found"] += 1
        op_name = getattr(match.node.target, "__name__", str(match.node.target))
        reason, fmt = match.skip_reason, None
        if reason is None:
            members = members_of.get(match.node, [match])
            if match is members[0]:
                fmts[match.node] = _rewrite_members(gm, members, options, registered, zeros.get(match.node))
            fmt = fmts[members[0].node]
            reason = None if fmt is not None else DENSE_FASTER
        if fmt is not None:
            compressed = _compressed_bytes(fmt, members, match)
            rewritten += 1
            counters["flashllm"]["rewritten"] += 1
            log.info("flashllm: %s [%dx%d] %.1f%% zeros -> sparse_linear (%s), %.1f MB -> %.1f MB", match.name,
                     match.out_features, match.in_features, 100 * match.sparsity, options.kernel.value,
                     match.weight.nbytes / 1e6, compressed / 1e6)
        else:
            counters["flashllm"][f"skip_{reason}"] += 1
            log.info("flashllm: %s left dense: %s", match.name, reason)
        publish(LinearDecision(
            name=match.name, out_features=match.out_features if match.weight.dim() == 2 else 0,
            in_features=match.in_features if match.weight.dim() == 2 else 0,
            dtype=str(match.weight.dtype).removeprefix("torch."), sparsity=match.sparsity,
            rewritten=fmt is not None, reason=reason or "rewritten",
            kernel=options.kernel.value if fmt is not None else "", dense_bytes=match.weight.nbytes,
            layout=fmt.LAYOUT if fmt is not None else "",
            compressed_bytes=compressed if fmt is not None else 0, op=op_name, **_op_fields(fmt, match, members_of)))
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
