"""Part registries: a block is MIXERS[name](config, layer_idx) + FEED_FORWARDS[name](config, layer_idx).

A part module registers itself with the decorators below and is imported by
`velocis/models/__init__.py`, so a new part needs its own file and one import line there. Config
validation, CLI choices, parameter counts and cache sizes all read these registries. See
docs/INTERFACES.md for the contract a mixer and a feed-forward implement.

AUX_LOSSES maps an auxiliary-loss family a part may return (e.g. "moe_balance") to the
ModelConfig field holding its coefficient; the model averages each family over the layers that
report it and adds coefficient * value to the loss.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

MIXERS: dict[str, type[nn.Module]] = {}
FEED_FORWARDS: dict[str, type[nn.Module]] = {}
AUX_LOSSES: dict[str, str] = {}
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


def register_aux_loss(family: str, coef_field: str) -> None:
    AUX_LOSSES[family] = coef_field


def register_stats(fn: Callable[[nn.Module], dict]) -> Callable[[nn.Module], dict]:
    if fn not in STATS_HOOKS:
        STATS_HOOKS.append(fn)
    return fn
