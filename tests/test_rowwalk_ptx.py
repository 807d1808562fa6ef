"""The row walk's inline-PTX path cannot run on a CPU, but it can be compiled: Triton + ptxas build it for sm_90
here (no GPU needed), so a PTX syntax or register error fails CI instead of the first GPU call.  Checked too: no
local-memory spills, and the per-nonzero value load is the 16-bit non-coherent load the PTX asks for.  The compile
runs in a child process: under TRITON_INTERPRET=1 (set by conftest.py) @triton.jit makes interpreter objects."""

import json
import os
import subprocess
import sys

import pytest

CHILD = r'''
import json, re, subprocess, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashllm_compile.codegen.kernels.bitmap_rowwalk import _bitmap_rowwalk_kernel
from flashllm_compile.codegen.kernels.rowwalk_ptx import PTX_TYPES, rowwalk_constraints, rowwalk_ptx

block_m, dtype, workdir, smem_bytes = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
ty = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
signature = {"xt_ptr": f"*{ty}", "bitmap_ptr": "*i32", "offsets_ptr": "*i32", "values_ptr": f"*{ty}",
             "bias_ptr": f"*{ty}", "res_ptr": f"*{ty}", "out_ptr": f"*{ty}", "M": "i32", "N": "i32", "KW": "i32",
             "stride_om": "i32", "stride_os": "i32", "num_chunks": "i32", "x_bytes": "i32"}
constants = {"HAS_BIAS": True, "PARTIALS": False, "ACT": 1, "HAS_RESIDUAL": True, "CHUNK_K": 128,
             "CHUNK_STEPS": 5, "BLOCK_N": 16, "BLOCK_M": block_m, "SEGMENTS": 32, "HW_POPC": True,
             "ASM": rowwalk_ptx(block_m, dtype, smem_bytes), "CONSTRAINTS": rowwalk_constraints(block_m)}
signature.update({name: "constexpr" for name in constants})
kernel = triton.compile(ASTSource(_bitmap_rowwalk_kernel, signature, constexprs=constants),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
result = {"ptx_has_loop": "bfind.u32" in kernel.asm["ptx"] and f"cvt.f32.{PTX_TYPES[dtype]}" in kernel.asm["ptx"]}
nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
if nvdisasm.exists():
    (workdir / "walk.cubin").write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([str(nvdisasm), "-c", str(workdir / "walk.cubin")], capture_output=True, text=True,
                          check=True).stdout
    result.update(spills=bool(re.search(r"\b(LDL|STL)\b", sass)), value_load="LDG.E.U16.CONSTANT" in sass,
                  staged="STS.128" in sass and re.search(r"LDS(\.U16|\.128|\.64)?\b", sass) is not None)
print(json.dumps(result))
'''


@pytest.mark.parametrize("block_m, dtype, smem_bytes", [(1, "float16", 8192), (4, "bfloat16", 0), (8, "float16", 0)])
def test_ptx_walk_compiles_for_sm90(block_m, dtype, smem_bytes, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    child = subprocess.run([sys.executable, "-c", CHILD, str(block_m), dtype, str(tmp_path),
                            str(smem_bytes)], check=False, env=env,
                           capture_output=True, text=True, timeout=300)
    if child.returncode and "ptxas" in child.stderr and "not found" in child.stderr.lower():
        pytest.skip("this Triton build has no ptxas")
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["ptx_has_loop"]
    if "spills" in result:
        assert not result["spills"], "the walk spills registers to local memory"
        assert result["value_load"]
        assert result["staged"] == (smem_bytes > 0), "xt staged in shared memory exactly when asked"


def test_walk_stages_x_only_where_it_fits():
    from flashllm_compile.codegen.kernels.bitmap_rowwalk import SMEM_X_MAX, walk_smem_bytes
    from flashllm_compile.codegen.kernels.rowwalk_ptx import rowwalk_ptx

    assert walk_smem_bytes(4096 * 2) == 8192  # M = 1, K = 4096
    assert walk_smem_bytes(1001 * 2) == 2016  # rounded up to 16 bytes: the copy runs in 16-byte pieces + a tail
    assert walk_smem_bytes(4096 * 8 * 2) == 0 and walk_smem_bytes(SMEM_X_MAX + 2) == 0  # M = 8, K = 4096: too big
    staged, plain = rowwalk_ptx(1, "float16", 2016), rowwalk_ptx(1, "float16", 0)
    assert ".shared .align 16 .b8 flx_xs[2016];" in staged and "bar.sync" in staged
    assert "ld.shared.b16" in staged and "ld.shared" not in plain and ".shared" not in plain
