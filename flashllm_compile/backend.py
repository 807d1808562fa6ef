"""The TorchDynamo backend `flashllm`: rewrite sparse linears, fold their epilogues, hand the graph to Inductor
(whose generated code calls the ops' twin without an autograd layer: passes/nograd_ops.py).

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so
`torch.compile(model, backend="flashllm")` works without importing this package, and importing it does not
register the name a second time.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from flashllm_compile.options import FlashLLMOptions
from flashllm_compile.passes.fuse_epilogues import fuse_epilogues
from flashllm_compile.passes.nograd_ops import UseNogradOps
from flashllm_compile.passes.rewrite_sparse_linear import rewrite_sparse_linears
from flashllm_compile.report import note_epilogues, record_decisions


def _ensure_fake_metadata(gm: fx.GraphModule, example_inputs: list[Any]) -> None:
    """Graphs that did not come from Dynamo (e.g. torch.fx.symbolic_trace) carry no meta['val']: propagate fake
    tensors through them so the detection pass can read shapes and dtypes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if all("val" in n.meta or "example_value" in n.meta for n in placeholders):
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)


def register_torch_logs() -> None:
    """Make the `flashllm_compile` logger a TORCH_LOGS-controlled log under the alias "flashllm" (idempotent).

    `TORCH_LOGS="+flashllm_compile"` works at torch import (any importable module name does); after this call
    `torch._logging.set_logs(modules={"flashllm": logging.INFO})` works too.  Called by the backend on each
    compile."""
    from torch._logging import _internal

    registry = getattr(_internal, "log_registry", None)
    if registry is not None and registry.is_log("flashllm"):
        return
    register = getattr(_internal, "register_log", None)
    if register is not None:  # private API (torch 2.1 .. 2.13); a later rename must not break compiling
        register("flashllm", "flashllm_compile")


def flashllm_backend(gm: fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None,
                     options: FlashLLMOptions | dict[str, Any] | None = None):
    """TorchDynamo backend: `(gm, example_inputs, mode=, options=)` -> compiled callable.

    Weights reach it as placeholders whose example input is the real nn.Parameter (default Dynamo) or as
    get_attr nodes (Inductor freezing); both are handled by the detection pass.  `mode` (or options["mode"],
    since torch.compile refuses mode and options together) is forwarded to Inductor, e.g. "reduce-overhead"
    for CUDA graphs."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    register_torch_logs()
    opts = FlashLLMOptions.from_any(options)
    _ensure_fake_metadata(gm, example_inputs)
    with record_decisions() as decisions:
        rewrite_sparse_linears(gm, example_inputs, opts)
    if opts.fuse_epilogues:  # also the ops a sparsify_'d model calls itself
        note_epilogues(decisions, fuse_epilogues(gm))
    mode = mode or opts.mode
    # a user's own post-grad pass (options["inductor_config"]) replaces ours: the op then keeps its wrappers
    config_patches = {**(list_mode_options(mode) if mode else {}), "post_grad_custom_post_pass": UseNogradOps(),
                      **opts.inductor_config}
    return compile_fx(gm, example_inputs, config_patches=config_patches)
