"""Rotary position embedding (RoPE) with the context-extension schemes HF checkpoints use.

Layout: the rotate_half ("non-interleaved") convention of HF Llama — a head vector's first half
pairs with its second half — so HF q/k weights load without any permutation.

`config.rope_scaling` (None = plain RoPE) is {"type": ..., "factor": f, ...}:
  linear   positions / f (position interpolation)
  ntk      static NTK-aware: theta * f ** (d / (d - 2))
  dynamic  dynamic NTK: theta grows with the current length once it passes original_max_seq_len
  yarn     YaRN: per-frequency blend of interpolation and extrapolation + attention_factor on cos/sin
  llama3   Llama 3.1's wavelength-banded interpolation
Each follows transformers' `modeling_rope_utils` so an HF config with rope_scaling imports exactly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from velocis.kernels.rope import apply_rope_halves


def _base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(dim: int, theta: float, scaling: dict | None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2], attention factor applied to cos/sin)."""
    if not scaling:
        return _base_inv_freq(dim, theta), 1.0
    kind, factor = scaling["type"], float(scaling.get("factor", 1.0))
    orig = scaling.get("original_max_seq_len")
    if kind == "linear":
        return _base_inv_freq(dim, theta) / factor, 1.0
    if kind == "ntk":
        return _base_inv_freq(dim, theta * factor ** (dim / (dim - 2))), 1.0
    if kind == "dynamic":
        seq_len = max(seq_len or orig, orig)
        base = theta * ((factor * seq_len / orig) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(dim, base), 1.0
    if kind == "llama3":
        inv_freq = _base_inv_freq(dim, theta)
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        low_wavelen, high_wavelen = orig / low, orig / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, factor, orig, scaling)
    raise ValueError(f"unknown rope scaling type {kind!r}")


def _yarn(dim: int, theta: float, factor: float, orig: int, s: dict) -> tuple[torch.Tensor, float]:
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = get_mscale(factor, m) / get_mscale(factor, m_all) if m and m_all else get_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `orig`
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """positions [T] -> (cos, sin) [T, dim]; per-row positions [B, T] -> [B, 1, T, dim] (broadcasting
    over heads); the scaling's attention factor folded in."""

    def __init__(self, dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        inv_freq, self.attention_scaling = rope_inv_freq(dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dynamic = bool(scaling) and scaling["type"] == "dynamic"

    def _apply(self, fn, recurse=True):
        # inv_freq stays fp32 whatever dtype the model is cast to (bf16 frequencies blur far positions)
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = torch.empty_like(self.inv_freq, dtype=torch.float32)
            if not self.inv_freq.is_meta:
                self.init_buffers()
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute inv_freq in place (after building on the meta device and `to_empty`)."""
        self.inv_freq.copy_(rope_inv_freq(self.dim, self.theta, self.scaling)[0])

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.dynamic:  # frequencies depend on the current length (as in HF, from a fresh state)
            seq_len = int(positions.max()) + 1
            if seq_len > self.scaling["original_max_seq_len"]:
                inv_freq = rope_inv_freq(self.dim, self.theta, self.scaling, seq_len)[0].to(positions.device)
        freqs = positions.float()[..., None] * inv_freq.float()  # fp32: positions can be large
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb.unsqueeze(1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, dim]; cos/sin [T, dim]."""
    return x * cos + rotate_half(x) * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, dim]; cos/sin [T, dim] from RotaryEmbedding. Same result as the reference,
    computed by kernels/rope.py (half-width tables, no rotate_half copy, hand-written backward)."""
    return apply_rope_halves(x, cos, sin)
