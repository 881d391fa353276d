"""The optimizer and the per-step work parts register for themselves.

`build_optimizer` decays matrices only (norm gains and biases stay undecayed, as in nanoGPT /
Llama). With `optimizer="muon"` the blocks' hidden matrices (and experts) take Muon's
orthogonalised update (train/muon.py) while embeddings, the head, norms, biases, routers,
convolutions and adapters keep AdamW; which is which is decided by parameter name. `register_step_hooks` runs every module's `after_optimizer_step()` after each
optimizer step (e.g. the MoE router bias of auxiliary-loss-free balancing), so the trainer needs
to know no architecture.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from velocis.train.muon import MuonAdamW
from velocis.utils.device import resolve_precision

# 2-D weights that are not hidden matrices: token tables and heads (their rows are looked up or
# scored one by one), routers (a few rows whose scale is their meaning), low-rank adapters.
TABLES = re.compile(r"^(embed_tokens|lm_head)\.weight$")  # the token embedding and output head
NOT_MUON = re.compile(r"embed|(^|[._])head|lora_|(^|\.)gate\.weight$|router")


def takes_muon(name: str, p: nn.Parameter) -> bool:
    if NOT_MUON.search(name):
        return False
    return p.dim() == 2 or (p.dim() == 3 and "experts" in name)  # a stack of expert matrices; not a conv


def build_optimizer(params: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]], cfg,
                    device: torch.device) -> torch.optim.Optimizer:
    """`params`: parameters, or (name, parameter) pairs (Muon and per-group rates need the names).
    Groups, each parameter in the first that takes it: Muon's matrices (--optimizer muon), the
    embedding and head at --embed-lr-scale times the rate (when not 1), decayed matrices, the rest."""
    named = [item if isinstance(item, tuple) else ("", item) for item in params]
    named = [(n, p) for n, p in named if p.requires_grad]
    groups: list[dict] = []
    taken: set[int] = set()

    def group(chosen: list[nn.Parameter], **options) -> None:
        chosen = [p for p in chosen if id(p) not in taken]
        taken.update(id(p) for p in chosen)
        groups.append({"params": chosen, **options})

    muon = getattr(cfg, "optimizer", "adamw") == "muon"
    embed_scale = getattr(cfg, "embed_lr_scale", 1.0)
    if muon:
        group([p for n, p in named if takes_muon(n, p)], weight_decay=cfg.weight_decay, muon=True)
    if embed_scale != 1.0:
        group([p for n, p in named if TABLES.search(n)], weight_decay=cfg.weight_decay, lr_scale=embed_scale)
    group([p for _, p in named if p.dim() >= 2], weight_decay=cfg.weight_decay)
    group([p for _, p in named if p.dim() < 2], weight_decay=0.0)
    if muon:
        # Newton–Schulz in bf16 when training in bf16 (which "auto" picks where the hardware multiplies bf16:
        # GPUs, AVX512-BF16 / AMX CPUs, ~4x faster than fp32 there; the iteration tolerates it, as
        # torch.optim.Muon's bf16 does); an fp32 run stays fp32 throughout (and reproducible across layouts)
        bf16 = resolve_precision(getattr(cfg, "precision", "auto"), device) == "bf16"
        return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), momentum=cfg.muon_momentum,
                         ns_dtype=torch.bfloat16 if bf16 else torch.float32)
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
