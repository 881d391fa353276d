"""Velocis models: one decoder class whose blocks are a token *mixer* + a *feed-forward*.

    from velocis.models import VelocisModel
    model = VelocisModel(config)
    logits = model(input_ids)                              # [B, T, vocab]
    out = model(input_ids, targets)                        # ModelOutput: loss, lm_loss, aux_losses, stats
    cache = model.new_cache(batch_size, max_len)           # caller-owned, per-row lengths
    logits = model(prompt_ids, cache=cache); logits = model(next_ids, cache=cache)

Parts live in registries (registry.py) and are built as ``Part(config, layer_idx)``; each part
module registers itself when imported here. The contracts (forward, output, positions, caches,
mixers, the attention back end) are in docs/INTERFACES.md.
"""
from __future__ import annotations

# Part modules register themselves on import: every mixer and feed-forward is listed here.
from velocis.models import attention, layers, mla, moe  # noqa: F401
from velocis.models import mamba2  # noqa: F401
from velocis.models import deltanet, gated_attention  # noqa: F401  (Qwen3-Next: Gated DeltaNet, gated attention)
from velocis.models.block import Block
from velocis.models.cache import Cache
from velocis.models.decoder import VelocisModel
from velocis.models.output import ModelOutput
from velocis.models.positions import Positions
from velocis.models.registry import AUX_LOSSES, FEED_FORWARDS, MIXERS, STATS_HOOKS, register_feed_forward, register_mixer

__all__ = ["VelocisModel", "Block", "Cache", "ModelOutput", "Positions", "MIXERS", "FEED_FORWARDS", "AUX_LOSSES",
           "STATS_HOOKS", "register_mixer", "register_feed_forward"]
