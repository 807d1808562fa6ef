"""The scatter + tensor-core kernel (smma) is a whole program in inline PTX: the interpreter cannot run it, so CI
builds it for sm_90 with Triton + ptxas (no GPU needed) and checks what the GPU would run: it assembles, does not
spill, uses cp.async (LDGSTS), ldmatrix (LDSM) and tensor-core MMAs (HMMA), fits the static shared-memory cap, and
the tensor it runs on has exactly one element per thread (the PTX has barriers: it must run once in every thread).
Correctness against F.linear runs on the GPU (tests/gpu)."""

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
from flashllm_compile.codegen.kernels.smma_ptx import smma_constraints, smma_ptx

block_n, block_m, dtype, partials, workdir = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1",
                                              Path(sys.argv[5]))
ty = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
signature = {"x_ptr": f"*{ty}", "bitmap_ptr": "*i32", "offsets_ptr": "*i32", "values_ptr": f"*{ty}",
             "bias_ptr": f"*{ty}", "res_ptr": f"*{ty}", "out_ptr": "*fp32" if partials else f"*{ty}", "M": "i32",
             "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "stride_os": "i32",
             "chunks_per_split": "i32", "num_chunks": "i32"}
constants = {"HAS_BIAS": not partials, "PARTIALS": partials, "ACT": 0 if partials else 1,
             "HAS_RESIDUAL": not partials, "CHUNK_K": 128, "BLOCK_N": block_n, "BLOCK_M": block_m, "HW_POPC": True,
             "ASM": smma_ptx(block_n, block_m // 8, dtype), "CONSTRAINTS": smma_constraints(block_m // 8)}
signature.update({name: "constexpr" for name in constants})
kernel = triton.compile(ASTSource(_bitmap_smma_kernel, signature, constexprs=constants),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": block_n // 16, "num_stages": 1})
ttgir = kernel.asm["ttgir"]
asm_line = next(line for line in ttgir.splitlines() if "elementwise_inline_asm" in line)
layout = re.search(r"tensor<(\d+)xi32, (#\w+)>", asm_line.split("->")[0])
layout_def = next(line for line in ttgir.splitlines() if line.startswith(layout.group(2) + " ="))
result = {"elements": int(layout.group(1)), "layout": layout_def,
          "shared": int(re.search(r"flx_w\[(\d+)\]", kernel.asm["ptx"]).group(1))
          + int(re.search(r"flx_v\[(\d+)\]", kernel.asm["ptx"]).group(1))
          + int(re.search(r"flx_x\[(\d+)\]", kernel.asm["ptx"]).group(1))}
nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
if nvdisasm.exists():
    (workdir / "smma.cubin").write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([str(nvdisasm), "-c", str(workdir / "smma.cubin")], capture_output=True, text=True,
                          check=True).stdout
    result.update(spills=bool(re.search(r"\b(LDL|STL)\b", sass)), ldgsts="LDGSTS" in sass, ldsm="LDSM" in sass,
                  hmma=len(re.findall(r"\bHMMA\.16816\.F32", sass)))
print(json.dumps(result))
'''


@pytest.mark.parametrize("block_m, dtype, partials", [(8, "float16", False), (16, "bfloat16", True)])
def test_smma_compiles_for_sm90(block_m, dtype, partials, tmp_path):
    from flashllm_compile.codegen.kernels.smma_ptx import STATIC_SMEM_MAX, smma_smem_bytes

    block_n = 32
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    child = subprocess.run([sys.executable, "-c", CHILD, str(block_n), str(block_m), dtype, str(int(partials)),
                            str(tmp_path)], check=False, env=env, capture_output=True, text=True, timeout=300)
    if child.returncode and "ptxas" in child.stderr and "not found" in child.stderr.lower():
        pytest.skip("this Triton build has no ptxas")
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    threads = 32 * (block_n // 16)
    assert result["elements"] == threads and "sizePerThread = [1]" in result["layout"], result
    assert f"warpsPerCTA = [{block_n // 16}]" in result["layout"], result
    assert result["shared"] == smma_smem_bytes(block_n, block_m // 8) <= STATIC_SMEM_MAX
    if "spills" in result:
        assert not result["spills"], "the smma program spills registers to local memory"
        assert result["ldgsts"] and result["ldsm"]
        assert result["hmma"] == 8 * block_m // 8  # 8 k-steps per chunk, one MMA per 8-token tile


def test_smma_is_offered_only_where_it_can_run():
    import torch

    from flashllm_compile.codegen.autotune import GPU_ONLY_FAMILIES, candidate_configs
    from flashllm_compile.codegen.formats.bitmap import BitmapWeight
    from flashllm_compile.codegen.kernels.bitmap_smma import bitmap_smma, smma_supported
    from flashllm_compile.codegen.kernels.common import TileConfig

    assert "smma" in GPU_ONLY_FAMILIES
    assert not any(c.family == "smma" for m in (1, 8, 16, 64) for c in candidate_configs(m))  # the interpreter
    fmt = BitmapWeight.from_dense(torch.randn(8, 128, dtype=torch.float16))
    assert not smma_supported(torch.randn(2, 128, dtype=torch.float16), fmt)
    with pytest.raises(RuntimeError, match="smma kernel needs a CUDA"):
        bitmap_smma(torch.randn(2, 128, dtype=torch.float16), fmt, None, TileConfig("smma", 32, 8, 1, 2, 1))
