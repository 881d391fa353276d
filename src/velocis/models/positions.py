"""Positions: where each token of a forward sits, for RoPE, cache writes and attention masks.

The model builds one `Positions` per forward and hands it to every mixer:
  ids      [T] shared by every row (training, the common case: RoPE and kernels take the fast path)
           or [B, T], every row its own offset (batched decoding, packed documents)
  doc_ids  [B, T] document index of each token when rows pack several documents (the ids restart
           inside a row), else None: attention and recurrent state never cross a document boundary
  kv_len   with a cache, how many cache slots any query may see (largest position + 1, a host int,
           so the attention back end reads only the filled part of a preallocated cache)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Positions:
    ids: torch.Tensor
    doc_ids: torch.Tensor | None = None
    kv_len: int = 0

    @staticmethod
    def of(pos) -> "Positions":
        """A Positions, or plain position ids ([T] or [B, T]) wrapped as one (calling a mixer directly)."""
        if isinstance(pos, Positions):
            return pos
        ids = torch.as_tensor(pos, dtype=torch.long)
        return Positions(ids, None, int(ids.max()) + 1 if ids.numel() else 0)

    @property
    def per_row(self) -> bool:
        return self.ids.dim() == 2

    def rows(self, batch_size: int) -> torch.Tensor:
        """ids as [B, T] (a view when they are shared)."""
        return self.ids if self.per_row else self.ids.expand(batch_size, -1)

    @staticmethod
    def documents(ids: torch.Tensor) -> torch.Tensor | None:
        """[B, T] document index (a new document wherever the position does not increase), or None
        when no row restarts (one document per row)."""
        restart = ids[:, 1:] <= ids[:, :-1]
        if not bool(restart.any()):
            return None
        return torch.cat([torch.zeros_like(ids[:, :1]), restart.long().cumsum(1)], dim=1)
