"""Causal self-attention (MIXERS["attention"]): MHA / GQA / MQA by num_kv_heads, RoPE, SDPA.

Parameter names match HF LlamaAttention / Qwen2Attention / Qwen3Attention (q_norm, k_norm), so
a checkpoint's tensors copy across by renaming the layer prefix only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from velocis.kernels import attention_cpu
from velocis.kernels.gemm import Linear
from velocis.models.layers import RMSNorm
from velocis.models.registry import register_mixer
from velocis.models.rope import RotaryEmbedding, apply_rope


class KVCache(nn.Module):
    """Static, preallocated per-layer cache (gpt-fast style): k/v [B, kv_heads, max_len, head_dim].

    Shapes never change during decoding, so the step can be compiled / captured in a CUDA graph;
    new entries are written at their absolute positions and a mask hides the unwritten tail.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, v_head_dim: int | None = None,
                 device=None, dtype=torch.float32):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        vshape = (batch_size, num_kv_heads, max_len, v_head_dim or head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(vshape, device=device, dtype=dtype), persistent=False)
        self.max_len = max_len

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kv_heads, T, d] at `positions` [T]; return the whole cache."""
        self.k.index_copy_(2, positions, k.to(self.k.dtype))
        self.v.index_copy_(2, positions, v.to(self.v.dtype))
        return self.k, self.v

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Bool [T, max_len]: query at position p sees cache slots 0..p (causal, hides the empty tail)."""
        slots = torch.arange(self.max_len, device=positions.device)
        return slots[None, :] <= positions[:, None]


@register_mixer("attention")
class Attention(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h, bias = config.hidden_dim, config.qkv_bias
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=False)
        # Qwen3: RMSNorm over each head's q and k before RoPE
        self.qk_norm = bool(getattr(config, "qk_norm", False))
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.rotary = RotaryEmbedding(self.head_dim, config.rope_theta, config.rope_scaling)
        self.reset_parameters(config.init_std, config.num_layers)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, num_layers: int = 1) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.o_proj.weight, std=std / math.sqrt(2 * num_layers))  # residual-branch output

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(batch_size, self.num_kv_heads, max_len, self.head_dim, device=device, dtype=dtype)

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        cos, sin = self.rotary(positions, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if cache is None and attention_cpu.supports(q, k, v):
            y = attention_cpu.causal_attention(q, k, v)  # CPU fp32: a third faster than SDPA's flash kernel
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = cache.update(positions, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask(positions), enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
