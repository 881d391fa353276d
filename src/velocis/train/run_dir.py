"""What a training run may write in its --output-dir, and the lock that keeps it to one writer.

A run owns RUN_NAMES (checkpoints, best/, metrics, the latest model at the root, the data it
prepared). A fresh run refuses a directory holding anything else (another model's files, a user's
files) unless overwrite, and even then deletes only what a run writes; it refuses a directory
holding a run unless resume or overwrite. `locked_run_dir` takes the directory's lock
(utils/lock.py) so a second training, resume or data preparation into it is refused.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from velocis.errors import VelocisError
from velocis.utils.lock import dir_lock
from velocis.utils.output_dir import check_output_dir

# checkpoints/, best/, metrics, plots and the latest model (+ tokenizer) at the root, the train
# config, and what `train-*` / the demo prepare from raw text in the run dir
RUN_NAMES = {"checkpoints", "best", "metrics.jsonl", "curves.png", "model.safetensors", "config.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "train_config.json",
             "data", "tokenizer", "data_source.json", "corpus", "logs",
             "adapter_model.safetensors", "adapter_config.json"}  # a LoRA run's adapters (align/lora.py)
# what a fresh start (overwrite) removes: the previous run's outputs, not its prepared data
_PREVIOUS_RUN = ("checkpoints", "best", "metrics.jsonl", "curves.png", "model.safetensors", "config.json", "logs",
                 "adapter_model.safetensors", "adapter_config.json")


def is_run_dir(path: Path) -> bool:
    """A run's directory, or one a run's data preparation started; not a plain model directory."""
    return (path / "train_config.json").exists() or (path / "checkpoints").exists() or not (path / "config.json").exists()


def locked_run_dir(path: str | Path):
    """The run dir's lock. Under a launcher only rank 0 takes it: the other ranks of the same run write
    only their checkpoint shards and logs, under rank 0's lock."""
    if int(os.environ.get("RANK", "0") or 0) > 0:
        return contextlib.nullcontext(Path(path))
    return dir_lock(path, what="a training run")


def check_run_dir(path: str | Path, overwrite: bool, resume: bool) -> None:
    """Before any work: may a run (fresh, or resumed) use this directory?"""
    path = Path(path)
    if resume:
        return  # find_checkpoint says what is wrong with a dir that holds no run
    has_run = (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir())
    if has_run and not overwrite:
        raise VelocisError(f"{path} already holds a training run; pass --resume (resume=...) to continue it, "
                           f"--overwrite (overwrite=True) to start over, or choose another output directory")
    check_output_dir(path, RUN_NAMES, "a training run", overwrite, flag="output_dir (--output-dir)",
                     is_own=is_run_dir)


def start_fresh(path: str | Path, overwrite: bool) -> None:
    """Clear a previous run's outputs (only with overwrite; only names a run writes) and make the dir."""
    path = Path(path)
    check_run_dir(path, overwrite, resume=False)
    if overwrite and is_run_dir(path):
        for name in _PREVIOUS_RUN:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
