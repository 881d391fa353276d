"""Muon for hidden matrices, AdamW for the rest, in one optimizer.

Muon (Keller Jordan, 2024; "Muon is Scalable for LLM Training", Moonshot 2025) replaces a
matrix's update by the nearest semi-orthogonal matrix of its Nesterov momentum, found by a
quintic Newton–Schulz iteration. It suits the 2-D weights inside the blocks (and each expert's
matrices, orthogonalised one by one); embeddings, the output head, norms, biases and routers keep
AdamW. One optimizer object holds both kinds of group so the trainer's step hooks, state_dict
resume and torch.distributed.checkpoint see a single optimizer.

The update scale follows Moonshot's `match_rms_adamw` (0.2 * sqrt(max(rows, cols))): Muon's
update then has AdamW's per-element size, so one peak learning rate serves both kinds of group
(`torch.optim.Muon(adjust_lr_fn="match_rms_adamw")` computes the same update; tests hold this to it
and to a plain reference).
"""
from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at zero


def orthogonalize(update: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Newton–Schulz: the (approximately) orthogonal factor U V^T of each matrix in the last two
    dims. Works on the wide orientation (fewer rows), where X X^T is the small Gram matrix."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if tall:
        x = x.mT
    return x.to(update.dtype)


def update_scale(shape: torch.Size) -> float:
    rows, cols = shape[-2], shape[-1]
    return 0.2 * math.sqrt(max(rows, cols))


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with `"muon": True` take Muon's update; the others AdamW's (decoupled weight
    decay, bias-corrected moments, as torch.optim.AdamW)."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, muon=False)
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() < 2:
                        raise ValueError(f"Muon takes matrices (or stacks of them); got a parameter of shape "
                                         f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon if group["muon"] else self._adamw)(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            direction = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            p.mul_(1 - lr * wd)
            p.add_(orthogonalize(direction, group["ns_steps"], dtype=self.ns_dtype), alpha=-lr * update_scale(p.shape))

    def _adamw(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avg = [s["exp_avg"] for s in states]
        exp_avg_sq = [s["exp_avg_sq"] for s in states]
        for s in states:
            s["step"] += 1
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        for p, s, m, v in zip(params, states, exp_avg, exp_avg_sq):
            step = float(s["step"])
            bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
            denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / bias1)
