"""Block: one decoder layer, a token mixer plus a feed-forward, each taken from the registries.

    x = x + mixer(mixer_norm(x), pos, cache)
    x = x + feed_forward(ff_norm(x))

A part returns its output, or (output, aux) where aux maps an auxiliary-loss family (registry
AUX_LOSSES) to an unweighted scalar; the block returns (x, aux) with both parts' entries.
The feed-forward "none" makes a mixer-only layer (Mamba-2's blocks): no feed-forward, no norm for it.
"""
from __future__ import annotations

import torch
from torch import nn

from velocis.errors import VelocisError
from velocis.models.layers import RMSNorm
from velocis.models.registry import FEED_FORWARDS, MIXERS, register_feed_forward

NO_FEED_FORWARD = "none"


@register_feed_forward(NO_FEED_FORWARD)
class NoFeedForward(nn.Module):
    """The registry's entry for "none" (so configs and the CLI know the name); a block never builds it."""


def split_aux(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return out if isinstance(out, tuple) else (out, {})


class Block(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        mixer, ff = config.mixers()[layer_idx], config.feed_forwards()[layer_idx]
        for kind, name, reg in (("mixer", mixer, MIXERS), ("feed_forward", ff, FEED_FORWARDS)):
            if name not in reg:
                raise VelocisError(f"layer {layer_idx} {kind} {name!r} is not registered "
                                   f"(registered: {', '.join(sorted(reg))})")
        self.mixer_name, self.feed_forward_name = mixer, ff
        self.mixer_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.mixer = MIXERS[mixer](config, layer_idx)
        if ff == NO_FEED_FORWARD:
            self.ff_norm = self.feed_forward = None
        else:
            self.ff_norm = RMSNorm(config.hidden_dim, config.norm_eps)
            self.feed_forward = FEED_FORWARDS[ff](config, layer_idx)

    def forward(self, x: torch.Tensor, pos, cache=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y, aux = split_aux(self.mixer(self.mixer_norm(x), pos, cache))
        x = x + y
        if self.feed_forward is None:
            return x, aux
        y, ff_aux = split_aux(self.feed_forward(self.ff_norm(x)))
        return x + y, {**aux, **ff_aux} if ff_aux else aux
