"""Structured zeros on top of unstructured pruning: whole MLP channels zeroed, as SliceGPT / channel pruning leaves them.

Magnitude pruning of random weights leaves no all-zero row or column, so the backend's structured-zero passes
(passes/slice_structured_zeros.py, passes/propagate_structured_zeros.py) find nothing to slice.  After the
unstructured pruning, `zero_mlp_channels_` zeroes a fraction of every MLP's intermediate channels c (I of them),
everywhere channel c lives:

    LLaMA (gate_proj, up_proj, down_proj)   gate_proj.weight[c, :], up_proj.weight[c, :]   rows of [I, H]
                                            down_proj.weight[:, c]                          column of [H, I]
    OPT   (fc1, fc2 of a decoder layer)     fc1.weight[c, :] and fc1.bias[c]                row of [I, H], [I]
                                            fc2.weight[:, c]                                column of [H, I]

The channels go by the smallest L2 norm of their input rows (gate and up together; fc1 with its bias entry),
measured on the already-pruned weights, ties by channel index: deterministic.  The output projection's bias is
untouched (it does not belong to a channel).  `zero_output_columns=False` leaves down_proj / fc2 as they are: the
channels are still exact zeros at its input, so only passes/propagate_structured_zeros.py can drop those columns.

`zero_fraction` reports what the weights then hold: exact zeros over the elements of the linears magnitude_prune_
selects, which exceeds the nominal unstructured sparsity once channels are zeroed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# (input projections whose rows are the channels, output projection whose columns are the channels)
MLP_LAYOUTS = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"))


def mlp_blocks(model: nn.Module) -> Iterator[tuple[str, list[nn.Linear], nn.Linear]]:
    """(module name, input projections, output projection) of every MLP in `model` with a known layout."""
    for name, module in model.named_modules():
        for inputs, output in MLP_LAYOUTS:
            found = [getattr(module, n, None) for n in (*inputs, output)]
            if all(isinstance(m, nn.Linear) for m in found):
                yield name, found[:-1], found[-1]


def weakest_channels(inputs: list[nn.Linear], count: int) -> torch.Tensor:
    """int64 [count], ascending: the channels whose input rows (weights [I, H], biases [I]) have the smallest
    summed squared L2 norm (fp32), ties by index (stable sort)."""
    sq = sum(m.weight.float().square().sum(1) + (m.bias.float().square() if m.bias is not None else 0)
             for m in inputs)  # [I]
    return torch.sort(sq, stable=True).indices[:count].sort().values


@torch.no_grad()
def zero_mlp_channels_(model: nn.Module, fraction: float, zero_output_columns: bool = True) -> dict[str, torch.Tensor]:
    """Zero, in place, int(I * fraction) intermediate channels of every MLP of `model` (see the module docstring).
    Returns {MLP module name: int64 [count] zeroed channels, on the CPU}; raises if `model` has no known MLP."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must satisfy 0 <= fraction < 1, got {fraction!r}")
    zeroed = {}
    for name, inputs, output in mlp_blocks(model):
        channels = torch.zeros(0, dtype=torch.int64)
        count = int(inputs[0].out_features * fraction)
        if count:
            channels = weakest_channels(inputs, count)
            for m in inputs:
                m.weight[channels] = 0  # rows [count, H]
                if m.bias is not None:
                    m.bias[channels] = 0
            if zero_output_columns:
                output.weight[:, channels] = 0  # columns [H, count]
        zeroed[name] = channels.cpu()
    if not zeroed:
        raise ValueError("no MLP with gate_proj/up_proj/down_proj or fc1/fc2 linears found")
    return zeroed


def zero_fraction(model: nn.Module) -> float:
    """Exact-zero fraction of all the weights flashllm_compile.prune.magnitude_prune_ selects, element-weighted."""
    from flashllm_compile.prune import sparsity_report

    report = sparsity_report(model)  # {fqn: zero fraction}
    sizes = {fqn: model.get_submodule(fqn).weight.numel() for fqn in report}
    total = sum(sizes.values())
    return sum(report[fqn] * sizes[fqn] for fqn in report) / total if total else 0.0
