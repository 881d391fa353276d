"""The training loop. One loop for every objective (pretraining now; SFT/DPO/GRPO plug in as
objectives, see objectives.py).

Per optimizer step: `grad_accum` micro-batches of forward + backward (bf16 autocast on CUDA,
fp32 on CPU), gradient clipping, AdamW, the learning-rate schedule, then logging, periodic
validation (loss and bits-per-byte) and atomic checkpoints. A checkpoint carries everything
the next step depends on (weights, optimizer, RNG states, data position, schedule progress),
so `resume` continues the run as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.kernels import cpu_ops
from velocis.train import checkpoint as ckpt_io
from velocis.train.config import TrainConfig
from velocis.train.monitor import MetricsLog, make_monitor, memory_usage
from velocis.train.objectives import NextTokenObjective
from velocis.train.schedule import lr_multiplier


class TrainingDiverged(VelocisError):
    """The loss or gradient became NaN/inf."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    first_loss: float | None
    last_loss: float | None
    val: list[tuple[int, float, float]] = field(default_factory=list)  # (step, val_loss, val_bpb)


# --- device / precision / optimizer ---------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VelocisError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def hardware_bf16(device: torch.device) -> bool:
    """Does this device multiply bf16 matrices natively (faster than fp32, not emulated)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # AVX512-BF16 (Zen 4, Cooper Lake+) or AMX (Sapphire Rapids+)
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if hardware_bf16(device) else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str):
    # bf16 autocast keeps fp32 master weights and optimizer state; "fp32" runs plain.
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices only; norms' gains and biases stay undecayed (as in nanoGPT / Llama).
    params = [p for p in model.parameters() if p.requires_grad]
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


def _to_python(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach()
        return v.item() if v.numel() == 1 else v.float().cpu().tolist()
    return v


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- the trainer ---------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, model_config: ModelConfig, *, objective=None, resume: str | None = None,
                 overwrite: bool = False):
        from velocis.data import PackedLoader
        from velocis.models import VelocisModel
        from velocis.tokenizer import Tokenizer

        self.cfg, self.model_config = cfg, model_config
        self.objective = objective or NextTokenObjective()
        self.run_dir = cfg.run_dir
        data_dir = Path(cfg.data_dir)
        if not (data_dir / "index.json").is_file():
            raise VelocisError(
                f"--data {data_dir}: not a prepared data directory (no index.json); "
                f"run `velocis data prepare` or pass --chinese-path/--english-path"
            )
        if cfg.seq_len > model_config.max_seq_len:
            raise VelocisError(
                f"--seq-len {cfg.seq_len} is longer than the model's context ({model_config.max_seq_len} tokens); "
                f"use --seq-len {model_config.max_seq_len} or less"
            )
        self.tokenizer = Tokenizer.load(data_dir)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise VelocisError(
                f"the data's tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                f"{model_config.vocab_size}; build the model with vocab_size >= {self.tokenizer.vocab_size}"
            )

        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu":
            cpu_ops.available()  # build the C++ CPU kernels now (once per machine), not under the monitor's clock
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

        # Where does this run start?
        self.resume_from: Path | None = None
        if resume:
            self.resume_from = ckpt_io.find_checkpoint(self.run_dir if resume == "auto" else resume)
            ckpt_io.check_compatible(self.resume_from, model_config)
        else:
            self._fresh_run_dir(overwrite)

        seed_everything(cfg.seed)
        self.model = VelocisModel(model_config).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.train_loader = PackedLoader(data_dir, cfg.seq_len, cfg.batch_size, split="train", seed=cfg.seed)
        self.val_loader = PackedLoader(data_dir, cfg.seq_len, cfg.batch_size, split="val", seed=cfg.seed)
        self._val_start = self.val_loader.state_dict()
        self._train_iter = iter(self.train_loader)

        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0  # training seconds, summed over resumes (the time budget spans them)
        self.best_val = math.inf
        self.val_history: list[tuple[int, float, float]] = []
        if self.resume_from is not None:
            self._load(self.resume_from)

        self.loss_fn = self._loss
        if cfg.compile:
            self.loss_fn = torch.compile(self._loss)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if self.resume_from is not None:
            self.metrics.truncate_after(self.step)

    # -- run dir ---------------------------------------------------------------------------
    def _fresh_run_dir(self, overwrite: bool) -> None:
        run = self.run_dir
        if ckpt_io.list_checkpoints(run) and not overwrite:
            raise VelocisError(
                f"{run} already holds a training run; pass --resume to continue it, "
                f"--overwrite to start over, or choose another --output-dir"
            )
        for name in ("checkpoints", "best"):
            shutil.rmtree(run / name, ignore_errors=True)
        for name in ("metrics.jsonl", "curves.png", "model.safetensors", "config.json"):
            (run / name).unlink(missing_ok=True)
        run.mkdir(parents=True, exist_ok=True)

    # -- state ----------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "best_val": self.best_val,
            "val_history": self.val_history,
            "optimizer": self.optimizer.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "rng": ckpt_io.rng_state(),
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "objective": self.objective.name,
        }

    def _load(self, path: Path) -> None:
        state = ckpt_io.load_trainer_state(path)
        old = state.get("train_config", {})
        for key in ("batch_size", "seq_len", "grad_accum"):
            if key in old and old[key] != getattr(self.cfg, key):
                raise VelocisError(
                    f"--resume {path}: the run used --{key.replace('_', '-')} {old[key]}, now "
                    f"{getattr(self.cfg, key)}; resume with the same value to continue exactly"
                )
        ckpt_io.load_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.load_state_dict(state["train_loader"])
        self._train_iter = iter(self.train_loader)
        ckpt_io.set_rng_state(state["rng"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.best_val = state["best_val"]
        self.val_history = [tuple(v) for v in state.get("val_history", [])]

    # -- pieces of a step --------------------------------------------------------------------
    def _loss(self, batch):
        return self.objective(self.model, batch)

    def _next_batch(self):
        try:
            x, y = next(self._train_iter)
        except StopIteration:  # end of an epoch: start the next one
            self._train_iter = iter(self.train_loader)
            x, y = next(self._train_iter)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def progress(self) -> float:
        p = 0.0
        if self.cfg.max_steps:
            p = max(p, self.step / self.cfg.max_steps)
        if self.cfg.time_budget:
            p = max(p, self.elapsed / (self.cfg.time_budget * 60))
        return p

    def lr_now(self) -> float:
        c = self.cfg
        return c.lr * lr_multiplier(
            self.step, self.progress(), schedule=c.schedule, warmup_steps=c.warmup_steps,
            min_lr_ratio=c.min_lr_ratio, decay_fraction=c.decay_fraction,
        )

    def train_step(self) -> tuple[float, float, dict[str, Any], float]:
        """One optimizer step; returns (loss, grad norm, stats, lr)."""
        self.model.train()
        lr = self.lr_now()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        stats: dict[str, Any] = {}
        for _ in range(self.cfg.grad_accum):
            batch = self._next_batch()
            with autocast_for(self.device, self.precision):
                loss, stats = self.loss_fn(batch)
            (loss / self.cfg.grad_accum).backward()
            total += loss.detach()
        loss_value = (total / self.cfg.grad_accum).item()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {grad_norm}"
            last = ckpt_io.list_checkpoints(self.run_dir)
            hint = f"; the last good checkpoint is {last[-1][1]} (--resume it with a lower --lr)" if last else ""
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: {what} (lr {lr:.3e}); "
                f"lower --lr or raise --warmup{hint}"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "update_expert_bias"):  # MoE aux-loss-free balancing
            self.model.update_expert_bias()
        self.step += 1
        self.tokens += self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum
        return loss_value, grad_norm, {k: _to_python(v) for k, v in stats.items()}, lr

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Mean loss over the first `eval_batches` validation batches, and bits per byte."""
        self.model.eval()
        self.val_loader.load_state_dict(self._val_start)  # the same batches every time
        losses = []
        for i, (x, y) in enumerate(self.val_loader):
            if i >= self.cfg.eval_batches:
                break
            with autocast_for(self.device, self.precision):
                loss, stats = self.loss_fn((x.to(self.device), y.to(self.device)))
            lm = stats.get("lm_loss", loss)  # bpb measures the language model, not aux losses
            losses.append(float(lm))
        if not losses:
            raise VelocisError(f"{self.cfg.data_dir}: the validation split is empty or shorter than --seq-len")
        val_loss = sum(losses) / len(losses)
        # nats/token -> bits/token -> bits/byte
        bpb = val_loss / math.log(2) / self.val_loader.bytes_per_token
        self.model.train()
        return val_loss, bpb

    def save(self) -> Path:
        path = ckpt_io.save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, self.trainer_state())
        ckpt_io.prune_checkpoints(self.run_dir, self.cfg.keep_last)
        ckpt_io.write_root_model(self.run_dir, self.model, self.tokenizer)
        return path

    # -- the loop -------------------------------------------------------------------------
    def done(self) -> bool:
        return self.progress() >= 1.0

    def run(self) -> TrainResult:
        cfg = self.cfg
        if not cfg.max_steps and not cfg.time_budget:
            raise VelocisError("give --max-steps or --time-budget (or both) so the run knows when to stop")
        n_params = sum(p.numel() for p in self.model.parameters())
        title = (f"velocis train · {self.run_dir} · {n_params / 1e6:.1f}M params · {self.device.type} {self.precision}"
                 f" · batch {cfg.batch_size}x{cfg.seq_len}x{cfg.grad_accum}")
        monitor = make_monitor(cfg.monitor, title, cfg.max_steps, cfg.log_every)
        (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        first_loss = last_loss = None
        window: deque[float] = deque(maxlen=20)  # recent step times, for tokens/s and the ETA
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        # a resumed run starts from a saved step: nothing to save or evaluate again there
        last_save = last_eval = self.step if self.resume_from is not None else -1
        monitor.start()
        if self.resume_from is not None:
            monitor.note(f"resumed from {self.resume_from} at step {self.step}")
        if cfg.compile and self.device.type == "cpu" and cpu_ops.available():
            monitor.note("note: under torch.compile the CPU runs without Velocis' C++ kernels (GEMM, attention); "
                         "eager trains ~20% faster on a CPU (benchmarks/RESULTS.md)")
        if self.precision == "bf16" and not hardware_bf16(self.device):
            monitor.note(f"warning: --precision bf16 on a {self.device.type} without bf16 matrix hardware runs "
                         "emulated and far slower than fp32; use --precision auto (fp32 here)")
        try:
            if self.step == 0:
                self._eval_and_record(monitor)  # the starting point of the validation curve
            t_last = time.perf_counter()
            while not self.done():
                t0 = time.perf_counter()
                loss, grad_norm, stats, lr = self.train_step()
                now = time.perf_counter()
                if self.step == 1 and cfg.compile:
                    monitor.note(f"compiled + first step in {now - t0:.1f}s")
                else:
                    window.append(now - t0)
                # The time budget is wall time: evals and checkpoints count too.
                self.elapsed += now - t_last
                t_last = now
                step_time = sum(window) / len(window) if window else now - t0
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                rec = {"type": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens": self.tokens, "tokens_per_s": tokens_per_step / step_time, "elapsed_s": self.elapsed}
                self.metrics.write({**rec, **stats})
                rec.update(eta_s=self._eta(step_time), memory=memory_usage(), last=self.done(),
                           stats={k: v for k, v in stats.items() if k != "lm_loss"})
                monitor.train(rec)

                if self.step % cfg.eval_every == 0:
                    self._eval_and_record(monitor)
                    last_eval = self.step
                if self.step % cfg.save_every == 0:
                    monitor.note(f"saved {self.save()}")
                    last_save = self.step
                now = time.perf_counter()
                self.elapsed += now - t_last
                t_last = now
            # The end of the run is evaluated and saved here, whichever check (steps or the time
            # budget, which can run out during an eval) ended the loop.
            if self.step > 0 and last_eval != self.step:
                self._eval_and_record(monitor)
            if self.step > 0 and last_save != self.step:
                monitor.note(f"saved {self.save()}")
                last_save = self.step
        except KeyboardInterrupt:
            if self.step > 0 and last_save != self.step:
                monitor.note("interrupted: saving a checkpoint…")
                self.save()
            raise
        finally:
            monitor.stop()
            self.metrics.close()
        if cfg.plot and self.step > 0:
            from velocis.train.plot import plot_run

            with contextlib.suppress(Exception):  # a plot must never fail a finished run
                monitor.note(f"curves: {plot_run(self.run_dir)}")
        return TrainResult(self.run_dir, self.step, self.tokens, self.elapsed, first_loss, last_loss,
                           list(self.val_history))

    def _eval_and_record(self, monitor) -> None:
        val_loss, bpb = self.evaluate()
        self.val_history.append((self.step, val_loss, bpb))
        rec = {"type": "eval", "step": self.step, "val_loss": val_loss, "val_bpb": bpb}
        self.metrics.write(rec)
        monitor.eval(rec)
        if val_loss < self.best_val and self.step > 0:
            self.best_val = val_loss
            ckpt_io.save_best(self.run_dir, self.model, self.tokenizer,
                              {"step": self.step, "val_loss": val_loss, "val_bpb": bpb})

    def _eta(self, step_time: float) -> float | None:
        etas = []
        if self.cfg.max_steps:
            etas.append((self.cfg.max_steps - self.step) * step_time)
        if self.cfg.time_budget:
            etas.append(self.cfg.time_budget * 60 - self.elapsed)
        return min(etas) if etas else None


def train(cfg: TrainConfig, model_config: ModelConfig, *, objective=None, resume: str | None = None,
          overwrite: bool = False) -> TrainResult:
    """Build a Trainer and run it to the end of its step or time budget."""
    return Trainer(cfg, model_config, objective=objective, resume=resume, overwrite=overwrite).run()
