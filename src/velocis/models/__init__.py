"""Velocis models: one decoder class whose blocks are a token *mixer* + a *feed-forward*.

    from velocis.models import VelocisModel
    model = VelocisModel(config)
    logits = model(input_ids)                              # [B, T, vocab]
    cache = model.new_cache(batch_size, max_len)           # static per-layer caches
    logits = model(prompt_ids, cache=cache); logits = model(next_ids, cache=cache)
    loss, stats = model.compute_loss(input_ids, targets)   # stats: lm_loss, aux_loss?, mtp_loss?, ...

Part contract
-------------
Parts live in registries (velocis/models/registry.py) and are built as ``Part(config, layer_idx)``.
A module registers with ``@register_mixer("name")`` / ``@register_feed_forward("name")``; list the
module in ``_PART_MODULES`` below so importing ``velocis.models`` registers it. Part modules must
not import ``velocis.models.decoder`` (it imports the registries, not the parts).

Mixer (MIXERS["attention"], MIXERS["mla"], ...)::

    forward(x: Tensor[B, T, hidden_dim], positions: LongTensor[T], cache: <its cache> | None) -> Tensor[B, T, hidden_dim]
        positions are absolute and contiguous (start .. start+T-1). Causal: a token sees itself
        and earlier positions. cache=None: the whole sequence is in x (training / full recompute).
        With a cache: the cache already holds positions 0..start-1; write this chunk's state at
        `positions` and attend over the cache. The mixer owns its RoPE (velocis.models.rope).
    new_cache(batch_size, max_len, device, dtype) -> object
        this layer's cache, preallocated for max_len positions (attention: KVCache with k/v;
        MLA may store its compressed latent + rope key instead). Usually an nn.Module of buffers.
    kv_cache_bytes_per_token(dtype_bytes=2) -> int      cache bytes per token for this layer
    reset_parameters(std, num_layers)                    called by the constructor (init)
    init_buffers()    (only if it has non-persistent buffers that are not zeros, e.g. RoPE inv_freq):
        rebuild them; loading builds models on the meta device and never runs the constructor's init.

Feed-forward (FEED_FORWARDS["mlp"], FEED_FORWARDS["moe"], ...)::

    forward(x: Tensor[..., hidden_dim]) -> Tensor[..., hidden_dim]

Extra losses and stats: after a forward, any part may hold ``self.last_aux_loss`` (a scalar
tensor with grad, or None); ``compute_loss`` adds ``config.aux_loss_coef * mean`` over the parts
that have one and logs it as ``aux_loss``. Numbers to log (e.g. expert load) come from
``STATS_HOOKS``: functions ``fn(model) -> dict`` merged into compute_loss's stats.
Multi-token prediction is model-level: with ``config.mtp_depth > 0`` the model builds
``velocis.models.mtp.MTP(config)`` and, in training, adds ``config.mtp_loss_weight *
mtp(h, input_ids, targets, model)`` where h is the last block's output before the final norm
(``model.logits(h)`` applies the final norm + shared head; ``model.embed_tokens`` the embedding).
"""
from __future__ import annotations

import importlib

from velocis.models.registry import FEED_FORWARDS, MIXERS, STATS_HOOKS, register_feed_forward, register_mixer
from velocis.models import attention, layers  # noqa: F401  (register "attention", "mlp")

# Optional parts: imported when their file exists (each registers itself).
_PART_MODULES = ["velocis.models.moe", "velocis.models.mla", "velocis.models.dsa"]
for _name in _PART_MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as e:
        if e.name != _name:
            raise

# moe.py predates the registry decorators: register it (and its expert-load stats) here.
try:
    from velocis.models.moe import MoE, moe_stats

    FEED_FORWARDS.setdefault("moe", MoE)
    if moe_stats not in STATS_HOOKS:
        STATS_HOOKS.append(moe_stats)
except ModuleNotFoundError as e:
    if e.name != "velocis.models.moe":
        raise

from velocis.models.decoder import Block, Cache, VelocisModel  # noqa: E402

__all__ = ["VelocisModel", "Block", "Cache", "MIXERS", "FEED_FORWARDS", "STATS_HOOKS",
           "register_mixer", "register_feed_forward"]
