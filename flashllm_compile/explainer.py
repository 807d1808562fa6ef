"""See what the compiler did: `flashllm_compile.explain(model, *example_inputs, **options)`.

Compiles a wrapper of `model` with the flashllm backend, runs it once on the example inputs under
`torch.no_grad()`, and reports every linear the backend saw (rewritten or why not, format, bytes), the
autotuned kernel per M bucket on CUDA, and the Triton source of the kernel families involved.  The model
itself is not modified; the Dynamo cache is reset before and after so later compiles start clean.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from flashllm_compile.options import FlashLLMOptions
from flashllm_compile.report import LinearDecision, decision_table, record_decisions

FAMILIES = ("rowwalk", "fmma", "cmma", "smma", "mma", "unpack")  # Triton kernel families, in the order shown
# family -> (module under codegen/kernels, its @triton.jit kernel); the bitmap families follow bitmap_<family>
KERNEL_MODULES = {"cmma": ("csl_mma", "_csl_mma_kernel")}


@dataclass
class KernelChoice:
    """The implementation the autotuner picked for one M bucket of one layer."""

    m_bucket: int
    family: str  # "dense" or a Triton family of FAMILIES
    config: str  # TileConfig.short(), "" for dense
    time_us: float
    dense_us: float

    @property
    def speedup(self) -> float:
        """dense_us / time_us, nan when either was not measured."""
        return self.dense_us / self.time_us if self.time_us > 0 else float("nan")

    def describe(self) -> str:
        text = f"M<={self.m_bucket}: {self.config or self.family}"
        return text + (f" {self.speedup:.2f}x vs dense" if math.isfinite(self.speedup) else "")


@dataclass
class LayerReport:
    """One linear-like op: the backend's LinearDecision plus format and kernel choices."""

    decision: LinearDecision
    format: str  # "bitmap(chunk_k=128)" or "csl(Tiled-CSL)" for rewritten layers, "" otherwise
    kernels: list[KernelChoice] = field(default_factory=list)
    note: str = ""  # e.g. "emulated (CPU)" when no Triton kernel ran

    def kernel_text(self) -> str:
        if not self.decision.rewritten:
            return ""
        return "; ".join(k.describe() for k in self.kernels) or self.note

    def to_dict(self) -> dict[str, Any]:
        data = {**dataclasses.asdict(self.decision), "format": self.format, "note": self.note,
                "kernels": [{**dataclasses.asdict(k), "speedup": k.speedup} for k in self.kernels]}
        return _json_safe(data)


@dataclass
class ExplainReport:
    """What `explain()` found; `str(report)` is a readable table, `report.to_dict()` JSON-able data."""

    device: str
    options: dict[str, Any]
    layers: list[LayerReport]
    kernel_sources: dict[str, str]  # family -> Triton source (kernel + shared device functions it calls)
    compiled_asm: dict[str, dict[str, str]] = field(default_factory=dict)  # family -> {"ptx"/"ttgir": text}

    @property
    def rewritten(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.decision.rewritten]

    def table(self) -> str:
        """The per-layer table with a kernel column, and the summary line."""
        return decision_table([layer.decision for layer in self.layers],
                              kernels={layer.decision.name: layer.kernel_text() for layer in self.layers})

    def __str__(self) -> str:
        parts = [f"flashllm explain: device {self.device}, options {self.options}", "", self.table()]
        for family, src in self.kernel_sources.items():
            parts += ["", f"=== Triton source: {family} kernel ===", src.rstrip()]
        for family, asm in self.compiled_asm.items():
            for kind, text in asm.items():
                parts += ["", f"=== {kind.upper()}: {family} kernel ===", text.rstrip()]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "options": _json_safe(self.options),
                "layers": [layer.to_dict() for layer in self.layers], "kernel_sources": dict(self.kernel_sources),
                "compiled_asm": {f: dict(a) for f, a in self.compiled_asm.items()}}


def _json_safe(value: Any) -> Any:
    """nan/inf -> None, enums -> values, containers recursively (json.dumps(allow_nan=False) accepts it)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return getattr(value, "value", str(value))


def _input_device(model: torch.nn.Module, example_inputs: tuple) -> torch.device:
    for t in (*example_inputs, *model.parameters()):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _run_compiled(model: torch.nn.Module, example_inputs: tuple, opts: FlashLLMOptions) -> list[LinearDecision]:
    """Compile a wrapper of `model` with the flashllm backend and run it once; the decisions it published."""
    from flashllm_compile.backend import flashllm_backend

    backend = functools.partial(flashllm_backend, options=opts)
    torch._dynamo.reset()
    try:
        with record_decisions() as decisions, torch.no_grad():
            torch.compile(model, backend=backend)(*example_inputs)
    finally:
        torch._dynamo.reset()
    return list(decisions)


def _kernel_choices(d: LinearDecision, chunk_k: int) -> list[KernelChoice]:
    from flashllm_compile.codegen.autotune import AUTOTUNER

    n, k = d.op_shape or (d.out_features, d.in_features)  # a fused / sliced linear is tuned as its op's shape
    density = d.op_density if d.op_density is not None else 1.0 - d.sparsity
    if d.layout == "csl":  # keyed by the density of its stored words (nonzeros + filler): every density of the shape
        choices = AUTOTUNER.choices_for(n, k, chunk_k, d.dtype, layout="csl")
    else:
        choices = AUTOTUNER.choices_for(n, k, chunk_k, d.dtype, density=density)
    return [KernelChoice(m, c.family, c.config.short() if c.config else "", c.time_us, c.dense_us)
            for m, c in choices.items()]


def _layer_report(d: LinearDecision, opts: FlashLLMOptions, device: torch.device) -> LayerReport:
    if not d.rewritten:
        return LayerReport(d, "")
    shape = f", op {d.op_shape[0]}x{d.op_shape[1]}" if d.op_shape else ""
    fmt = "csl(Tiled-CSL" if d.layout == "csl" else f"bitmap(chunk_k={opts.chunk_k}"
    layer = LayerReport(d, f"{fmt}{shape})" + (f" fused {d.group}" if d.group else ""))
    if opts.kernel.value in ("emulated", "dense"):
        layer.note = opts.kernel.value
    elif device.type != "cuda":
        layer.note = "emulated (CPU)"
    else:
        layer.kernels = _kernel_choices(d, opts.chunk_k)
        layer.note = "" if layer.kernels else "not tuned (autotune off or not run yet)"
    return layer


def _jit_source(fn) -> str:
    """Source of a @triton.jit function, decorator included."""
    try:
        return inspect.getsource(getattr(fn, "fn", fn))
    except (OSError, TypeError):  # no source file (e.g. zipped install): Triton keeps the body without decorator
        return "@triton.jit\n" + fn.src


def _kernel_of(family: str):
    """(kernels module, @triton.jit kernel) of a family."""
    import importlib

    module_name, kernel_name = KERNEL_MODULES.get(family, (f"bitmap_{family}", f"_bitmap_{family}_kernel"))
    module = importlib.import_module(f"flashllm_compile.codegen.kernels.{module_name}")
    return module, getattr(module, kernel_name)


def _device_functions(module) -> dict[str, object]:
    """The @triton.jit functions a kernels module defines (not its kernels `_bitmap_*_kernel`), by name.  Duck-typed:
    under TRITON_INTERPRET=1 the decorator makes interpreter objects, not JITFunctions; both wrap `.fn`."""
    return {name: fn for name, fn in vars(module).items()
            if inspect.isfunction(getattr(fn, "fn", None)) and fn.fn.__module__ == module.__name__
            and not (name.startswith("_") and name.endswith("_kernel"))}


def kernel_source(family: str) -> str:
    """The Triton source of one kernel family: the @triton.jit kernel plus every device function it calls, directly
    or through each other (its own module's, codegen/kernels/bitmap_decode.py's, epilogue.py's), and for the row
    walk the inline PTX of its inner loop (BLOCK_M = 1, fp16), for fmma, cmma and smma the PTX program body
    (BLOCK_M = 16, fp16)."""
    from flashllm_compile.codegen.kernels import bitmap_decode, cmma_ptx, epilogue, fmma_ptx, rowwalk_ptx, smma_ptx

    module, kernel = _kernel_of(family)
    kernel_src = _jit_source(kernel)
    available = {name: (mod, fn) for mod in (epilogue, bitmap_decode, module)
                 for name, fn in _device_functions(mod).items()}
    used, pending = set(), [kernel_src]
    while pending:  # the transitive closure of `name(` mentions
        text = pending.pop()
        for name, (_, fn) in available.items():
            if name not in used and f"{name}(" in text:
                used.add(name)
                pending.append(_jit_source(fn))
    parts = []
    for mod in (epilogue, bitmap_decode, module):  # definition order within each file
        names = [name for name, (m, _) in available.items() if m is mod and name in used]
        if names:
            parts.append(f"# from {mod.__name__.removeprefix('flashllm_compile.').replace('.', '/')}.py: "
                         f"{', '.join(names)}")
            parts += [_jit_source(available[name][1]) for name in names]
    parts += [f"# the kernel, from {module.__name__.removeprefix('flashllm_compile.').replace('.', '/')}.py", kernel_src]
    if family == "rowwalk":
        parts += ["# inline PTX of the walk on the GPU (codegen/kernels/rowwalk_ptx.py, BLOCK_M=1, fp16, K=4096, x staged)",
                  "\n".join("# " + line for line in rowwalk_ptx.rowwalk_ptx(
                      1, "float16", module.walk_smem_bytes(4096 * 2)).splitlines())]
    if family == "fmma":
        parts += ["# inline PTX of the program on the GPU (codegen/kernels/fmma_ptx.py, 2 warps, BLOCK_M=16, fp16)",
                  "\n".join("# " + line for line in fmma_ptx.fmma_ptx(2, 2, "float16").splitlines())]
    if family == "cmma":
        ptx = cmma_ptx.cmma_ptx(2, 2, 2, "float16", 16)
        parts += [("# inline PTX of the program on the GPU (codegen/kernels/cmma_ptx.py, 2 warps of 2 weight tiles, "
                   "BLOCK_M=16, fp16)"),
                  "\n".join("# " + line for line in ptx.splitlines())]
    if family == "smma":
        parts += ["# inline PTX of the program on the GPU (codegen/kernels/smma_ptx.py, BLOCK_N=32, BLOCK_M=16, fp16)",
                  "\n".join("# " + line for line in smma_ptx.smma_ptx(32, 2, "float16").splitlines())]
    return "\n\n".join(parts)


def _compiled_asm(family: str) -> dict[str, str]:
    """PTX / TTGIR of the first compiled specialisation in Triton's in-process cache (best effort, CUDA)."""
    _, fn = _kernel_of(family)
    try:
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for compiled in kernels.values():
                asm = getattr(compiled, "asm", {})
                return {kind: asm[kind] for kind in ("ttgir", "ptx") if isinstance(asm.get(kind), str)}
    except Exception as e:  # noqa: BLE001 -- Triton internals differ between versions; this is optional output
        logging.getLogger("flashllm_compile").debug("flashllm explain: no compiled asm for %s: %s", family, e)
    return {}


def _families(layers: list[LayerReport]) -> list[str]:
    """Triton families chosen for some layer; when none was measured (CPU, autotune off) all that could run."""
    chosen = {k.family for layer in layers for k in layer.kernels if k.family in FAMILIES}
    return [f for f in FAMILIES if f in chosen] if chosen else list(FAMILIES)


def explain(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> ExplainReport:
    """Compile `model` with backend="flashllm" (the given FlashLLMOptions fields as keyword arguments), run it
    once on `example_inputs` without grad, and report what the backend did.

    The model is left untouched: torch.compile(model) returns a new wrapper, weights are only read (compressed
    copies), and torch._dynamo.reset() runs before and after.  On CUDA the run also autotunes, so the report
    shows the kernel family, tile config and measured speedup per M bucket; on CPU rewritten layers run the
    emulated path.  Example: `print(flashllm_compile.explain(model, input_ids, min_sparsity=0.6))`."""
    opts = FlashLLMOptions.from_any(options)
    device = _input_device(model, example_inputs)
    decisions = _run_compiled(model, example_inputs, opts)
    layers = [_layer_report(d, opts, device) for d in decisions]
    families = _families(layers) if any(layer.decision.rewritten for layer in layers) else []
    asm = {f: a for f in families if device.type == "cuda" and (a := _compiled_asm(f))}
    return ExplainReport(device=str(device), options=_json_safe(dataclasses.asdict(opts)), layers=layers,
                         kernel_sources={f: kernel_source(f) for f in families}, compiled_asm=asm)
