"""Multi-head latent attention (MIXERS["mla"]), as in DeepSeek-V2 / V3.

Projections (names match transformers' DeepseekV3Attention, so HF tensors copy across):
  query     q_lora_rank set:  q = q_b_proj(q_a_layernorm(q_a_proj(x)))      (low-rank query)
            q_lora_rank None: q = q_proj(x)                                 (full rank)
            per head: q = [q_nope (qk_nope_head_dim) | q_pe (qk_rope_head_dim)]
  key/value kv_a_proj_with_mqa(x) = [c (kv_lora_rank) | k_pe (qk_rope_head_dim)]
            c = kv_a_layernorm(c)          the joint compressed KV latent
            k_pe: one rotary key shared by all heads (decoupled RoPE)
            kv_b_proj(c) = per head [k_nope (qk_nope_head_dim) | v (v_head_dim)]
  output    o_proj(concat_h attn_h)
  score     (q_nope . k_nope + q_pe . k_pe) * softmax_scale, softmax_scale = (nope+rope)^-0.5, times
            yarn_mscale(factor, mscale_all_dim)^2 when rope_scaling is YaRN with mscale_all_dim.

Two equivalent ways to compute it:
  * expanded (training, cache=None): kv_b_proj turns every latent into per-head keys/values, then
    ordinary causal SDPA.
  * absorbed (decoding, with a cache): the cache holds only [c | k_pe] per token
    (kv_lora_rank + qk_rope_head_dim numbers, no head dimension). W_UK (the k_nope rows of kv_b_proj)
    is folded into the query: q_lat = q_nope @ W_UK, score = q_lat . c + q_pe . k_pe; W_UV into the
    output: out = (attn @ c) @ W_UV^T. The cache is never expanded to per-head keys/values.

RoPE: Velocis uses the rotate-half layout. DeepSeek checkpoints rotate interleaved pairs
(transformers' rope_interleave=True); the importer permutes the rope rows of q_b_proj / q_proj and
kv_a_proj_with_mqa (evens first, then odds), which gives the same scores (see interop/hf_deepseek.py).

DeepSeek Sparse Attention (V3.2): with config.index_num_heads > 0 the layer owns a lightning
indexer (velocis.models.dsa.Indexer) that keeps, per query, the index_topk best-scored past tokens.
While a query has <= index_topk visible tokens every token is kept, i.e. attention is exactly dense.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from velocis.errors import VelocisError
from velocis.kernels.gemm import Linear
from velocis.models.layers import RMSNorm
from velocis.models.registry import register_mixer
from velocis.models.rope import RotaryEmbedding, apply_rope

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(config) -> float:
    """(qk_nope + qk_rope)^-0.5, times yarn_mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V3)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rs = config.rope_scaling or {}
    if rs.get("type") == "yarn" and rs.get("mscale_all_dim"):
        m = yarn_mscale(float(rs.get("factor", 1.0)), float(rs["mscale_all_dim"]))
        scale = scale * m * m
    return scale


class MLACache(nn.Module):
    """Static per-layer MLA cache: kv [B, max_len, kv_lora_rank + qk_rope_head_dim] = [c | k_pe]
    (latent after its norm, rotary key after RoPE); with DSA also index_k [B, max_len, index_head_dim]."""

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int, index_dim: int = 0,
                 device=None, dtype=torch.float32):
        super().__init__()
        self.kv_lora_rank, self.max_len = kv_lora_rank, max_len
        self.register_buffer("kv", torch.zeros(batch_size, max_len, kv_lora_rank + rope_dim, device=device,
                                               dtype=dtype), persistent=False)
        self.register_buffer("index_k", torch.zeros(batch_size, max_len, index_dim, device=device, dtype=dtype)
                             if index_dim else None, persistent=False)

    def update(self, positions: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Write latent [B, T, r] and k_pe [B, T, rope] at positions [T]; return the whole kv buffer."""
        self.kv.index_copy_(1, positions, torch.cat([latent, k_pe], dim=-1).to(self.kv.dtype))
        return self.kv

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Bool [T, max_len]: query at position p sees slots 0..p."""
        slots = torch.arange(self.max_len, device=positions.device)
        return slots[None, :] <= positions[:, None]


def mla_cache_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """Bytes one MLA layer caches per token: the latent + rotary key (+ the DSA indexer key)."""
    n = config.kv_lora_rank + config.qk_rope_head_dim
    if getattr(config, "index_num_heads", 0):
        n += config.index_head_dim
    return n * dtype_bytes


@register_mixer("mla")
class MLA(nn.Module):
    # with a cache, chunks of at least this many tokens expand the latents (temporarily) instead of
    # the absorbed form: compute break-even is T ~ r*(nope+v) / (2r - nope - v) = 171 for V3
    expand_min_tokens = 128

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        h = config.hidden_dim
        self.num_heads = H = config.num_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.qk_dim = self.nope + self.rope
        if self.rope % 2:
            raise VelocisError(f"invalid model config: qk_rope_head_dim {self.rope} must be even")
        if self.q_lora_rank:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        else:
            self.q_proj = Linear(h, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, h, bias=False)
        self.rotary = RotaryEmbedding(self.rope, config.rope_theta, config.rope_scaling)
        self.scaling = mla_softmax_scale(config)
        self.last_aux_loss = None  # the indexer's KL loss while it trains (see _indexer_loss)
        self.indexer = None
        if getattr(config, "index_num_heads", 0):
            from velocis.models.dsa import Indexer

            if not self.q_lora_rank:
                raise VelocisError("invalid model config: DeepSeek sparse attention (index_num_heads > 0) reads the "
                                   "query latent, so it needs q_lora_rank; set q_lora_rank or index_num_heads=0")
            self.indexer = Indexer(config)
        self.reset_parameters(config.init_std, config.num_layers)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, num_layers: int = 1) -> None:
        for name in ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=std / math.sqrt(2 * num_layers))
        if self.indexer is not None:
            self.indexer.reset_parameters(std)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> MLACache:
        index_dim = self.indexer.head_dim if self.indexer is not None else 0
        return MLACache(batch_size, max_len, self.kv_lora_rank, self.rope, index_dim, device=device, dtype=dtype)

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        n = self.kv_lora_rank + self.rope + (self.indexer.head_dim if self.indexer is not None else 0)
        return n * dtype_bytes

    # ------------------------------------------------------------------
    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        q_lat = None
        if self.q_lora_rank:
            q_lat = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_lat)
        else:
            q = self.q_proj(x)
        q = q.view(B, T, self.num_heads, self.qk_dim).transpose(1, 2)  # [B, H, T, nope+rope]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, r]
        cos, sin = self.rotary(positions, q.dtype)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # [B, T, rope]
        return q_nope, q_pe, latent, k_pe, q_lat, (cos, sin)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: MLACache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_pe, latent, k_pe, q_lat, rope = self._project(x, positions)
        if cache is None:
            y = self._expanded(x, q_nope, q_pe, latent, k_pe, q_lat, positions, rope)
        else:
            y = self._absorbed(x, q_nope, q_pe, latent, k_pe, q_lat, positions, rope, cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))

    def _expanded(self, x, q_nope, q_pe, latent, k_pe, q_lat, positions, rope) -> torch.Tensor:
        """Training / full recompute: expand the latents to per-head K/V, causal SDPA. -> [B, H, T, v]."""
        B, T, _ = latent.shape
        H = self.num_heads
        kv = self.kv_b_proj(latent).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, H, T, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        keep = None
        idx = self.indexer
        training_indexer = self.training and idx is not None and idx.train_mode is not None
        if idx is not None and T > idx.topk and not (training_indexer and idx.train_mode == "warmup"):
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            keep = idx.select(x, q_lat, idx.keys(x, *rope), causal, rope) & causal  # [B, T, T]
        self.last_aux_loss = None
        if training_indexer:
            self.last_aux_loss = self._indexer_loss(x, q, k, q_lat, keep, rope)
        if keep is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep.unsqueeze(1), scale=self.scaling)

    def _indexer_loss(self, x, q, k, q_lat, keep, rope) -> torch.Tensor:
        """DeepSeek-V3.2's indexer objective (velocis.models.dsa): KL from the main attention (summed over
        heads, detached) to softmax of the index scores, over the visible tokens ("warmup": attention
        stays dense) or the selected ones ("sparse"). The indexer reads detached inputs, so this loss
        trains the indexer only."""
        from velocis.models.dsa import indexer_kl_loss

        T = x.shape[1]
        visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() if keep is None else keep
        with torch.no_grad():
            att = (q @ k.transpose(-1, -2)).float() * self.scaling
            m = visible if visible.dim() == 2 else visible.unsqueeze(1)
            probs = torch.softmax(att.masked_fill(~m, float("-inf")), dim=-1)
        xd, qd = x.detach(), q_lat.detach()
        scores = self.indexer.scores(xd, qd, self.indexer.keys(xd, *rope), rope)
        loss = indexer_kl_loss(scores, probs, visible)
        self.indexer.last_kl = loss.detach()
        return loss

    def _absorbed(self, x, q_nope, q_pe, latent, k_pe, q_lat, positions, rope, cache: MLACache) -> torch.Tensor:
        """With a cache: write [c | k_pe], then attend over the cache. -> [B, H, T, v].

        Short chunks (decode steps, speculative verification) use the absorbed form: W_UK folded
        into the query, W_UV into the output, scores taken against the latents directly (MQA over
        [c | k_pe] with one shared "head" of width kv_lora_rank + rope). Per (head, query, key) that
        costs (r + rope) + r multiply-adds against (nope + rope) + v for expanded keys/values, so a
        long chunk (T >= expand_min_tokens, e.g. a prompt) instead expands the visible latents once,
        temporarily, and runs SDPA; the cache itself always stays compressed."""
        B, T, _ = latent.shape
        H, r = self.num_heads, self.kv_lora_rank
        kv = cache.update(positions, latent, k_pe)  # [B, L, r + rope]
        L = kv.shape[1]
        mask = cache.mask(positions)  # [T, L]
        if self.indexer is not None:
            cache.index_k.index_copy_(1, positions, self.indexer.keys(x, *rope).to(cache.index_k.dtype))
            if int(positions[-1]) + 1 > self.indexer.topk:  # some query sees more than top-k tokens
                keep = self.indexer.select(x, q_lat, cache.index_k, mask, rope)  # [B, T, L]
                mask = mask & keep
        mask = mask if mask.dim() == 2 else mask.unsqueeze(1)  # [T, L] or [B, 1, T, L]
        if T >= self.expand_min_tokens:
            end = int(positions[-1]) + 1  # slots past the chunk are invisible to all its queries
            kv = kv[:, :end].to(q_nope.dtype)
            kvx = self.kv_b_proj(kv[..., :r]).view(B, end, H, self.nope + self.v_dim).transpose(1, 2)
            k_nope, v = kvx.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, kv[:, None, :, r:].expand(B, H, end, self.rope)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[..., :end], scale=self.scaling)
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, r)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # [H, nope, r], [H, v, r]
        q_lat_k = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # query in latent space
        q_abs = torch.cat([q_lat_k, q_pe], dim=-1).reshape(B, H * T, r + self.rope)
        kv = kv.to(q_abs.dtype)
        scores = torch.bmm(q_abs, kv.transpose(1, 2)).view(B, H, T, L) * self.scaling
        scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(q_abs.dtype)
        o_lat = torch.bmm(p.view(B, H * T, L), kv[..., :r]).view(B, H, T, r)  # attn @ c
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)
