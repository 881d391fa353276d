"""ModelOutput: what `VelocisModel.forward` returns when asked for a loss or hidden states."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    # what to back-propagate: lm_loss + aux_loss (reduction "mean" or "sum"; None for "none")
    loss: torch.Tensor | None = None
    # next-token negative log-likelihood: mean or sum over valid targets, or per token [B, T]
    # ("none"; 0 where the target is ignored), with gradients either way
    lm_loss: torch.Tensor | None = None
    # sum over auxiliary-loss families of coefficient * value (a scalar; 0 when there are none)
    aux_loss: torch.Tensor | None = None
    # family -> unweighted value, averaged over the layers that report it ("moe_balance", "mtp", ...)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: torch.Tensor | None = None  # valid (not ignored) targets in the batch
    stats: dict = field(default_factory=dict)  # detached numbers to log (lm_loss, families, expert load)
    logits: torch.Tensor | None = None  # [B, T', vocab] (without targets)
    hidden: torch.Tensor | None = None  # last block output before the final norm (return_hidden=True)
