"""Objectives: how a batch becomes a loss. The training loop is the same for all of them.

An objective is called once per micro-batch as `objective(model, batch, num_tokens)` and returns
`(loss, stats)`: `loss` is the scalar to back-propagate for this micro-batch, `stats` a dict of
numbers to log. `num_tokens` is the count of valid (unmasked) target tokens over *all*
micro-batches of the optimizer step (from `objective.num_tokens(batch)`, summed by the trainer),
so a token weighs the same whatever micro-batch it falls in: the step's gradient is that of one
big batch. An objective may hold more models than the one being trained (a frozen reference,
a value head): `setup(model, device)` builds them once the model is ready, and `modules()`
names those the optimizer trains and checkpoints save beside the model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


class Objective:
    name = "objective"

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Build what the objective holds beside the trained model: called once the starting weights
        (init_from) are in and before a resume loads the trained ones, so a frozen reference copied here
        is the starting model on a resume too."""

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules the objective owns besides the model (optimised and checkpointed)."""
        return {}

    def num_tokens(self, batch: Any) -> int:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: Any, num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batch: Any) -> tuple[float, int]:
        """Validation of one batch (no gradient): (summed loss, count); the trainer reports their ratio.
        The default: next-token loss of (input_ids, targets) batches, without auxiliary losses."""
        input_ids, targets = batch[0], batch[1]
        out = model(input_ids, targets, reduction="sum", ignore_index=IGNORE_INDEX)
        return float(out.lm_loss), int(out.num_tokens)


class NextTokenObjective(Objective):
    """Pretraining: cross-entropy of the next token, plus the model's auxiliary losses (MoE balance,
    MTP, ...) weighted by this micro-batch's share of the step's tokens."""

    name = "pretrain"

    def num_tokens(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def __call__(self, model, batch, num_tokens):
        input_ids, targets = batch
        out = model(input_ids, targets, reduction="sum", ignore_index=IGNORE_INDEX)
        share = out.num_tokens / num_tokens
        return out.lm_loss / num_tokens + out.aux_loss * share, out.stats
