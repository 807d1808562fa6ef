"""What a sparse_linear epilogue computes, and its plain-torch reference.

After y = x @ W^T, the op finishes [M, N] in fp32 before the one cast to x's dtype (passes/fuse_epilogues.py
folds these from the graph; codegen/kernels/epilogue.py runs them in one kernel):

    y = sum over split-K partials + bias          always (the split-K reduction the kernels need anyway)
    y = act(y)                                    epilogue "silu" | "gelu" | "gelu_tanh" | "relu"
      or act(y[..., :N/2]) * y[..., N/2:]         epilogue "silu*up" (SwiGLU: gate rows first, then up rows)
    y = y + residual                              residual [M, N_out] in x's dtype
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The kernel's ACT constexpr is 1 + the index here (0: no activation).
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
               "relu": F.relu}
GLU_SUFFIX = "*up"  # "silu*up": the activation of the first half times the second half


@dataclass(frozen=True)
class Epilogue:
    """The pointwise tail of one op call: an activation (or a GLU of it) and a residual [M, N_out]."""

    act: str = ""  # "" or a key of ACTIVATIONS
    glu: bool = False  # out = act(y[..., :N/2]) * y[..., N/2:]
    residual: torch.Tensor | None = None  # [M, N_out], x's dtype

    @classmethod
    def parse(cls, text: str | None, residual: torch.Tensor | None = None) -> Epilogue:
        """From the op's `epilogue` string ("silu", "silu*up", None)."""
        act, glu = parse_epilogue(text)
        return cls(act, glu, residual)

    @property
    def act_code(self) -> int:
        return 0 if not self.act else 1 + list(ACTIVATIONS).index(self.act)

    def out_features(self, n: int) -> int:
        return n // 2 if self.glu else n


def parse_epilogue(text: str | None) -> tuple[str, bool]:
    """"silu" -> ("silu", False), "silu*up" -> ("silu", True), None / "" -> ("", False); ValueError otherwise."""
    if not text:
        return "", False
    glu = text.endswith(GLU_SUFFIX)
    act = text.removesuffix(GLU_SUFFIX) if glu else text
    if act not in ACTIVATIONS:
        raise ValueError(f"flashllm: unknown epilogue {text!r}; known: {list(ACTIVATIONS)}, each optionally "
                         f"followed by {GLU_SUFFIX!r}")
    return act, glu


def apply_epilogue(partials: torch.Tensor, bias: torch.Tensor | None, epilogue: Epilogue | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """Reference: partials [S, M, N] (fp32 split-K partial sums, or a finished [1, M, N] in any dtype)
    -> [M, N_out] in `dtype`, all math in fp32."""
    y = partials.float().sum(0)  # [M, N]
    if bias is not None:
        y = y + bias.float()
    if epilogue is None:
        return y.to(dtype)
    act = ACTIVATIONS.get(epilogue.act, lambda t: t)
    if epilogue.glu:
        gate, up = y.chunk(2, dim=-1)  # [M, N/2] each
        y = act(gate) * up
    else:
        y = act(y)
    if epilogue.residual is not None:
        y = y + epilogue.residual.float()
    return y.to(dtype)
