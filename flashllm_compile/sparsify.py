"""Free the dense copies of sparse weights: swap eligible nn.Linear modules for SparseLinear (torchao-style
`sparsify_`), so the model holds only the compressed bitmap format.

    from flashllm_compile.sparsify import sparsify_
    sparsify_(model)                                   # in place; returns {module path: bytes saved}
    model = torch.compile(model, backend="flashllm")   # or any backend: the custom op traces everywhere

After this the weights live only in compressed form (e.g. 27% of dense at 80% sparsity): there is no dense
fallback, so the sparse kernel runs for every M. Eager calls work (the op runs eagerly); `.weight` rebuilds the
dense weight on demand (a new tensor, for inspection: writing to it changes nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import flashllm_compile.ops  # noqa: F401  (registers torch.ops.flashllm)
from flashllm_compile.codegen.formats.bitmap import COMPILER_ORDER, DEFAULT_CHUNK_K, BitmapWeight
from flashllm_compile.codegen.kernels.common import KERNEL_DTYPES
from flashllm_compile.options import KernelPreference


class SparseLinear(nn.Module):
    """y = x @ W^T + b with W held only as a BitmapWeight (buffers: bitmap, offsets, values)."""

    def __init__(self, fmt: BitmapWeight, bias: torch.Tensor | None, name: str,
                 kernel: KernelPreference = KernelPreference.AUTO):
        super().__init__()
        self.in_features, self.out_features, self.chunk_k = fmt.k, fmt.n, fmt.chunk_k
        self.format_param = fmt.op_param  # chunk_k and the values' order
        self.register_buffer("bitmap", fmt.bitmap)
        self.register_buffer("offsets", fmt.offsets)
        self.register_buffer("values", fmt.values)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self.name, self.kernel = name, KernelPreference(kernel)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [N, K] weight, rebuilt on demand (not stored)."""
        return self.format().to_dense()

    def format(self) -> BitmapWeight:
        return BitmapWeight.from_op_param(self.bitmap, self.offsets, self.values, self.out_features, self.in_features,
                                          self.format_param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.flashllm.sparse_linear(x, self.bitmap, self.offsets, self.values, self.bias, None,
                                                self.out_features, self.in_features, self.format_param,
                                                self.kernel.value, self.name, -1)

    def extra_repr(self) -> str:
        density = self.values.numel() / max(1, self.out_features * self.in_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}"


def _default_filter(module: nn.Module, name: str) -> bool:
    return not name.endswith("lm_head")


def sparsify_(model: nn.Module, min_sparsity: float = 0.5, filter_fn: Callable[[nn.Module, str], bool] | None = None,
              chunk_k: int = DEFAULT_CHUNK_K, kernel: KernelPreference | str = KernelPreference.AUTO) -> dict[str, int]:
    """Replace, in place, every nn.Linear selected by `filter_fn(module, name)` (default: all but `lm_head`)
    whose weight is fp16/bf16/fp32, at least `min_sparsity` exactly zero and not shared with another module,
    by a SparseLinear. Returns {module path: bytes saved}."""
    filter_fn = filter_fn or _default_filter
    owners: dict[int, int] = {}
    for module in model.modules():  # weights used by several modules (tied embeddings) stay dense
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    saved = {}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not filter_fn(module, name) or owners[id(module.weight)] > 1:
            continue
        weight = module.weight
        if weight.dtype not in KERNEL_DTYPES or weight.numel() == 0:
            continue
        with torch.no_grad():
            if (weight == 0).sum().item() / weight.numel() < min_sparsity:
                continue
            fmt = BitmapWeight.from_dense(weight, chunk_k, COMPILER_ORDER)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                SparseLinear(fmt, module.bias, name, kernel))
        saved[name] = weight.numel() * weight.element_size() - fmt.nbytes
    return saved
