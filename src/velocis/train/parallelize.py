"""Parallelism is applied to the built, unchanged model from outside (torchtitan's parallelize.py).

The trainer builds the model on the meta device, passes it through `parallelize`, then
materialises and initialises it, then builds the optimizer: the order FSDP2 (`fully_shard`)
needs, since sharding must happen before parameters get memory. On one process this is the
identity; the distributed trainer fills it with DDP / FSDP2 / expert parallel / activation
checkpointing.
"""
from __future__ import annotations

from torch import nn


def parallelize(model: nn.Module, cfg) -> nn.Module:
    """Apply the run's parallelism to `model` (built on the meta device); one process: unchanged."""
    return model
