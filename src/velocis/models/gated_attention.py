"""Gated full attention (MIXERS["gated_attention"]), as in Qwen3-Next: causal GQA attention plus
  * an output gate: q_proj gives every head [q (head_dim) | gate (head_dim)]; the attention output is
    multiplied by sigmoid(gate) before o_proj (a per-channel, input-dependent gate: it lets a head
    output nothing and removes the attention sink);
  * partial RoPE: only the first `partial_rotary_factor * head_dim` dims of q and k rotate (0.25 in
    Qwen3-Next), the rest carry no position;
  * RMSNorm on each head's q and k (config.qk_norm), as Qwen3.
Everything else (the KV cache, the attention back end, the engine's packed steps) is the attention
mixer's (models/attention.py). Names match transformers' Qwen3NextAttention. Qwen3-Next's norms
compute x * (1 + w); Velocis' RMSNorm computes x * w, so the importer stores 1 + w (interop/hf_qwen3_next.py).
"""
from __future__ import annotations

import math

import torch
from velocis.errors import VelocisError
from velocis.kernels.gemm import Linear
from velocis.models.attend import attend
from velocis.models.attention import Attention, KVCache
from velocis.models.positions import Positions
from velocis.models.registry import register_mixer
from velocis.models.rope import RotaryEmbedding, apply_rope


def rotary_dim(head_dim: int, factor: float) -> int:
    return int(head_dim * factor)


@register_mixer("gated_attention")
class GatedAttention(Attention):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.q_proj = Linear(config.hidden_dim, 2 * self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.rope_dim = rotary_dim(self.head_dim, config.partial_rotary_factor)
        if self.rope_dim % 2 or self.rope_dim == 0:
            raise VelocisError(f"invalid model config: partial_rotary_factor {config.partial_rotary_factor} x head_dim "
                               f"{self.head_dim} = {self.rope_dim} rotary dims; it must be a positive even number")
        self.rotary = RotaryEmbedding(self.rope_dim, config.rope_theta, config.rope_scaling)
        self.reset_parameters()  # again: q_proj is new

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_dim == self.head_dim:
            return apply_rope(x, cos, sin)
        return torch.cat([apply_rope(x[..., : self.rope_dim].contiguous(), cos, sin), x[..., self.rope_dim:]], dim=-1)

    def forward(self, x: torch.Tensor, pos: Positions, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, d = self.num_heads, self.head_dim
        pos = Positions.of(pos)
        q, gate = self.q_proj(x).view(B, T, H, 2 * d).chunk(2, dim=-1)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, d)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        cos, sin = self._rope(pos, q.dtype)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if getattr(cache, "packed", None) is not None:  # the engine's packed step: y is [1, N, heads, d]
            y = cache.attend_packed(q, k, v, 1.0 / math.sqrt(d)).reshape(B, T, H * d)
        else:
            if cache is not None:
                k, v = KVCache.update(cache, pos, k, v)
            y = attend(q, k, v, pos, cached=cache is not None).transpose(1, 2).reshape(B, T, H * d)
        return self.o_proj(y * torch.sigmoid(gate.reshape(B, T, H * d)))
