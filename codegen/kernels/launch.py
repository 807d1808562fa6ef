"""Launch a @triton.jit kernel with less host time than `kernel[grid](...)`.

Why: under `mode="reduce-overhead"` a decode graph is recorded again for every new KV cache, and a recording runs
each op's Python once, so host time per launch is paid per generate (benchmarks/RESULTS.md, tenth session).  The
JIT launch path costs ~30 us of host time a call on the H100 machine (argument binding, cache key, options); the
compiled kernel's own launcher ~10 us.

How: the first launch of a specialisation goes through the JIT (which compiles or finds the kernel) and returns the
`CompiledKernel`; later launches with the same key call its launcher directly.  The key is finer than Triton's own
specialisation, so a cached kernel is always the one the JIT would pick: integers by value (Triton specialises on
== 1 and % 16), tensors by dtype and 16-byte alignment (the NVIDIA backend's only pointer specialisation), every
constexpr by name and value, plus num_warps, num_stages and the device.  Knobs read by the JIT at launch time (e.g.
TRITON_DEBUG) are taken from a specialisation's first launch.

Also here: `precompile`, which compiles the kernels of many calls at once (a tuner's candidates), and programmatic
dependent launch (`pdl_enabled`, `wait_for_previous_kernel`), which the kernels of the
decode path use on Hopper to shorten the gap between dependent kernels.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.runtime import driver

try:  # a private module of Triton (3.4 and later): without it, precompile does nothing
    from triton.runtime import _async_compile
except ImportError:
    _async_compile = None

_MAX_ENTRIES = 4096  # distinct (kernel, config, shape) launches kept; beyond, the cache starts over
_COMPILED: dict[tuple, tuple] = {}  # key -> (CompiledKernel, constexpr values in signature order)
_PRECOMPILING: ContextVar[bool] = ContextVar("flashllm_precompiling", default=False)


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1: tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels that support it launch with programmatic dependent launch (PDL, Hopper and later): such a
    kernel may start while the kernel before it in the stream finishes, so it must run `griddepcontrol.wait` before it
    reads anything but weights or writes anything (ours do: the Tiled-CSL kernel loads its first words, the row
    walk its first bitmap words and fmma its first words and values before they wait, the epilogue kernel waits on
    entry), and it lets the next kernel start early with `griddepcontrol.launch_dependents`.  H100
    (benchmarks/RESULTS.md ideas 30, 54): cmma 1.055x on geo-mean, the row walk 1.09-1.19x at M = 1, fmma 1.015x,
    decode +5% / +10% tokens/s at batch 1 / 8.
    What it saves is the gap between dependent kernels, which a CUDA graph does not remove (~2-3 us a launch on the
    H100).  Off under the interpreter, before sm_90, and with FLASHLLM_PDL=0."""
    return device.type == "cuda" and not interpreting() and os.environ.get("FLASHLLM_PDL", "1") != "0" and \
        _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """In a kernel launched with `pdl`: wait until the kernel before it in the stream is done and its writes are
    visible (call it before reading activations or writing anything), then let the next kernel launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def _arg_key(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    return arg  # int / bool / float: by value


def launch(kernel, grid: tuple[int, ...], args: tuple, *, num_warps: int = 4, num_stages: int = 3, pdl: bool = False,
           **constexprs) -> None:
    """`kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)`, with `launch_pdl=True` when
    `pdl` (the kernel must honour it: `pdl_enabled`).

    args: the runtime arguments in signature order (tensors and ints); constexprs: every remaining parameter by
    name; num_warps / num_stages default to Triton's own defaults.  The interpreter (TRITON_INTERPRET=1) always
    takes the JIT path."""
    if interpreting():
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    if _PRECOMPILING.get():  # compile only (on precompile's threads); the same options make the same JIT cache key
        kernel.warmup(*args, grid=grid, **constexprs, num_warps=num_warps, num_stages=num_stages, **_options(pdl))
        return
    device = driver.active.get_current_device()
    key = (kernel, device, num_warps, num_stages, pdl, *constexprs.items(), *map(_arg_key, args))
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages, **_options(pdl))
        bound = inspect.signature(kernel.fn).bind(*args, **constexprs)
        bound.apply_defaults()
        if len(_COMPILED) >= _MAX_ENTRIES:
            _COMPILED.clear()
        _COMPILED[key] = (compiled, tuple(bound.arguments.values())[len(args):])
        return
    compiled, tail = entry
    grid = (*grid, 1, 1)
    stream = driver.active.get_current_stream(device)
    hook_in, hook_out = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if _hooked(hook_in) or _hooked(hook_out):  # a profiler's hooks: give them what the JIT path gives
        meta = compiled.launch_metadata(grid, stream, *args, *tail)
    else:  # no hooks (the usual case): skip building the metadata and calling empty hook chains
        meta = hook_in = hook_out = None
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, meta, hook_in,
                 hook_out, *args, *tail)


def _options(pdl: bool) -> dict:
    """The JIT's launch options (part of its cache key): built only where the JIT is called, not on every launch."""
    return {"launch_pdl": True} if pdl else {}


def precompile(calls: Iterable[Callable[[], object]], threads: int | None = None) -> None:
    """Compile the Triton kernels that `calls` launch through `launch`, on `threads` threads at once, without running
    them; each call's host code runs (allocations, and torch ops on its unset outputs).  So that a tuner's first
    timing of each candidate finds its kernel compiled instead of compiling it then: a shape's first tuning ran
    1.5-2.6x faster on a 16-core H100 host (benchmarks/RESULTS.md idea 49).  Uses Triton's AsyncCompileMode (each
    compile on the pool; ptxas runs as a subprocess).  A call that raises, or a kernel that fails to compile, is
    skipped: its real call raises again.  A no-op under the interpreter, inside another AsyncCompileMode (Triton
    allows one at a time), and with a Triton that has none."""
    if interpreting() or _async_compile is None or _async_compile.active_mode.get() is not None:
        return
    token = _PRECOMPILING.set(True)
    try:
        with ThreadPoolExecutor(threads or min(32, os.cpu_count() or 1)) as pool, \
                _async_compile.AsyncCompileMode(pool, ignore_errors=True):
            for call in calls:
                with contextlib.suppress(Exception):
                    call()
    finally:
        _PRECOMPILING.reset(token)


def _hooked(hook) -> bool:
    """Whether a launch hook knob holds a hook: False for None and for an empty HookChain (triton >= 3.4)."""
    return bool(getattr(hook, "calls", hook))
