"""The optimizer and the per-step work parts register for themselves.

`build_optimizer` decays matrices only (norm gains and biases stay undecayed, as in nanoGPT /
Llama). `register_step_hooks` runs every module's `after_optimizer_step()` after each
optimizer step (e.g. the MoE router bias of auxiliary-loss-free balancing), so the trainer needs
to know no architecture.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def build_optimizer(params: Iterable[nn.Parameter], cfg, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    # The fused kernel does the whole update in one pass per tensor (CUDA and CPU).
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw)


def register_step_hooks(optimizer: torch.optim.Optimizer, *modules: nn.Module) -> int:
    """Hook every sub-module's `after_optimizer_step` onto the optimizer; returns how many."""
    steps = [m.after_optimizer_step for root in modules for m in root.modules() if hasattr(m, "after_optimizer_step")]
    if steps:
        def run(_optimizer, _args, _kwargs):
            for fn in steps:
                fn()

        optimizer.register_step_post_hook(run)
    return len(steps)
