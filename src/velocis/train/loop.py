"""The training loop. One loop for every objective (pretraining now; SFT/DPO/GRPO plug in as
objectives, see objectives.py).

Set-up: the model is built on the meta device, handed to the parallelize hook (parallelize.py),
materialised and initialised, then the optimizer is built and parts' per-step work hooked onto
it. The trainer names no architecture.

Per optimizer step: `grad_accum` micro-batches of forward + backward (bf16 autocast where the
hardware has it), each normalised by the valid target tokens of the whole step, gradient
clipping, AdamW, the learning-rate schedule, then logging, periodic validation (loss and
bits-per-byte) and atomic checkpoints. A checkpoint carries everything the next step depends on
(weights, optimizer, RNG states, data position, schedule progress), so `resume` continues the
run as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.kernels import cpu_ops
from velocis.models import VelocisModel
from velocis.train import checkpoint as ckpt_io
from velocis.train import run_dir
from velocis.train.config import TrainConfig
from velocis.train.data_source import TrainData, packed_data, to_device
from velocis.train.monitor import MetricsLog, make_monitor, memory_usage
from velocis.train.objectives import NextTokenObjective, Objective
from velocis.train.optim import build_optimizer, register_step_hooks
from velocis.train import distributed, sharded_checkpoint
from velocis.train.parallelize import materialize, parallelize, start_data_parallel
from velocis.train.schedule import lr_multiplier
from velocis.utils.device import autocast_for, hardware_bf16, resolve_precision


class TrainingDiverged(VelocisError):
    """The loss or gradient became NaN/inf."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; a checkpoint of the last finished step was saved."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_at_step_boundary(trainer: "Trainer"):
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, `docker stop`) ask the loop to stop after the step it
    is in, so the checkpoint it saves is a step boundary and a resume is exact; a second signal
    stops at once. Only the main thread can take signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_signal is not None:
            raise KeyboardInterrupt  # asked twice: stop now (the checkpoint is still the last boundary)
        trainer.stop_signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    first_loss: float | None
    last_loss: float | None
    val: list[tuple[int, float, float]] = field(default_factory=list)  # (step, val_loss, val_bpb)


def _to_python(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach()
        return v.item() if v.numel() == 1 else v.float().cpu().tolist()
    return v


def average_stats(per_micro_batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each logged number over the step's micro-batches (element-wise for lists)."""
    def mean(values):
        if isinstance(values[0], list):
            return [mean([v[i] for v in values]) for i in range(len(values[0]))]
        if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            return sum(values) / len(values)
        return values[-1]

    keys = [k for k in per_micro_batch[0] if all(k in s for s in per_micro_batch)]
    return {k: mean([_to_python(s[k]) for s in per_micro_batch]) for k in keys}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fill_special_ids(config: ModelConfig, tokenizer) -> ModelConfig:
    """The model's bos/eos/pad ids follow the data's tokenizer where the config leaves them unset, and
    a prompt starts the way a document does in the packed data: after an EOS."""
    fill = {f"{n}_token_id": getattr(tokenizer, f"{n}_id", None) for n in ("bos", "eos", "pad")}
    fill["prompt_start_token_id"] = getattr(tokenizer, "eos_id", None)
    fill = {k: v for k, v in fill.items() if v is not None and getattr(config, k) is None}
    return config.replace(**fill) if fill else config


def build_model(model_config: ModelConfig, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Meta device -> parallelize hook -> memory on `device` -> initialised weights."""
    with torch.device("meta"):
        model = VelocisModel(model_config)
    model = parallelize(model, cfg)
    materialize(model, device)
    return model


# --- the trainer ---------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, model_config: ModelConfig, *, objective: Objective | None = None,
                 data: TrainData | None = None, resume: str | None = None, overwrite: bool = False,
                 prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 export_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        """prepare_model: changes the model once its starting weights are in, before the objective and
        the optimizer see it (LoRA adapters: align/lora.py); export_model: the model written as the run's
        model dir (the root and best/; LoRA: the adapters merged), checkpoints keep the trained model."""
        self.cfg = cfg
        self.objective = objective or NextTokenObjective()
        self.run_dir = cfg.run_dir
        # several processes (torchrun): join them; rank 0 writes the run's files, see distributed.py
        self.dist = distributed.setup(cfg.world_size, cfg.device, cfg.dist_timeout)
        if cfg.seq_len > model_config.max_seq_len:
            raise VelocisError(
                f"seq_len (--seq-len) {cfg.seq_len} is longer than the model's context ({model_config.max_seq_len} "
                f"tokens); use {model_config.max_seq_len} or less"
            )
        self.data = data or packed_data(cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.seed,
                                        rank=self.dist.rank, world_size=self.dist.world_size)
        self.tokenizer = self.data.tokenizer
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise VelocisError(
                f"the data's tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                f"{model_config.vocab_size}; build the model with vocab_size >= {self.tokenizer.vocab_size}"
            )
        self.model_config = model_config = fill_special_ids(model_config, self.tokenizer)

        self.device = distributed.device_for(cfg.device, self.dist)
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu":
            cpu_ops.available()  # build the C++ CPU kernels now (once per machine), not under the monitor's clock
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

        # Where does this run start? One writer per run dir: the lock is held until run() ends.
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(run_dir.locked_run_dir(self.run_dir))
        self.resume_from: Path | None = None
        try:
            if resume:
                self.resume_from = ckpt_io.find_checkpoint(self.run_dir if resume == "auto" else resume)
                ckpt_io.check_compatible(self.resume_from, model_config)
            else:
                distributed.run_on_main(lambda: run_dir.start_fresh(self.run_dir, overwrite))
        except BaseException:
            self.close()
            raise
        distributed.log_to_file(self.run_dir)

        seed_everything(cfg.seed)
        self.model = build_model(model_config, cfg, self.device)
        self.train_loader, self.val_loader = self.data.train, self.data.val
        self._val_start = self.val_loader.state_dict() if self.val_loader is not None else None
        self._train_iter = iter(self.train_loader)

        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0  # training seconds, summed over resumes (the time budget spans them)
        self._clock: float | None = None  # perf_counter of the last time `elapsed` was brought up to date
        self._save_seconds = 0.0  # how long the last checkpoint took (the next one's elapsed counts it in)
        self._step_seconds = 0.0  # recent mean step time: where the schedule of a time budget will be
        self.best_val = math.inf
        self.val_history: list[tuple[int, float, float]] = []
        self.stop_signal: int | None = None  # set by SIGINT / SIGTERM: stop after the current step
        self._last_save = self._last_eval = -1  # the steps last checkpointed / evaluated
        self._saving: str | None = None  # set while a checkpoint is being written
        if cfg.init_from:  # fine-tuning: start from a trained model's weights (a resume then loads its own)
            ckpt_io.load_weights(self.model, Path(cfg.init_from))
        if prepare_model is not None:
            self.model = prepare_model(self.model)
        start_data_parallel(self.model)  # now, with gradients on: an objective may first run it for inference
        self.export_model = export_model or (lambda model: model)
        # the objective sees the starting weights even on a resume (a frozen reference copies them)
        self.objective.setup(self.model, self.device)
        if self.resume_from is not None:
            ckpt_io.load_weights(self.model, self.resume_from)
        extra = self.objective.modules()
        self.optimizer = build_optimizer([np for m in (self.model, *extra.values()) for np in m.named_parameters()],
                                         cfg, self.device)
        register_step_hooks(self.optimizer, self.model, *extra.values())
        if self.resume_from is not None:
            self._load(self.resume_from)
        self._mark_boundary()

        self.loss_fn = self._loss
        if cfg.compile:
            self.loss_fn = torch.compile(self._loss)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.dist.is_main else distributed.NoMetrics()
        if self.resume_from is not None:
            self.metrics.truncate_after(self.step)

    # -- run dir ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the run directory's lock (run() does this when it ends)."""
        self._lock.close()

    # -- state ----------------------------------------------------------------------------
    def _mark_boundary(self) -> None:
        """Remember the data position and RNG states between steps: a checkpoint always records these,
        so even one taken while a step was cut short resumes exactly at the step that did not finish."""
        self._boundary = {"train_loader": self.train_loader.state_dict(), "rng": ckpt_io.rng_state()}

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "best_val": self.best_val,
            "val_history": self.val_history,
            # several processes: the optimizer goes into the checkpoint's shards
            **({} if self.dist.active else {"optimizer": self.optimizer.state_dict()}),
            "world_size": self.dist.world_size,
            **self._boundary,
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "objective": self.objective.name,
        }

    def _load(self, path: Path) -> None:
        state = ckpt_io.load_trainer_state(path)
        ckpt_io.check_global_batch(path, state.get("train_config", {}), state.get("world_size", 1), self.cfg,
                                   self.dist.world_size)
        ckpt_io.load_optimizer(self.model, self.optimizer, path, state, self.objective.modules())
        self.train_loader.load_state_dict(state["train_loader"])
        self._train_iter = iter(self.train_loader)
        ckpt_io.set_rng_state(state["rng"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.best_val = state["best_val"]
        self.val_history = [tuple(v) for v in state.get("val_history", [])]

    # -- pieces of a step --------------------------------------------------------------------
    def _loss(self, batch, num_tokens):
        return self.objective(self.model, batch, num_tokens)

    def _next_batch(self):
        try:
            batch = next(self._train_iter)
        except StopIteration:  # end of an epoch: start the next one
            self._train_iter = iter(self.train_loader)
            batch = next(self._train_iter)
        return to_device(batch, self.device)

    def progress(self) -> float:
        """Fraction of the run done (steps, or time against the budget; the further along)."""
        p = 0.0
        if self.cfg.max_steps:
            p = max(p, self.step / self.cfg.max_steps)
        if self.cfg.time_budget:
            p = max(p, self.elapsed / (self.cfg.time_budget * 60))
        return p

    def schedule_position(self) -> float:
        """Where the step about to run sits in the schedule, 0..1: the first step at 0, the last at 1,
        so the last step trains at the schedule's floor (a time budget: from the mean step time)."""
        p = 0.0
        if self.cfg.max_steps:
            p = max(p, self.step / max(self.cfg.max_steps - 1, 1))
        if self.cfg.time_budget:
            budget = self.cfg.time_budget * 60
            p = max(p, (self.elapsed + self._step_seconds) / budget)
        return min(p, 1.0)

    def lr_now(self) -> float:
        c = self.cfg
        return c.lr * lr_multiplier(
            self.step, self.schedule_position(), schedule=c.schedule, warmup_steps=c.warmup_steps,
            min_lr_ratio=c.min_lr_ratio, decay_fraction=c.decay_fraction,
        )

    def accumulate(self, batches: list) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward + backward over a step's micro-batches, each normalised by the valid target tokens
        of all of them. Returns (the step's loss, detached; stats averaged over the micro-batches)."""
        # several processes: every rank divides by the whole step's count (the gradients are summed)
        num_tokens = distributed.sum_over_ranks(sum(self.objective.num_tokens(b) for b in batches))
        if num_tokens == 0:
            raise VelocisError(f"step {self.step + 1}: no target token in the batch is scored (all are masked)")
        n = torch.tensor(float(num_tokens), device=self.device)
        total = torch.zeros((), device=self.device)
        stats = []
        for i, batch in enumerate(batches):
            with distributed.gradient_sync(self.model, enabled=i == len(batches) - 1):  # DDP: the last syncs
                with autocast_for(self.device, self.precision):
                    loss, s = self.loss_fn(batch, n)
                loss.backward()
            total += loss.detach()
            stats.append(s)
        for module in self.objective.modules().values():
            distributed.sum_gradients(module)
        return distributed.sum_over_ranks(total), distributed.mean_stats(average_stats(stats))

    def train_step(self) -> tuple[float, float, dict[str, Any], float]:
        """One optimizer step; returns (loss, grad norm, stats, lr)."""
        self.model.train()
        lr = self.lr_now()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # e.g. embeddings at their own rate (optim.py)
        total, stats = self.accumulate([self._next_batch() for _ in range(self.cfg.grad_accum)])
        loss_value = total.item()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = distributed.clip_grad_norm(params, clip)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {grad_norm}"
            last = ckpt_io.list_checkpoints(self.run_dir)
            hint = f"; the last good checkpoint is {last[-1][1]} (--resume it with a lower --lr)" if last else ""
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: {what} (lr {lr:.3e}); "
                f"lower --lr or raise --warmup{hint}"
            )
        self.optimizer.step()  # runs the parts' after_optimizer_step hooks (e.g. MoE bias updates)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum * self.dist.world_size
        self._mark_boundary()
        return loss_value, grad_norm, stats, lr

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float | None]:
        """The objective's validation loss (per token for next-token objectives) over the first
        `eval_batches` validation batches, and bits per byte where the data knows its bytes per token."""
        self.model.eval()
        self.val_loader.load_state_dict(self._val_start)  # the same batches every time
        total, count = 0.0, 0
        # several processes: each rank its own slice, the same number of batches on every rank
        batches = self.cfg.eval_batches
        if self.dist.active and hasattr(self.val_loader, "__len__"):
            batches = distributed.min_over_ranks(min(batches, len(self.val_loader)))
        for i, batch in enumerate(self.val_loader):
            if i >= batches:
                break
            with autocast_for(self.device, self.precision):
                loss_sum, n = self.objective.evaluate(self.model, to_device(batch, self.device))
            total += float(loss_sum)
            count += int(n)
        total, count = distributed.sum_over_ranks(total), distributed.sum_over_ranks(count)
        if not count:
            raise VelocisError(f"{self.data.where}: the validation split is empty or shorter than seq_len (--seq-len)")
        val_loss = total / count
        # nats/token -> bits/token -> bits/byte
        bpb = val_loss / math.log(2) / self.data.bytes_per_token if self.data.bytes_per_token else None
        self.model.train()
        return val_loss, bpb

    def _tick(self) -> None:
        """Bring `elapsed` up to now (the time budget is wall time: evals and checkpoints count too)."""
        now = time.perf_counter()
        if self._clock is not None:
            self.elapsed += now - self._clock
        self._clock = now

    def save(self) -> Path:
        self._saving = f"the checkpoint of step {self.step}"  # what a lost rank's error names
        self._tick()
        t0 = time.perf_counter()
        state = self.trainer_state()
        # the checkpoint's clock includes this save, estimated by the last one's duration, so a run
        # resumed from it stands where the uninterrupted run does after the save
        state["elapsed"] = self.elapsed + self._save_seconds
        if self.dist.active:  # every rank writes its shards
            path = sharded_checkpoint.save(self.run_dir, self.step, self.model, self.optimizer, self.tokenizer,
                                           state, self.objective.modules())
        else:
            path = ckpt_io.save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, state)
        model = self._model_to_write()
        if model is not None:
            ckpt_io.prune_checkpoints(self.run_dir, self.cfg.keep_last)
            ckpt_io.write_root_model(self.run_dir, model, self.tokenizer)
        self._save_seconds = time.perf_counter() - t0
        self._last_save = self.step
        self._saving = None
        self._tick()
        return path

    def _model_to_write(self):
        """The model a model dir (the root, best/) holds: this one, or under several processes the whole
        model gathered on rank 0 (every rank must call this; None on the others)."""
        model = self.export_model(self.model)
        return sharded_checkpoint.gather_full_model(model) if self.dist.active else model

    def _agree(self) -> None:
        """Several processes decide alike whether to stop and where the schedule stands: the slowest
        rank's clock, and a stop signal any rank got."""
        if self.dist.active:
            self.elapsed, self._step_seconds, stop = distributed.max_over_ranks(
                self.elapsed, self._step_seconds, float(self.stop_signal or 0))
            self.stop_signal = int(stop) or None

    def done(self) -> bool:
        return self.progress() >= 1.0

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if not cfg.max_steps and not cfg.time_budget:
            raise VelocisError("give max_steps or time_budget (--max-steps / --time-budget, or both) so the run "
                               "knows when to stop")
        n_params = sum(p.numel() for p in self.model.parameters())
        title = (f"velocis train · {self.run_dir} · {n_params / 1e6:.1f}M params · {self.device.type} {self.precision}"
                 f" · batch {cfg.batch_size}x{cfg.seq_len}x{cfg.grad_accum}")
        if self.dist.active:
            title += f"x{self.dist.world_size} ranks ({distributed.layout(cfg)})"
        monitor = make_monitor(cfg.monitor if self.dist.is_main else "none", title, cfg.max_steps, cfg.log_every)
        if self.dist.is_main:
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        # a resumed run starts from a saved step: nothing to save or evaluate again there
        self._last_save = self._last_eval = self.step if self.resume_from is not None else -1
        monitor.start()
        if self.resume_from is not None:
            monitor.note(f"resumed from {self.resume_from} at step {self.step}")
        if cfg.compile and self.device.type == "cpu" and cpu_ops.available():
            monitor.note("note: under torch.compile the CPU runs without Velocis' C++ kernels (GEMM, attention); "
                         "eager trains faster on a CPU (benchmarks/RESULTS.md)")
        if self.precision == "bf16" and not hardware_bf16(self.device):
            monitor.note(f"warning: --precision bf16 on a {self.device.type} without bf16 matrix hardware runs "
                         "emulated and far slower than fp32; use --precision auto (fp32 here)")
        try:
            with stop_at_step_boundary(self):
                first_loss, last_loss = self._loop(monitor)
        except KeyboardInterrupt:  # a second signal, or an interrupt raised inside a step
            # (several processes save only at a step boundary they all agreed on)
            if self.step > 0 and self._last_save != self.step and not self.dist.active:
                monitor.note("interrupted: saving a checkpoint of the last finished step…")
                self.save()
            raise
        except BaseException as e:  # BaseException: DCP's CheckpointException (a peer lost mid-save) is one
            if self.dist.active and distributed.is_collective_failure(e):
                raise distributed.rank_lost(e, self._saving or f"step {self.step + 1}", cfg.dist_timeout,
                                            self._resume_hint()) from None
            raise
        finally:
            monitor.stop()
            self.metrics.close()
            self.close()
        if cfg.plot and self.step > 0 and self.dist.is_main:
            from velocis.train.plot import plot_run

            with contextlib.suppress(Exception):  # a plot must never fail a finished run
                monitor.note(f"curves: {plot_run(self.run_dir)}")
        return TrainResult(self.run_dir, self.step, self.tokens, self.elapsed, first_loss, last_loss,
                           list(self.val_history))

    def _loop(self, monitor) -> tuple[float | None, float | None]:
        """Steps until done (or a stop signal); evaluates and saves on schedule and at the end."""
        cfg = self.cfg
        first_loss = last_loss = None
        window: deque[float] = deque(maxlen=20)  # recent step times, for tokens/s and the ETA
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.dist.world_size
        if self.step == 0:
            self._eval_and_record(monitor)  # the starting point of the validation curve
        self._clock = time.perf_counter()  # the time budget counts from here (and spans resumes)
        while not self.done() and self.stop_signal is None:
            t0 = time.perf_counter()
            loss, grad_norm, stats, lr = self.train_step()
            now = time.perf_counter()
            if self.step == 1 and cfg.compile:
                monitor.note(f"compiled + first step in {now - t0:.1f}s")
            else:
                window.append(now - t0)
            self._tick()
            step_time = self._step_seconds = sum(window) / len(window) if window else now - t0
            self._agree()
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            rec = {"type": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens": self.tokens, "tokens_per_s": tokens_per_step / step_time, "elapsed_s": self.elapsed}
            self.metrics.write({**rec, **stats})
            rec.update(eta_s=self._eta(step_time), memory=memory_usage(), last=self.done(),
                       stats={k: v for k, v in stats.items() if k != "lm_loss"})
            monitor.train(rec)
            if self.stop_signal is not None:
                break  # the checkpoint below is this step's; no eval first (the user asked to stop)
            if self.step % cfg.eval_every == 0:
                self._eval_and_record(monitor)
            if self.step % cfg.save_every == 0:
                monitor.note(f"saved {self.save()}")
            self._tick()
            self._agree()
        if self.stop_signal is not None:
            if self.step > 0 and self._last_save != self.step:
                monitor.note(f"{signal.Signals(self.stop_signal).name}: saved {self.save()}; "
                             f"continue with --resume")
            raise TrainingInterrupted(self.stop_signal)
        # The end of the run is evaluated and saved here, whichever check (steps or the time
        # budget, which can run out during an eval) ended the loop.
        if self.step > 0 and self._last_eval != self.step:
            self._eval_and_record(monitor)
        if self.step > 0 and self._last_save != self.step:
            monitor.note(f"saved {self.save()}")
        return first_loss, last_loss

    def _eval_and_record(self, monitor) -> None:
        if self.val_loader is None:
            return
        val_loss, bpb = self.evaluate()
        self._last_eval = self.step
        self.val_history.append((self.step, val_loss, bpb))
        rec = {"type": "eval", "step": self.step, "val_loss": val_loss, "val_bpb": bpb}
        self.metrics.write(rec)
        monitor.eval(rec)
        if val_loss < self.best_val and self.step > 0:
            self.best_val = val_loss
            model = self._model_to_write()
            if model is not None:
                ckpt_io.save_best(self.run_dir, model, self.tokenizer,
                                  {"step": self.step, "val_loss": val_loss, "val_bpb": bpb})

    def _resume_hint(self) -> str:
        last = ckpt_io.list_checkpoints(self.run_dir)
        if last:
            return f"the last complete checkpoint is {last[-1][1]}: launch again with --resume"
        return "no checkpoint was complete yet: launch the run again"

    def _eta(self, step_time: float) -> float | None:
        etas = []
        if self.cfg.max_steps:
            etas.append((self.cfg.max_steps - self.step) * step_time)
        if self.cfg.time_budget:
            etas.append(self.cfg.time_budget * 60 - self.elapsed)
        return min(etas) if etas else None


def train(cfg: TrainConfig, model_config: ModelConfig, *, objective=None, data: TrainData | None = None,
          resume: str | None = None, overwrite: bool = False, prepare_model=None, export_model=None) -> TrainResult:
    """Build a Trainer and run it to the end of its step or time budget."""
    return Trainer(cfg, model_config, objective=objective, data=data, resume=resume, overwrite=overwrite,
                   prepare_model=prepare_model, export_model=export_model).run()
