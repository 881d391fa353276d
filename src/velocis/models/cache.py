"""Caches for decoding. The caller owns them: `model.new_cache(batch_size, max_len)` builds one,
`model(ids, cache=cache)` reads and extends it, and the caller may reset or roll back rows.

    cache.lengths          LongTensor [B]: tokens held per row (each row its own length)
    cache.reset(rows)      forget rows (all by default): their next token is position 0
    cache.rollback(n)      keep only the first n[b] tokens of each row (speculative decoding's undo)

Each mixer makes its own layer cache and says what kind it is (`CACHE_KINDS`):
  "kv"      per-token keys and values (attention)
  "latent"  a per-token compressed latent (MLA)
  "state"   a fixed-size recurrent state per sequence (state-space / linear-attention mixers)
Per-token caches are preallocated for max_len slots and written at each token's position; a
query at position p sees slots 0..p, so slots past a row's length are invisible, and resetting
or rolling back a row only moves its length. A state cannot be rolled back without a saved
checkpoint of it, so a "state" layer must implement `rollback` itself or the cache refuses.
"""
from __future__ import annotations

import torch
from torch import nn

from velocis.errors import VelocisError

CACHE_KINDS = ("kv", "latent", "state")


def write_slots(buf: torch.Tensor, dim: int, ids: torch.Tensor, values: torch.Tensor) -> None:
    """buf[b, ..., ids[b, t], ...] = values[b, ..., t, ...] along `dim`; ids [T] (shared) or [B, T]."""
    values = values.to(buf.dtype)
    if ids.dim() == 1:
        buf.index_copy_(dim, ids, values)
        return
    shape = [1] * values.dim()
    shape[0], shape[dim] = ids.shape
    buf.scatter_(dim, ids.view(shape).expand_as(values), values)


class LayerCache(nn.Module):
    """Base of a layer's cache: buffers preallocated for `max_len` slots (or a fixed state).

    Per-token buffers are [batch, ..., slot, ...] with the slot dimension named in `slot_dims`; a
    mixer writes and reads them through `write` / `read`, so the same mixer code runs over this
    static layout or over the inference engine's paged blocks (infer/paged.py), which override both.
    """

    kind = "kv"
    slot_dims: dict[str, int] = {}  # buffer name -> its slot (position) dimension

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len

    def write(self, name: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Store values [B, ..., T, ...] at positions ids ([T] or [B, T]) of buffer `name`."""
        write_slots(getattr(self, name), self.slot_dims[name], ids, values)

    def read(self, name: str, length: int | None = None) -> torch.Tensor:
        """Buffer `name` for every row, its first `length` slots (all by default)."""
        buf = getattr(self, name)
        return buf if length is None else buf.narrow(self.slot_dims[name], 0, length)

    def reset(self, rows: torch.Tensor) -> None:
        """Per-token caches need nothing (lengths mask stale slots); a state cache zeroes its rows."""

    def rollback(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        if self.kind == "state":
            raise VelocisError(f"{type(self).__name__} keeps a recurrent state and cannot roll back tokens; "
                               f"speculative decoding and prefix reuse are not available for this model")


class Cache:
    """The whole model's cache: one layer cache per block plus the filled length of each row."""

    def __init__(self, layers: list[LayerCache], max_len: int, batch_size: int, device=None):
        self.layers, self.max_len, self.batch_size = layers, max_len, batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    def next_positions(self, T: int) -> torch.Tensor:
        """[B, T]: the positions of T new tokens appended to every row."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def advance(self, ids: torch.Tensor) -> None:
        """After a forward wrote positions `ids` ([T] or [B, T]): each row now ends after its last one."""
        last = ids[..., -1] + 1
        self.lengths = last.expand(self.batch_size).clone() if last.dim() == 0 else last.clone()

    def _rows(self, rows) -> torch.Tensor:
        if rows is None:
            return torch.arange(self.batch_size, device=self.lengths.device)
        return torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device).reshape(-1)

    def reset(self, rows=None) -> None:
        rows = self._rows(rows)
        self.lengths[rows] = 0
        for layer in self.layers:
            layer.reset(rows)

    def rollback(self, lengths) -> None:
        """Shorten every row b to lengths[b] tokens (an int applies to all rows)."""
        new = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device).expand(self.batch_size)
        if bool((new > self.lengths).any()) or bool((new < 0).any()):
            raise VelocisError(f"cannot roll the cache back to lengths {new.tolist()}: rows hold "
                               f"{self.lengths.tolist()} tokens (a rollback only shortens)")
        rows = torch.nonzero(new < self.lengths).flatten()
        if len(rows):
            for layer in self.layers:
                layer.rollback(rows, new)
        self.lengths = new.clone()
