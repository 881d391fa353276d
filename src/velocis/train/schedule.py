"""Learning-rate schedules: linear warmup, then cosine or warmup-stable-decay (WSD).

A schedule maps (step, progress) to a multiplier of the peak learning rate. `progress` is the
fraction of the run done, 0..1: step / max_steps, or elapsed / time budget for a time-budgeted
run (whichever is further along), so a time-budgeted run still decays fully by its end.
"""
from __future__ import annotations

import math

from velocis.errors import VelocisError

SCHEDULES = ("cosine", "wsd")


def lr_multiplier(
    step: int,
    progress: float,
    *,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
    max_warmup_fraction: float = 0.1,
) -> float:
    if schedule not in SCHEDULES:
        raise VelocisError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        mult = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    else:  # wsd: flat at the peak, then a linear decay over the last `decay_fraction` of the run
        start = 1.0 - decay_fraction
        mult = 1.0 if p <= start else 1.0 - (1.0 - min_lr_ratio) * (p - start) / max(decay_fraction, 1e-9)
    # Warmup ramps over `warmup_steps` (Adam's moments need a few real updates), but never over
    # more than `max_warmup_fraction` of the run, so a short or slow run does not spend itself warming up.
    if warmup_steps > 0 and step < warmup_steps:
        ramp = (step + 1) / warmup_steps
        if max_warmup_fraction > 0:
            ramp = max(ramp, p / max_warmup_fraction)
        mult *= min(ramp, 1.0)
    return mult
