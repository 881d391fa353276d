"""Paged KV cache: the inference engine's memory, in fixed-size blocks (vLLM's PagedAttention layout).

Every layer's cache is one pool of `num_blocks` blocks of `block_size` token slots, built by the
layer's own mixer (`mixer.new_cache(num_blocks, block_size)`: an attention pool is k/v
[blocks, kv_heads, block_size, head_dim], an MLA pool its latent [blocks, block_size, rank + rope]).
A sequence owns a block table, the list of its blocks in order; position p lives in block
table[p // block_size] at offset p % block_size. Blocks are refcounted, so sequences with the same
prompt prefix share the blocks that hold it (prefix caching): a full block is registered under the
hash of (its parent's hash, its tokens) and found again by a later request with the same prefix;
freed cached blocks stay findable until the allocator needs them (LRU eviction).

The model sees a `PagedCache`: its layers implement the LayerCache `write` / `read` contract over
the pools, so mixers run unchanged. `read` gathers each row's blocks into a contiguous
[B, ..., length, ...] tensor, the plain-PyTorch reference of a paged attention kernel (a fused
kernel that reads blocks in place is the GPU path's job). Block 0 is scratch: table entries past a
sequence's blocks point there, so padding never lands in a real block.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from velocis.errors import VelocisError
from velocis.models.cache import LayerCache

SCRATCH = 0


class BlockAllocator:
    """Free blocks, refcounts, and the prefix cache (hash -> block, LRU of unreferenced cached blocks)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise VelocisError(f"the KV cache holds {num_blocks} blocks; it needs at least 2: give it more memory")
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, 0, -1))  # block 0 is scratch
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, int] = {}  # block -> its prefix hash, while it is cached
        self.cached: dict[int, int] = {}  # prefix hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody references, oldest first
        self.hits = self.queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int | None:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
        else:
            return None
        self.refs[block] = 1
        return block

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None  # keep its contents for a later prefix hit
            else:
                self.free.append(block)

    def register(self, block: int, prefix_hash: int) -> None:
        """A full block's contents are final: make it findable by its prefix hash."""
        if prefix_hash not in self.cached and block not in self.hash_of:
            self.cached[prefix_hash] = block
            self.hash_of[block] = prefix_hash

    def lookup(self, prefix_hash: int) -> int | None:
        """A cached block for this prefix, referenced for the caller, or None."""
        self.queries += 1
        block = self.cached.get(prefix_hash)
        if block is None:
            return None
        self.hits += 1
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1
        return block


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """Prefix hash of every full block of `tokens` (each depends on all tokens before it)."""
    out, h = [], 0
    for i in range(0, len(tokens) - block_size + 1, block_size):
        h = hash((h, tuple(tokens[i:i + block_size])))
        out.append(h)
    return out


class BlockTables:
    """The block tables of the rows of one forward: [rows, max blocks] (scratch where unused)."""

    def __init__(self, block_size: int, device):
        self.block_size, self.device = block_size, device
        self.table = torch.zeros(1, 1, dtype=torch.long, device=device)

    def set(self, tables: list[list[int]], width: int) -> None:
        t = torch.full((len(tables), max(width, 1)), SCRATCH, dtype=torch.long)
        for i, row in enumerate(tables):
            t[i, :len(row)] = torch.tensor(row[:width], dtype=torch.long)
        self.table = t.to(self.device)


class PagedLayer(LayerCache):
    """One layer's cache over its block pool: `write` / `read` through the rows' block tables."""

    def __init__(self, pool: LayerCache, tables: BlockTables):
        super().__init__(max_len=0)
        self.pool, self.tables = pool, tables
        self.kind, self.slot_dims = pool.kind, pool.slot_dims
        if pool.kind == "state":
            raise VelocisError("the paged engine keeps per-token caches; this model has recurrent state layers")

    def write(self, name: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        d, bs = self.slot_dims[name], self.tables.block_size
        B, T = values.shape[0], values.shape[d]
        ids = ids.expand(B, T) if ids.dim() == 1 else ids
        block = self.tables.table.gather(1, ids // bs)  # [B, T]
        pool = getattr(self.pool, name).movedim(d, 1)  # [blocks, block_size, ...]: a view of the pool
        pool[block.reshape(-1), (ids % bs).reshape(-1)] = values.movedim(d, 1).reshape(B * T, *pool.shape[2:]).to(pool.dtype)

    def read(self, name: str, length: int | None = None) -> torch.Tensor:
        d, bs = self.slot_dims[name], self.tables.block_size
        table = self.tables.table
        length = length if length is not None else table.shape[1] * bs
        n = math.ceil(length / bs)
        pool = getattr(self.pool, name).movedim(d, 1)
        rows = pool[table[:, :n]]  # [B, n, block_size, ...]: the gather a paged kernel avoids
        rows = rows.reshape(table.shape[0], n * bs, *pool.shape[2:])[:, :length]
        return rows.movedim(1, d)


class PagedCache:
    """What the model gets as `cache=` for one engine forward: its rows' block tables over the pools.
    Positions are always given explicitly by the engine (each row's computed length onwards)."""

    def __init__(self, model, num_blocks: int, block_size: int, device=None, dtype=None):
        ref = model.embed_tokens.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        self.tables = BlockTables(block_size, device)
        self.layers = [PagedLayer(b.mixer.new_cache(num_blocks, block_size, device, dtype), self.tables)
                       for b in model.layers]
        self.max_len = model.config.max_seq_len
        self.batch_size = 0
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)

    def bind(self, tables: list[list[int]], max_len: int) -> None:
        """Point the pools at these rows' block tables for the next forward (max_len: longest row after it)."""
        self.tables.set(tables, math.ceil(max_len / self.block_size))
        self.batch_size = len(tables)

    def next_positions(self, T: int) -> torch.Tensor:
        raise VelocisError("the engine passes positions explicitly to a paged cache")

    def advance(self, ids: torch.Tensor) -> None:
        """The engine tracks each sequence's computed length itself."""


def blocks_for_budget(model, budget_bytes: int, block_size: int, dtype_bytes: int) -> int:
    per_token, per_seq = model.cache_bytes(dtype_bytes)
    if per_seq:
        raise VelocisError("the paged engine keeps per-token caches; this model has recurrent state layers")
    return int(budget_bytes // (per_token * block_size))
