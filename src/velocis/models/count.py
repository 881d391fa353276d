"""Parameter and KV-cache accounting, on the meta device (a 600B preset costs no memory)."""
from __future__ import annotations

from collections import OrderedDict

import torch

from velocis.config import ModelConfig
from velocis.models.decoder import VelocisModel


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _active(part) -> int:
    """Parameters one token uses: a sparse part says so (active_params(), e.g. MoE's top-k); else all."""
    if hasattr(part, "active_params"):
        return int(part.active_params())
    return _n(part)


def count_params(config: ModelConfig) -> dict:
    """{"parts": {name: count}, "total", "active" (per token), "kv_cache_bytes_per_token" (bf16),
    "cache_bytes_per_sequence" (fixed-size states), "kv_cache_bytes_context" (one full-context sequence)}. A tied embedding/head is counted once (under "embedding")."""
    with torch.device("meta"):
        model = VelocisModel(config)
    parts: "OrderedDict[str, int]" = OrderedDict()
    active = 0
    parts["embedding"] = _n(model.embed_tokens)
    for block in model.layers:
        for name, part in ((block.mixer_name, block.mixer), (block.feed_forward_name, block.feed_forward)):
            if part is None:  # a mixer-only layer (feed-forward "none")
                continue
            parts[name] = parts.get(name, 0) + _n(part)
            active += _active(part)
    parts["norms"] = _n(model.norm) + sum(_n(b.mixer_norm) + _n(b.ff_norm) for b in model.layers)
    parts["head"] = 0 if config.tie_embeddings else _n(model.lm_head)
    if model.mtp is not None:
        parts["mtp"] = _n(model.mtp)
    total = model.num_params()
    assert total == sum(parts.values()), (total, parts)
    # a token looks up one embedding row; the head (a matmul) is counted in full
    active += parts["norms"] + _n(model.lm_head)
    kv, per_seq = model.cache_bytes(2)
    return {"parts": dict(parts), "total": total, "active": active, "kv_cache_bytes_per_token": kv,
            "cache_bytes_per_sequence": per_seq, "kv_cache_bytes_context": kv * config.max_seq_len + per_seq}


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"
