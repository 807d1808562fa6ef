"""Compress each weight once per process: repeated compiles of the same model (recompiles for new shapes,
several graphs sharing a layer) reuse the compressed tensors instead of duplicating them in memory."""

from __future__ import annotations

import weakref

import torch

from flashllm_compile.codegen.formats.bitmap import BitmapWeight

# id(weight) -> (weak reference to the weight, version, chunk_k, transposed, compressed)
_CACHE: dict[int, tuple[weakref.ref, int, int, bool, BitmapWeight]] = {}
STATS = {"compressions": 0, "reuses": 0}


def _version(weight: torch.Tensor) -> int:
    return -1 if weight.is_inference() else weight._version


def compress_weight(weight: torch.Tensor, chunk_k: int, transposed: bool = False) -> BitmapWeight:
    """BitmapWeight of `weight` ([N, K]; or [K, N] when `transposed`, as HF Conv1D stores it).

    Cached by the weight's identity and version counter: an in-place update produces a fresh compression.
    Inference-mode tensors have no version counter, so they are compressed afresh on every compile."""
    key = id(weight)
    hit = _CACHE.get(key)
    version = _version(weight)
    if hit is not None and not weight.is_inference():
        ref, cached_version, cached_chunk, cached_t, fmt = hit
        if ref() is weight and cached_version == version and cached_chunk == chunk_k and cached_t == transposed:
            STATS["reuses"] += 1
            return fmt
    with torch.no_grad():
        fmt = BitmapWeight.from_dense(weight.t() if transposed else weight, chunk_k)
    STATS["compressions"] += 1
    _CACHE[key] = (weakref.ref(weight, lambda _, key=key: _CACHE.pop(key, None)), version, chunk_k, transposed, fmt)
    return fmt


def clear_compression_cache() -> None:
    _CACHE.clear()


# token -> (weak reference to a compressed weight, its version when compressed). Compiled code may hand the
# op a different tensor object for a parameter (its version counter is not always shared), so freshness is
# checked on the original object, through this registry.
_WATCHED: dict[int, tuple[weakref.ref, int]] = {}


def watch_weight(weight: torch.Tensor) -> int:
    """Remember `weight` and its current version; returns the token to pass to `weight_is_stale`."""
    token = len(_WATCHED)
    _WATCHED[token] = (weakref.ref(weight), _version(weight))
    return token


def weight_is_stale(token: int) -> bool:
    """True when the watched weight was modified in place since `watch_weight` (False if it was freed)."""
    entry = _WATCHED.get(token)
    if entry is None:
        return False
    weight = entry[0]()
    return weight is not None and _version(weight) != entry[1]
