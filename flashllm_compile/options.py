"""User options of the flashllm backend: `torch.compile(model, backend="flashllm", options={...})`."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from typing import Any


class KernelPreference(str, enum.Enum):
    """Which implementation a rewritten linear runs.

    AUTO      measured choice per shape on CUDA (row walk / tensor-core / unpack sparse kernels / dense cuBLAS, whichever is
              fastest; never a slower sparse kernel); on CPU the EMULATED path.
    TRITON    always our Triton sparse kernel (CUDA, or CPU under TRITON_INTERPRET=1).
    DENSE     the original dense op on the original weight (the rewrite still happens; useful to compare).
    EMULATED  decode the compressed weight to dense with plain torch ops, then F.linear: a reference that
              runs anywhere and exercises the format.
    """

    AUTO = "auto"
    TRITON = "triton"
    DENSE = "dense"
    EMULATED = "emulated"


def default_cache_dir() -> str:
    return os.environ.get("FLASHLLM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "flashllm_compile"))


@dataclass
class FlashLLMOptions:
    """Options of `backend="flashllm"` (pass as a dict: `options={"min_sparsity": 0.6}`).

    min_sparsity       rewrite a linear only if at least this fraction of its weight is exactly zero.
    min_weight_numel   skip weights with fewer elements (compression and a launch are not worth it).
    kernel             a KernelPreference or its string value.
    autotune           measure tile configs (and dense) per shape on the GPU; off: dense where the dense weight
                       is kept, else a default sparse tile config.
    cache_dir          where autotune results are stored (default $FLASHLLM_CACHE_DIR or ~/.cache/flashllm_compile).
    chunk_k            columns per chunk of the bitmap format (multiple of 32).
    release_dense_weights  the compiled graph keeps no dense weight of its own (no transposed / concatenated /
                       sliced copies, no frozen constants).  Where the module's parameter is a graph input anyway
                       (default Dynamo), the op still receives it, to refuse a replaced parameter and to run cuBLAS
                       on it in place where that is faster.  `flashllm_compile.sparsify_` frees the parameters.
    fuse_siblings      fuse rewritten linears that read the same input (LLaMA q/k/v, gate/up) into one sparse_linear
                       on their concatenated weight, outputs split as views (passes/fuse_sibling_linears.py).
    slice_structured_zeros  compute only the nonzero rows / columns of a rewritten weight that has all-zero rows /
                       columns, and scatter the output back (passes/slice_structured_zeros.py); also drop the columns
                       whose input features are exact zeros made by an upstream linear's all-zero rows (zero bias)
                       through zero-preserving ops, e.g. down_proj's columns at gate_proj's zero rows in
                       silu(gate) * up (passes/propagate_structured_zeros.py).  Exact for finite activations (dense
                       math turns 0 * Inf into NaN, a dropped term does not).
                       A fused op's dense fallback runs one GEMM per member weight in place; a sliced op's runs its
                       full weight in place on the full input and keeps the sliced rows; HF Conv1D siblings' dense
                       weight is built in the graph on every call (torch.cat of the parameters), which
                       release_dense_weights=True avoids.  Measured on the H100 (benchmarks/RESULTS.md, sixth
                       session) per LLaMA-7B layer with 25% / 50% of the MLP channels zeroed: +2.6% / +15.6% at
                       M = 16, -2.4% / -3.4% at M = 1 (there the row walk already skips zeros, and slicing blocks
                       the SwiGLU fold).
    fuse_epilogues     fold the pointwise ops right after a rewritten linear into its op: the SwiGLU product
                       silu(gate) * up of fused gate/up siblings, an activation (silu, gelu, relu), a residual add;
                       computed in fp32 in the kernel's split-K epilogue (passes/fuse_epilogues.py).
    csl                where a graph's token count is static (decode steps under mode="reduce-overhead") and M <= 64,
                       also compress each rewritten weight in the Tiled-CSL format (codegen/formats/csl.py) and run
                       it where its kernel measures faster than the bitmap's (H100, LLaMA-7B shapes: 1.3-1.5x
                       cuBLAS at M = 8..16 and 80-90% sparsity, against 1.15-1.2x; benchmarks/RESULTS.md).  It
                       stores 4 bytes a nonzero (the bitmap: 2 + 1/8 per element), so None (default) allows it
                       unless release_dense_weights asks for the least memory; True / False force it on / off.
    deterministic      outputs reproducible across processes, not only across calls: every kernel already reduces
                       split-K partials in a fixed order (no atomics), and this also makes the kernel choice
                       independent of timings (the untuned defaults: dense where the dense weight is kept, else
                       a fixed sparse tile config per M bucket; no autotuning, no autotune cache).
    mode               Inductor mode to forward (torch.compile refuses `mode` and `options` together).
    inductor_config    extra Inductor config patches.
    """

    min_sparsity: float = 0.5
    min_weight_numel: int = 4096
    kernel: KernelPreference = KernelPreference.AUTO
    autotune: bool = True
    cache_dir: str = field(default_factory=default_cache_dir)
    chunk_k: int = 128
    release_dense_weights: bool = False
    fuse_siblings: bool = True
    slice_structured_zeros: bool = True
    fuse_epilogues: bool = True
    csl: bool | None = None
    deterministic: bool = False
    mode: str | None = None
    inductor_config: dict[str, Any] = field(default_factory=dict)

    def csl_allowed(self) -> bool:
        """Whether the compile-time dispatch may choose the Tiled-CSL format (see `csl`)."""
        return self.csl if self.csl is not None else not self.release_dense_weights

    def runtime_spec(self) -> str:
        """The settings a compiled op reads at run time, as the op's `runtime` argument (JSON)."""
        return json.dumps({"autotune": self.autotune, "cache_dir": self.cache_dir,
                           "deterministic": self.deterministic}, sort_keys=True)

    def __post_init__(self) -> None:
        self.kernel = KernelPreference(self.kernel)
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise ValueError(f"min_sparsity must be in [0, 1], got {self.min_sparsity}")
        if self.chunk_k <= 0 or self.chunk_k % 32:
            raise ValueError(f"chunk_k must be a positive multiple of 32, got {self.chunk_k}")

    @classmethod
    def from_any(cls, options: FlashLLMOptions | dict[str, Any] | None) -> FlashLLMOptions:
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown flashllm option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**options)
