"""Packaging: `backend="flashllm"` comes from the `torch_dynamo_backends` entry point, importing the package has no
side effects, and the install exposes no generic top-level `passes` / `codegen` packages.

Each check runs in a fresh interpreter (`sys.executable -c`), from a directory other than the repository."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

MODEL = """
import torch
from torch import nn
torch.manual_seed(0)
lin = nn.Linear(128, 64)
with torch.no_grad():
    lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.8, 0.0)
x = torch.randn(2, 3, 128)
"""

COMPILE = """
from torch._dynamo.utils import counters
with torch.no_grad():
    out = torch.compile(lin, backend="flashllm")(x)
    assert torch.allclose(out, lin(x), rtol=1e-4, atol=1e-5)
"""


def run_python(code: str, cwd) -> dict:
    """Run `code` in a fresh interpreter in `cwd`; it prints one JSON line last, which is returned."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_backend_loads_through_the_entry_point_without_importing_the_package(tmp_path):
    result = run_python(MODEL + """
import json, sys
import torch._dynamo.backends.registry as registry
before = sorted(m for m in sys.modules if m.startswith("flashllm_compile"))
""" + COMPILE + """
import flashllm_compile.backend
import flashllm_compile.ops
from importlib.metadata import entry_points
print(json.dumps({
    "before": before,
    "imported": "flashllm_compile.backend" in sys.modules,
    "entry_points": sorted({ep.value for ep in entry_points(group="torch_dynamo_backends") if ep.name == "flashllm"}),
    "registered_fn_is_backend": registry._COMPILER_FNS["flashllm"] is flashllm_compile.backend.flashllm_backend,
    "counters": dict(counters["flashllm"]),
    "hits": sum(flashllm_compile.ops.KERNEL_HITS.values()),
}))
""", tmp_path)
    assert result["before"] == []
    assert result["imported"]
    assert result["entry_points"] == ["flashllm_compile.backend:flashllm_backend"]
    assert result["registered_fn_is_backend"]
    assert result["counters"] == {"linear_found": 1, "rewritten": 1}
    assert result["hits"] == 1


def test_importing_the_package_first_then_compiling(tmp_path):
    result = run_python("""
import flashllm_compile
import flashllm_compile.backend
import flashllm_compile.ops
""" + MODEL + COMPILE + """
import json
# a second compile in the same process looks the name up again: still no duplicate registration
torch._dynamo.reset()
with torch.no_grad():
    torch.compile(lin, backend="flashllm")(x)
print(json.dumps({"counters": dict(counters["flashllm"]), "hits": sum(flashllm_compile.ops.KERNEL_HITS.values())}))
""", tmp_path)
    assert result == {"counters": {"linear_found": 2, "rewritten": 2}, "hits": 2}


@pytest.mark.parametrize("module", ["flashllm_compile", "flashllm_compile.backend"])
def test_import_has_no_side_effects(tmp_path, module):
    result = run_python(f"""
import json, sys
import torch
import torch._dynamo
import torch._dynamo.backends.registry as registry
import torch._inductor.config as inductor_config
import torch._dynamo.config as dynamo_config

def snapshot():
    return (repr(sorted(inductor_config.get_config_copy().items())),
            repr(sorted(dynamo_config.get_config_copy().items())))

freezing = inductor_config.freezing
configs = snapshot()
compiler_fns = sorted(registry._COMPILER_FNS)
backends = sorted(registry._BACKENDS)
import {module}
print(json.dumps({{
    "freezing_unchanged": inductor_config.freezing == freezing,
    "inductor_config_unchanged": snapshot()[0] == configs[0],
    "dynamo_config_unchanged": snapshot()[1] == configs[1],
    "compiler_fns_unchanged": sorted(registry._COMPILER_FNS) == compiler_fns,
    "backends_unchanged": sorted(registry._BACKENDS) == backends,
    "flashllm_registered": "flashllm" in registry._COMPILER_FNS,
}}))
""", tmp_path)
    assert result == {"freezing_unchanged": True, "inductor_config_unchanged": True, "dynamo_config_unchanged": True,
                      "compiler_fns_unchanged": True, "backends_unchanged": True, "flashllm_registered": False}


def test_no_top_level_passes_or_codegen_package(tmp_path):
    result = run_python("""
import importlib.util, json
print(json.dumps({
    "passes": importlib.util.find_spec("passes") is None,
    "codegen": importlib.util.find_spec("codegen") is None,
    "namespaced_passes": importlib.util.find_spec("flashllm_compile.passes") is not None,
    "namespaced_codegen": importlib.util.find_spec("flashllm_compile.codegen.formats.bitmap") is not None,
}))
""", tmp_path)
    assert result == {"passes": True, "codegen": True, "namespaced_passes": True, "namespaced_codegen": True}
