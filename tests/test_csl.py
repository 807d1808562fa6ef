"""The Tiled-CSL format (codegen/formats/csl.py) and its tensor-core kernel (codegen/kernels/cmma_ptx.py), on the CPU:
  - the format round-trips exactly (fp16 / bf16, Inf / NaN values, empty and full weights, odd shapes);
  - a model of what the PTX does with the words (zero a [16, 128] tile, store each word's low half at its
    offset, for the groups a segment has) rebuilds every tile, with filler words only in the padding;
  - the bank-aware order keeps a group's stores near 2 wavefronts (row-major order: 2.5 at 80%, 3 at 90%);
  - the x chunk's swizzle: copies and ldmatrix reads agree, without bank conflicts (evaluated from the PTX);
  - the program builds for sm_90 (no spills, the ldmatrix / MMA / barrier counts of its design, shared memory
    under the cap, one element per thread);
  - the launcher and tuner offer it only where it can run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashllm_compile.codegen.formats.csl import (
    BANKS,
    CSL_CHUNK,
    CSL_ROWS,
    LANES,
    TILE_BYTES,
    TILE_ROW_BYTES,
    CslWeight,
)
from flashllm_compile.codegen.kernels.common import TileConfig


def pruned(n: int, k: int, sparsity: float, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    return w.masked_fill_(torch.rand(n, k, generator=g) < sparsity, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 300), (16, 128), (1, 1), (200, 1000)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.97, 1.0])
def test_round_trip_is_exact(shape, sparsity, dtype):
    w = pruned(*shape, sparsity, dtype)
    if w.numel() > 4:
        w[0, 1], w[-1, -1] = float("inf"), float("nan")  # kept as they are (nonzero)
    fmt = CslWeight.from_dense(w)
    assert fmt.dtype == dtype and (fmt.n, fmt.k) == shape
    assert torch.equal(fmt.to_dense().view(torch.int16), w.view(torch.int16))
    assert fmt.max_groups % 4 == 0
    groups = fmt.seg_start[1:] - fmt.seg_start[:-1]
    assert (groups >= 0).all() and int(groups.max()) <= fmt.max_groups
    assert fmt.items.numel() == LANES * int(fmt.seg_start[-1])
    assert fmt.nnz >= int((w != 0).sum())


def test_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match="fp16 / bf16"):
        CslWeight.from_dense(torch.randn(4, 8))
    with pytest.raises(ValueError, match="2-D"):
        CslWeight.from_dense(torch.randn(2, 4, 8, dtype=torch.float16))


def scatter_model(fmt: CslWeight) -> np.ndarray:
    """What every warp of the kernel leaves in its tile buffers, chunk by chunk: uint16 [R * 16, C * 128]."""
    tiles, chunks = -(-fmt.n // CSL_ROWS), fmt.num_chunks
    items = fmt.items.numpy().view(np.uint32)
    start = fmt.seg_start.numpy()
    out = np.zeros((tiles * CSL_ROWS, chunks * CSL_CHUNK), np.uint16)
    for seg in range(tiles * chunks):
        tile = np.zeros(TILE_BYTES // 2, np.uint16)  # zeroed by the lanes (8 16-byte stores each)
        written = set()
        for g in range(start[seg], start[seg + 1]):  # group g: one 32-bit load and one 16-bit store a lane
            for lane in range(LANES):
                word = int(items[LANES * g + lane])
                offset, value = word >> 16, word & 0xFFFF
                assert offset % 2 == 0 and offset < TILE_BYTES
                if offset % TILE_ROW_BYTES >= 2 * CSL_CHUNK:  # filler: the row padding, which ldmatrix never reads
                    assert value == 0
                    continue
                assert offset not in written, "two nonzeros stored at one place"
                written.add(offset)
                tile[offset // 2] = value
        r, c = divmod(seg, chunks)
        rows = tile.reshape(CSL_ROWS, TILE_ROW_BYTES // 2)[:, :CSL_CHUNK]
        out[CSL_ROWS * r: CSL_ROWS * (r + 1), CSL_CHUNK * c: CSL_CHUNK * (c + 1)] = rows
    return out


@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.9, 1.0])
def test_kernel_scatter_model_rebuilds_every_tile(sparsity):
    w = pruned(45, 333, sparsity)
    rebuilt = scatter_model(CslWeight.from_dense(w))
    assert np.array_equal(rebuilt[:45, :333], w.view(torch.int16).numpy().view(np.uint16))
    assert not rebuilt[45:].any() and not rebuilt[:, 333:].any()  # padding rows / columns of the last tiles


def wavefronts(groups: list[list[int]]) -> float:
    """Mean over groups of stores (byte offsets) of the most distinct 32-bit words one bank is asked for."""
    worst = []
    for group in groups:
        per_bank: dict[int, set] = {}
        for offset in group:
            per_bank.setdefault(offset // 4 % BANKS, set()).add(offset // 4)
        worst.append(max(len(v) for v in per_bank.values()))
    return sum(worst) / len(worst)


@pytest.mark.parametrize("sparsity, bound", [(0.7, 1.5), (0.8, 1.7), (0.9, 2.1)])
def test_bank_aware_order_cuts_the_scatter_wavefronts(sparsity, bound):
    w = pruned(64, 512, sparsity)
    fmt = CslWeight.from_dense(w)
    offsets = ((fmt.items.to(torch.int64) & 0xFFFFFFFF) >> 16).tolist()
    ordered = wavefronts([offsets[i:i + LANES] for i in range(0, len(offsets), LANES)])
    # the same nonzeros stored in row-major order per segment, 32 to a group
    naive = []
    for r in range(0, 64, CSL_ROWS):
        for c in range(0, 512, CSL_CHUNK):
            rows, cols = w[r:r + CSL_ROWS, c:c + CSL_CHUNK].nonzero(as_tuple=True)
            seg = (rows * TILE_ROW_BYTES + 2 * cols).tolist()
            naive += [seg[i:i + LANES] for i in range(0, len(seg), LANES)]
    assert ordered <= bound and ordered < wavefronts(naive) - 0.3, (ordered, wavefronts(naive))
    assert fmt.bank_conflicts() == pytest.approx(ordered)


@pytest.mark.parametrize("warps, rt, block_m, dtype, partials, depth, max_groups, jump, split", [
    (2, 1, 8, "float16", False, 2, 16, False, False), (4, 1, 16, "bfloat16", True, 1, 16, False, False),
    (2, 2, 32, "float16", True, 1, 16, False, False), (4, 1, 64, "float16", False, 1, 24, False, False),
    (4, 2, 8, "bfloat16", True, 1, 12, False, False), (2, 2, 64, "float16", False, 1, 12, False, False),
    (4, 2, 32, "float16", False, 1, 16, False, False), (2, 1, 64, "bfloat16", False, 1, 32, False, False),
    (4, 1, 8, "float16", True, 1, 24, True, False), (4, 2, 32, "float16", False, 1, 16, True, False),
    (2, 2, 64, "bfloat16", True, 1, 12, True, False), (2, 1, 8, "float16", False, 2, 16, True, False),
    (4, 1, 8, "float16", False, 1, 16, False, True), (2, 2, 16, "bfloat16", True, 1, 12, True, True),
    (2, 2, 8, "float16", True, 1, 16, True, True), (4, 1, 16, "float16", False, 1, 16, True, True)])
def test_cmma_compiles_for_sm90(warps, rt, block_m, dtype, partials, depth, max_groups, jump, split, tmp_path):
    from ptx_program import assert_one_element_per_thread, compile_cmma

    from flashllm_compile.codegen.kernels.cmma_ptx import STATIC_SMEM_MAX, cmma_smem_bytes, cmma_x_buffers

    nt = block_m // 8
    result = compile_cmma(warps, rt, block_m, dtype, partials, max_groups, depth, tmp_path, jump, split)
    assert_one_element_per_thread(result, warps)
    assert result["shared"] == cmma_smem_bytes(warps, rt, nt, split) <= STATIC_SMEM_MAX
    if "spills" in result:
        assert not result["spills"], "the cmma program spills registers to local memory"
        # the loop body is unrolled once per word-register set (depth + 1 chunks), and ptxas may emit the loop
        # twice (a peeled first iteration); each chunk has one block barrier (x double-buffered) or two (single).
        # Warps splitting the chunks have none in the loop (warp syncs only), one before warp 0 sums.
        if split:
            assert result["BAR.SYNC"] == 1, result
            chunks = result["HMMA"] // (8 * nt * rt)
        else:
            barriers = 3 - cmma_x_buffers(warps, rt, nt)
            chunks = result["BAR.SYNC"] // barriers
            assert result["BAR.SYNC"] % barriers == 0, result
        assert chunks in (depth + 1, 2 * (depth + 1)), result
        assert result["HMMA"] == chunks * 8 * nt * rt  # 8 k-steps a chunk, one MMA per weight tile and token tile
        # A: 2 ldmatrix.x4 per k-step pair and weight tile; B: 1 per token tile, shared by the weight tiles
        assert result["LDSM"] == chunks * (8 * rt + 4 * nt)
        # two 16-bit stores per word register: its value, and its zero a chunk later (ptxas drops the zeros of a
        # peeled first chunk, where no words went yet: its word count is a known 0)
        stores = [chunks * rt * max_groups * 2, (chunks * 2 - 1) * rt * max_groups]
        if jump:
            # per tile: one indirect jump into the word loads of each prologue chunk, and three a chunk (loads,
            # clear, scatter), each into max_groups unguarded steps; a dropped first clear drops its jump too
            jumps = [rt * (depth + 3 * chunks), rt * (depth + 3 * chunks - 1)]
            assert result["BRX"] + result["BRXU"] == jumps[result["STS.U16"] != stores[0]], result
            assert result["STS.U16"] in stores and result["guarded STS.U16"] == 0, result
        else:
            assert result["STS.U16"] in stores and result["guarded STS.U16"] == result["STS.U16"], result
        assert result["LDGSTS"] > 0  # x chunks copied asynchronously


def test_cmma_copies_x_rows_of_real_tokens_only():
    """Every x piece copy is guarded by the count of this thread's pieces whose token is < M (%nv), so a program
    with fewer than 8 NT tokens copies no padding rows (RESULTS.md idea 35); nothing clamps a token to M - 1."""
    from flashllm_compile.codegen.kernels.cmma_ptx import cmma_ptx

    for warps, rt, nt in ((2, 1, 1), (4, 2, 2), (4, 1, 8)):
        lines = cmma_ptx(warps, rt, nt, "float16", 8).splitlines()
        copies = [i for i, line in enumerate(lines) if "cp.async.cg" in line]
        pieces = 8 * nt * 16 // (32 * warps)
        assert len(copies) >= 2 * pieces  # the prologue's chunk and the loop's next chunks
        for i in copies:
            guard = next(line for line in reversed(lines[:i]) if line.startswith("setp.") and "%pc" in line)
            assert lines[i].startswith("@%pc ") and "%nv" in guard, (guard, lines[i])
        assert not any(line.startswith("min.u32") for line in lines)


def _prologue_registers(lines: list[str], tid: int) -> dict[str, int]:
    """The 32-bit registers cmma's prologue computes from %tid.x alone (shared-memory symbols at 0), by evaluating
    its integer instructions; anything else (arguments, loads) is skipped and reads as unknown (None)."""
    ops = {"mov": lambda a: a, "and": lambda a, b: a & b, "xor": lambda a, b: a ^ b, "add": lambda a, b: a + b,
           "sub": lambda a, b: a - b, "shl": lambda a, b: a << b, "shr": lambda a, b: a >> b,
           "mul": lambda a, b: a * b, "mad": lambda a, b, c: a * b + c, "bfe": lambda a, b, c: (a >> b) & ((1 << c) - 1)}
    regs: dict[str, int | None] = {"%tid.x": tid, "flc_x": 0, "flc_w": 0}
    for line in lines:
        if line == "CMMA_LOOP:":
            break
        op, _, rest = line.rstrip(";").partition(" ")
        if op.split(".")[0] not in ops or not op.endswith((".u32", ".b32")) or line.startswith("@"):
            continue
        dst, *srcs = [a.strip() for a in rest.split(",")]
        vals = [regs.get(a) if a.startswith(("%", "flc_")) else (None if a.startswith("$") else int(a)) for a in srcs]
        regs[dst] = None if None in vals else ops[op.split(".")[0]](*vals) & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("warps,nt,split", [(2, 1, False), (2, 4, False), (4, 1, False), (4, 8, False),
                                            (8, 2, False), (2, 1, True), (4, 2, True), (2, 4, True)])
def test_cmma_x_copies_and_ldmatrix_agree_on_the_swizzle(warps, nt, split):
    """x chunk layout (RESULTS.md idea 36): the ldmatrix address of token row 8 i + lane % 8, piece 4 p + lane / 8 is
    where the cp.async of that row and piece wrote; each quarter warp's copies fill one aligned 128-byte line; each
    ldmatrix phase (8 rows of one piece) hits 8 distinct 4-bank groups; and the tiles' first zeroing covers every
    tile byte once, each quarter warp's 16-byte stores on 8 distinct bank groups.  With the warps splitting the
    chunks (`split`), each warp copies and reads its own x buffers.  Evaluated from the PTX text."""
    import re

    from flashllm_compile.codegen.kernels.cmma_ptx import X_ROW_BYTES, cmma_config_ok, cmma_ptx, cmma_x_buffers

    assert cmma_config_ok(warps, 1, nt, split)  # every parameter set is a program cmma builds
    lines = [line.strip() for line in cmma_ptx(warps, 1, nt, "float16", 4, warp_split=split).splitlines()]
    # the threads that copy one x chunk together (a warp, or the program), their x buffers' stride
    group = 32 if split else 32 * warps
    stride = cmma_x_buffers(warps, 1, nt, split) * 8 * nt * X_ROW_BYTES
    threads, pieces = 32 * warps, 8 * nt * 16 // group
    # the prologue's copy of x chunk c0 (xbuf 0): its first `pieces` cp.async, in piece order j
    copies = [re.search(r"\[(%xa\d)\+(\d+)\]", line).groups() for line in lines if "cp.async.cg" in line][:pieces]
    loads = [re.search(r"\[(%xl2?)\+(\d+)\]", line).groups() for line in lines
             if line.startswith("ldmatrix") and "%xl" in line]
    zeros = [re.search(r"\[(%z[bc])\+(\d+)\]", line).groups() for line in lines if line.startswith("st.shared.v4")]
    regs = [_prologue_registers(lines, tid) for tid in range(threads)]
    written = {}  # (copy group, token row, piece) -> byte
    for tid, r in enumerate(regs):
        g, t = divmod(tid, group)
        for j, (reg, off) in enumerate(copies):
            row, piece = t // 16 + group // 16 * j, t % 16
            written[g, row, piece] = r[reg.replace("%xa", "%xd")] + int(off)
    for g in range(threads // group):  # one piece per 16 bytes of the group's buffer
        mine = sorted(b for (gg, _, _), b in written.items() if gg == g)
        assert mine == list(range(g * stride, g * stride + 8 * nt * X_ROW_BYTES, 16))
    for tid0 in range(0, threads, 8):
        g = tid0 // group
        for j in range(pieces):
            lines128 = {written[g, t % group // 16 + group // 16 * j, t % 16] // 128 for t in range(tid0, tid0 + 8)}
            assert len(lines128) == 1, (tid0, j)
    for xreg, off in loads[:4 * nt]:  # the first chunk's: every (p, i)
        i, p = int(off) // (8 * X_ROW_BYTES), int(off) % (8 * X_ROW_BYTES) // 64
        reg = {"%xl": "%xs", "%xl2": "%xs2"}[xreg]
        for w in range(warps):
            g = 32 * w // group
            for phase in range(4):
                lanes = range(8 * phase, 8 * phase + 8)
                addrs = [regs[32 * w + lane][reg] + int(off) for lane in lanes]
                assert addrs == [written[g, 8 * i + lane % 8, 4 * p + lane // 8] for lane in lanes]
                assert len({a // 16 % 8 for a in addrs}) == 8, (p, i, phase)
    assert len(zeros) == 8
    for w in range(warps):
        stored = sorted(regs[32 * w + lane][reg] + int(off) for lane in range(32) for reg, off in zeros)
        base = w * TILE_BYTES
        assert stored == [base + row * TILE_ROW_BYTES + 16 * q for row in range(CSL_ROWS) for q in range(16)]
        for reg, off in zeros:
            for phase in range(4):
                addrs = [regs[32 * w + lane][reg] + int(off) for lane in range(8 * phase, 8 * phase + 8)]
                assert len({a // 16 % 8 for a in addrs}) == 8, (w, reg, off, phase)


@pytest.mark.parametrize("warps, rt, nt", [(2, 1, 1), (4, 1, 2), (2, 2, 2), (4, 2, 1)])
def test_cmma_warp_split_sums_every_warp_once_in_warp_order(warps, rt, nt):
    """warp_split: after the loop each warp > 0 stores accumulator q of lane l inside its own tile buffers (which only
    it used), and warp 0 adds, for q in order of warps 1, 2, ..., the value stored at the same place: every other
    warp's partial sum exactly once, in a fixed order (deterministic).  Evaluated from the PTX text."""
    import itertools
    import re

    from flashllm_compile.codegen.kernels.cmma_ptx import cmma_ptx

    lines = [line.strip() for line in cmma_ptx(warps, rt, nt, "float16", 8, warp_split=True).splitlines()]
    tail = lines[lines.index("CMMA_END:"):]
    acc = 4 * nt * rt
    stores = {int(q): int(off) for off, q in (re.match(r"@%pe st\.shared\.f32 \[%t\+(\d+)\], \$(\d+);", line).groups()
                                              for line in tail if "st.shared.f32" in line)}
    assert sorted(stores) == list(range(acc)) and tail.count("barrier.sync 0;") == 1
    first_store = next(i for i, line in enumerate(tail) if "st.shared.f32" in line)
    assert "bar.warp.sync 0xffffffff;" in tail[:first_store]  # the warp's last ldmatrix reads of its tiles are done
    adds = [(int(re.search(r"\[%t\+(\d+)\]", load).group(1)), int(re.match(r"add\.f32 \$(\d+)", add).group(1)))
            for load, add in itertools.pairwise(tail) if load.startswith("ld.shared.f32 %fa") and add.startswith("add.f32")]
    assert len(adds) == acc * (warps - 1)
    regs = [_prologue_registers(lines, tid) for tid in range(32 * warps)]
    for i, (off, q) in enumerate(adds):
        w = i // acc + 1  # warps in order, each once
        assert q == i % acc
        for lane in range(32):
            stored = regs[32 * w + lane]["%tb"] + 4 * lane + stores[q]  # where warp w's lane put accumulator q
            assert stored == 4 * lane + off  # where warp 0's lane reads it (flc_w at 0)
            assert w * rt * TILE_BYTES <= stored < (w + 1) * rt * TILE_BYTES  # inside warp w's own tiles


def test_cmma_is_offered_only_where_it_can_run(monkeypatch):
    from flashllm_compile.codegen import autotune
    from flashllm_compile.codegen.kernels import csl_mma

    fmt = CslWeight.from_dense(pruned(32, 256, 0.8))
    assert autotune.candidate_configs(8, fmt) == []  # the interpreter (conftest sets TRITON_INTERPRET=1)
    assert not any(c.family == "cmma" for c in autotune.candidate_configs(8))  # never for a bitmap
    assert autotune.untuned_choice(8, False, fmt).family == "cmma"
    assert autotune.untuned_choice(8, True, fmt).family == "dense"
    x = torch.randn(2, 256, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="cmma kernel needs a CUDA"):
        csl_mma.csl_mma(x, fmt, None, csl_mma.cmma_default_config(2))
    monkeypatch.setattr(csl_mma, "interpreting", lambda: False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # get past the device check
    for config in (TileConfig("cmma", 48, 8, 1, 3, 2), TileConfig("cmma", 32, 128, 1, 2, 2),
                   TileConfig("cmma", 48, 8, 1, 1, 2), TileConfig("cmma", 128, 64, 1, 2, 1)):
        with pytest.raises(ValueError, match="not a cmma config"):
            csl_mma.csl_mma(x, fmt, None, config)
    assert fmt.max_groups == 16  # ~410 nonzeros a [16, 128] tile at 80%: 13-14 groups of 32 words, rounded up
    with pytest.raises(ValueError, match="weight tiles a warp"):  # 1 warp owning 4 tiles: 4 x 16 word registers
        csl_mma.csl_mma(x, fmt, None, TileConfig("cmma", 64, 8, 1, 1, 1))
    assert {c.row_tiles() for c in csl_mma.get_csl_mma_configs(8, 16)} == {1, 2}  # 32 word registers
    assert {c.row_tiles() for c in csl_mma.get_csl_mma_configs(8, 24)} == {1}
    assert {c.row_tiles() for c in csl_mma.get_csl_mma_configs(64, 16)} == {1}  # 24 next to 8 token tiles
    assert {c.row_tiles() for c in csl_mma.get_csl_mma_configs(64, 12)} == {1, 2}
    # warps splitting a program's chunks: offered up to M = 16 (they lose beyond, RESULTS.md idea 42)
    assert {c.split_k for c in csl_mma.get_csl_mma_configs(16, 16) if c.warp_split} == {1, 2}
    assert not any(c.warp_split for c in csl_mma.get_csl_mma_configs(32, 16))
    # split-K over programs: 3 and 6 (one wave where powers of two leave one part full) only beyond M = 16
    assert {c.split_k for c in csl_mma.get_csl_mma_configs(16, 16) if not c.warp_split} == {1, 2, 4, 8}
    assert {c.split_k for c in csl_mma.get_csl_mma_configs(32, 16)} == {1, 2, 3, 4, 6, 8}
    # the word path entered by jump only up to M = 16 (it measured fastest there); beyond, each shape in both forms
    # (guarded, jump): neither measured faster everywhere
    for m in (1, 8, 16):
        assert all(c.jump for c in csl_mma.get_csl_mma_configs(m, 16))
    configs = csl_mma.get_csl_mma_configs(32, 12)
    assert {c._replace(jump=False) for c in configs if c.jump} == {c for c in configs if not c.jump} != set()
    # the untuned default: a tuning candidate for any weight the format holds (warps splitting the chunks up to
    # M = 16, the fastest on average over 72 H100 points, RESULTS.md sixteenth session), one tile a warp beyond
    for m in (1, 3, 8, 16, 17, 64):
        default = csl_mma.cmma_default_config(m)
        assert default.warp_split == (m <= 16) and default.row_tiles() == 1
        for max_groups in (4, 16, 32):
            assert default in csl_mma.get_csl_mma_configs(m, max_groups), (m, max_groups, default)
    dense_fmt = CslWeight.from_dense(pruned(32, 256, 0.0))
    with pytest.raises(ValueError, match="too dense"):
        csl_mma.csl_mma(x, dense_fmt, None, csl_mma.cmma_default_config(2))


def test_tuner_keys_the_formats_apart(tmp_path):
    from flashllm_compile.codegen.autotune import _key
    from flashllm_compile.codegen.formats.bitmap import BitmapWeight

    w = pruned(64, 256, 0.8)
    csl, bitmap = CslWeight.from_dense(w), BitmapWeight.from_dense(w)
    assert _key(csl, 8, True).startswith(f"csl:float16:64x256:g{csl.max_groups}:")
    assert _key(bitmap, 8, True).startswith("float16:64x256:ck128:")


def test_cmma_under_pdl_waits_before_x_and_before_its_stores(monkeypatch):
    """With programmatic dependent launch the program may start before the kernel that writes x has finished: it may
    load words (weights) first, but must `griddepcontrol.wait` before its first copy of x, and on every path out
    (an empty split skips the loop) before Triton's stores.  Off on the CPU, under the interpreter and by env."""
    from flashllm_compile.codegen.kernels.cmma_ptx import cmma_ptx
    from flashllm_compile.codegen.kernels.launch import pdl_enabled

    for warps, rt, nt in ((4, 1, 1), (2, 2, 4), (4, 1, 8)):  # x double- and single-buffered
        lines = cmma_ptx(warps, rt, nt, "float16", 16, 1, pdl=True).splitlines()
        waits = [i for i, line in enumerate(lines) if line == "griddepcontrol.wait;"]
        first_x = next(i for i, line in enumerate(lines) if "cp.async.cg" in line)
        first_words = next(i for i, line in enumerate(lines) if "ld.global.nc.b32 %g" in line)
        assert lines.count("griddepcontrol.launch_dependents;") == 1
        assert first_words < waits[0] < first_x and lines[waits[-1] - 1] == "CMMA_END:"
        assert "griddepcontrol" not in cmma_ptx(warps, rt, nt, "float16", 16, 1)
    assert not pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("FLASHLLM_PDL", "1")
    assert not pdl_enabled(torch.device("cuda", 0))  # the tests run under TRITON_INTERPRET=1
