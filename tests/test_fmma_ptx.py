"""The fragment-decode tensor-core kernel (fmma) is a whole program in inline PTX, so the interpreter cannot run it.
CI checks it two ways without a GPU:
  - a bit-exact Python model of its decode (the same tables, byte permutes, funnel shifts and predicated window
    loads as the PTX, with never-loaded words and the stage past the values poisoned) rebuilds every weight tile
    from the compressed format;
  - Triton + ptxas build it for sm_90: no spills, cp.async / tensor-core MMAs / shared-memory barriers as designed,
    the static shared-memory cap, one element per thread.
Correctness against F.linear runs on the GPU (tests/gpu, every family fuzzed)."""

import numpy as np
import pytest
import torch
from ptx_program import assert_one_element_per_thread, compile_program

from flashllm_compile.codegen.formats.bitmap import TILE_ROWS, BitmapWeight
from flashllm_compile.codegen.kernels.common import TileConfig
from flashllm_compile.codegen.kernels.fmma_ptx import (
    FIELD_BYTES,
    FIELD_INDEX,
    TABLE_HI,
    TABLE_LO,
    WTABLE_HI,
    WTABLE_LO,
    fmma_ptx,
)

POISON = 0xDEADBEEF  # what a register holds when its window word was not loaded


def prmt(a: int, b: int, c: int) -> int:
    src = (a | b << 32).to_bytes(8, "little")
    out = 0
    for i in range(4):
        nib = c >> 4 * i & 0xF
        byte = src[nib & 7]
        out |= ((0xFF if byte & 0x80 else 0) if nib & 8 else byte) << 8 * i
    return out


def shf_r(lo: int, hi: int, amount: int) -> int:
    return (hi << 32 | lo) >> amount & 0xFFFFFFFF


def decode_thread(word: int, run: bytes, first: int, s: int) -> tuple[int, int]:
    """The PTX's k-step s for one thread and row: (a01, a23) fragment registers.  `run` is the row's staged values
    as bytes, `first` the byte address of the thread's first value in it."""
    a = first + 2 * (word & ((1 << 4 * s) - 1)).bit_count()
    end = first + 2 * (word & ((1 << 4 * s + 4) - 1)).bit_count()
    a4 = a & -4
    loaded = (True, end - a4 > 4, end - a4 > 8)  # the first word in every lane of an existing row
    staged = run + POISON.to_bytes(4, "little") * 4  # whatever the stage holds past the run
    v = [int.from_bytes(staged[a4 + 4 * j: a4 + 4 * j + 4], "little") if loaded[j] else POISON for j in range(3)]
    lo, hi = shf_r(v[0], v[1], (a << 3) & 31), shf_r(v[1], v[2], (a << 3) & 31)
    # table selectors of k-steps 2 u + h (u = 0..3, one a byte), looked up two k-steps a prmt
    h, u = s % 2, s // 2

    def index(shift: int) -> int:
        return ((word >> shift & FIELD_BYTES) * FIELD_INDEX[0] + FIELD_INDEX[1]) & 0xFFFFFFFF

    c01, c23 = (index(4 * h) >> 16 * (u // 2)), (index(4 * h + 2) >> 16 * (u // 2))
    sel01, selw, sel23 = (prmt(lo_t, hi_t, c) >> 16 * (u % 2) for lo_t, hi_t, c in (
        (TABLE_LO, TABLE_HI, c01), (WTABLE_LO, WTABLE_HI, c01), (TABLE_LO, TABLE_HI, c23)))
    return prmt(lo, 0, sel01), prmt(prmt(lo, hi, selw), 0, sel23)


def test_window_loads_are_predicated_as_the_model():
    """The model above loads a window's first word in every lane of an existing row, the others only where the
    nibble's values reach them: the PTX must do the same (a row past N has no stage address)."""
    ptx = fmma_ptx(2, 1, "float16", linear=True)
    for row in "AB":
        assert ptx.count(f"@%p{row} ld.shared.b32 %v0, [%a4];") == 8  # one a k-step
    assert ptx.count("@%pw1 ld.shared.b32 %v1, [%a4+4];") == ptx.count("@%pw2 ld.shared.b32 %v2, [%a4+8];") == 16
    assert "%v0, [%a4]" not in ptx.replace("@%pA ld.shared.b32 %v0", "").replace("@%pB ld.shared.b32 %v0", "")


@pytest.mark.parametrize("tile_rows", [0, TILE_ROWS])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.97, 1.0])
def test_decode_model_rebuilds_every_tile(sparsity, tile_rows):
    """Row-major values: each row's run is staged in its own slot (_stage_row).  Tile-major: the warp's 16 runs are
    one segment, staged whole (_stage_segment), and a row's run sits at its offset within it."""
    n, k = 2 * TILE_ROWS, 256  # two warps' rows, two chunks
    weight = torch.randn(n, k, dtype=torch.float16)
    weight[torch.rand(n, k) < sparsity] = 0
    fmt = BitmapWeight.from_dense(weight, tile_rows=tile_rows)
    words = fmt.bitmap.numpy().view(np.uint32)
    values = fmt.values.view(torch.int16).numpy().tobytes()
    rebuilt = np.zeros((n, k), dtype=np.uint16)
    for chunk in range(fmt.num_chunks):
        for row in range(n):
            start = int(fmt.offsets[chunk, row])
            if tile_rows:  # the segment of the warp's rows r0 .. r0 + 15 from its 16-byte block on
                seg = int(fmt.offsets[chunk, row - row % TILE_ROWS])
                mis = 2 * seg % 16
                run = values[2 * seg - mis: 2 * int(fmt.offsets[chunk + 1, row - row % TILE_ROWS])]
                first_row = mis + 2 * (start - seg)
            else:
                mis = 2 * start % 16  # the stage starts at the 16-byte block holding the run's first value
                run = values[2 * start - mis: 2 * start - mis + 272]
                first_row = mis
            for t in range(4):  # the thread that owns word t of this row
                word = int(words[row, 4 * chunk + t])
                first = first_row + 2 * sum(int(words[row, 4 * chunk + j]).bit_count() for j in range(t))
                for s in range(8):  # fragment slots (2t, 2t+1) / (2t+8, 2t+9) hold columns 32 t + 4 s + 0..3
                    a01, a23 = decode_thread(word, run, first, s)
                    col = 128 * chunk + 32 * t + 4 * s
                    rebuilt[row, col:col + 4] = [a01 & 0xFFFF, a01 >> 16, a23 & 0xFFFF, a23 >> 16]
    assert np.array_equal(rebuilt, weight.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("warps, block_m, dtype, partials, bounded, x_shared, linear, pdl", [
    (2, 8, "float16", False, False, False, False, False), (4, 16, "bfloat16", True, False, True, False, True),
    (2, 32, "float16", True, True, True, False, False), (2, 8, "float16", False, False, False, True, True),
    (4, 16, "bfloat16", True, True, True, True, False)])
def test_fmma_compiles_for_sm90(warps, block_m, dtype, partials, bounded, x_shared, linear, pdl, tmp_path):
    from flashllm_compile.codegen.kernels.fmma_ptx import STATIC_SMEM_MAX, fmma_smem_bytes

    result = compile_program("fmma", 16 * warps, block_m, dtype, partials, tmp_path, bounded, x_shared, linear, pdl)
    assert_one_element_per_thread(result, warps)
    if "ACQBULK" in result:  # griddepcontrol.wait / .launch_dependents in SASS
        assert (result["ACQBULK"] > 0, result["PREEXIT"] > 0) == (pdl, pdl)
    assert result["shared"] == fmma_smem_bytes(warps, block_m // 8, x_shared) <= STATIC_SMEM_MAX
    if "spills" in result:
        assert not result["spills"], "the fmma program spills registers to local memory"
        assert result["LDGSTS"] and result["PRMT"] >= 64  # value copies; 4 permutes per row and k-step
        assert result["HMMA"] == 8 * block_m // 8  # 8 k-steps per chunk, one MMA per 8-token tile
        assert (result["BAR.SYNC"] > 0) == x_shared  # only a shared x chunk needs a block barrier
        assert (result["LDS.128"] > 0) == x_shared


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("x_shared", [False, True])
def test_fmma_under_pdl_waits_before_x_and_before_its_stores(x_shared, linear):
    """With programmatic dependent launch the program may start before the kernel that writes x has finished: it may
    load its words and stage its first values (weights) first, but must `griddepcontrol.wait` before it touches x,
    and on every path out (an empty split skips the loop) before Triton's stores."""
    for warps, nt in ((2, 1), (4, 2), (2, 4)):
        lines = fmma_ptx(warps, nt, "float16", True, x_shared, linear, pdl=True).splitlines()
        waits = [i for i, line in enumerate(lines) if line == "griddepcontrol.wait;"]
        x_uses = [i for i, line in enumerate(lines) if "%xs" in line and "cp.async" in line or "[%xp" in line]
        first_values = next(i for i, line in enumerate(lines) if "cp.async.cg.shared.global [%dst" in line)
        first_words = next(i for i, line in enumerate(lines) if "ld.global.nc.v4.b32 {%rA0" in line)
        assert lines.count("griddepcontrol.launch_dependents;") == 1 and len(waits) == 2
        assert first_words < first_values < waits[0] < min(x_uses) and lines[waits[-1] - 1] == "FMMA_END:"
        assert "griddepcontrol" not in fmma_ptx(warps, nt, "float16", True, x_shared, linear)


def test_fmma_is_offered_only_where_it_can_run(monkeypatch):
    from flashllm_compile.codegen.autotune import GPU_ONLY_FAMILIES, candidate_configs
    from flashllm_compile.codegen.kernels.bitmap_fmma import FMMA_MAX_M, bitmap_fmma, get_bitmap_fmma_configs

    assert "fmma" in GPU_ONLY_FAMILIES
    assert not any(c.family == "fmma" for m in (1, 8, 16, 64) for c in candidate_configs(m))  # the interpreter
    assert get_bitmap_fmma_configs(FMMA_MAX_M + 1) == []
    from flashllm_compile.codegen.kernels import bitmap_fmma as module

    monkeypatch.setattr(module, "interpreting", lambda: False)
    for m in (1, 8, 32):  # split-K 3 and 6 fill one wave where powers of two do not (RESULTS.md idea 54)
        assert {c.split_k for c in get_bitmap_fmma_configs(m)} == {1, 2, 3, 4, 6, 8}
    monkeypatch.undo()
    fmt = BitmapWeight.from_dense(torch.randn(8, 128, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="fmma kernel needs a CUDA"):
        bitmap_fmma(torch.randn(2, 128, dtype=torch.float16), fmt, None, TileConfig("fmma", 32, 8, 1, 2, 2))


@pytest.mark.parametrize("config", [TileConfig("fmma", 32, 64, 1, 2, 2), TileConfig("fmma", 64, 8, 1, 2, 2),
                                    TileConfig("fmma", 32, 12, 1, 2, 2), TileConfig("fmma", 32, 8, 1, 2, 3),
                                    TileConfig("fmma", 64, 32, 1, 4, 2)])
def test_fmma_refuses_configs_it_cannot_run(config, monkeypatch):
    from flashllm_compile.codegen.kernels import bitmap_fmma

    monkeypatch.setattr(bitmap_fmma, "smma_supported", lambda x, fmt: True)  # get past the device check on CPU
    fmt = BitmapWeight.from_dense(torch.randn(8, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match="not an fmma config"):
        bitmap_fmma.bitmap_fmma(torch.randn(2, 128, dtype=torch.float16), fmt, None, config)
