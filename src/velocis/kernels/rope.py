"""Rotary embedding applied with a hand-written backward (the fast path of `models.rope.apply_rope`).

Reference (what the tests hold this to), HF Llama's rotate_half layout:

    x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1)

Velocis's cos/sin are cat(f, f) of per-frequency values, so each half of the head vector sees the
same half-width table: out1 = x1*c - x2*s, out2 = x2*c + x1*s. Written into one output with two
multiply-adds per half there is no negated copy, no concatenation and no full-width product; the
backward is the same rotation by -angle (the transpose of a rotation), so it saves only cos/sin.
"""
from __future__ import annotations

import torch

from velocis.kernels import cpu_ops


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate by +angle (by -angle if inverse: the backward)."""
    if (x.dim() == 4 and x.stride(-1) == 1 and c.shape == s.shape == (x.shape[2], x.shape[3] // 2)
            and cpu_ops.usable(x, c, s)):
        return cpu_ops.ops().rope(x, c, s, inverse)  # one pass (csrc/fused_cpu.cpp)
    if inverse:
        s = -s
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x, dtype=torch.result_type(x, c))  # x's memory layout: no transposing copy
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=o2).addcmul_(x1, s)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c, s):
        ctx.save_for_backward(c, s)
        return _rotate(x, c, s)

    @staticmethod
    def backward(ctx, dy):
        c, s = ctx.saved_tensors
        return _rotate(dy, c, s, inverse=True), None, None


def apply_rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, D]; cos/sin [T, D] whose two halves are equal (as RotaryEmbedding builds them)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    if torch.compiler.is_compiling():  # inductor fuses the plain form itself (and trips on out= views)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    if not torch.is_grad_enabled() or not x.requires_grad:
        return _rotate(x, c, s)
    return _Rope.apply(x, c.detach(), s.detach())
