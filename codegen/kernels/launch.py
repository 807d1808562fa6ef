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
"""

from __future__ import annotations

import inspect
import os

import torch
from triton import knobs
from triton.runtime import driver

_MAX_ENTRIES = 4096  # distinct (kernel, config, shape) launches kept; beyond, the cache starts over
_COMPILED: dict[tuple, tuple] = {}  # key -> (CompiledKernel, constexpr values in signature order)


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1: tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _arg_key(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    return arg  # int / bool / float: by value


def launch(kernel, grid: tuple[int, ...], args: tuple, *, num_warps: int = 4, num_stages: int = 3,
           **constexprs) -> None:
    """`kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)`.

    args: the runtime arguments in signature order (tensors and ints); constexprs: every remaining parameter by
    name; num_warps / num_stages default to Triton's own defaults.  The interpreter (TRITON_INTERPRET=1) always
    takes the JIT path."""
    if interpreting():
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    device = driver.active.get_current_device()
    key = (kernel, device, num_warps, num_stages, *constexprs.items(), *map(_arg_key, args))
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
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


def _hooked(hook) -> bool:
    """Whether a launch hook knob holds a hook: False for None and for an empty HookChain (triton >= 3.4)."""
    return bool(getattr(hook, "calls", hook))
