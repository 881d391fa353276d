"""What the trainer reads: a tokenizer and two loaders of batches, whatever the objective.

Pretraining reads a prepared data dir (`packed_data`: fixed-length windows of packed documents);
alignment objectives bring their own (chat conversations packed with their boundaries, preference
pairs, prompts for sampling) by building a TrainData and handing it to the Trainer. A loader is
an iterable of batches (any nesting of tuples / lists / dicts of tensors: the trainer moves them
to the device and hands them to the objective as they are) with `state_dict()` /
`load_state_dict()`, so a resumed run continues at the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from velocis.errors import VelocisError


@dataclass
class TrainData:
    tokenizer: Any
    train: Any
    val: Any | None = None  # None: no validation (the run's eval records are skipped)
    bytes_per_token: float | None = None  # known: validation also reports bits per byte
    where: str = ""  # names the data in errors


def packed_data(data_dir: str | Path, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                world_size: int = 1) -> TrainData:
    """A prepared data dir (velocis data prepare): next-token windows of seq_len tokens; under several
    processes each rank reads only its own slice of every split."""
    from velocis.data import PackedLoader
    from velocis.tokenizer import Tokenizer

    data_dir = Path(data_dir)
    if not (data_dir / "index.json").is_file():
        raise VelocisError(f"data directory {data_dir}: not prepared (no index.json); "
                           f"run `velocis data prepare` or pass --chinese-path/--english-path")
    train = PackedLoader(data_dir, seq_len, batch_size, split="train", rank=rank, world_size=world_size, seed=seed)
    val = PackedLoader(data_dir, seq_len, batch_size, split="val", rank=rank, world_size=world_size, seed=seed)
    return TrainData(Tokenizer.load(data_dir), train, val, val.bytes_per_token, str(data_dir))


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch's tensors on `device`, its structure unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
