"""TrainConfig: everything about a run that is not the model's shape."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velocis.errors import VelocisError
from velocis.train.schedule import SCHEDULES
from velocis.utils.cli_fields import flag_for
from velocis.utils.fields import check_field_types


def _f(default, help: str, **meta):
    """A field with its CLI help (see utils/cli_fields.py)."""
    return field(default=default, metadata={"help": help, **meta})


# The training recipe per model size, for what a caller does not set: chosen by measurement
# (benchmarks/bench_quality.py against transformers at equal wall-clock; the ablation table in
# benchmarks/RESULTS.md). `velocis train / train-custom / train-cluster` start from these; from Python,
# TrainConfig(**recipe_for("micro"), output_dir=..., data_dir=...).
RECIPE = dict(optimizer="muon", schedule="wsd")
PRESET_RECIPES: dict[str, dict] = {
    "micro": dict(batch_size=16, seq_len=256, lr=2e-3, max_steps=2000, **RECIPE),
    "small": dict(batch_size=16, seq_len=1024, lr=1e-3, max_steps=10000, **RECIPE),
    "custom": dict(batch_size=16, seq_len=256, lr=2e-3, max_steps=1000, **RECIPE),
}


def recipe_for(preset: str | None, parallel: str = "ddp") -> dict:
    """The preset's recipe (a shape of no known preset gets "custom"'s). Under FSDP the optimizer is
    AdamW: Muon orthogonalises whole matrices and FSDP shards them by rows."""
    recipe = dict(PRESET_RECIPES.get(preset or "custom", PRESET_RECIPES["custom"]))
    if parallel == "fsdp":
        recipe["optimizer"] = "adamw"
    return recipe


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/run", "run directory", cli=False)
    data_dir: str = _f("", "a prepared data dir (index.json, tokenizer.json, train/, val/)", cli=False)
    init_from: str = _f("", "a model dir whose weights a fresh run starts from (fine-tuning)", cli=False)

    # --- length of the run: whichever limit comes first ---
    max_steps: int | None = _f(None, "optimizer steps (default fits the preset, unless --time-budget)")
    time_budget: float | None = _f(None, "stop (and finish the schedule) after this many minutes; "
                                   "checkpoints and evals count", metavar="MINUTES")

    # --- batch ---
    batch_size: int = _f(16, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seq_len: int = _f(256, "training sequence length (<= the model's context)")

    # --- optimizer and schedule ---
    lr: float = _f(3e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of the peak")
    warmup_steps: int = _f(50, "warmup steps", flag="--warmup")
    schedule: str = _f("cosine", "cosine decay, or warmup-stable-decay (wsd)", choices=list(SCHEDULES))
    decay_fraction: float = _f(0.2, "wsd: the share of the run spent decaying")
    optimizer: str = _f("adamw", "adamw, or muon (Muon's orthogonalised update for the blocks' matrices, AdamW for "
                        "embeddings, head, norms and biases; one --lr serves both)", choices=["adamw", "muon"])
    muon_momentum: float = _f(0.95, "Muon's Nesterov momentum")
    embed_lr_scale: float = _f(1.0, "the token embedding's and output head's rate as a multiple of --lr (untied "
                               "embeddings often want their own)")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0 = off)")

    # --- execution ---
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    compile: bool = _f(False, "torch.compile the model (slower start, faster steps on a GPU; on a CPU eager "
                       "with the C++ kernels is faster)")
    precision: str = _f("auto", "auto: bf16 autocast where the hardware multiplies bf16 (CUDA, AVX512-BF16/AMX "
                        "CPUs), else fp32", choices=["auto", "fp32", "bf16"])
    seed: int = _f(1337, "random seed (weights, data order)")
    threads: int | None = _f(None, "torch CPU threads (default: torch's)")

    # --- several processes (launched by torchrun; train/distributed.py, train/parallelize.py) ---
    world_size: int | None = _f(None, "processes in the run, checked against the launcher's (torchrun --nnodes N "
                                "--nproc-per-node M starts N*M)")
    parallel: str = _f("ddp", "how the processes share the model: ddp (each holds all of it) or fsdp (parameters, "
                       "gradients and optimizer state sharded across them)", choices=["ddp", "fsdp"])
    expert_parallel: int = _f(1, "shard each MoE layer's experts over this many processes, tokens exchanged by "
                              "all-to-all (needs --parallel fsdp)", metavar="N")
    activation_checkpointing: bool = _f(False, "recompute each block's activations in the backward pass (less "
                                        "memory, about a third more compute)")
    dist_timeout: float = _f(300.0, "seconds a collective waits for the other processes before the run stops "
                             "with an error (a dead or stuck rank)", metavar="SECONDS")

    # --- evaluation, checkpoints, logging ---
    eval_every: int = _f(100, "validate every N steps")
    eval_batches: int = _f(8, "validation batches per evaluation")
    save_every: int = _f(200, "checkpoint every N steps")
    keep_last: int = _f(2, "checkpoints to keep (plus best/)")
    log_every: int = _f(10, "plain-text log line every N steps (the live monitor redraws every step)")
    monitor: str = _f("auto", "live dashboard (default on a terminal) or plain log lines",
                      choices=["auto", "live", "plain", "none"])
    plot: bool = _f(True, "write curves.png at the end")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_field_types(self, "TrainConfig")

        def name(field: str) -> str:  # the Python name and the CLI flag: both kinds of caller read this
            return f"{field} ({flag_for(next(f for f in dataclasses.fields(self) if f.name == field))})"

        def bad(msg: str) -> None:
            raise VelocisError(msg)

        if self.max_steps is not None and self.max_steps <= 0:
            bad(f"{name('max_steps')} must be positive, got {self.max_steps}")
        if self.time_budget is not None and self.time_budget <= 0:
            bad(f"{name('time_budget')} must be positive minutes, got {self.time_budget}")
        for field in ("batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "eval_batches", "log_every"):
            if getattr(self, field) <= 0:
                bad(f"{name(field)} must be positive, got {getattr(self, field)}")
        if self.keep_last < 1:
            bad(f"{name('keep_last')} must be at least 1, got {self.keep_last}")
        if not self.lr > 0:
            bad(f"{name('lr')} must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            bad(f"{name('min_lr_ratio')} must be in [0, 1] and {name('decay_fraction')} in (0, 1], got "
                f"{self.min_lr_ratio} and {self.decay_fraction}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            bad(f"{name('warmup_steps')}, {name('weight_decay')} and {name('grad_clip')} must be >= 0")
        if self.threads is not None and self.threads <= 0:
            bad(f"{name('threads')} must be positive, got {self.threads}")
        if self.world_size is not None and self.world_size <= 0:
            bad(f"{name('world_size')} must be positive, got {self.world_size}")
        if self.parallel not in ("ddp", "fsdp"):
            bad(f"{name('parallel')} {self.parallel!r} is unknown; choose ddp or fsdp")
        if self.expert_parallel < 1:
            bad(f"{name('expert_parallel')} must be at least 1, got {self.expert_parallel}")
        if self.expert_parallel > 1 and self.parallel != "fsdp":
            bad(f"{name('expert_parallel')} {self.expert_parallel} needs --parallel fsdp: expert shards compose with "
                f"FSDP's sharded parameters, not with DDP's replicas")
        if not self.embed_lr_scale > 0:
            bad(f"{name('embed_lr_scale')} must be positive, got {self.embed_lr_scale}")
        if self.optimizer not in ("adamw", "muon"):
            bad(f"{name('optimizer')} {self.optimizer!r} is unknown; choose adamw or muon")
        if not 0 <= self.muon_momentum < 1:
            bad(f"{name('muon_momentum')} must be in [0, 1), got {self.muon_momentum}")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            bad(f"{name('optimizer')} muon needs each matrix whole to orthogonalise its update, and FSDP shards them "
                f"by rows; use --parallel ddp (or --optimizer adamw with fsdp)")
        if not self.dist_timeout > 0:
            bad(f"{name('dist_timeout')} must be positive seconds, got {self.dist_timeout}")
        if self.schedule not in SCHEDULES:
            bad(f"{name('schedule')} {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad(f"{name('precision')} {self.precision!r} is unknown; choose auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad(f"{name('device')} {self.device!r} is unknown; choose auto, cpu or cuda")
        if self.monitor not in ("auto", "live", "plain", "none"):
            bad(f"{name('monitor')} {self.monitor!r} must be auto, live, plain or none")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
