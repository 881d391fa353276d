"""`--lr-find`: a learning-rate range test (Smith 2017; fastai's lr_find) on the run's own model,
data and optimizer. The rate grows geometrically from `start` to `stop` over `steps` optimizer
steps while the smoothed training loss is recorded; the test stops early once the loss has
blown up (4x its best). The suggestion is the rate at the lowest smoothed loss divided by 10: the
largest rate that still sits on the falling part of the curve with a margin, which is where
training at a constant peak rate is fast and stable.

Nothing is kept: the run dir gets no checkpoint, and a real training starts afresh after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from velocis.errors import VelocisError
from velocis.train.loop import TrainingDiverged


@dataclass
class LrFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed, bias-corrected
    suggestion: float | None = None
    stopped_early: bool = False

    def table(self, rows: int = 12) -> str:
        every = max(1, len(self.lrs) // rows)
        lines = [f"{'lr':>10}  {'loss':>8}"]
        lines += [f"{lr:>10.2e}  {loss:>8.4f}" for lr, loss in list(zip(self.lrs, self.losses))[::every]]
        return "\n".join(lines)


def lr_schedule(start: float, stop: float, steps: int) -> list[float]:
    if not 0 < start < stop or steps < 2:
        raise VelocisError(f"the range test needs 0 < start ({start}) < stop ({stop}) and at least 2 steps ({steps})")
    return [start * (stop / start) ** (i / (steps - 1)) for i in range(steps)]


def find_lr(trainer, start: float = 1e-5, stop: float = 1.0, steps: int = 100, smoothing: float = 0.9) -> LrFindResult:
    """Run the range test on a freshly built Trainer (it is spent afterwards)."""
    lrs = lr_schedule(start, stop, steps)
    trainer.lr_now = lambda: lrs[min(trainer.step, steps - 1)]  # the test's rate instead of the schedule
    result, avg, best = LrFindResult(), 0.0, math.inf
    for i, lr in enumerate(lrs):
        try:
            loss = trainer.train_step()[0]
        except TrainingDiverged:
            result.stopped_early = True
            break
        avg = smoothing * avg + (1 - smoothing) * loss
        smoothed = avg / (1 - smoothing ** (i + 1))
        result.lrs.append(lr)
        result.losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best and i > steps // 10:
            result.stopped_early = True
            break
    if result.losses:
        lowest = min(range(len(result.losses)), key=result.losses.__getitem__)
        result.suggestion = result.lrs[lowest] / 10
    return result
