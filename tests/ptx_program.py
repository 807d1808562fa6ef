"""Build one PTX-program kernel family (smma, fmma: the whole program body is inline PTX inside
bitmap_smma's Triton kernel) for sm_90 with Triton + ptxas, no GPU needed, and report what the GPU would run.

The compile runs in a child process: under TRITON_INTERPRET=1 (set by conftest.py) @triton.jit makes interpreter
objects.  Used by tests/test_smma_ptx.py and tests/test_fmma_ptx.py."""

from __future__ import annotations

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
from flashllm_compile.codegen.kernels.bitmap_smma import _bitmap_smma_kernel
from flashllm_compile.codegen.kernels.fmma_ptx import fmma_ptx
from flashllm_compile.codegen.kernels.smma_ptx import smma_constraints, smma_ptx

family, block_n, block_m, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
partials, bounded, x_shared, workdir = sys.argv[5] == "1", sys.argv[6] == "1", sys.argv[7] == "1", Path(sys.argv[8])
linear, pdl = sys.argv[9] == "1", sys.argv[10] == "1"
nt = block_m // 8
asm = smma_ptx(block_n, nt, dtype) if family == "smma" else fmma_ptx(block_n // 16, nt, dtype, bounded, x_shared,
                                                                     linear, pdl)
ty = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
signature = {"x_ptr": f"*{ty}", "bitmap_ptr": "*i32", "offsets_ptr": "*i32", "values_ptr": f"*{ty}",
             "bias_ptr": f"*{ty}", "res_ptr": f"*{ty}", "out_ptr": "*fp32" if partials else f"*{ty}", "M": "i32",
             "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "stride_os": "i32",
             "chunks_per_split": "i32", "num_chunks": "i32"}
constants = {"HAS_BIAS": not partials, "PARTIALS": partials, "ACT": 0 if partials else 1,
             "HAS_RESIDUAL": not partials, "CHUNK_K": 128, "BLOCK_N": block_n, "BLOCK_M": block_m, "HW_POPC": True,
             "ASM": asm, "CONSTRAINTS": smma_constraints(nt)}
signature.update({name: "constexpr" for name in constants})
kernel = triton.compile(ASTSource(_bitmap_smma_kernel, signature, constexprs=constants),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": block_n // 16, "num_stages": 1})
ttgir = kernel.asm["ttgir"]
asm_line = next(line for line in ttgir.splitlines() if "elementwise_inline_asm" in line)
layout = re.search(r"tensor<(\d+)xi32, (#\w+)>", asm_line.split("->")[0])
layout_def = next(line for line in ttgir.splitlines() if line.startswith(layout.group(2) + " ="))
result = {"elements": int(layout.group(1)), "layout": layout_def,
          "shared": sum(int(n) for n in re.findall(r"\.shared \.align 16 \.b8 fl\w+\[(\d+)\]", kernel.asm["ptx"]))}
nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
if nvdisasm.exists():
    (workdir / "program.cubin").write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([str(nvdisasm), "-c", str(workdir / "program.cubin")], capture_output=True, text=True,
                          check=True).stdout
    result["spills"] = bool(re.search(r"\b(LDL|STL)\b", sass))
    for op in ("LDGSTS", "LDSM", "PRMT", "POPC", "BAR.SYNC", "LDS.128", "STS.U16", "BRX", "BRXU", "ACQBULK",
               "PREEXIT"):
        result[op] = len(re.findall(r"\b" + re.escape(op) + r"\b", sass))
    result["HMMA"] = len(re.findall(r"\bHMMA\.16816\.F32", sass))
    result["guarded STS.U16"] = len(re.findall(r"@!?U?P\w+\s+STS\.U16\b", sass))
print(json.dumps(result))
'''


def compile_program(family: str, block_n: int, block_m: int, dtype: str, partials: bool, tmp_path,
                    bounded: bool = True, x_shared: bool = True, linear: bool = False, pdl: bool = False) -> dict:
    """The child's report (elements / layout of the tensor the PTX runs on, static shared bytes, and from the SASS:
    spills and instruction counts); skips when this Triton build has no ptxas.  `linear`: fmma's staging of
    tile-major values; `pdl`: fmma built for programmatic dependent launch."""
    return _run_child(CHILD, [family, block_n, block_m, dtype, int(partials), int(bounded), int(x_shared), tmp_path,
                              int(linear), int(pdl)], tmp_path)


CMMA_CHILD = r'''
import json, re, subprocess, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashllm_compile.codegen.kernels.csl_mma import _csl_mma_kernel
from flashllm_compile.codegen.kernels.cmma_ptx import cmma_constraints, cmma_ptx

warps, rt, block_m, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
partials, max_groups, depth, workdir = sys.argv[5] == "1", int(sys.argv[6]), int(sys.argv[7]), Path(sys.argv[8])
jump, split = sys.argv[9] == "1", sys.argv[10] == "1"
nt = block_m // 8
ty = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
signature = {"x_ptr": f"*{ty}", "items_ptr": "*i32", "seg_ptr": "*i32", "bias_ptr": f"*{ty}", "res_ptr": f"*{ty}",
             "out_ptr": "*fp32" if partials else f"*{ty}", "M": "i32", "N": "i32", "stride_xm": "i32",
             "stride_om": "i32", "stride_os": "i32", "chunks_per_split": "i32", "num_chunks": "i32"}
constants = {"HAS_BIAS": not partials, "PARTIALS": partials, "ACT": 0 if partials else 1,
             "HAS_RESIDUAL": not partials, "BLOCK_N": 16 * (1 if split else warps) * rt, "BLOCK_M": block_m,
             "RT": rt, "THREADS": 32 * warps, "WARP_SPLIT": split,
             "ASM": cmma_ptx(warps, rt, nt, dtype, max_groups, depth, jump=jump, warp_split=split),
             "CONSTRAINTS": cmma_constraints(nt, rt)}
signature.update({name: "constexpr" for name in constants})
kernel = triton.compile(ASTSource(_csl_mma_kernel, signature, constexprs=constants),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
''' + CHILD[CHILD.index("ttgir = kernel.asm"):]


def compile_cmma(warps: int, rt: int, block_m: int, dtype: str, partials: bool, max_groups: int, depth: int,
                 tmp_path, jump: bool = False, warp_split: bool = False) -> dict:
    """compile_program for the Tiled-CSL program (its own Triton kernel around the PTX; warps own rt tiles, the
    same ones with `warp_split`)."""
    return _run_child(CMMA_CHILD, [warps, rt, block_m, dtype, int(partials), max_groups, depth, tmp_path, int(jump),
                                   int(warp_split)], tmp_path)


def _run_child(child_source: str, args: list, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    child = subprocess.run([sys.executable, "-c", child_source, *map(str, args)], check=False, env=env,
                           capture_output=True, text=True, timeout=300)
    if child.returncode and "ptxas" in child.stderr and "not found" in child.stderr.lower():
        pytest.skip("this Triton build has no ptxas")
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def assert_one_element_per_thread(result: dict, warps: int) -> None:
    """The PTX has barriers and per-lane roles: it must run exactly once in every thread of the program."""
    assert result["elements"] == 32 * warps and "sizePerThread = [1]" in result["layout"], result
    assert f"warpsPerCTA = [{warps}]" in result["layout"], result
