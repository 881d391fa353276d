"""Causal self-attention for CPU training: a small C++ extension (csrc/attention_cpu.cpp).

Reference (what the tests hold it to):

    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

PyTorch's CPU flash kernel tiles both queries and keys and pays per-tile overhead; this one takes
each (batch, kv head) on one thread with its group of query heads stacked, keeps a 64-query-row
block of scores of the whole group in cache between the QK^T gemm, the softmax and the PV gemm,
and calls the BLAS PyTorch itself links once per block. The backward recomputes probabilities
from the saved log-sum-exp, as flash attention does. fp32 only; its speed against SDPA at the
micro preset's shapes is in benchmarks/RESULTS.md.

Built on first use with the other CPU kernels (kernels/cpu_ops.py); where they cannot be built,
attention uses SDPA.
"""
from __future__ import annotations

import math

import torch

from velocis.kernels import cpu_ops


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        o, lse = cpu_ops.ops().causal_attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, lse = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        return (*cpu_ops.ops().causal_attention_bwd(q, k, v, o, lse, dout, ctx.scale), None)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and dtypes the kernel takes: fp32 CPU, [B, heads, T, D] with one D for q, k and v."""
    return (q.dim() == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1] and k.shape == v.shape
            and q.shape[2] == k.shape[2] and q.shape[1] % k.shape[1] == 0 and cpu_ops.usable(q, k, v))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, KV, T, D] (H a multiple of KV) -> [B, H, T, D]; call `supports` first.
    scale defaults to 1/sqrt(D), as SDPA's.

    Any strides with D contiguous (the [B, T, heads, D] projections seen through transpose(1, 2)
    are read in place); the output and the input gradients are [B, T, heads, D] in memory, so
    the output projection and the q/k/v projections' backward take them without a copy."""
    return _CausalAttention.apply(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))


def decode_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The decode kernel's inputs: CPU q [R, H, D], k/v [R, KV, S, D] of one dtype (fp32, bf16 or
    fp16: the model's own) with D contiguous."""
    return (q.dim() == 3 and k.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0]
            and q.shape[2] == k.shape[3] and q.shape[1] % k.shape[1] == 0 and k.stride(-1) == 1
            and v.stride(-1) == 1 and q.dtype == k.dtype == v.dtype and k.dtype in _DECODE_DTYPES
            and q.device.type == k.device.type == v.device.type == "cpu"
            and not torch.compiler.is_compiling() and cpu_ops.available())


_DECODE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row over its first lens[r] keys (inference; no gradient): q [R, H, D],
    k/v [R, KV, S, D] -> [R, H, D] in q's dtype, computed in fp32 (keys and values widened as read).
    Reference: SDPA with -inf past each row's length."""
    return cpu_ops.ops().decode_attention(q.float(), k, v, lens, float(scale)).to(q.dtype)
