"""Speculative decoding's acceptance rule (Leviathan et al. 2023; Chen et al. 2023).

A draft proposes k tokens d_1..d_k, drawn from its distributions q_1..q_k; the target scores the
prefix and the k drafts in one forward, giving p_1..p_{k+1}. Each draft is accepted with
probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn instead from
the residual norm(max(0, p_i - q_i)) and the rest are dropped; if every draft is accepted, one
more token comes from p_{k+1}. The tokens that come out are distributed exactly as sampling the
target alone (tests/test_speculative.py checks it with a chi-square test). Greedy requests
accept a draft while it is the target's argmax and emit the target's argmax where it is not, so
their output equals plain greedy decoding token for token.
"""
from __future__ import annotations

import torch


def accept(p: torch.Tensor, q: torch.Tensor, drafts: list[int], greedy: bool,
           generator: torch.Generator | None = None) -> list[int]:
    """p [k+1, V] target probabilities (greedy: any scores), q [k, V] the draft's, drafts the k proposed
    tokens -> the tokens to emit (1..k+1): the accepted drafts, then a corrected or bonus token."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        if greedy:
            best = int(p[i].argmax())
            if best != d:
                return out + [best]
            out.append(d)
            continue
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i, d] <= p[i, d]:  # accept with probability min(1, p/q)
            out.append(d)
            continue
        residual = (p[i] - q[i]).clamp_(min=0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[i]
        return out + [int(torch.multinomial(dist, 1, generator=generator))]
    last = p[len(drafts)]
    bonus = int(last.argmax()) if greedy else int(torch.multinomial(last, 1, generator=generator))
    return out + [bonus]
