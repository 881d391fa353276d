"""PackedLoader: memory-mapped token shards -> packed (input, target) batches.

A split's shards, concatenated, form one token stream (documents already end in an
end-of-text token). Sequence i is stream[i*T : i*T + T + 1]: the input is its first T tokens,
the target its last T (the input shifted by one), so consecutive sequences share one token
and together cover the whole stream.

Each epoch the sequence indices are shuffled with (seed, epoch), and rank r of world_size takes
every world_size-th of them, starting at r: the ranks' sets are disjoint and together hold
every sequence. Training iterates forever; every rank yields the same number of full batches
per epoch (so ranks stay in step), leaving out at most batch_size * world_size sequences, a
different few each epoch. Validation makes one pass per iteration and keeps the last partial
batch. The position (epoch, step) is the loader's state, so a resumed run reads on exactly
where it stopped. Only the slices a batch needs are read from disk.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from velocis.tokenizer import check_tokenizer_matches
from velocis.errors import VelocisError


class PackedLoader:
    def __init__(self, data_dir: str | Path, seq_len: int, batch_size: int, split: str = "train",
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        self.data_dir = Path(data_dir)
        if split not in ("train", "val"):
            raise VelocisError(f"split {split!r} must be 'train' or 'val'")
        if seq_len < 1 or batch_size < 1:
            raise VelocisError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise VelocisError(f"rank {rank} must be in 0..world_size-1 (world_size {world_size})")
        index_file = self.data_dir / "index.json"
        if not index_file.is_file():
            raise VelocisError(f"{self.data_dir}: not a prepared data directory (no index.json); run `velocis data prepare`")
        index = json.loads(index_file.read_text(encoding="utf-8"))
        # the tokenizer copy must be the one the shards were made with (it is loaded once per process)
        check_tokenizer_matches(self.data_dir)
        info = index["splits"][split]
        self.seq_len, self.batch_size, self.split = seq_len, batch_size, split
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.dtype = np.dtype(index["dtype"])
        self.num_tokens = int(info["tokens"])
        self.bytes_per_token = float(info["bytes_per_token"])
        if self.num_tokens < seq_len + 1:
            raise VelocisError(
                f"{self.data_dir}: the {split} split has {self.num_tokens} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; use a shorter --seq-len, more text, or a larger --val-fraction"
            )
        self.num_sequences = (self.num_tokens - 1) // seq_len
        if split == "train" and self.num_sequences // world_size < batch_size:
            raise VelocisError(
                f"{self.data_dir}: the train split holds {self.num_sequences} sequences of {seq_len} tokens, "
                f"fewer than batch_size x world_size = {batch_size * world_size}; use a smaller batch or --seq-len"
            )
        # Lazily opened memory maps of each shard's used prefix, and where each starts in the stream.
        self._shards = [(self.data_dir / s["path"], int(s["used_tokens"])) for s in info["shards"] if s["used_tokens"]]
        self._starts = np.cumsum([0] + [n for _, n in self._shards])
        self._maps: list[np.memmap | None] = [None] * len(self._shards)
        self.epoch, self.step = 0, 0

    # -- which sequences this rank reads ----------------------------------------------------------
    def rank_sequences(self, epoch: int) -> np.ndarray:
        """This rank's sequence indices for `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
        mine = order[self.rank :: self.world_size]
        if self.split == "train":  # equal full batches on every rank
            mine = mine[: self.batches_per_epoch * self.batch_size]
        return mine

    @property
    def batches_per_epoch(self) -> int:
        if self.split == "train":
            return (self.num_sequences // self.world_size) // self.batch_size
        mine = len(range(self.rank, self.num_sequences, self.world_size))
        return -(-mine // self.batch_size)

    # -- reading -------------------------------------------------------------------------------
    def _map(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            path, n = self._shards[i]
            self._maps[i] = np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))
        return self._maps[i]

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] as int64, across shard boundaries."""
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo = pos - self._starts[i]
            take = min(stop, self._starts[i + 1]) - pos
            out[pos - start : pos - start + take] = self._map(i)[lo : lo + take]
            pos += take
            i += 1
        return out

    def batch(self, sequence_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([self.read_tokens(int(s) * T, int(s) * T + T + 1) for s in sequence_ids])
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            sequences = self.rank_sequences(self.epoch)
            while self.step < self.batches_per_epoch:
                ids = sequences[self.step * self.batch_size : (self.step + 1) * self.batch_size]
                self.step += 1  # advanced before yielding: the state then points at the next batch
                yield self.batch(ids)
            self.epoch, self.step = self.epoch + 1, 0
            if self.split != "train":
                return

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- exact resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
                "split": self.split, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A position saved at another world size (or per-rank batch) continues at the same place in
        the epoch's sequence order: its `step` batches of batch_size x world_size sequences are then
        counted in this loader's batches (which must fit a whole number of times)."""
        for key in ("seq_len", "split", "num_tokens", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise VelocisError(
                    f"the saved data position was taken with {key}={state[key]}, this loader has "
                    f"{getattr(self, key)}; resume with the same data and settings"
                )
        epoch, step = int(state["epoch"]), int(state["step"])
        saved = int(state.get("batch_size", self.batch_size)) * int(state.get("world_size", self.world_size))
        here = self.batch_size * self.world_size
        if saved != here:
            if (step * saved) % here:
                raise VelocisError(
                    f"the saved data position ({step} batches of {saved} sequences over all ranks) is not a whole "
                    f"number of batches of {here} (batch_size {self.batch_size} x world_size {self.world_size}); "
                    f"resume with the same global batch"
                )
            step = step * saved // here
        self.epoch, self.step = epoch, step
