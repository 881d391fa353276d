"""Causal self-attention (MIXERS["attention"]): MHA / GQA / MQA by num_kv_heads, RoPE.

Parameter names match HF LlamaAttention / Qwen2Attention / Qwen3Attention (q_norm, k_norm), so
a checkpoint's tensors copy across by renaming the layer prefix only. The attention itself runs
in the back end (models/attend.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from velocis.kernels.gemm import Linear
from velocis.models.attend import attend
from velocis.models.cache import LayerCache
from velocis.models.layers import RMSNorm
from velocis.models.mixer import Mixer
from velocis.models.positions import Positions
from velocis.models.registry import register_mixer
from velocis.models.rope import RotaryEmbedding, apply_rope


class KVCache(LayerCache):
    """Static, preallocated per-layer cache (gpt-fast style): k/v [B, kv_heads, max_len, head_dim].

    Shapes never change during decoding, so the step can be compiled / captured in a CUDA graph;
    each row's new entries are written at that row's positions.
    """

    kind = "kv"
    slot_dims = {"k": 2, "v": 2}

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, v_head_dim: int | None = None,
                 device=None, dtype=torch.float32):
        super().__init__(max_len)
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        vshape = (batch_size, num_kv_heads, max_len, v_head_dim or head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(vshape, device=device, dtype=dtype), persistent=False)

    @staticmethod
    def update(cache: LayerCache, pos: Positions, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kv_heads, T, d] at the chunk's positions; return the filled slots of every row."""
        cache.write("k", pos.ids, k)
        cache.write("v", pos.ids, v)
        return cache.read("k", pos.kv_len), cache.read("v", pos.kv_len)


@register_mixer("attention")
class Attention(Mixer):
    cache_kind = "kv"
    packed_attention = True  # takes the inference engine's packed steps (infer/paged.py)

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.init_std, self.num_layers = config.init_std, config.num_layers
        h, bias = config.hidden_dim, config.qkv_bias
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=False)
        # Qwen3: RMSNorm over each head's q and k before RoPE
        self.qk_norm = bool(config.qk_norm)
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.rotary = RotaryEmbedding(self.head_dim, config.rope_theta, config.rope_scaling)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=self.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        # residual-branch output: scaled so the residual stream's variance does not grow with depth
        nn.init.normal_(self.o_proj.weight, std=self.init_std / math.sqrt(2 * self.num_layers))

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(batch_size, self.num_kv_heads, max_len, self.head_dim, device=device, dtype=dtype)

    def cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def _rope(self, pos: Positions, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the forward's positions. In inference the first layer computes them and the
        others reuse them (kept on the forward's Positions): per layer they cost as much as a decode
        step's attention."""
        if torch.is_grad_enabled():
            return self.rotary(pos.ids, dtype)
        r = self.rotary
        key = (r.dim, r.theta, repr(r.scaling), dtype)
        memo = pos.__dict__.setdefault("rope_tables", {})
        if key not in memo:
            memo[key] = r(pos.ids, dtype)
        return memo[key]

    def forward(self, x: torch.Tensor, pos: Positions, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        pos = Positions.of(pos)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        cos, sin = self._rope(pos, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if getattr(cache, "packed", None) is not None:  # the engine's packed step: y is [1, N, heads, d]
            y = cache.attend_packed(q, k, v, 1.0 / math.sqrt(self.head_dim))
            return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim))
        if cache is not None:
            k, v = KVCache.update(cache, pos, k, v)
        y = attend(q, k, v, pos, cached=cache is not None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
