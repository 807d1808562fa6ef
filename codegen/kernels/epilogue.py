"""The op's epilogue in one launch: split-K sum + bias + activation / GLU + residual + cast (codegen/epilogue_spec.py).

Replaces the 2-3 torch launches of the split-K reduction (sum, + bias, .to) even without an activation, and
the separate pointwise passes over [M, N] that the folded graph ops (passes/fuse_epilogues.py) would cost.
Memory-bound: reads S x [M, N] partials (+ bias, residual), writes [M, N_out] once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashllm_compile.codegen.epilogue_spec import Epilogue
from flashllm_compile.codegen.kernels.host_math import cdiv
from flashllm_compile.codegen.kernels.launch import launch, pdl_enabled, wait_for_previous_kernel

SMALL_OUTPUT = 1 << 16  # outputs up to this many elements get smaller blocks: more programs for a decode step


def get_epilogue_config(numel: int) -> tuple[int, int]:
    """(BLOCK output elements per program, num_warps) for an output of `numel` elements."""
    return (256, 2) if numel <= SMALL_OUTPUT else (1024, 4)


@triton.jit
def apply_act(y, ACT: tl.constexpr):
    """y (fp32) -> act(y).  ACT: 0 none, 1 silu, 2 gelu (erf), 3 gelu (tanh), 4 relu (epilogue_spec.ACTIVATIONS)."""
    if ACT == 1:  # silu
        y = y * tl.sigmoid(y)
    elif ACT == 2:  # gelu, exact
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 3:  # gelu, tanh approximation: 0.5 (1 + tanh(z)) = sigmoid(2 z)
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    elif ACT == 4:  # relu; NaN stays NaN (tl.maximum would drop it)
        y = tl.where(y < 0.0, 0.0, y)
    return y


@triton.jit
def _epilogue_kernel(
    # pointers
    in_ptr, bias_ptr, res_ptr, out_ptr,
    # sizes and strides
    S, M, N_OUT, stride_is, stride_im,
    # meta-parameters
    ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[m, n] = cast(act(y[m, n]) (* y[m, n + N_OUT] with GLU) + res[m, n]),  y = sum_s in[s, m, :] + bias
    (fixed order s = 0..S-1: deterministic, no atomics).  in: [S, M, N] (N = N_OUT, or 2 N_OUT with GLU),
    last dim contiguous; out, res: [M, N_OUT] contiguous.  One program covers BLOCK flat output elements.
    ACT: 0 none, 1 silu, 2 gelu (erf), 3 gelu (tanh), 4 relu."""
    wait_for_previous_kernel(PDL)  # launched with PDL (launch.pdl_enabled): the partials' writer must be done
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat index into out [M, N_OUT]
    mask = offs < M * N_OUT
    m = offs // N_OUT
    n = offs % N_OUT
    src = in_ptr + m * stride_im + n  # [BLOCK] pointers into in[0]
    y = tl.zeros((BLOCK,), dtype=tl.float32)
    up = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        y += tl.load(src + s * stride_is, mask=mask, other=0.0).to(tl.float32)
        if GLU:
            up += tl.load(src + s * stride_is + N_OUT, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
        if GLU:
            up += tl.load(bias_ptr + n + N_OUT, mask=mask, other=0.0).to(tl.float32)
    y = apply_act(y, ACT)
    if GLU:
        y = y * up
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def fused_epilogue(partials: torch.Tensor, bias: torch.Tensor | None, epilogue: Epilogue | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """partials: [S, M, N] (fp32 split-K partials, or a finished [1, M, N] in any dtype) -> [M, N_out] in `dtype`.
    bias: [N] or None.  Checks, allocates, launches."""
    epilogue = epilogue or Epilogue()
    s, m, n = partials.shape
    if epilogue.glu and n % 2:
        raise ValueError(f"a GLU epilogue needs an even N, got {n}")
    n_out = epilogue.out_features(n)
    residual = epilogue.residual
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if residual is not None and residual.shape != (m, n_out):
        raise ValueError(f"residual must be [{m}, {n_out}], got {tuple(residual.shape)}")
    out = torch.empty(m, n_out, device=partials.device, dtype=dtype)
    if out.numel() == 0:
        return out
    if partials.stride(-1) != 1:
        partials = partials.contiguous()
    bias = bias.contiguous() if bias is not None else None
    residual = residual.contiguous() if residual is not None else None
    block, num_warps = get_epilogue_config(out.numel())
    pdl = pdl_enabled(out.device)
    launch(
        _epilogue_kernel, (cdiv(out.numel(), block),),
        (partials, bias if bias is not None else partials, residual if residual is not None else partials, out,
         s, m, n_out, partials.stride(0), partials.stride(1)),
        ACT=epilogue.act_code, GLU=epilogue.glu, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK=block, PDL=pdl, num_warps=num_warps, pdl=pdl,
    )
    return out
