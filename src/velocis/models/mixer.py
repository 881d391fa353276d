"""Mixer: what every token mixer (attention, MLA, later state-space and linear attention) provides.

    forward(x [B, T, hidden], pos: Positions, cache: its layer cache | None) -> [B, T, hidden]
                                                      (or (out, aux): see models/block.py)
        pos may also be plain position ids ([T] or [B, T]): `Positions.of(pos)` wraps them
    new_cache(batch_size, max_len, device, dtype) -> LayerCache     (models/cache.py)
    cache_kind                  "kv" | "latent" | "state"
    cache_bytes_per_token(b)    bytes a cached token costs in this layer (b bytes per number)
    cache_bytes_per_sequence(b) bytes a sequence costs whatever its length (a recurrent state)
"""
from __future__ import annotations

from torch import nn


class Mixer(nn.Module):
    cache_kind = "kv"

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None):
        raise NotImplementedError(f"{type(self).__name__} has no cache")

    def cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 0

    def cache_bytes_per_sequence(self, dtype_bytes: int = 2) -> int:
        return 0
