"""Compress each weight once per process: repeated compiles of the same model (recompiles for new shapes,
several graphs sharing a layer) reuse the compressed tensors instead of duplicating them in memory."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from flashllm_compile.codegen.formats.bitmap import COMPILER_ORDER, BitmapWeight
from flashllm_compile.codegen.formats.csl import CslWeight

# id(weight) -> (weak reference to the weight, version, chunk_k, transposed, compressed)
_CACHE: dict[int, tuple[weakref.ref, tuple[int, int], int, bool, BitmapWeight]] = {}
STATS = {"compressions": 0, "reuses": 0}


def _version(weight: torch.Tensor) -> tuple[int, int]:
    """(version counter, data pointer): `param.data = new` swaps the storage without bumping the counter."""
    return -1 if weight.is_inference() else weight._version, weight.data_ptr()


def compress_weight(weight: torch.Tensor, chunk_k: int, transposed: bool = False) -> BitmapWeight:
    """BitmapWeight of `weight` ([N, K]; or [K, N] when `transposed`, as HF Conv1D stores it), its values in the
    compiler's order (formats/bitmap.py `compiler_tile_rows`).

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
        fmt = BitmapWeight.from_dense(weight.t() if transposed else weight, chunk_k, COMPILER_ORDER)
    STATS["compressions"] += 1
    _CACHE[key] = (weakref.ref(weight, lambda _, key=key: _CACHE.pop(key, None)), version, chunk_k, transposed, fmt)
    return fmt


def clear_compression_cache() -> None:
    _CACHE.clear()
    _DERIVED.clear()


# id(format) -> weak reference to it, for the formats some compiled graph holds as buffers (`adopt`)
_ADOPTED: dict[int, weakref.ref] = {}


def adopt(fmt: object) -> None:
    """Mark `fmt` (a BitmapWeight or a StructuredSlice) as held by a compiled graph: `forget_unless_adopted` keeps
    it cached."""
    key = id(fmt)
    _ADOPTED[key] = weakref.ref(fmt, lambda _, key=key: _ADOPTED.pop(key, None))


def forget_unless_adopted(fmt: object) -> None:
    """Drop `fmt` (compressed only to measure it: its linears were left dense) from the caches unless a graph holds
    it, so the cache does not keep its GPU memory alive for nothing; a later compile that rewrites those linears
    compresses them again.  By identity: a format's dataclass equality would compare tensors."""
    ref = _ADOPTED.get(id(fmt))
    if ref is not None and ref() is fmt:
        return
    for cache in (_CACHE, _DERIVED):
        for key in [k for k, v in cache.items() if v[-1] is fmt]:
            del cache[key]


T = TypeVar("T")
# (tag, ids of the weights) -> (weak references to the weights, their versions, result)
_DERIVED: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], object]] = {}


def derive_once(weights: Sequence[torch.Tensor], tag: tuple, build: Callable[[], T]) -> T:
    """`build()` once per (identities + versions of `weights`, tag): the cache of `compress_weight` for data
    derived from several weights (fused siblings, a sliced weight).  Inference tensors are rebuilt every time."""
    key = (tag, *map(id, weights))
    versions = tuple(map(_version, weights))
    hit = _DERIVED.get(key)
    if (hit is not None and not any(w.is_inference() for w in weights) and hit[1] == versions
            and all(ref() is w for ref, w in zip(hit[0], weights))):
        STATS["reuses"] += 1
        return hit[2]
    result = build()
    _DERIVED[key] = (tuple(weakref.ref(w, lambda _, key=key: _DERIVED.pop(key, None)) for w in weights), versions,
                     result)
    return result


def compress_weights(weights: Sequence[torch.Tensor], chunk_k: int, transposed: bool = False) -> BitmapWeight:
    """BitmapWeight of the row-concatenation [N_1 + ... + N_s, K] of `weights` (each [N_i, K]; [K, N_i] when
    `transposed`): sibling linears fused into one.  Compressed once per set of parameters (identities + versions)."""

    def build() -> BitmapWeight:
        with torch.no_grad():
            fmt = BitmapWeight.from_dense(torch.cat([w.t() if transposed else w for w in weights]), chunk_k,
                                          COMPILER_ORDER)
        STATS["compressions"] += 1
        return fmt

    return derive_once(weights, ("concat", chunk_k, transposed), build)


def compress_csl(weights: Sequence[torch.Tensor], transposed: bool = False) -> CslWeight:
    """Tiled-CSL format of the row-concatenation of `weights` (one or more [N_i, K]; [K, N_i] when `transposed`),
    once per set of parameters (identities + versions)."""

    def build() -> CslWeight:
        with torch.no_grad():
            parts = [w.t() if transposed else w for w in weights]
            fmt = CslWeight.from_dense(parts[0] if len(parts) == 1 else torch.cat(parts))
        STATS["compressions"] += 1
        return fmt

    return derive_once(weights, ("csl", transposed), build)


# token -> (weak reference to a compressed weight, its version when compressed). Compiled code may hand the
# op a different tensor object for a parameter (its version counter is not always shared), so freshness is
# checked on the original object, through this registry.
_WATCHED: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}
# token -> tokens of its weights: one token for several weights (`watch_weights`)
_WATCHED_SETS: dict[int, tuple[int, ...]] = {}
_TOKENS = itertools.count()


def watch_weight(weight: torch.Tensor) -> int:
    """Remember `weight` and its current version; returns the token to pass to `weight_is_stale`."""
    token = next(_TOKENS)
    _WATCHED[token] = (weakref.ref(weight), _version(weight))
    return token


def watch_weights(weights: Sequence[torch.Tensor]) -> int:
    """One token for several weights (fused siblings, or a sliced weight): stale when any of them is.  Such a
    token has no single original tensor, so the op's dense weight (derived in the graph) is not compared with one."""
    token = next(_TOKENS)
    _WATCHED_SETS[token] = tuple(watch_weight(w) for w in weights)
    return token


# token -> data pointer of the compressed weight (taken from the original, or the first tensor checked if the
# original was freed)
_WEIGHT_PTRS: dict[int, int] = {}


def replaced_weights(token: int, tensors: Sequence[torch.Tensor]) -> bool:
    """Are `tensors` (what a compiled graph passes now: the weight of a `watch_weight` token, or the members of a
    `watch_weights` one, in order) other tensors than the ones watched?  Dynamo does not guard on parameter
    identity: after `module.weight = nn.Parameter(new)`, or when one compiled graph serves several instances of a
    module class (`layer.compile()` per layer), it passes another tensor.  Unknown tokens: False."""
    tokens = _WATCHED_SETS.get(token, (token,))
    for t, tensor in zip(tokens, tensors):
        if t not in _WATCHED:
            continue
        ptr = _WEIGHT_PTRS.get(t)
        if ptr is None:
            original = _WATCHED[t][0]()
            ptr = _WEIGHT_PTRS[t] = (tensor if original is None else original).data_ptr()
        if tensor.data_ptr() != ptr:
            return True
    return False


def weight_is_stale(token: int) -> bool:
    """True when the watched weight (any of them, for a `watch_weights` token) was modified in place since it
    was watched (False if it was freed)."""
    if token in _WATCHED_SETS:
        return any(weight_is_stale(t) for t in _WATCHED_SETS[token])
    entry = _WATCHED.get(token)
    if entry is None:
        return False
    weight = entry[0]()
    return weight is not None and _version(weight) != entry[1]
