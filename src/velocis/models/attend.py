"""The attention back end: the one place that decides how softmax(q k^T * scale) v is computed.

Mixers (attention, MLA) project their queries, keys and values and call `attend`; which kernel
runs is chosen here from the inputs and `set_backend`:
  "cpu"   Velocis' C++ causal GQA kernel (kernels/attention_cpu.py): CPU fp32 training, plain causal
  "sdpa"  torch's scaled_dot_product_attention (flash / memory-efficient / math, chosen by torch)
  "auto"  the C++ kernel where it applies, SDPA elsewhere
Later back ends (paged KV, flash kernels on CUDA) plug in here without touching a mixer.
The inference engine's packed steps (infer/paged.py) use the three pieces below `attend`: causal
attention of a chunk over its own keys, of a chunk after cached slots, and of single decode
tokens batched over their sequences' slots.

Masks: without a cache a query sees the earlier tokens of its own chunk (of its own document when
rows are packed); with a cache k/v are cache slots and a query at position p sees slots 0..p (stale
slots past a row's length are never visible, which is what makes per-row rollback free).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from velocis.errors import VelocisError
from velocis.kernels import attention_cpu
from velocis.models.positions import Positions

BACKENDS = ("auto", "sdpa", "cpu")
_backend = "auto"


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise VelocisError(f"attention back end {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def _mask(pos: Positions, T: int, S: int, cached: bool, keep: torch.Tensor | None, device) -> torch.Tensor | None:
    """Bool mask broadcastable to [B, 1, T, S] (True = visible), or None for plain causal."""
    if cached:
        slots = torch.arange(S, device=device)
        mask = slots <= pos.ids[..., None]  # [T, S] or [B, T, S]
    elif pos.doc_ids is not None:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = causal & (pos.doc_ids[:, :, None] == pos.doc_ids[:, None, :])  # [B, T, T]
    elif keep is not None:
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    else:
        return None
    if keep is not None:
        mask = mask & keep
    return mask if mask.dim() == 2 else mask.unsqueeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions, *, cached: bool = False,
           scale: float | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, D], k [B, KV, S, D], v [B, KV, S, Dv] (H a multiple of KV) -> [B, H, T, Dv].

    cached=False: k/v are this chunk's tokens (S == T). cached=True: k/v are cache slots, of which
    only the first pos.kv_len are read. keep: an extra bool [B, T, S] (DeepSeek sparse attention's top-k).
    """
    if cached and pos.kv_len and pos.kv_len < k.shape[2]:
        k, v = k[:, :, :pos.kv_len], v[:, :, :pos.kv_len]
        keep = keep[..., :pos.kv_len] if keep is not None else None
    T, S = q.shape[2], k.shape[2]
    mask = _mask(pos, T, S, cached, keep, q.device)
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        # the C++ kernel takes fp32 CPU tensors with one head size; anything else runs SDPA
        if _backend != "sdpa" and attention_cpu.supports(q, k, v):
            return attention_cpu.causal_attention(q, k, v, scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if v.dtype != q.dtype or k.dtype != q.dtype:  # a cache kept in another dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention of a chunk over its own keys: q [B, H, T, D], k/v [B, KV, T, D]."""
    if _backend != "sdpa" and attention_cpu.supports(q, k, v):
        return attention_cpu.causal_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def attend_prefixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """A chunk at positions start.. over slots 0..start+T-1 (cached ones first): q [B, H, T, D],
    k/v [B, KV, S, D]; query j sees slots <= start + j."""
    T, S = q.shape[2], k.shape[2]
    mask = torch.arange(S, device=q.device) <= torch.arange(start, start + T, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per row over that row's first lens[r] slots: q [R, H, D], k/v [R, KV, S, D]
    (views: any strides with D contiguous, read in place) -> [R, H, D]. The C++ kernel on a CPU (it
    reads no slot past a row's length), else SDPA over the padded slots with -inf past each length."""
    if _backend != "sdpa" and attention_cpu.decode_supported(q, k, v):
        return attention_cpu.decode_attention(q, k, v, lens, scale)
    filled = torch.arange(k.shape[2], device=q.device) < lens[:, None]
    mask = torch.zeros(filled.shape, device=q.device).masked_fill_(~filled, float("-inf"))[:, None, None]
    y = F.scaled_dot_product_attention(q[:, :, None], k.to(q.dtype), v.to(q.dtype), attn_mask=mask.to(q.dtype),
                                       scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return y[:, :, 0]
