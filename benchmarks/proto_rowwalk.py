"""Prototype sweep (GPU): row-walk variants for M <= 8 before one goes into the product.

Variants, each on the same pruned weights, timed against cuBLAS as CUDA-graph replays over rotated copies:
  triton     the product's Triton loop (one round = one set bit, program-wide trip count)
  ptx        the same walk as one inline-PTX loop per lane: 32-bit counters, predication instead of masked loads,
             the round body unrolled U times in one basic block so ptxas overlaps the loads of several rounds;
             each lane stops on its own (warp-level, not program-level, imbalance)
  *_il       lane-interleaved layout: word w of row n at ((n // 32) * KW + w) * 32 + n % 32, and a row's i-th
             nonzero of a segment at base[segment, n // 32] + 32 * i + n % 32 (padded to the group's longest row),
             so the 32 lanes of a warp read neighbouring addresses (coalesced) instead of 32 cache lines.

python benchmarks/proto_rowwalk.py  (writes $OUT/proto_rowwalk.csv, prints a table)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashllm_compile.codegen.formats.bitmap import BitmapWeight  # noqa: E402
from flashllm_compile.codegen.kernels.bitmap_decode import popcount  # noqa: E402
from flashllm_compile.codegen.kernels.bitmap_rowwalk import transpose_tokens  # noqa: E402
from flashllm_compile.codegen.kernels.common import interpreting, split_k_plan  # noqa: E402


def walk_asm(block_m: int, unroll: int, vstride: int, wstride: int, dtype: str = "f16") -> str:
    """PTX of one lane's walk. Operands: $0..$(BM-1) fp32 sums (out), then wp (u64 address of the lane's first
    bitmap word), vp (u64 address of its first value), xbase (u64 address of xt[first column, 0], xt fp32), n (u32
    words).  wp / vp advance by predicated 64-bit adds (2 SASS instructions each); x by one LEA pair per load."""
    xb = 4 * block_m  # bytes of one fp32 xt row (all tokens of one column)
    a = block_m
    o = ["{",
         ".reg .pred %pa, %pn, %pc;",
         f".reg .pred %pu<{unroll}>;",
         ".reg .b32 %w, %wn, %wi, %wlast, %jj, %low, %j;",
         ".reg .b64 %wp, %vp, %xb, %xa;",
         f".reg .b16 %hv<{unroll}>;",
         f".reg .f32 %fv<{unroll}>;",
         f".reg .f32 %xf<{unroll * block_m}>;"]
    o += [f"mov.f32 ${t}, 0f00000000;" for t in range(block_m)]
    o += [f"mov.b64 %wp, ${a};", f"mov.b64 %vp, ${a + 1};", f"mov.b64 %xb, ${a + 2};",
          f"add.s32 %wlast, ${a + 3}, -1;",  # index of the segment's last word
          "mov.b32 %wi, 0;", "mov.b32 %wn, 0;",
          "setp.lt.s32 %pn, %wlast, 0;", "@%pn bra DONE;",
          "ld.global.nc.b32 %w, [%wp];",
          "setp.gt.s32 %pn, %wlast, 0;",
          f"@%pn ld.global.nc.b32 %wn, [%wp+{wstride}];",
          "LOOP:"]
    for u in range(unroll):
        o += [f"setp.ne.b32 %pu{u}, %w, 0;",
              "neg.s32 %low, %w;", "and.b32 %low, %low, %w;", "bfind.u32 %j, %low;", "xor.b32 %w, %w, %low;",
              f"@%pu{u} ld.global.nc.b16 %hv{u}, [%vp];",
              f"@%pu{u} add.s64 %vp, %vp, {vstride};",
              "mad.lo.u32 %jj, %wi, 32, %j;",
              f"mad.wide.u32 %xa, %jj, {xb}, %xb;"]
        if block_m == 1:
            o.append(f"@%pu{u} ld.global.nc.f32 %xf{u}, [%xa];")
        elif block_m == 2:
            o.append(f"@%pu{u} ld.global.nc.v2.f32 {{%xf{2 * u}, %xf{2 * u + 1}}}, [%xa];")
        else:
            for q in range(block_m // 4):
                regs = ", ".join(f"%xf{u * block_m + 4 * q + i}" for i in range(4))
                o.append(f"@%pu{u} ld.global.nc.v4.f32 {{{regs}}}, [%xa+{16 * q}];")
        # once this word is used up, and it is not the segment's last: move to the prefetched next word
        o += ["setp.eq.b32 %pa, %w, 0;",
              "setp.lt.and.s32 %pa, %wi, %wlast, %pa;",
              "@%pa mov.b32 %w, %wn;", "@%pa add.s32 %wi, %wi, 1;", f"@%pa add.s64 %wp, %wp, {wstride};",
              "setp.lt.and.s32 %pn, %wi, %wlast, %pa;",
              f"@%pn ld.global.nc.b32 %wn, [%wp+{wstride}];"]
    for u in range(unroll):  # the FMAs last, so the loads of all unrolled rounds are in flight together
        o.append(f"cvt.f32.{dtype} %fv{u}, %hv{u};")
        o += [f"@%pu{u} fma.rn.f32 ${t}, %fv{u}, %xf{u * block_m + t}, ${t};" for t in range(block_m)]
    o += ["setp.ne.b32 %pc, %w, 0;",
          "setp.lt.or.s32 %pc, %wi, %wlast, %pc;",
          "@%pc bra LOOP;",
          "DONE:",
          "}"]
    return "\n".join(o)


@triton.jit
def _proto_kernel(
    xt_ptr, bitmap_ptr, offsets_ptr, values_ptr, vbase_ptr, out_ptr,
    M, N, KW, stride_os, chunks_per_split, num_chunks, n_groups,
    CHUNK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SEGMENTS: tl.constexpr,
    IL: tl.constexpr, PTX: tl.constexpr, ASM: tl.constexpr, HW_POPC: tl.constexpr,
):
    WORDS: tl.constexpr = CHUNK_K // 32
    VSTEP: tl.constexpr = 32 if IL else 1
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_ids = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = row_ids[None, :]
    row_ok = rows < N
    split_end = tl.minimum(pid_s * chunks_per_split + chunks_per_split, num_chunks)
    per_segment = tl.cdiv(chunks_per_split, SEGMENTS)
    seg = tl.arange(0, SEGMENTS)[:, None]
    c_lo = tl.minimum(pid_s * chunks_per_split + seg * per_segment, split_end)
    c_hi = tl.minimum(c_lo + per_segment, split_end)
    n_words = tl.where(row_ok, (c_hi - c_lo) * WORDS, 0)  # [SEGMENTS, BLOCK_N]
    if IL:
        # word w of row n at ((n // 32) * KW + w) * 32 + n % 32; values from the segment's slab
        word0 = ((rows // 32) * KW + c_lo * WORDS) * 32 + rows % 32
        gseg = pid_s * SEGMENTS + seg
        vi = tl.load(vbase_ptr + gseg * n_groups + rows // 32, mask=row_ok, other=0) + rows % 32
        WSTEP: tl.constexpr = 32
    else:
        word0 = rows * KW + c_lo * WORDS
        vi = tl.load(offsets_ptr + c_lo * N + rows, mask=row_ok, other=0)
        WSTEP: tl.constexpr = 1
    toks = tl.arange(0, BLOCK_M)
    if PTX:
        wp = (bitmap_ptr + word0).to(tl.int64, bitcast=True)
        vp = (values_ptr + vi).to(tl.int64, bitcast=True)
        xp = (xt_ptr + c_lo * CHUNK_K * BLOCK_M + 0 * rows).to(tl.int64, bitcast=True)
        if BLOCK_M == 1:
            acc = tl.inline_asm_elementwise(ASM, "=f,l,l,l,r", [wp, vp, xp, n_words], dtype=tl.float32,
                                            is_pure=True, pack=1)
            out = tl.sum(acc, axis=0)[:, None]
        elif BLOCK_M == 2:
            a0, a1 = tl.inline_asm_elementwise(ASM, "=f,=f,l,l,l,r", [wp, vp, xp, n_words],
                                               dtype=(tl.float32,) * 2, is_pure=True, pack=1)
            out = tl.join(tl.sum(a0, axis=0), tl.sum(a1, axis=0))
        elif BLOCK_M == 4:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(ASM, "=f,=f,=f,=f,l,l,l,r", [wp, vp, xp, n_words],
                                                       dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            out = tl.reshape(tl.join(tl.join(tl.sum(a0, axis=0), tl.sum(a2, axis=0)),
                                     tl.join(tl.sum(a1, axis=0), tl.sum(a3, axis=0))), (BLOCK_N, BLOCK_M))
        else:
            a0, a1, a2, a3, a4, a5, a6, a7 = tl.inline_asm_elementwise(
                ASM, "=f,=f,=f,=f,=f,=f,=f,=f,l,l,l,r", [wp, vp, xp, n_words], dtype=(tl.float32,) * 8,
                is_pure=True, pack=1)
            out = tl.reshape(tl.join(tl.join(tl.join(tl.sum(a0, axis=0), tl.sum(a4, axis=0)),
                                             tl.join(tl.sum(a2, axis=0), tl.sum(a6, axis=0))),
                                     tl.join(tl.join(tl.sum(a1, axis=0), tl.sum(a5, axis=0)),
                                             tl.join(tl.sum(a3, axis=0), tl.sum(a7, axis=0)))), (BLOCK_N, BLOCK_M))
    else:
        nnz = tl.load(offsets_ptr + c_hi * N + rows, mask=row_ok, other=0) - tl.load(
            offsets_ptr + c_lo * N + rows, mask=row_ok, other=0)
        lane_rounds = nnz
        for c in range(per_segment):
            for q in range(WORDS):
                wd = tl.load(bitmap_ptr + word0 + (c * WORDS + q) * WSTEP, mask=row_ok & (c_lo + c < c_hi), other=1)
                lane_rounds += (wd == 0).to(tl.int32)
        rounds = tl.max(tl.max(lane_rounds, axis=1), axis=0)
        wi = tl.zeros((SEGMENTS, BLOCK_N), dtype=tl.int32)
        w = tl.load(bitmap_ptr + word0, mask=n_words > 0, other=0).to(tl.uint32, bitcast=True)
        w_next = tl.load(bitmap_ptr + word0 + WSTEP, mask=n_words > 1, other=0).to(tl.uint32, bitcast=True)
        col0 = c_lo * CHUNK_K
        if BLOCK_M == 1:
            acc = tl.zeros((SEGMENTS, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((SEGMENTS, BLOCK_N, BLOCK_M), dtype=tl.float32)
        for _ in range(rounds):
            live = w != 0
            low = w & (0 - w)
            col = col0 + wi * 32 + popcount(low - 1, HW_POPC)
            v = tl.load(values_ptr + vi, mask=live, other=0.0).to(tl.float32)
            if BLOCK_M == 1:
                acc += v * tl.load(xt_ptr + col, mask=live, other=0.0).to(tl.float32)
            else:
                xv = tl.load(xt_ptr + col[:, :, None] * BLOCK_M + toks[None, None, :], mask=live[:, :, None],
                             other=0.0)
                acc += v[:, :, None] * xv.to(tl.float32)
            vi += live.to(tl.int32) * VSTEP
            w = w ^ low
            advance = (w == 0) & (wi + 1 < n_words)
            wi += advance.to(tl.int32)
            w = tl.where(advance, w_next, w)
            w_next = tl.where(advance, tl.load(bitmap_ptr + word0 + (wi + 1) * WSTEP,
                                               mask=advance & (wi + 1 < n_words), other=0).to(tl.uint32, bitcast=True),
                              w_next)
        if BLOCK_M == 1:
            out = tl.sum(acc, axis=0)[:, None]
        else:
            out = tl.sum(acc, axis=0)
    out_mask = (row_ids[:, None] < N) & (toks[None, :] < M)
    tl.store(out_ptr + pid_s * stride_os + toks[None, :] * N + row_ids[:, None], out, mask=out_mask)


def bal_asm(block_m: int, unroll: int, hint: str = "", xf32: bool = False) -> str:
    """PTX walk of exactly `cnt` nonzeros. Operands: $0..$(BM-1) fp32 sums, then w (u32: the lane's first word,
    bits before its first nonzero cleared), wb (u64: address of the row's word 0), vp (u64: its first value),
    xb (u64: xt, fp16 [K, BM], or fp32 with xf32), wi (u32: index of the first word), wend (u32: the row's word
    count), cnt (u32)."""
    xb = (4 if xf32 else 2) * block_m
    nx32 = max(1, xb // 4)
    a = block_m
    o = ["{", ".reg .pred %pa, %pn, %pc;", f".reg .pred %pu<{unroll}>;",
         ".reg .b32 %w, %wn, %wi, %wlast, %cnt, %jj, %low, %j;",
         ".reg .b64 %wb, %vp, %xb, %xa, %wa;",
         f".reg .b16 %hv<{unroll}>;", f".reg .f32 %fv<{unroll}>;",
         f".reg .b32 %xw<{unroll * nx32}>;", f".reg .b16 %xh<{unroll * max(2, block_m)}>;",
         f".reg .f32 %xf<{unroll * block_m}>;"]
    o += [f"mov.f32 ${t}, 0f00000000;" for t in range(block_m)]
    o += [f"mov.b32 %w, ${a};", f"mov.b64 %wb, ${a + 1};", f"mov.b64 %vp, ${a + 2};", f"mov.b64 %xb, ${a + 3};",
          f"mov.b32 %wi, ${a + 4};", f"add.s32 %wlast, ${a + 5}, -1;", f"mov.b32 %cnt, ${a + 6};",
          "mov.b32 %wn, 0;",
          "setp.lt.s32 %pc, %cnt, 1;", "@%pc bra DONE;",
          "setp.lt.s32 %pn, %wi, %wlast;",
          "mad.wide.u32 %wa, %wi, 4, %wb;",
          "@%pn ld.global.nc.b32 %wn, [%wa+4];",
          "LOOP:"]
    for u in range(unroll):
        o += [f"setp.ne.b32 %pu{u}, %w, 0;", f"setp.gt.and.s32 %pu{u}, %cnt, 0, %pu{u};",
              "neg.s32 %low, %w;", "and.b32 %low, %low, %w;", "bfind.u32 %j, %low;", "xor.b32 %w, %w, %low;",
              f"@%pu{u} ld.global.nc{hint}.b16 %hv{u}, [%vp];",
              f"@%pu{u} add.s64 %vp, %vp, 2;",
              f"@%pu{u} add.s32 %cnt, %cnt, -1;",
              "mad.lo.u32 %jj, %wi, 32, %j;",
              f"mad.wide.u32 %xa, %jj, {xb}, %xb;"]
        if xf32:
            for q in range(0, block_m, 4):
                n = min(4, block_m - q)
                regs = ", ".join(f"%xf{u * block_m + q + i}" for i in range(n))
                width = {1: "f32", 2: "v2.f32", 4: "v4.f32"}[n]
                o.append(f"@%pu{u} ld.global.nc.{width} {{{regs}}}, [%xa+{4 * q}];" if n > 1 else
                         f"@%pu{u} ld.global.nc.f32 {regs}, [%xa];")
        elif block_m == 1:
            o.append(f"@%pu{u} ld.global.nc.b16 %xh{u * 2}, [%xa];")
        elif block_m == 2:
            o.append(f"@%pu{u} ld.global.nc.b32 %xw{u * nx32}, [%xa];")
        elif block_m == 4:
            o.append(f"@%pu{u} ld.global.nc.v2.b32 {{%xw{u * nx32}, %xw{u * nx32 + 1}}}, [%xa];")
        else:
            regs = ", ".join(f"%xw{u * nx32 + i}" for i in range(4))
            o.append(f"@%pu{u} ld.global.nc.v4.b32 {{{regs}}}, [%xa];")
        o += ["setp.eq.b32 %pa, %w, 0;", "setp.gt.and.s32 %pa, %cnt, 0, %pa;",
              "@%pa mov.b32 %w, %wn;", "@%pa add.s32 %wi, %wi, 1;",
              "setp.lt.and.s32 %pn, %wi, %wlast, %pa;",
              "mad.wide.u32 %wa, %wi, 4, %wb;",
              f"@%pn ld.global.nc{hint}.b32 %wn, [%wa+4];"]
    for u in range(unroll):
        o.append(f"cvt.f32.f16 %fv{u}, %hv{u};")
        if block_m > 1 and not xf32:
            o += [f"mov.b32 {{%xh{u * block_m + 2 * i}, %xh{u * block_m + 2 * i + 1}}}, %xw{u * nx32 + i};"
                  for i in range(nx32)]
        for t in range(block_m):
            if not xf32:
                h = f"%xh{u * 2}" if block_m == 1 else f"%xh{u * block_m + t}"
                o.append(f"cvt.f32.f16 %xf{u * block_m + t}, {h};")
            o.append(f"@%pu{u} fma.rn.f32 ${t}, %fv{u}, %xf{u * block_m + t}, ${t};")
    o += ["setp.gt.s32 %pc, %cnt, 0;", "@%pc bra LOOP;", "DONE:", "}"]
    return "\n".join(o)


@triton.jit
def _bal_kernel(
    xt_ptr, bitmap_ptr, offsets_ptr, values_ptr, out_ptr, M, N, KW, num_chunks,
    CHUNK_STEPS: tl.constexpr, CHUNK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    SEGMENTS: tl.constexpr, PTX: tl.constexpr, ASM: tl.constexpr, HW_POPC: tl.constexpr,
):
    """Lane (s, r) walks exactly the s-th of SEGMENTS equal shares of row r's nonzeros (balanced work)."""
    WORDS: tl.constexpr = CHUNK_K // 32
    pid_n = tl.program_id(0)
    row_ids = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = row_ids[None, :]  # [1, BLOCK_N]
    row_ok = rows < N
    s = tl.arange(0, SEGMENTS)[:, None]  # [SEGMENTS, 1]
    row_start = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    row_end = tl.load(offsets_ptr + num_chunks * N + rows, mask=row_ok, other=0)
    share = tl.cdiv(row_end - row_start, SEGMENTS)
    v_lo = tl.minimum(row_start + s * share, row_end)  # [SEGMENTS, BLOCK_N]: the lane's first value
    cnt = tl.minimum(v_lo + share, row_end) - v_lo
    # chunk of value v_lo: the largest c < C with offsets[c, row] <= v_lo (binary search, CHUNK_STEPS probes)
    c = tl.zeros_like(v_lo)
    for i in tl.static_range(CHUNK_STEPS):
        cand = c + (1 << (CHUNK_STEPS - 1 - i))
        probe = tl.load(offsets_ptr + cand * N + rows, mask=row_ok & (cand < num_chunks), other=2147483647)
        c = tl.where(probe <= v_lo, cand, c)
    r = v_lo - tl.load(offsets_ptr + c * N + rows, mask=row_ok, other=0)  # rank of v_lo within chunk c
    row_words = bitmap_ptr + rows * KW
    wi = c * WORDS
    for q in tl.static_range(WORDS - 1):  # the word of chunk c holding it
        pc = popcount(tl.load(row_words + wi, mask=row_ok, other=0).to(tl.uint32, bitcast=True), HW_POPC)
        step = r >= pc
        r = tl.where(step, r - pc, r)
        wi += step.to(tl.int32)
    w = tl.load(row_words + wi, mask=row_ok & (cnt > 0), other=0).to(tl.uint32, bitcast=True)
    pos = tl.zeros_like(v_lo)
    for i in tl.static_range(5):  # position of its r-th set bit (binary search on popcounts)
        below = popcount((w >> pos.to(tl.uint32)) & ((1 << (16 >> i)) - 1), HW_POPC)
        step = r >= below
        r = tl.where(step, r - below, r)
        pos = tl.where(step, pos + (16 >> i), pos)
    w = (w >> pos.to(tl.uint32)) << pos.to(tl.uint32)  # bits before the lane's first nonzero cleared
    toks = tl.arange(0, BLOCK_M)
    if PTX:
        wb = (row_words + 0 * s).to(tl.int64, bitcast=True)
        vp = (values_ptr + v_lo).to(tl.int64, bitcast=True)
        xb = (xt_ptr + 0 * v_lo).to(tl.int64, bitcast=True)
        kw = KW + 0 * v_lo
        args = [w.to(tl.int32, bitcast=True), wb, vp, xb, wi, kw, cnt]
        if BLOCK_M == 1:
            acc = tl.inline_asm_elementwise(ASM, "=f,r,l,l,l,r,r,r", args, dtype=tl.float32, is_pure=True, pack=1)
            out = tl.sum(acc, axis=0)[:, None]
        elif BLOCK_M == 2:
            a0, a1 = tl.inline_asm_elementwise(ASM, "=f,=f,r,l,l,l,r,r,r", args, dtype=(tl.float32,) * 2,
                                               is_pure=True, pack=1)
            out = tl.join(tl.sum(a0, axis=0), tl.sum(a1, axis=0))
        elif BLOCK_M == 4:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(ASM, "=f,=f,=f,=f,r,l,l,l,r,r,r", args,
                                                       dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            out = tl.reshape(tl.join(tl.join(tl.sum(a0, axis=0), tl.sum(a2, axis=0)),
                                     tl.join(tl.sum(a1, axis=0), tl.sum(a3, axis=0))), (BLOCK_N, BLOCK_M))
        else:
            a0, a1, a2, a3, a4, a5, a6, a7 = tl.inline_asm_elementwise(
                ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r,l,l,l,r,r,r", args, dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            out = tl.reshape(tl.join(tl.join(tl.join(tl.sum(a0, axis=0), tl.sum(a4, axis=0)),
                                             tl.join(tl.sum(a2, axis=0), tl.sum(a6, axis=0))),
                                     tl.join(tl.join(tl.sum(a1, axis=0), tl.sum(a5, axis=0)),
                                             tl.join(tl.sum(a3, axis=0), tl.sum(a7, axis=0)))), (BLOCK_N, BLOCK_M))
    else:
        w_next = tl.load(row_words + wi + 1, mask=row_ok & (cnt > 0) & (wi + 1 < KW), other=0).to(
            tl.uint32, bitcast=True)
        vi = v_lo
        if BLOCK_M == 1:
            acc = tl.zeros((SEGMENTS, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((SEGMENTS, BLOCK_N, BLOCK_M), dtype=tl.float32)
        rounds = tl.max(tl.max(cnt, axis=1), axis=0)
        for _ in range(rounds):
            live = (w != 0) & (cnt > 0)
            low = w & (0 - w)
            col = wi * 32 + popcount(low - 1, HW_POPC)
            v = tl.load(values_ptr + vi, mask=live, other=0.0).to(tl.float32)
            if BLOCK_M == 1:
                acc += v * tl.load(xt_ptr + col, mask=live, other=0.0).to(tl.float32)
            else:
                xv = tl.load(xt_ptr + col[:, :, None] * BLOCK_M + toks[None, None, :], mask=live[:, :, None],
                             other=0.0)
                acc += v[:, :, None] * xv.to(tl.float32)
            vi += live.to(tl.int32)
            cnt -= live.to(tl.int32)
            w = w ^ low
            advance = (w == 0) & (cnt > 0)
            wi += advance.to(tl.int32)
            w = tl.where(advance, w_next, w)
            w_next = tl.where(advance, tl.load(row_words + wi + 1, mask=advance & (wi + 1 < KW), other=0).to(
                tl.uint32, bitcast=True), w_next)
        while tl.max(tl.max(cnt, axis=1), axis=0) > 0:  # lanes that met empty words: rare below ~95% sparsity
            live = (w != 0) & (cnt > 0)
            low = w & (0 - w)
            col = wi * 32 + popcount(low - 1, HW_POPC)
            v = tl.load(values_ptr + vi, mask=live, other=0.0).to(tl.float32)
            if BLOCK_M == 1:
                acc += v * tl.load(xt_ptr + col, mask=live, other=0.0).to(tl.float32)
            else:
                xv = tl.load(xt_ptr + col[:, :, None] * BLOCK_M + toks[None, None, :], mask=live[:, :, None],
                             other=0.0)
                acc += v[:, :, None] * xv.to(tl.float32)
            vi += live.to(tl.int32)
            cnt -= live.to(tl.int32)
            w = w ^ low
            advance = (w == 0) & (cnt > 0)
            wi += advance.to(tl.int32)
            w = tl.where(advance, w_next, w)
            w_next = tl.where(advance, tl.load(row_words + wi + 1, mask=advance & (wi + 1 < KW), other=0).to(
                tl.uint32, bitcast=True), w_next)
        if BLOCK_M == 1:
            out = tl.sum(acc, axis=0)[:, None]
        else:
            out = tl.sum(acc, axis=0)
    out_mask = (row_ids[:, None] < N) & (toks[None, :] < M)
    tl.store(out_ptr + toks[None, :] * N + row_ids[:, None], out, mask=out_mask)


def run_bal(xt, fmt, m, block_n, segments, ptx, unroll, out, hint=""):
    """Balanced walk: xt fp16 (or fp32 for the PTX walk) [K, BLOCK_M] -> out [M, N] (x's dtype)."""
    block_m = xt.numel() // fmt.k
    asm = bal_asm(block_m, unroll, hint, xt.dtype == torch.float32) if ptx else ""
    _bal_kernel[(triton.cdiv(fmt.n, block_n),)](
        xt, fmt.bitmap, fmt.offsets, fmt.values, out, m, fmt.n, fmt.bitmap.shape[1], fmt.num_chunks,
        CHUNK_STEPS=max(1, (fmt.num_chunks - 1).bit_length()), CHUNK_K=fmt.chunk_k, BLOCK_N=block_n,
        BLOCK_M=block_m, SEGMENTS=segments, PTX=ptx, ASM=asm, HW_POPC=not interpreting(),
        num_warps=max(1, block_n * segments // 32), num_stages=1)
    return out


def segments_of(num_chunks: int, split_k: int, segments: int) -> list[tuple[int, int]]:
    """(c_lo, c_hi) per global segment pid_s * SEGMENTS + seg, exactly as the kernel computes them."""
    per_split, used = split_k_plan_counts(num_chunks, split_k)
    per_seg = -(-per_split // segments)
    out = []
    for s in range(used):
        end = min(s * per_split + per_split, num_chunks)
        for g in range(segments):
            lo = min(s * per_split + g * per_seg, end)
            out.append((lo, min(lo + per_seg, end)))
    return out


def split_k_plan_counts(num_chunks: int, split_k: int) -> tuple[int, int]:
    per = -(-num_chunks // split_k)
    return per, -(-num_chunks // per)


def interleave(dense: torch.Tensor, fmt: BitmapWeight, split_k: int, segments: int):
    """(bitmap_il [N/32 * KW * 32], values_il, vbase [G, N/32]) for the lane-interleaved variant."""
    n, k = dense.shape
    assert n % 32 == 0
    ck = fmt.chunk_k
    kw = fmt.bitmap.shape[1]
    bitmap_il = fmt.bitmap.view(n // 32, 32, kw).transpose(1, 2).contiguous().view(-1)
    w = torch.nn.functional.pad(dense, (0, fmt.num_chunks * ck - k))
    segs = segments_of(fmt.num_chunks, split_k, segments)
    parts, bases, total = [], [], 0
    for lo, hi in segs:
        blk = w[:, lo * ck:hi * ck]  # [N, L]
        mask = blk != 0
        cnt = mask.sum(1).view(n // 32, 32)  # [G32, 32]
        longest = cnt.max(1).values  # [G32]
        size = longest * 32
        base = total + torch.cumsum(size, 0) - size
        bases.append(base)
        slab = torch.zeros(int(size.sum()), dtype=dense.dtype, device=dense.device)
        rank = torch.cumsum(mask.to(torch.int32), 1) - 1  # [N, L]
        rows = torch.arange(n, device=dense.device)[:, None].expand_as(rank)
        pos = (base - total)[rows // 32] + rank * 32 + rows % 32
        slab[pos[mask]] = blk[mask]
        parts.append(slab)
        total += int(size.sum())
    vbase = torch.stack(bases).to(torch.int32).contiguous()  # [G, N/32]
    return bitmap_il, torch.cat(parts), vbase


def run_variant(xt, fmt, il_parts, m, block_n, segments, split_k, ptx, il, unroll, out):
    """xt: [K, BLOCK_M] (fp32 for the PTX walk, else x's dtype) -> [M, N] (sum of the split-K partials)."""
    per_split, used = split_k_plan(fmt, split_k)
    block_m = xt.numel() // fmt.k
    bitmap, values, vbase = (il_parts if il else (fmt.bitmap, fmt.values, fmt.offsets))
    asm = walk_asm(block_m, unroll, 64 if il else 2, 128 if il else 4) if ptx else ""
    _proto_kernel[(triton.cdiv(fmt.n, block_n), used)](
        xt, bitmap, fmt.offsets, values, vbase, out, m, fmt.n, fmt.bitmap.shape[1], m * fmt.n, per_split,
        fmt.num_chunks, fmt.n // 32, CHUNK_K=fmt.chunk_k, BLOCK_N=block_n, BLOCK_M=block_m, SEGMENTS=segments,
        IL=il, PTX=ptx, ASM=asm, HW_POPC=not interpreting(), num_warps=block_n * segments // 32, num_stages=1)
    return out[:used].sum(0) if used > 1 else out[0]


SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "up": (11008, 4096), "down": (4096, 11008)}


def main() -> None:
    from benchmarks.timing import ROTATIONS, gpu_info, graph_time_us

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["qkv", "down"])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--variants", nargs="+", default=["triton", "ptx", "triton_il", "ptx_il"])
    ap.add_argument("--unroll", type=int, nargs="+", default=[2])
    ap.add_argument("--profile", action="store_true", help="one launch per variant (run under ncu), no timing")
    args = ap.parse_args()
    if args.profile:
        return profile(args)
    out_dir = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out_dir, exist_ok=True)
    info = gpu_info()
    torch.manual_seed(0)
    rows = []
    configs = [(32, 8), (32, 16), (64, 8)]
    bal_configs = [(32, 16), (32, 32), (16, 32), (16, 64), (64, 16)]
    for shape, sp in itertools.product(args.shapes, args.sparsity):
        n, k = SHAPES[shape]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(ROTATIONS)]
        dense = [d * (torch.rand_like(d, dtype=torch.float32) >= sp) for d in dense]
        fmts = [BitmapWeight.from_dense(d) for d in dense]
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = torch.nn.functional.linear(x.float(), dense[0].float())
            t_dense = graph_time_us([lambda d=d: torch.nn.functional.linear(x, d) for d in dense])
            block_m = triton.next_power_of_2(m)
            xts = {False: transpose_tokens(x, block_m), True: transpose_tokens(x.float(), block_m)}
            best = {}
            for variant, (bn, sg), sk, un in itertools.product(args.variants, configs + bal_configs, (1, 2, 4, 8),
                                                               args.unroll):
                ptx, il, bal = variant.startswith("ptx"), variant.endswith("_il"), "bal" in variant
                if (not ptx and un != args.unroll[0]) or (bal != ((bn, sg) in bal_configs)) or (bal and sk > 1):
                    continue
                ils = [interleave(d, f, sk, sg) if il else None for d, f in zip(dense, fmts)]
                if bal:
                    outs = [torch.full((m, n), float("nan"), device="cuda", dtype=x.dtype) for _ in dense]

                    hint = {"ptxbal128": ".L2::128B", "ptxbal256": ".L2::256B"}.get(variant, "")

                    def call(f, i, o, bn=bn, sg=sg, ptx=ptx, un=un, hint=hint):
                        return run_bal(xts[variant == "ptxbal_x32"], f, m, bn, sg, ptx, un, o, hint)
                else:
                    outs = [torch.full((sk, m, n), float("nan"), device="cuda") for _ in dense]

                    def call(f, i, o, bn=bn, sg=sg, sk=sk, ptx=ptx, il=il, un=un):
                        return run_variant(xts[ptx], f, i, m, bn, sg, sk, ptx, il, un, o)
                try:
                    got = call(fmts[0], ils[0], outs[0]).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    if not err < 2e-3:
                        print(f"WRONG {variant} {shape} {sp} m={m} bn={bn} sg={sg} sk={sk}: err {err}")
                        continue
                    t = graph_time_us([lambda f=f, i=i, o=o: call(f, i, o) for f, i, o in zip(fmts, ils, outs)])
                except Exception as e:  # report and go on: a prototype sweep
                    print(f"FAIL {variant} {shape} {sp} m={m} bn={bn} sg={sg} sk={sk}: {type(e).__name__}: {e}"[:400])
                    continue
                rows.append({**info, "shape": shape, "sparsity": sp, "m": m, "variant": variant, "block_n": bn,
                             "segments": sg, "split_k": sk, "unroll": un, "us": round(t, 2),
                             "dense_us": round(t_dense, 2), "speedup": round(t_dense / t, 3), "err": err})
                key = variant + (f"_u{un}" if ptx else "")
                if key not in best or t < best[key][0]:
                    best[key] = (t, f"bn{bn}sg{sg}sk{sk}")
            print(f"{shape} sp={sp} m={m} dense {t_dense:.1f}us | " + " | ".join(
                f"{v} {t:.1f} ({t_dense / t:.2f}x {c})" for v, (t, c) in sorted(best.items())), flush=True)
            del ils, outs
        del dense, fmts
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "proto_rowwalk.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def profile(args) -> None:
    """One launch of each variant (BLOCK_N 32 x 16 segments, split-K 2) and of cuBLAS, for ncu to read."""
    torch.manual_seed(0)
    for shape, sp, m in itertools.product(args.shapes, args.sparsity, args.m):
        n, k = SHAPES[shape]
        d = torch.randn(n, k, device="cuda", dtype=torch.float16)
        d = d * (torch.rand_like(d, dtype=torch.float32) >= sp)
        f = BitmapWeight.from_dense(d)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        torch.nn.functional.linear(x, d)
        block_m = triton.next_power_of_2(m)
        for variant in args.variants:
            ptx, il = variant.startswith("ptx"), variant.endswith("_il")
            if "bal" in variant:
                run_bal(transpose_tokens(x, block_m), f, m, 32, 16, ptx, args.unroll[0], torch.empty_like(x[:, :1].expand(m, n)).contiguous())
                continue
            xt = transpose_tokens(x.float() if ptx else x, block_m)
            ils = interleave(d, f, 2, 16) if il else None
            out = torch.empty((2, m, n), device="cuda")
            run_variant(xt, f, ils, m, 32, 16, 2, ptx, il, args.unroll[0], out)
        torch.cuda.synchronize()
        print(f"profiled {shape} {sp} m={m}: variants in order {args.variants}", flush=True)


if __name__ == "__main__":
    main()
