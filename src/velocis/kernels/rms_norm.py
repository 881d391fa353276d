"""RMSNorm with a hand-written backward (the fp32 fast path of `models.layers.RMSNorm`).

Reference (what the tests hold this to):

    weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

Autograd through the reference keeps x, x², the mean, rsqrt and x * rsqrt alive and runs a
backward op for each: about ten passes over [tokens, hidden] per norm. Here the forward saves only
the normalised x and the per-row 1/rms, and the backward is four passes:

    dx = rstd * (dy * w - xhat * mean(dy * w * xhat))      dw = sum over rows of dy * xhat

On CPU (fp32) both directions are one pass each in C++ (csrc/fused_cpu.cpp), saving x and 1/rms.
"""
from __future__ import annotations

import torch

from velocis.kernels import cpu_ops


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.shape[-1]
        # the norm kernel reads x once and allocates nothing of x's size (x.pow(2) would)
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(h).add_(eps).rsqrt_()
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, dy):
        xhat, rstd, weight = ctx.saved_tensors
        dw = (dy * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        dxhat = dy * weight
        mean = torch.linalg.vecdot(dxhat, xhat).unsqueeze_(-1).div_(xhat.shape[-1])
        dx = xhat * (mean * rstd).neg_()
        dx.addcmul_(dxhat, rstd)  # rstd * dxhat - rstd * mean * xhat
        return dx, dw, None


class _RMSNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        y, rstd = cpu_ops.ops().rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = cpu_ops.ops().rms_norm_bwd(dy.contiguous(), x, weight, rstd)
        return dx, dw if ctx.needs_input_grad[1] else None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; x and weight fp32 (other dtypes take the reference)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or torch.compiler.is_compiling():
        return rms_norm_reference(x, weight, eps)  # under torch.compile inductor fuses the reference
    if cpu_ops.usable(x, weight) and weight.is_contiguous():
        return _RMSNormCPU.apply(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
