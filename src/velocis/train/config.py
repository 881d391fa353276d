"""TrainConfig: everything about a run that is not the model's shape."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velocis.errors import VelocisError
from velocis.train.schedule import SCHEDULES


@dataclass
class TrainConfig:
    output_dir: str = "runs/run"
    data_dir: str = ""  # a prepared data dir (index.json, tokenizer.json, train/, val/)

    # --- length of the run: whichever limit comes first ---
    max_steps: int | None = None
    time_budget: float | None = None  # minutes of training (checkpoints and evals included)

    # --- batch ---
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256

    # --- optimizer and schedule ---
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine" | "wsd"
    decay_fraction: float = 0.2  # wsd: the share of the run spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    # --- execution ---
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    compile: bool = False
    # "auto": bf16 autocast (fp32 master weights) where matmuls have bf16 hardware (CUDA with bf16,
    # CPUs with AVX512-BF16 or AMX), else fp32. "fp32" / "bf16" force one.
    precision: str = "auto"
    seed: int = 1337
    threads: int | None = None  # torch CPU threads; None = torch's default

    # --- evaluation, checkpoints, logging ---
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10  # plain-text log lines (the live monitor redraws every step)
    monitor: str = "auto"  # "auto" (live on a TTY) | "live" | "plain" | "none"
    plot: bool = True  # write PNG curves at the end

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise VelocisError(msg)

        if self.max_steps is not None and self.max_steps <= 0:
            bad(f"--max-steps must be positive, got {self.max_steps}")
        if self.time_budget is not None and self.time_budget <= 0:
            bad(f"--time-budget must be positive minutes, got {self.time_budget}")
        for name in ("batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                bad(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.keep_last < 1:
            bad(f"--keep-last must be at least 1, got {self.keep_last}")
        if not self.lr > 0:
            bad(f"--lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            bad(f"--schedule {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad(f"--precision {self.precision!r} is unknown; choose auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad(f"--device {self.device!r} is unknown; choose auto, cpu or cuda")
        if self.monitor not in ("auto", "live", "plain", "none"):
            bad(f"monitor {self.monitor!r} must be auto, live, plain or none")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
