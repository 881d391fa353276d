"""GPU weight-only quantized matmul in Triton: y = x @ dequantize(W)^T (+ bias).

One kernel for every stored format of velocis.quant.formats (int8 per channel or per group,
int4 asymmetric or symmetric, group size 32 / 64 / 128). It reads the stored tensors as they are:

    qweight  int8 [N, K_p]          or  uint8 [N, K_p / 2]  (int4: column 2j low nibble, 2j + 1 high)
    scales   float16 [N, G]         (per channel: [N, 1])
    zeros    uint8 [N, G]           (asymmetric int4 only; symmetric int4 has the implicit zero 8)

where K_p is in_features padded up to a multiple of the group size; x [M, in_features] is fp16,
bf16 or fp32. A program computes a [BLOCK_M, BLOCK_N] tile of y: it walks K in steps of BLOCK_K,
loads a [BLOCK_K, BLOCK_N] tile of codes, dequantizes it in registers the way the reference
does (fp32 scale * (code - zero), cast once to x's dtype) and accumulates tl.dot in fp32.
BLOCK_K divides the group size, so a K step lies inside one group: one scale (and zero) per output
column per step. Per-channel int8 casts the codes (exact in fp16 / bf16) and applies the row
scale once, at the end. Columns past in_features are masked on x (and on the codes past K_p),
so padding contributes nothing.

Decode (small M) has few output tiles, too few to fill the GPU's SMs, so the K range is split
(split-K): each split writes a fp32 partial [M, N] and torch sums them (deterministic; no atomics).

Block sizes are fixed by M (no autotuning): small M a narrow, deep tile; large M a square one.

Dispatch: QuantLinear.forward calls `quant_linear` when x is on CUDA, triton imports and the env
switch VELOCIS_TRITON is not "0" (see `enabled`). Everything else runs the plain-PyTorch reference.
The kernel is tested on the CPU under TRITON_INTERPRET=1 (tests/test_quant_triton.py), where a
kernel takes CPU tensors; the interpreter multiplies bfloat16 dot operands as raw bits
(triton-lang/triton#11584, "not supported yet"), so interpreted bf16 dots upcast to fp32 first
(exact: bf16 products are exact in fp32, as on the GPU's tensor cores).
"""
from __future__ import annotations

import functools
import os

import torch

from velocis.quant.formats import QSpec

try:  # triton is optional: CPU installs without it run the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> bool:
    """triton imported."""
    return triton is not None


def enabled() -> bool:
    """The Triton path is on: triton imports and VELOCIS_TRITON is not "0"."""
    return triton is not None and os.environ.get("VELOCIS_TRITON", "1") != "0"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(x: torch.Tensor) -> bool:
    """The kernel handles this input: fp16 / bf16 / fp32 with at least one feature."""
    return x.dtype in _DTYPES and x.shape[-1] > 0


if triton is not None:

    @triton.jit
    def _qmatmul_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, K, Kp, k_split,
        stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
        stride_ys, stride_ym, stride_yn,
        BITS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """y[pid_s] = x[:, K range of split pid_s] @ dequant(W)[:, that range]^T (fp32 partial, or the
        final cast output when there is one split). GROUP == 0: per-channel int8."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        rows_x = offs_m.to(tl.int64) * stride_xm
        rows_q = offs_n.to(tl.int64) * stride_qn
        rows_s = offs_n.to(tl.int64) * stride_sn
        cdt = x_ptr.dtype.element_ty  # the compute dtype: the dequantized tile's dtype

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: a @jit helper, which the
        # interpreter only runs if triton itself was imported under TRITON_INTERPRET=1
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows_x[:, None] + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
            wmask = (offs_k[:, None] < Kp) & mask_n[None, :]
            if BITS == 8:
                code = tl.load(q_ptr + rows_q[None, :] + offs_k[:, None] * stride_qk, mask=wmask, other=0)
                code = code.to(tl.float32)
            else:  # byte k // 2 holds column k in its low (k even) or high (k odd) nibble
                byte = tl.load(q_ptr + rows_q[None, :] + (offs_k[:, None] // 2) * stride_qk, mask=wmask, other=0)
                code = ((byte.to(tl.int32) >> ((offs_k[:, None] % 2) * 4)) & 0xF).to(tl.float32)
            if GROUP == 0:  # per channel: codes are exact in the compute dtype; the scale comes last
                w = code.to(cdt)
            else:
                g = k0 // GROUP  # the whole K step lies in group g (BLOCK_K divides GROUP)
                s = tl.load(s_ptr + rows_s + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
                if BITS == 4:
                    if ASYM:
                        z = tl.load(z_ptr + offs_n.to(tl.int64) * stride_zn + g * stride_zg, mask=mask_n, other=0)
                        code = code - z.to(tl.float32)[None, :]
                    else:
                        code = code - 8.0
                w = (code * s[None, :]).to(cdt)  # fp32 scale * (code - zero), cast once: the reference
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc, input_precision=PRECISION)

        if GROUP == 0:
            s = tl.load(s_ptr + rows_s, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc * s[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = (y_ptr + pid_s * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym
                  + offs_n[None, :] * stride_yn)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _blocks(M: int, dtype: torch.dtype, group: int | None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows: fixed, no autotuning."""
    if M <= 16:  # decode / GEMV: memory-bound; deep K steps, narrow N so more programs exist
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif M <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:  # prefill: compute-bound tiles
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if dtype == torch.float32:  # fp32 tiles take twice the registers / shared memory
        bm, bn = min(bm, 64), min(bn, 64)
        bk = min(bk, 64)
    if group is not None:
        bk = min(bk, group)  # a K step never crosses a group (group sizes are 32, 64, 128)
    return bm, bn, bk, warps, stages


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(M: int, N: int, K: int, bm: int, bn: int, bk: int, device: torch.device) -> int:
    """Enough K splits that small-M launches fill the GPU (about 2 programs per SM), each split
    keeping at least 4 K steps. 1 for large M and in the interpreter."""
    if device.type != "cuda" or M > 64:
        return 1
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(2 * sms // tiles, triton.cdiv(K, bk) // 4, 16))


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 spec: QSpec, in_features: int, bias: torch.Tensor | None = None, *,
                 split_k: int | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [..., in_features] (fp16 / bf16 / fp32) @ dequantize(W)^T + bias -> [..., out] in x's dtype.

    The stored tensors as velocis.quant.formats lays them out (2-D: one weight, not an expert stack).
    `split_k` / `blocks` (BLOCK_M, BLOCK_N, BLOCK_K) override the choices by M (tests use them).
    On CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if triton is None:
        raise RuntimeError("triton is not installed: the Triton quantized matmul is unavailable")
    if x.dtype not in _DTYPES:
        raise TypeError(f"quant_matmul: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"quant_matmul: x has {x.shape[-1]} features, the weight {in_features}")
    if qweight.dim() != 2:
        raise ValueError(f"quant_matmul: one weight [out, in] at a time, got qweight {tuple(qweight.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    M, K = x2.shape
    N = qweight.shape[0]
    Kp = qweight.shape[1] * (2 if spec.bits == 4 else 1)
    if M == 0 or N == 0:
        return x.new_zeros(*lead, N)
    group = spec.group_size
    bm, bn, bk, warps, stages = _blocks(M, x.dtype, group)
    if blocks is not None:
        bm, bn, bk = blocks
    if group is not None and group % bk:
        raise ValueError(f"BLOCK_K {bk} must divide the group size {group}")
    splits = split_k if split_k is not None else _split_k(M, N, K, bm, bn, bk, x.device)
    k_tiles = triton.cdiv(K, bk)
    k_split = triton.cdiv(k_tiles, splits) * bk  # K columns per split, whole K steps
    splits = triton.cdiv(K, k_split)  # drop empty splits
    asym = spec.bits == 4 and not spec.symmetric
    if asym and zeros is None:
        raise ValueError("asymmetric int4 needs its zero points")
    if bias is not None and splits == 1:
        bias = bias.contiguous()
    y = torch.empty((1 if splits == 1 else splits, M, N), device=x.device,
                    dtype=x.dtype if splits == 1 else torch.float32)
    z = zeros if asym else scales  # a placeholder pointer when there are no zero points
    precision = "tf32" if (x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32) \
        else "ieee"
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), splits)
    _qmatmul_kernel[grid](
        x2, qweight, scales, z, bias if (bias is not None and splits == 1) else scales, y,
        M, N, K, Kp, k_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        z.stride(0), z.stride(1), y.stride(0), y.stride(1), y.stride(2),
        BITS=spec.bits, GROUP=group or 0, ASYM=asym, HAS_BIAS=bias is not None and splits == 1,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_FP32=x.dtype == torch.bfloat16 and _interpreting(), PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    if splits == 1:
        out = y[0]
    else:
        out = y.sum(0)
        if bias is not None:
            out = out + bias.float()
        out = out.to(x.dtype)
    return out.reshape(*lead, N)


def quant_linear(x: torch.Tensor, module, bias: torch.Tensor | None) -> torch.Tensor:
    """QuantLinear's forward through the kernel (bias already in x's dtype, or None)."""
    return quant_matmul(x, module.qweight, module.scales, module.zeros, module.spec, module.in_features, bias)
