"""Tensor-parallel linears: weights that are DTensor parameters (`torch.distributed.tensor.parallel`).

What the backend receives (torch 2.13, `parallelize_module` with ColwiseParallel / RowwiseParallel on a 1-D
DeviceMesh): a torch-level Dynamo graph in which the weight placeholders' example inputs are the DTensor
parameters themselves and the activations are DTensors between PyTorch's own hooks:

    x_dt = DTensor.from_local(x, mesh, (Replicate(),))             # ColwiseParallel input hook
    y_dt = torch._C._nn.linear(x_dt, W_dt, b_dt)                   # W_dt: Shard(0) -> y_dt: Shard(-1)
    y = y_dt.redistribute(placements=(Shard(-1),)).to_local()      # output hook (a no-op here)
    ...
    x_dt = DTensor.from_local(y, mesh, (Shard(-1),))               # RowwiseParallel input hook
    z_dt = torch._C._nn.linear(x_dt, W_dt, b_dt)                   # W_dt: Shard(1), b_dt: Replicate -> Partial
    z = z_dt.redistribute(placements=(Replicate(),)).to_local()    # the all-reduce

AOTAutograd later desugars the DTensors into local aten ops plus functional collectives.  This module works at
the Dynamo level, before that: a linear whose DTensor weight and input have one of the placement pairs below
is replaced by `sparse_linear_dtensor`, which runs `torch.ops.flashllm.sparse_linear` on this rank's local
shard (compressed by this rank) and wraps the result back into a DTensor with exactly the placement the
original linear produced.  The hooks, redistributes and collectives around it stay PyTorch's.

    style     weight      input x      bias         output       local computation
    colwise   Shard(0)    Replicate    Shard(0)     Shard(-1)    y = x @ W_local^T + b_local
    rowwise   Shard(1)    Shard(-1)    Replicate    Partial(sum) y = x_local @ W_local^T, then DTensor's y + b

Anything else stays dense, counted: `skip_dtensor_placement` (other weight placements, e.g. Replicate; an input,
bias or output placement other than in the table), `skip_dtensor_mesh_not_1d`, `skip_dtensor_uneven_shard`,
`skip_dtensor_transposed_weight`, and `skip_weight_requires_grad` in grad mode as for plain weights.
"""

from __future__ import annotations

import sys

import torch
from torch import fx

COLWISE, ROWWISE = "colwise", "rowwise"


def _dtensor_type() -> type | None:
    """DTensor's class if torch.distributed.tensor was imported (no DTensor can exist otherwise), else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(value) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(value, cls)


def local_shard(value):
    """The local tensor of a DTensor (real or fake), `value` itself otherwise.

    `_local_tensor`, not `to_local()`: under no_grad to_local() returns a fresh alias on every call, and the
    compression cache and the stale-weight check key on the tensor object."""
    return value._local_tensor if is_dtensor(value) else value


def _meta(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def _is_shard(placement, dim: int, ndim: int) -> bool:
    return placement.is_shard() and placement.dim % ndim == dim % ndim


def classify(node: fx.Node, x: fx.Node, bias: fx.Node | None, weight, transposed: bool) -> tuple[str | None, str | None]:
    """(style, None) when the linear `node` = linear(x, weight, bias) with a DTensor `weight` can run our op on
    this rank's shard, else (None, skip reason).  Pure: reads the placements of `weight` and of the fake
    DTensors in node.meta; every rank takes the same decision (only global shapes and placements are read)."""
    if transposed:  # Conv1D-style [K, N] storage: not produced by parallelize_module
        return None, "dtensor_transposed_weight"
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        return None, "dtensor_mesh_not_1d"
    if weight.requires_grad and torch.is_grad_enabled():
        return None, "weight_requires_grad"
    x_val, out_val, bias_val = _meta(x), _meta(node), _meta(bias)
    if not (is_dtensor(x_val) and is_dtensor(out_val)) or bias is not None and not is_dtensor(bias_val):
        return None, "dtensor_placement"  # DTensor mixed with plain tensors: DTensor itself would refuse
    if x_val.device_mesh != mesh or out_val.device_mesh != mesh or bias is not None and bias_val.device_mesh != mesh:
        return None, "dtensor_placement"
    (w_p,), (x_p,), (out_p,) = weight.placements, x_val.placements, out_val.placements
    b_p = bias_val.placements[0] if bias is not None else None
    world = mesh.size()
    if _is_shard(w_p, 0, 2):  # ColwiseParallel: out features split
        style, split = COLWISE, weight.shape[0]
        ok = (x_p.is_replicate() and _is_shard(out_p, -1, out_val.ndim)
              and (b_p is None or _is_shard(b_p, 0, 1)))
    elif _is_shard(w_p, 1, 2):  # RowwiseParallel: in features split, partial sums
        style, split = ROWWISE, weight.shape[1]
        ok = (_is_shard(x_p, -1, x_val.ndim) and out_p.is_partial() and out_p.reduce_op == "sum"
              and (b_p is None or b_p.is_replicate()))
    else:
        return None, "dtensor_placement"
    if not ok:
        return None, "dtensor_placement"
    if split % world:  # uneven shards: ranks would hold different shapes and from_local assumes even ones
        return None, "dtensor_uneven_shard"
    return style, None


def sparse_linear_dtensor(x, bitmap, offsets, values, bias, dense_weight, n: int, k: int, chunk_k: int, kernel: str,
                          name: str, weight_token: int, style: str, runtime: str | None = None):
    """The rewritten tensor-parallel linear (called from the graph; traced by AOTAutograd through DTensor).

    x: DTensor [..., K] (colwise: Replicate; rowwise: Shard(-1)); bitmap/offsets/values: this rank's compressed
    local shard [n, k]; bias, dense_weight: DTensors or None.  Returns the DTensor the original linear returned:
    colwise Shard(-1) of [..., N], rowwise Partial(sum)."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    local_bias = bias.to_local() if bias is not None and style == COLWISE else None  # Shard(0): this rank's part
    y = torch.ops.flashllm.sparse_linear(  # y: [..., n] local
        x.to_local(), bitmap, offsets, values, local_bias, None if dense_weight is None else dense_weight.to_local(),
        n, k, chunk_k, kernel, name, weight_token, runtime=runtime)
    if style == COLWISE:
        return DTensor.from_local(y, x.device_mesh, (Shard(y.dim() - 1),), run_check=False)
    out = DTensor.from_local(y, x.device_mesh, (Partial(),), run_check=False)
    # Replicate bias + Partial sum: DTensor's own rule (b / world on every rank), as in its linear -> Partial
    return out if bias is None else out + bias
