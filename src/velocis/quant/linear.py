"""Quantized modules: the plain-PyTorch reference that faster kernels are held to.

    Int8Linear(in_features, out_features, bias=False, group_size=None)             # per channel or per group
    Int4Linear(in_features, out_features, bias=False, group_size=32, symmetric=False)
    QuantExperts(num_experts, hidden_dim, inner_dim, spec)                          # MoE routed experts, stacked

Each has the stored tensors of velocis.quant.formats (qweight, scales, zeros) as buffers, so its
state dict is the checkpoint's layout, plus the float bias (a parameter) if it has one.

Reference semantics (the contract a kernel must meet):

    Int8Linear / Int4Linear:  y = F.linear(x, self.dequantize(x.dtype), bias)
    QuantExperts:             moe.dispatch(x, w, idx, gate_up.dequantize(x.dtype), down.dequantize(x.dtype))

where dequantize() computes scale * (code - zero) in fp32 and casts once to the compute dtype.
Weight-only: activations are never quantized, so no integer matmul of torch's is exact here
(torch._int_mm multiplies int8 by int8); the reference dequantizes, and costs a dequantization of
the whole weight per call: speed is the kernels' job, not this module's. On CUDA, QuantLinear
runs velocis.quant.triton_matmul's kernel instead (held to this reference; inference only, since
it has no backward), unless VELOCIS_TRITON=0 or triton is missing. On a CPU, inference (no
gradient) on a few rows runs velocis.kernels.decode_cpu's weight-only kernels (the same arithmetic
without dequantizing the whole weight; see decode_cpu.quant_linear). The batch-1 decode plan goes
further and quantizes activations to int8 per 32 values, as llama.cpp does.

`.weight` is the dequantized weight in the module's compute dtype (the model's float dtype; it
follows `model.to(dtype)`): code that reads a projection's weight directly (MLA's absorbed decode
reads kv_b_proj.weight) runs unchanged. The scales stay float16 whatever `.to(dtype)` asks: they
are part of the format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from velocis.errors import VelocisError
from velocis.models.moe import Experts, dispatch
from velocis.quant.formats import SCALE_DTYPE, QSpec, QTensor, dequantize, quantize_rtn, stored_shapes


class QuantWeight(nn.Module):
    """A quantized weight [*lead, out, in]: buffers qweight, scales (float16), zeros (asymmetric int4)."""

    def __init__(self, out_features: int, in_features: int, spec: QSpec, lead: tuple[int, ...] = (),
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.spec, self.lead = in_features, out_features, spec, tuple(lead)
        self.compute_dtype = dtype or torch.float32
        shapes = stored_shapes(out_features, in_features, spec, self.lead)
        for name in ("qweight", "scales", "zeros"):
            if name in shapes:
                shape, dt = shapes[name]
                self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
            else:
                self.register_buffer(name, None)

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int | None:
        return self.spec.group_size

    @torch.no_grad()
    def set_quantized(self, qt: QTensor) -> None:
        """Take the stored tensors of `qt` (shapes must match this module's)."""
        for name, t in qt.tensors().items():
            mine = getattr(self, name)
            if tuple(mine.shape) != tuple(t.shape) or mine.dtype != t.dtype:
                raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected {tuple(mine.shape)} {mine.dtype}")
            setattr(self, name, t.to(mine.device))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [*lead, out, in] as the stored codes say: scale * (code - zero), in `dtype`
        (default: the compute dtype)."""
        return dequantize(self.qweight, self.scales, self.zeros, self.spec, self.in_features,
                          dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def _apply(self, fn, recurse=True):
        """Device moves apply to every tensor; a dtype change moves only the compute dtype (and the
        float bias): codes are integers and the scales stay float16, as stored."""
        scales = self._buffers.get("scales")
        if scales is not None:
            self._buffers["scales"] = None
        super()._apply(fn, recurse)
        if scales is not None:
            moved = fn(scales)
            self._buffers["scales"] = moved if moved.dtype == SCALE_DTYPE else scales.to(moved.device)
        probe = fn(torch.zeros((), dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def extra_repr(self) -> str:
        lead = f"{self.lead[0]} x " if self.lead else ""
        return f"{lead}in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}"


class QuantLinear(QuantWeight):
    """Same forward contract as nn.Linear: x [..., in] -> [..., out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, spec: QSpec, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__(out_features, in_features, spec, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        if x.is_cuda and not _needs_grad(x, b):  # the GPU kernel (inference only; VELOCIS_TRITON=0 turns it off)
            from velocis.quant import triton_matmul

            if triton_matmul.enabled() and triton_matmul.supports(x):
                return triton_matmul.quant_linear(x, self, b)
        if x.device.type == "cpu" and not _needs_grad(x, b):  # a few rows: the C++ decode kernels
            from velocis.kernels import decode_cpu

            y = decode_cpu.quant_linear(x, self, b)
            if y is not None:
                return y
        return F.linear(x, self.dequantize(x.dtype), b)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, spec: QSpec, qt: QTensor | None = None) -> "QuantLinear":
        """A quantized copy of `linear` (round-to-nearest unless the codes `qt` are given, e.g. GPTQ's)."""
        w = linear.weight
        m = make_linear(linear.in_features, linear.out_features, linear.bias is not None, spec, w.device, w.dtype)
        m.set_quantized(qt if qt is not None else quantize_rtn(w, spec))
        if linear.bias is not None:
            m.bias.copy_(linear.bias)
        return m


def _needs_grad(x: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Autograd would record this call (the Triton kernel has no backward)."""
    return torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad))


class Int8Linear(QuantLinear):
    """int8 symmetric weights, per output channel (group_size None) or per group of input columns."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, spec=QSpec(8, group_size, True), device=device, dtype=dtype)


class Int4Linear(QuantLinear):
    """int4 weights per group of input columns, asymmetric (zero points) or symmetric; two per byte."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 symmetric: bool = False, device=None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, spec=QSpec(4, group_size, symmetric), device=device,
                         dtype=dtype)


def make_linear(in_features: int, out_features: int, bias: bool, spec: QSpec, device=None, dtype=None) -> QuantLinear:
    if spec.bits == 8:
        return Int8Linear(in_features, out_features, bias, spec.group_size, device=device, dtype=dtype)
    return Int4Linear(in_features, out_features, bias, spec.group_size, spec.symmetric, device=device, dtype=dtype)


class QuantExperts(nn.Module):
    """velocis.models.moe.Experts with quantized stacks: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    (each a QuantWeight with a leading expert dimension; the checkpoint names are
    `...experts.gate_up_proj.qweight` etc.). Same forward contract as Experts."""

    def __init__(self, num_experts: int, hidden_dim: int, inner_dim: int, spec: QSpec, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.gate_up_proj = QuantWeight(2 * inner_dim, hidden_dim, spec, (num_experts,), device, dtype)
        self.down_proj = QuantWeight(hidden_dim, inner_dim, spec, (num_experts,), device, dtype)

    def forward(self, x, weights, indices, capacity=None, impl="auto"):
        dt = x.dtype
        return dispatch(x, weights, indices, self.gate_up_proj.dequantize(dt), self.down_proj.dequantize(dt),
                        capacity=capacity, impl=impl)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: nn.Module, spec: QSpec, gate_up: QTensor | None = None,
                     down: QTensor | None = None) -> "QuantExperts":
        gu, dn = experts.gate_up_proj, experts.down_proj
        m = cls(gu.shape[0], gu.shape[2], dn.shape[2], spec, device=gu.device, dtype=gu.dtype)
        m.gate_up_proj.set_quantized(gate_up if gate_up is not None else quantize_rtn(gu, spec))
        m.down_proj.set_quantized(down if down is not None else quantize_rtn(dn, spec))
        return m


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_module(model: nn.Module, name: str, spec: QSpec, qts=None) -> nn.Module:
    """Swap module `name` for its quantized copy (codes `qts` if given: one QTensor for a Linear,
    (gate_up, down) for experts; else round-to-nearest). Returns the new module."""
    m = model.get_submodule(name)
    if isinstance(m, nn.Linear):
        new = QuantLinear.from_linear(m, spec, qts)
    elif isinstance(m, Experts):
        gu, dn = qts if qts is not None else (None, None)
        new = QuantExperts.from_experts(m, spec, gu, dn)
    else:
        raise VelocisError(f"module {name!r} is a {type(m).__name__}: only Linear and MoE experts are quantized")
    set_module(model, name, new)
    return new
