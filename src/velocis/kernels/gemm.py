"""Linear layers on CPU fp32 through Velocis' own GEMM (csrc/gemm_cpu.cpp).

Reference (what the tests hold this to):

    F.linear(x, weight)

At a small model's shapes (hidden 256-2000 against thousands of tokens) the C++ GEMM runs the
forward x W^T, the input gradient dY W and the tokens-deep weight gradient dY^T X faster than MKL
inside a training step (benchmarks/RESULTS.md, bench_gemm_cpu.py). Inference on fewer rows than
that (the engine's batched decodes: one token per running sequence) goes through the decode
kernels' few-rows product (csrc/decode_cpu.cpp: 4 weight rows x 4 tokens per register tile, the
weights read once per call), for fp32, bf16 and fp16 weights: MKL's sgemm runs those shapes at a
fraction of the FMA rate (16 rows of the 125M model: 61 ms a step against 37). A bf16 model's
products take AVX512-BF16's dot instruction where the CPU has it (1.7x the widening path at 16 rows). Elsewhere (no
AVX2/FMA build, autocast, torch.compile, a bias in training) this is F.linear.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from velocis.kernels import cpu_ops

MIN_ROWS = 64  # below this (decoding), the packing costs more than it saves


def _supported() -> bool:
    ops = cpu_ops.ops()
    return ops is not None and ops.gemm_supported()


def fast_ok(rows: int, *tensors: torch.Tensor) -> bool:
    """Does a product with `rows` output rows of these CPU fp32 tensors go through the C++ GEMM?"""
    return rows >= MIN_ROWS and cpu_ops.usable(*tensors) and _supported()


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """out = a @ b + beta * out (a new tensor when out is None): C++ where `fast_ok`, else torch."""
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
        beta = 0.0
    if fast_ok(a.shape[0], a, b):
        return cpu_ops.ops().gemm_(out, a, b, beta, 1.0)
    if beta == 0.0:
        return torch.mm(a, b, out=out)
    return out.addmm_(a, b, beta=beta)


class _LinearCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.in_shape = x.shape
        return mm(x2, weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = mm(dy2, weight).view(ctx.in_shape) if ctx.needs_input_grad[0] else None
        dw = mm(dy2.t(), x2) if ctx.needs_input_grad[1] else None
        return dx, dw


FLOAT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/decode_cpu.cpp's weight kinds
BF16_ACTS = 5  # its kind for bf16 weights against activations that are bf16 values
_EMPTY = torch.empty(0)


def few_rows_ok(rows: int, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Does an inference product with `rows` rows take the decode kernels' few-rows path?"""
    return (0 < rows < MIN_ROWS and x.device.type == "cpu" and x.dtype == weight.dtype
            and weight.dtype in FLOAT_KINDS and weight.dim() == 2 and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and os.environ.get("VELOCIS_DECODE_KERNEL", "1") != "0" and cpu_ops.available() and _supported())


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ b) for a few rows through the decode kernels (fp32 accumulation, output in x's dtype)."""
    rows, (out, cols) = x.numel() // x.shape[-1], weight.shape
    x2 = x.reshape(rows, cols)
    if weight.dtype == torch.bfloat16:  # bf16 x bf16 products (AVX512-BF16's dot instruction where present)
        y = cpu_ops.ops().matvec(x2, BF16_ACTS, weight, _EMPTY, _EMPTY, out, cols, 0, False)
    else:
        y = cpu_ops.ops().matvec(x2.float(), FLOAT_KINDS[weight.dtype], weight, _EMPTY, _EMPTY, out, cols, 0, False)
    if bias is not None:
        y += bias
    return y.to(x.dtype).view(*x.shape[:-1], out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with the C++ GEMM on CPU fp32 where it is faster."""
    if x.dim() >= 1 and x.shape[-1] and few_rows_ok(x.numel() // x.shape[-1], x, weight):
        return few_rows_linear(x, weight, bias)
    if (bias is None and x.dim() >= 2 and not torch.is_autocast_enabled(x.device.type)
            and fast_ok(x.numel() // max(1, x.shape[-1]), x, weight)):
        return _LinearCPU.apply(x, weight)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
