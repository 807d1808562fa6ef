"""The scatter + tensor-core kernel (smma) is a whole program in inline PTX: the interpreter cannot run it, so CI
builds it for sm_90 with Triton + ptxas (no GPU needed) and checks what the GPU would run: it assembles, does not
spill, uses cp.async (LDGSTS), ldmatrix (LDSM) and tensor-core MMAs (HMMA), fits the static shared-memory cap, and
the tensor it runs on has exactly one element per thread (the PTX has barriers: it must run once in every thread).
Correctness against F.linear runs on the GPU (tests/gpu)."""

import pytest
from ptx_program import assert_one_element_per_thread, compile_program


@pytest.mark.parametrize("block_m, dtype, partials", [(8, "float16", False), (16, "bfloat16", True)])
def test_smma_compiles_for_sm90(block_m, dtype, partials, tmp_path):
    from flashllm_compile.codegen.kernels.smma_ptx import STATIC_SMEM_MAX, smma_smem_bytes

    block_n = 32
    result = compile_program("smma", block_n, block_m, dtype, partials, tmp_path)
    assert_one_element_per_thread(result, block_n // 16)
    assert result["shared"] == smma_smem_bytes(block_n, block_m // 8) <= STATIC_SMEM_MAX
    if "spills" in result:
        assert not result["spills"], "the smma program spills registers to local memory"
        assert result["LDGSTS"] and result["LDSM"]
        assert result["HMMA"] == 8 * block_m // 8  # 8 k-steps per chunk, one MMA per 8-token tile


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
