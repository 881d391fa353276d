"""Checkpoints: `RUN/checkpoints/step_N/` = model.safetensors + config.json + tokenizer files
+ trainer_state.json / trainer_state.safetensors (optimizer, step, RNG states, data position, best
val; no pickle: train/state_io.py).

Every checkpoint directory is built aside and renamed into place (atomic_path), so a run
killed mid-save leaves the previous checkpoints intact. A run on several processes writes sharded
checkpoints instead (train/sharded_checkpoint.py: torch.distributed.checkpoint shards + the same
trainer state); both kinds resume at any world size. We keep the last K, plus `RUN/best/`
(the lowest validation loss so far), plus the latest model at the run dir root so that
`velocis generate --model RUN` works.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.train import state_io
from velocis.utils.atomic import atomic_path

STATE_FILE = state_io.STATE_JSON
_STEP_DIR = re.compile(r"^step_(\d+)$")


# --- RNG ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing -------------------------------------------------------------------------------
def _write_model(model, tokenizer, out_dir: Path) -> None:
    from velocis.model_io import save_model

    save_model(model, tokenizer, out_dir)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict[str, Any]) -> Path:
    """Write checkpoints/step_N atomically; returns its path."""
    target = Path(run_dir) / "checkpoints" / f"step_{step}"
    with atomic_path(target) as tmp:
        _write_model(model, tokenizer, tmp)
        state_io.save_state(trainer_state, tmp)
    return target


def save_best(run_dir: Path, model, tokenizer, info: dict[str, Any]) -> None:
    """RUN/best/: the model with the lowest validation loss so far (no optimizer state)."""
    import json

    with atomic_path(Path(run_dir) / "best") as tmp:
        _write_model(model, tokenizer, tmp)
        (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")


def write_root_model(run_dir: Path, model, tokenizer) -> None:
    """The latest weights + config + tokenizer at the run dir root, file by file.

    The run dir also holds metrics and checkpoints, so we cannot swap the whole directory:
    build the model dir aside, then rename each file over its old copy (each rename is atomic).
    """
    run_dir = Path(run_dir)
    with tempfile.TemporaryDirectory(prefix=".model.", dir=run_dir) as tmp:
        out = Path(tmp) / "model"
        _write_model(model, tokenizer, out)
        for f in sorted(out.iterdir()):
            if f.is_file():
                os.replace(f, run_dir / f.name)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    found = []
    for d in ck.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and state_io.has_state(d):
            found.append((int(m.group(1)), d))
    return sorted(found)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step_N dirs (best/ is a separate copy)."""
    for _, d in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


# --- reading -------------------------------------------------------------------------------
def find_checkpoint(path: str | Path) -> Path:
    """A run dir (-> its newest checkpoint), a checkpoints/ dir, or a step_N dir itself."""
    path = Path(path)
    if not path.exists():
        raise VelocisError(f"--resume {path}: no such directory")
    if state_io.has_state(path):
        return path
    base = path.parent if path.name == "checkpoints" else path
    found = list_checkpoints(base)
    if found:
        return found[-1][1]
    raise VelocisError(
        f"--resume {path}: no checkpoint here (looked for checkpoints/step_N/{STATE_FILE}); "
        f"train without --resume to start a new run"
    )


def check_compatible(ckpt: Path, config: ModelConfig) -> None:
    """The checkpoint's model config must equal the one this run builds."""
    saved = ModelConfig.load(ckpt / "config.json").to_dict()
    want = config.to_dict()
    diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {want.get(k)!r}" for k in diff[:6])
        raise VelocisError(
            f"--resume {ckpt}: the checkpoint is a different model ({detail}); "
            f"resume with the same preset/shape flags, or start a new --output-dir"
        )


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's weights into `model` in place (exactly; tied weights may be stored once):
    model.safetensors, or a sharded checkpoint's shards; into a sharded model, each rank its pieces."""
    from velocis.model_io import read_safetensors
    from velocis.train import sharded_checkpoint
    from velocis.train.parallelize import has_sharded_params, load_full_state

    if sharded_checkpoint.is_sharded(ckpt):
        sharded_checkpoint.load_model(model, ckpt)
        return
    sd = read_safetensors(ckpt / "model.safetensors")
    if has_sharded_params(model):
        load_full_state(model, sd, str(ckpt))
        return
    missing, unexpected = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in sd if k in params}
    # A name missing from the file is fine only if it is tied to a loaded tensor.
    missing = [k for k in missing if not (k in params and params[k].data_ptr() in loaded_ptrs)]
    if missing or unexpected:
        raise VelocisError(
            f"{ckpt}: weights do not fit the model (missing {missing[:4]}, unexpected {list(unexpected)[:4]})"
        )


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return state_io.load_state(ckpt)


def check_global_batch(ckpt: Path, saved_config: dict[str, Any], saved_world: int, cfg, world: int) -> None:
    """A resume continues the run exactly only with the same sequence length and, per optimizer step,
    the same sequences: at the same world size the same batch flags, at another world size the same
    global batch (batch_size x grad_accum x world_size)."""
    same = ("batch_size", "seq_len", "grad_accum") if saved_world == world else ("seq_len",)
    for key in same:
        if key in saved_config and saved_config[key] != getattr(cfg, key):
            raise VelocisError(
                f"resume from {ckpt}: the run used {key} (--{key.replace('_', '-')}) {saved_config[key]}, now "
                f"{getattr(cfg, key)}; resume with the same value to continue exactly"
            )
    if saved_world != world:
        was = saved_config.get("batch_size", cfg.batch_size) * saved_config.get("grad_accum", cfg.grad_accum) * saved_world
        now = cfg.batch_size * cfg.grad_accum * world
        if was != now:
            raise VelocisError(
                f"resume from {ckpt}: the run's global batch was {was} sequences per step (batch_size x grad_accum "
                f"x world_size {saved_world}), now {now} at world size {world}; set --batch-size / --grad-accum so "
                f"that they match"
            )


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, state: dict[str, Any],
                   extras: dict[str, torch.nn.Module] | None = None) -> None:
    """The optimizer state of a checkpoint of either kind, into an optimizer of any layout."""
    from velocis.train import sharded_checkpoint
    from velocis.train.parallelize import has_sharded_params

    if state.get("sharded"):
        sharded_checkpoint.load_optimizer(model, optimizer, ckpt, extras)
    elif has_sharded_params(model):  # one process's state (by parameter index) -> this rank's shards
        sharded_checkpoint.load_full_optimizer(model, optimizer, state["optimizer"], extras)
    else:
        optimizer.load_state_dict(state["optimizer"])
