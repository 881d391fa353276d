"""Part registries: a block is MIXERS[name](config, layer_idx) + FEED_FORWARDS[name](config, layer_idx).

A part module registers itself with the decorators below; `velocis.models` imports the part
modules (the optional ones only if their file exists), so a new part needs its own file and one
line in `velocis/models/__init__.py::_PART_MODULES`. See `velocis/models/__init__.py` for the
contract a mixer and a feed-forward implement.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

MIXERS: dict[str, type[nn.Module]] = {}
FEED_FORWARDS: dict[str, type[nn.Module]] = {}
# Model-level statistics hooks: fn(model) -> dict of numbers to log after a forward (e.g. expert load).
STATS_HOOKS: list[Callable[[nn.Module], dict]] = []


def register_mixer(name: str):
    def deco(cls):
        MIXERS[name] = cls
        return cls

    return deco


def register_feed_forward(name: str):
    def deco(cls):
        FEED_FORWARDS[name] = cls
        return cls

    return deco
