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
While the indexer trains, the layer returns its KL loss as the "indexer_kl" auxiliary family.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from velocis.errors import VelocisError
from velocis.kernels.gemm import Linear
from velocis.models.attend import attend
from velocis.models.cache import LayerCache
from velocis.models.dsa import Indexer, indexer_kl_loss
from velocis.models.layers import RMSNorm
from velocis.models.mixer import Mixer
from velocis.models.positions import Positions
from velocis.models.registry import register_aux_loss, register_mixer
from velocis.models.rope import RotaryEmbedding, apply_rope

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps

register_aux_loss("indexer_kl", "indexer_loss_coef")


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


class MLACache(LayerCache):
    """Static per-layer MLA cache: kv [B, max_len, kv_lora_rank + qk_rope_head_dim] = [c | k_pe]
    (latent after its norm, rotary key after RoPE); with DSA also index_k [B, max_len, index_head_dim]."""

    kind = "latent"
    slot_dims = {"kv": 1, "index_k": 1}

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int, index_dim: int = 0,
                 device=None, dtype=torch.float32):
        super().__init__(max_len)
        self.kv_lora_rank = kv_lora_rank
        self.register_buffer("kv", torch.zeros(batch_size, max_len, kv_lora_rank + rope_dim, device=device,
                                               dtype=dtype), persistent=False)
        self.register_buffer("index_k", torch.zeros(batch_size, max_len, index_dim, device=device, dtype=dtype)
                             if index_dim else None, persistent=False)

    @staticmethod
    def update(cache: LayerCache, pos: Positions, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Write latent [B, T, r] and k_pe [B, T, rope] at the chunk's positions; return the filled slots."""
        cache.write("kv", pos.ids, torch.cat([latent, k_pe], dim=-1))
        return cache.read("kv", pos.kv_len)


@register_mixer("mla")
class MLA(Mixer):
    cache_kind = "latent"
    # with a cache, chunks of at least this many tokens expand the latents (temporarily) instead of
    # the absorbed form: compute break-even is T ~ r*(nope+v) / (2r - nope - v) = 171 for V3
    expand_min_tokens = 128

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.init_std, self.num_layers = config.init_std, config.num_layers
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
        self.indexer = None
        if config.index_num_heads:
            if not self.q_lora_rank:
                raise VelocisError("invalid model config: DeepSeek sparse attention (index_num_heads > 0) reads the "
                                   "query latent, so it needs q_lora_rank; set q_lora_rank or index_num_heads=0")
            self.indexer = Indexer(config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name in ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=self.init_std)
        nn.init.normal_(self.o_proj.weight, std=self.init_std / math.sqrt(2 * self.num_layers))

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> MLACache:
        index_dim = self.indexer.head_dim if self.indexer is not None else 0
        return MLACache(batch_size, max_len, self.kv_lora_rank, self.rope, index_dim, device=device, dtype=dtype)

    def cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        n = self.kv_lora_rank + self.rope + (self.indexer.head_dim if self.indexer is not None else 0)
        return n * dtype_bytes

    # ------------------------------------------------------------------
    def _project(self, x: torch.Tensor, ids: torch.Tensor):
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
        cos, sin = self.rotary(ids, q.dtype)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # [B, T, rope]
        return q_nope, q_pe, latent, k_pe, q_lat, (cos, sin)

    def forward(self, x: torch.Tensor, pos: Positions, cache: MLACache | None = None):
        B, T, _ = x.shape
        pos = Positions.of(pos)
        q_nope, q_pe, latent, k_pe, q_lat, rope = self._project(x, pos.ids)
        aux = {}
        if cache is None:
            y, kl = self._expanded(x, q_nope, q_pe, latent, k_pe, q_lat, pos, rope)
            if kl is not None:
                aux["indexer_kl"] = kl
        else:
            y = self._cached(x, q_nope, q_pe, latent, k_pe, q_lat, pos, rope, cache)
        out = self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))
        return (out, aux) if aux else out

    def _expand_kv(self, latent: torch.Tensor, k_pe: torch.Tensor):
        """Latents [B, S, r] and rotary keys [B, S, rope] -> per-head k [B, H, S, nope+rope], v [B, H, S, v]."""
        B, S, _ = latent.shape
        H = self.num_heads
        kv = self.kv_b_proj(latent).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        return torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, H, S, self.rope)], dim=-1), v

    def _expanded(self, x, q_nope, q_pe, latent, k_pe, q_lat, pos, rope):
        """Training / full recompute: expand the latents to per-head K/V, causal attention.
        -> ([B, H, T, v], the indexer's KL loss while it trains, else None)."""
        T = latent.shape[1]
        k, v = self._expand_kv(latent, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        keep = None
        idx = self.indexer
        training_indexer = self.training and idx is not None and idx.train_mode is not None
        if idx is not None and T > idx.topk and not (training_indexer and idx.train_mode == "warmup"):
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            keep = idx.select(x, q_lat, idx.keys(x, *rope), causal, rope) & causal  # [B, T, T]
        kl = self._indexer_loss(x, q, k, q_lat, keep, rope) if training_indexer else None
        return attend(q, k, v, pos, scale=self.scaling, keep=keep), kl

    def _indexer_loss(self, x, q, k, q_lat, keep, rope) -> torch.Tensor:
        """DeepSeek-V3.2's indexer objective (velocis.models.dsa): KL from the main attention (summed over
        heads, detached) to softmax of the index scores, over the visible tokens ("warmup": attention
        stays dense) or the selected ones ("sparse"). The indexer reads detached inputs, so this loss
        trains the indexer only."""
        T = x.shape[1]
        visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() if keep is None else keep
        with torch.no_grad():
            att = (q @ k.transpose(-1, -2)).float() * self.scaling
            m = visible if visible.dim() == 2 else visible.unsqueeze(1)
            probs = torch.softmax(att.masked_fill(~m, float("-inf")), dim=-1)
        xd, qd = x.detach(), q_lat.detach()
        scores = self.indexer.scores(xd, qd, self.indexer.keys(xd, *rope), rope)
        return indexer_kl_loss(scores, probs, visible)

    def _cached(self, x, q_nope, q_pe, latent, k_pe, q_lat, pos, rope, cache: MLACache) -> torch.Tensor:
        """With a cache: write [c | k_pe], then attend over the cache. -> [B, H, T, v].

        Short chunks (decode steps, speculative verification) use the absorbed form: W_UK folded
        into the query, W_UV into the output, scores taken against the latents directly (MQA over
        [c | k_pe] with one shared "head" of width kv_lora_rank + rope). Per (head, query, key) that
        costs (r + rope) + r multiply-adds against (nope + rope) + v for expanded keys/values, so a
        long chunk (T >= expand_min_tokens, e.g. a prompt) instead expands the visible latents once,
        temporarily; the cache itself always stays compressed."""
        B, T, _ = latent.shape
        H, r = self.num_heads, self.kv_lora_rank
        kv = MLACache.update(cache, pos, latent, k_pe)  # [B, L, r + rope], the filled slots
        keep = None
        if self.indexer is not None:
            cache.write("index_k", pos.ids, self.indexer.keys(x, *rope))
            if pos.kv_len > self.indexer.topk:  # some query sees more than top-k tokens
                visible = torch.arange(pos.kv_len, device=x.device) <= pos.ids[..., None]  # [T, L] or [B, T, L]
                keep = self.indexer.select(x, q_lat, cache.read("index_k", pos.kv_len), visible, rope)  # [B, T, L]
        if T >= self.expand_min_tokens:
            kv = kv.to(q_nope.dtype)
            k, v = self._expand_kv(kv[..., :r], kv[..., r:])
            return attend(torch.cat([q_nope, q_pe], dim=-1), k, v, pos, cached=True, scale=self.scaling, keep=keep)
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, r)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # [H, nope, r], [H, v, r]
        q_abs = torch.cat([torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk), q_pe], dim=-1)  # query in latent space
        kv = kv.to(q_abs.dtype).unsqueeze(1)  # one shared "head": [B, 1, L, r + rope]
        o_lat = attend(q_abs, kv, kv[..., :r], pos, cached=True, scale=self.scaling, keep=keep)  # attn @ c
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)
