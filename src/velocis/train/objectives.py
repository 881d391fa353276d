"""Objectives: how a batch becomes a loss. The training loop is the same for all of them.

An objective is a callable `objective(model, batch) -> (loss, stats)`: `loss` is the scalar to
back-propagate, `stats` a dict of extra numbers to log (tensors or floats; lists such as MoE
expert loads are shown as they are). SFT, DPO or GRPO plug in here as new objectives, each
with its own batch format, without a second loop.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class Objective(Protocol):
    name: str

    def __call__(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...


class NextTokenObjective:
    """Pretraining: cross-entropy of the next token (plus whatever the model adds, e.g. MoE aux loss)."""

    name = "pretrain"

    def __call__(self, model, batch):
        input_ids, targets = batch
        return model.compute_loss(input_ids, targets)


OBJECTIVES = {"pretrain": NextTokenObjective}
