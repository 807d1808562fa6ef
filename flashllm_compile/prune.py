"""Unstructured pruning helpers: make sparse models without any other tool.

Two one-shot pruners, both in place and both per output row (the comparison group Wanda and SparseGPT
usually use), plus a report:

- :func:`magnitude_prune_` zeroes the smallest ``|W|`` of each row.
- :func:`wanda_prune_` zeroes the smallest ``|W| * ||X_col||_2`` of each row (Sun et al. 2023, "A Simple and
  Effective Pruning Approach for Large Language Models"), with the input-feature norms gathered by forward
  pre-hooks during one calibration forward pass.
- :func:`sparsity_report` returns the exact-zero fraction of every selected weight.

Linear layers are ``nn.Linear`` and, when ``transformers`` is importable, HF's ``Conv1D`` (GPT-2 style, weight
stored ``[K, N]``). Weights are always handled as an ``[N, K]`` view (N output features, K input features),
so "row" means one output feature for both kinds. The ``Parameter`` objects, their dtype and device are kept;
only their data changes.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["default_filter_fn", "magnitude_prune_", "sparsity_report", "wanda_prune_"]

FilterFn = Callable[[nn.Module, str], bool]


# ----------------------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------------------


def _linear_types() -> tuple[type[nn.Module], ...]:
    """``nn.Linear`` plus HF ``Conv1D`` if transformers can be imported (imported lazily, never required)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers not installed: plain linears only
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _is_conv1d(module: nn.Module) -> bool:
    """True for HF ``Conv1D`` (weight ``[K, N]``), without importing transformers."""
    return not isinstance(module, nn.Linear) and type(module).__name__ == "Conv1D"


def _weight_nk(module: nn.Module) -> torch.Tensor:
    """The weight's data as an ``[N, K]`` view (a transposed view for ``Conv1D``); writes go to the parameter."""
    w = module.weight.data
    return w.t() if _is_conv1d(module) else w  # [N, K]


def _in_features(module: nn.Module) -> int:
    return _weight_nk(module).shape[1]


def _embedding_ptrs(model: nn.Module) -> set[int]:
    return {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not None}


def default_filter_fn(model: nn.Module) -> FilterFn:
    """The default selection for ``model``: every linear except ``*lm_head`` and weights tied to an embedding."""
    tied = _embedding_ptrs(model)

    def filter_fn(module: nn.Module, fqn: str) -> bool:
        return not fqn.endswith("lm_head") and module.weight.data_ptr() not in tied

    return filter_fn


def _select(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` for every 2-D-weighted linear of ``model`` that ``filter_fn(module, fqn)`` accepts."""
    types = _linear_types()
    keep = filter_fn if filter_fn is not None else default_filter_fn(model)
    out = []
    for fqn, module in model.named_modules():
        if not isinstance(module, types):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if keep(module, fqn):
            out.append((fqn, module))
    return out


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")  # noqa: TRY004 (documented)
    if not (math.isfinite(sparsity) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity must satisfy 0 <= sparsity < 1, got {sparsity!r}")
    return float(sparsity)


def _progress(items: list, progress: bool | None, desc: str) -> Iterable:
    """A tqdm bar over ``items``; ``None`` shows it only when stderr is a TTY, ``False`` never."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer", file=sys.stderr)


def _zero_fraction(t: torch.Tensor) -> float:
    return 1.0 - torch.count_nonzero(t).item() / t.numel() if t.numel() else 0.0


def _writable(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Inference tensors may only be modified in place inside inference mode."""
    return torch.inference_mode() if t.is_inference() else contextlib.nullcontext()


def _prune_rows_(w: torch.Tensor, score: torch.Tensor, sparsity: float) -> None:
    """Zero, in place, the ``int(K * sparsity)`` lowest-``score`` entries of every row of ``w`` ``[N, K]``."""
    n_zero = int(w.shape[1] * sparsity)
    if n_zero == 0:
        return
    idx = torch.topk(score, n_zero, dim=1, largest=False, sorted=False).indices  # [N, n_zero]
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device).scatter_(1, idx, True)  # [N, K]
    with _writable(w):
        w.masked_fill_(mask, 0)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def magnitude_prune_(
    model: nn.Module, sparsity: float, filter_fn: FilterFn | None = None, progress: bool | None = None
) -> dict[str, float]:
    """Zero, in place, the smallest-``|w|`` fraction ``sparsity`` of every selected linear weight, per output row.

    Every row gets exactly ``int(K * sparsity)`` new zeros (ties broken arbitrarily); the rest keep their values.
    ``filter_fn(module, fqn) -> bool`` is called for each ``nn.Linear``/``Conv1D``; the default
    (:func:`default_filter_fn`) skips ``*lm_head`` and weights tied to an ``nn.Embedding``. A custom ``filter_fn``
    replaces that default entirely. Returns ``{fqn: achieved exact-zero fraction}`` for the pruned modules.
    """
    sparsity = _check_sparsity(sparsity)
    report = {}
    for fqn, module in _progress(_select(model, filter_fn), progress, "magnitude prune"):
        w = _weight_nk(module)  # [N, K]
        _prune_rows_(w, w.abs().float(), sparsity)
        report[fqn] = _zero_fraction(w)
    return report


@torch.no_grad()
def wanda_prune_(
    model: nn.Module,
    sparsity: float,
    calibration_input_ids: torch.Tensor,
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Wanda pruning in place: per output row, zero the lowest ``|W_ij| * ||X_j||_2`` fraction ``sparsity``.

    ``||X_j||_2`` is the L2 norm of input feature ``j`` of each selected linear over all calibration tokens,
    accumulated (fp32 sum of squares) by forward pre-hooks during one ``model(calibration_input_ids)`` pass, run
    in eval mode (the training flags are restored afterwards). The ids are moved to the device of the model's
    first parameter. Selection and return value as in :func:`magnitude_prune_`. Raises ``ValueError`` naming any
    selected module the calibration pass never reached (nothing is pruned then).
    """
    sparsity = _check_sparsity(sparsity)
    if not isinstance(calibration_input_ids, torch.Tensor) or calibration_input_ids.numel() == 0:
        raise ValueError("calibration_input_ids must be a non-empty tensor")
    selected = _select(model, filter_fn)
    sq_sums = _collect_input_sq_sums(model, selected, calibration_input_ids)  # {fqn: [K] fp32}
    missing = [fqn for fqn, _ in selected if fqn not in sq_sums]
    if missing:
        raise ValueError(f"wanda_prune_: the calibration pass never reached these selected modules: {missing}")

    report = {}
    for fqn, module in _progress(selected, progress, "wanda prune"):
        w = _weight_nk(module)  # [N, K]
        col_norm = sq_sums[fqn].to(w.device).sqrt()  # [K]
        _prune_rows_(w, w.abs().float() * col_norm[None, :], sparsity)
        report[fqn] = _zero_fraction(w)
    return report


def _collect_input_sq_sums(
    model: nn.Module, selected: list[tuple[str, nn.Module]], input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Run ``model(input_ids)`` once; return ``{fqn: [K] fp32 sum over tokens of x_j**2}`` for reached modules."""
    sq_sums: dict[str, torch.Tensor] = {}

    def make_hook(fqn: str, k: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            x = x.detach().reshape(-1, k).float()  # [B, T, K] or [T, K] -> [tokens, K]
            s = x.square().sum(0)  # [K]
            sq_sums[fqn] = sq_sums[fqn] + s if fqn in sq_sums else s

        return hook

    first = next(iter(model.parameters()), None)
    if first is not None:
        input_ids = input_ids.to(first.device)
    training = {m: m.training for m in model.modules()}
    handles = []
    try:
        for fqn, module in selected:
            handles.append(module.register_forward_pre_hook(make_hook(fqn, _in_features(module)), with_kwargs=True))
        model.eval()
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    return sq_sums


def sparsity_report(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, float]:
    """``{fqn: exact-zero fraction}`` of every linear weight selected as in :func:`magnitude_prune_`."""
    with torch.no_grad():
        return {fqn: _zero_fraction(module.weight) for fqn, module in _select(model, filter_fn)}
