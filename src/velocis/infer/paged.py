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

Packed steps (`PagedCache.bind_packed`, vLLM's layout): the engine flattens every sequence of a
step, one decode token each and the prompt chunks, into a single row of N tokens, so each weight is
read once per step and the products have N rows (the C++ GEMM's shapes) with no padding. Attention
mixers that know the layout (`Mixer.packed_attention`) then call `PagedLayer.attend_packed`: it
writes the step's keys and values into their slots, attends the decode tokens together over their
gathered blocks, and each prompt chunk causally (a chunk that starts the sequence needs no gather).

Recurrent layers (cache kind "state": Mamba-2, Gated DeltaNet) keep no per-token cache: each running
sequence owns a state slot, beside its blocks, from admission to its end (`StateSlots`). The layer's
own cache, built by its mixer for max_num_seqs rows, is what the mixer sees; for one forward its
buffers are swapped for the rows' slots, so mixers that update their state in place run unchanged.
Such models take the engine's padded forwards (one row per sequence, never padded in time); their
states cannot be rolled back or shared, so prefix caching and speculative decoding are refused.
"""
from __future__ import annotations

import itertools
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

    def has(self, prefix_hash: int) -> bool:
        """Is this prefix cached (without counting a query)?"""
        return prefix_hash in self.cached

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


def _table(tables: list[list[int]], width: int, device) -> torch.Tensor:
    """[rows, width] block ids, scratch where a row has fewer blocks."""
    width = max(width, 1)
    return torch.tensor([row[:width] + [SCRATCH] * (width - len(row[:width])) for row in tables],
                        dtype=torch.long, device=device)


class BlockTables:
    """The block tables of the rows of one forward: [rows, max blocks] (scratch where unused), and
    the packed step's layout when the forward is packed (None otherwise)."""

    def __init__(self, block_size: int, device):
        self.block_size, self.device = block_size, device
        self.table = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.packed: PackedStep | None = None

    def set(self, tables: list[list[int]], width: int) -> None:
        self.table = _table(tables, width, self.device)
        self.packed = None


class PackedStep:
    """Where the tokens of a packed forward go. Segment i is tokens [offsets[i], offsets[i] + lengths[i])
    of the row, at positions starts[i].. of the sequence in working-copy slot slots[i] whose blocks
    are tables[i]. The leading single-token segments (the decodes) attend as one batch over the
    working copy's slots 0..max(slot); the rest one chunk at a time."""

    def __init__(self, starts: list[int], lengths: list[int], tables: list[list[int]], slots: list[int],
                 block_size: int, device):
        positions = [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
        owners = [i for i, n in enumerate(lengths) for _ in range(n)]
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)
        # where each token's k/v go: its block and offset (prefix cache), its slot (working copy)
        self.block = torch.tensor([tables[i][p // block_size] for i, p in zip(owners, positions)],
                                  dtype=torch.long, device=device)
        self.offset = self.positions % block_size
        self.slot = torch.tensor([slots[i] for i in owners], dtype=torch.long, device=device)
        self.length = max(s + n for s, n in zip(starts, lengths))
        d = next((i for i, n in enumerate(lengths) if n != 1), len(lengths))
        self.num_decode = d
        if d:
            self._decode(starts[:d], slots[:d], device)
        offsets = list(itertools.accumulate(lengths, initial=0))
        self.chunks = [(offsets[i], starts[i], lengths[i], slots[i]) for i in range(d, len(lengths))]

    def _decode(self, starts: list[int], slots: list[int], device) -> None:
        rows = max(slots) + 1
        lens = [1] * rows  # a slot that does not decode this step sees one slot: no empty softmax
        for s, slot in zip(starts, slots):
            lens[slot] = s + 1
        self.decode_slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.decode_in_order = slots == list(range(rows))  # every slot decodes: no scatter, no gather
        self.decode_rows, self.decode_len = rows, max(lens)
        self.decode_lens = torch.tensor(lens, dtype=torch.long, device=device)  # each row's filled slots


class PagedLayer(LayerCache):
    """One layer's cache over its block pool: `write` / `read` through the rows' block tables, or
    `attend_packed` in a packed step."""

    def __init__(self, pool: LayerCache, tables: BlockTables):
        super().__init__(max_len=0)
        self.pool, self.tables = pool, tables
        self.kind, self.slot_dims = pool.kind, pool.slot_dims
        self.work: tuple[torch.Tensor, torch.Tensor] | None = None  # packed steps' per-sequence k/v

    @property
    def packed(self) -> "PackedStep | None":
        return self.tables.packed

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

    def attend_packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """A packed step's attention: q [1, H, N, d], this step's k/v [1, KV, N, d] -> [1, N, H, d].
        k/v go into the blocks (what the prefix cache keeps) and the working copy first, so a chunk's
        own keys are in place when it reads its slot."""
        from velocis.models.attend import attend_causal, attend_decode, attend_prefixed

        step = self.tables.packed
        kn, vn = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [N, KV, d]
        self.pool.k[step.block, :, step.offset] = kn.to(self.pool.k.dtype)
        self.pool.v[step.block, :, step.offset] = vn.to(self.pool.v.dtype)
        wk, wv = self.work  # [slots, KV, capacity, d]
        wk[step.slot, :, step.positions] = kn.to(wk.dtype)
        wv[step.slot, :, step.positions] = vn.to(wv.dtype)
        y = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])
        D = step.num_decode
        if D:
            qd = q[0, :, :D].transpose(0, 1)  # [D, H, d]
            if not step.decode_in_order:  # rows by slot; the slots that do not decode get zeros
                qd = qd.new_zeros(step.decode_rows, *qd.shape[1:]).index_copy_(0, step.decode_slots, qd)
            rows, S = step.decode_rows, step.decode_len
            yd = attend_decode(qd, wk[:rows, :, :S], wv[:rows, :, :S], step.decode_lens, scale)
            y[0, :D] = yd if step.decode_in_order else yd[step.decode_slots]
        for a, start, n, slot in step.chunks:
            qi = q[:, :, a:a + n]
            if start == 0:  # the chunk is the whole sequence so far: its own keys
                yi = attend_causal(qi, k[:, :, a:a + n], v[:, :, a:a + n], scale)
            else:
                yi = attend_prefixed(qi, wk[slot:slot + 1, :, :start + n], wv[slot:slot + 1, :, :start + n], start, scale)
            y[:, a:a + n] = yi.transpose(1, 2)
        return y

    def reserve(self, slots: int, length: int) -> None:
        """A working copy of `slots` sequences of at least `length` positions (grown by 256, kept)."""
        have = self.work[0].shape[2] if self.work is not None else 0
        if self.work is not None and self.work[0].shape[0] >= slots and have >= length:
            return
        k = self.pool.k
        length = max(have, min(self.max_len, -(-length // 256) * 256))
        grown = tuple(k.new_zeros(slots, k.shape[1], length, k.shape[3]) for _ in range(2))
        if self.work is not None:
            for new, old in zip(grown, self.work):
                new[:old.shape[0], :, :have] = old
        self.work = grown

    def load(self, slot: int, blocks: list[int], length: int) -> None:
        """Fill a slot of the working copy with the first `length` positions held in `blocks` (a
        prefix-cache hit)."""
        table = torch.tensor(blocks, dtype=torch.long, device=self.pool.k.device)
        for w, pool in zip(self.work, (self.pool.k, self.pool.v)):
            kv, bs, d = pool.shape[1:]
            w[slot, :, :length] = pool[table].transpose(0, 1).reshape(kv, len(blocks) * bs, d)[:, :length]


class StateSlots:
    """The state slots of a model's recurrent layers. Each such layer's cache holds `num_slots` rows
    (its buffers [num_slots, ...]); a running sequence keeps one slot. `bind(slots)` swaps every
    buffer for the forward's rows, in order: a view when they are slots 0..B-1, else a gathered copy;
    `release()` writes gathered rows back to their slots and restores the whole buffers."""

    def __init__(self, caches: list[LayerCache]):
        self.caches = caches
        self.pools = [{name: buf for name, buf in c.named_buffers(recurse=False)} for c in caches]
        self.index: torch.Tensor | None = None  # the bound rows' slots when gathered
        self.views: list[dict[str, torch.Tensor]] = []  # what bind set, per cache
        self.bound = False

    def bind(self, slots: list[int]) -> None:
        self.release()
        n = len(slots)
        in_order = slots == list(range(n))
        first = next(iter(self.pools[0].values()))
        self.index = None if in_order else torch.tensor(slots, dtype=torch.long, device=first.device)
        self.views = [{name: buf[:n] if in_order else buf[self.index] for name, buf in pool.items()}
                      for pool in self.pools]
        for cache, views in zip(self.caches, self.views):
            for name, rows in views.items():
                setattr(cache, name, rows)
        self.bound = True

    def release(self) -> None:
        if not self.bound:
            return
        for cache, pool, views in zip(self.caches, self.pools, self.views):
            for name, buf in pool.items():
                rows = getattr(cache, name)
                if self.index is not None:
                    buf[self.index] = rows
                elif rows is not views[name]:  # a mixer that replaced its buffer rather than writing into it
                    buf[:rows.shape[0]] = rows
                setattr(cache, name, buf)
        self.bound = False

    def reset(self, slot: int) -> None:
        """A new sequence takes `slot`: its state starts from zeros (the layer cache's own reset)."""
        self.release()
        rows = torch.tensor([slot], dtype=torch.long, device=next(iter(self.pools[0].values())).device)
        for cache in self.caches:
            cache.reset(rows)


class PagedCache:
    """What the model gets as `cache=` for one engine forward: its rows' block tables over the pools,
    and for recurrent layers their rows' state slots. Positions are always given explicitly by the
    engine (each row's computed length onwards)."""

    def __init__(self, model, num_blocks: int, block_size: int, device=None, dtype=None, num_slots: int = 1):
        ref = model.embed_tokens.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        self.tables = BlockTables(block_size, device)
        self.layers: list[LayerCache] = []
        states = []
        for b in model.layers:
            if b.mixer.cache_kind == "state":  # a fixed-size state per sequence: one slot per running sequence
                states.append(b.mixer.new_cache(num_slots, block_size, device, dtype))
                self.layers.append(states[-1])
            else:
                self.layers.append(PagedLayer(b.mixer.new_cache(num_blocks, block_size, device, dtype), self.tables))
        self.paged = [layer for layer in self.layers if isinstance(layer, PagedLayer)]
        self.states = StateSlots(states) if states else None
        self.max_len = model.config.max_seq_len
        for layer in self.layers:
            layer.max_len = self.max_len
        self.batch_size = 0
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)

    def bind(self, tables: list[list[int]], max_len: int, slots: list[int] | None = None) -> None:
        """Point the pools at these rows' block tables for the next forward (max_len: longest row after it)
        and, for recurrent layers, at the rows' state slots."""
        self.tables.set(tables, math.ceil(max_len / self.block_size))
        self.batch_size = len(tables)
        if self.states is not None:
            if slots is None or len(slots) != len(tables):
                raise VelocisError("this model has recurrent state layers: bind every row's state slot")
            self.states.bind(slots)

    def reset_slot(self, slot: int) -> None:
        """A sequence starts in this state slot (no-op for a model without recurrent layers)."""
        if self.states is not None:
            self.states.reset(slot)

    def bind_packed(self, starts: list[int], lengths: list[int], tables: list[list[int]], slots: list[int],
                    num_slots: int) -> torch.Tensor:
        """Set up a packed forward (one row: the segments' tokens back to back, single-token ones
        first, each sequence in its working-copy slot < num_slots); returns its positions [1, N]."""
        if self.states is not None:
            raise VelocisError("packed steps run attention layers only; this model has recurrent state layers")
        step = PackedStep(starts, lengths, tables, slots, self.block_size, self.tables.device)
        for layer in self.paged:
            layer.reserve(num_slots, step.length)
        self.tables.packed, self.batch_size = step, 1
        return step.positions[None]

    def load(self, slot: int, blocks: list[int], length: int, num_slots: int) -> None:
        """Copy a sequence's cached prefix (its first `length` positions) into its working-copy slot."""
        for layer in self.paged:
            layer.reserve(num_slots, length)
            layer.load(slot, blocks, length)

    def next_positions(self, T: int) -> torch.Tensor:
        raise VelocisError("the engine passes positions explicitly to a paged cache")

    def advance(self, ids: torch.Tensor) -> None:
        """The forward is over (the model calls this last): gathered state rows go back to their slots.
        The engine tracks each sequence's computed length itself."""
        if self.states is not None:
            self.states.release()


def blocks_for_budget(model, budget_bytes: int, block_size: int, dtype_bytes: int, num_slots: int = 0) -> int:
    """KV blocks that fit in the budget once `num_slots` sequences' recurrent states are set aside
    (unbounded, 2**62, for a model without per-token caches: the caller caps it)."""
    per_token, per_seq = model.cache_bytes(dtype_bytes)
    left = budget_bytes - per_seq * num_slots
    if per_seq and left < (2 * per_token * block_size or 1):
        raise VelocisError(f"kv_cache_memory ({budget_bytes:,} bytes) does not hold the recurrent state of "
                           f"max_num_seqs = {num_slots} sequences ({per_seq:,} bytes each) and two KV blocks; "
                           f"give the engine more memory or fewer sequences")
    return int(left // (per_token * block_size)) if per_token else 2**62
