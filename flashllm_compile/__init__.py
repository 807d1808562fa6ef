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
if _os.path.isfile(_os.path.join(_repo_root, "codegen", "autotune.py")) and _repo_root not in __path__:
    __path__.append(_repo_root)
