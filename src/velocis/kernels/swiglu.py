"""SwiGLU's gate, silu(g) * u, as one pass each way on CPU (the fast path of `models.layers.MLP`).

Reference (what the tests hold this to):

    F.silu(g) * u

Autograd through the reference keeps g, silu(g) and u, and its backward runs three ops that each
read and write a whole [tokens, mlp_dim] activation. The C++ kernels (csrc/fused_cpu.cpp) save only
g and u and produce both gradients in one pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from velocis.kernels import cpu_ops


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


class _SwiGLUCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        return cpu_ops.ops().swiglu_fwd(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        return tuple(cpu_ops.ops().swiglu_bwd(dh.contiguous(), g, u))


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u; C++ on CPU fp32 where the kernels are built, the reference elsewhere."""
    if g.shape == u.shape and cpu_ops.usable(g, u):
        return _SwiGLUCPU.apply(g, u)
    return swiglu_reference(g, u)
