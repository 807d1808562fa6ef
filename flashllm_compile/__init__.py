"""flashllm_compile: a torch.compile backend that runs unstructured-sparse (pruned) LLM linears with fused
sparse-decode Triton kernels.

    model = torch.compile(model, backend="flashllm")   # registered through the torch_dynamo_backends entry point

Importing this package registers nothing and changes no global config.
"""

import os as _os

# The repository keeps passes/ and codegen/ beside this folder; an install maps them to flashllm_compile.passes /
# flashllm_compile.codegen (pyproject package-dir).  When imported from a source checkout (PYTHONPATH=repo),
# resolve the same names from the sibling folders so both ways import identically.
_repo_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
# Only for the top-level package: the repository root also holds flashllm_compile/ itself, and a nested
# "flashllm_compile.flashllm_compile" (found by pkgutil.walk_packages, e.g. TORCH_LOGS="+flashllm_compile")
# must not extend its own path again, or the walk recurses into ever deeper copies.
if (__name__ == "flashllm_compile" and _os.path.isfile(_os.path.join(_repo_root, "codegen", "autotune.py"))
        and _repo_root not in __path__):
    __path__.append(_repo_root)


def __getattr__(name: str):
    """Lazy public API: `flashllm_compile.explain` imports torch (and the backend) on first use only."""
    if name in ("explain", "ExplainReport"):
        import importlib

        module = importlib.import_module("flashllm_compile.explainer")
        globals().update(explain=module.explain, ExplainReport=module.ExplainReport)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
