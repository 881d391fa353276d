"""PackedLoader: packing and shift, rank sharding, exact resume, epochs, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from velocis.data import PackedLoader, prepare_dataset
from velocis.data.default_corpus import write_default_corpus
from velocis.errors import VelocisError
from velocis.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    zh, en = write_default_corpus(root / "corpus", documents=800)
    Tokenizer.train([zh, en], vocab_size=500, progress=False).save(root / "tok")
    # small shards, so that sequences cross shard boundaries
    return prepare_dataset([zh], [en], root / "tok", root / "data", num_workers=1, shard_mb=0.1, val_fraction=0.05)


def stream(data_dir: Path, split: str) -> np.ndarray:
    index = json.loads((data_dir / "index.json").read_text())
    return np.concatenate([np.fromfile(data_dir / s["path"], dtype=index["dtype"])[: s["used_tokens"]]
                           for s in index["splits"][split]["shards"]]).astype(np.int64)


def test_packed_inputs_and_shifted_targets(data_dir):
    T = 32
    loader = PackedLoader(data_dir, T, 4, split="train", seed=3)
    tokens = stream(data_dir, "train")
    assert loader.num_tokens == len(tokens) and loader.num_sequences == (len(tokens) - 1) // T
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    seqs = loader.rank_sequences(0)[:4]
    for row, s in enumerate(seqs):
        assert x[row].tolist() == tokens[s * T : s * T + T].tolist()
        assert y[row].tolist() == tokens[s * T + 1 : s * T + T + 1].tolist()


def test_sequences_cross_shard_boundaries(data_dir):
    index = json.loads((data_dir / "index.json").read_text())
    assert len(index["splits"]["train"]["shards"]) > 2
    loader = PackedLoader(data_dir, 64, 2, split="train")
    tokens = stream(data_dir, "train")
    first = index["splits"]["train"]["shards"][0]["used_tokens"]
    start = first - 10  # a read that straddles the first two shards
    assert loader.read_tokens(start, start + 30).tolist() == tokens[start : start + 30].tolist()
    assert loader.read_tokens(0, len(tokens)).tolist() == tokens.tolist()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_read_disjoint_sets_that_cover_the_data(data_dir, world_size):
    T, B = 16, 3
    # validation: one full pass; what the ranks read together is the whole split, nothing twice
    tokens = stream(data_dir, "val")
    seen_ids: list[int] = []
    covered = np.zeros(len(tokens), dtype=int)
    for rank in range(world_size):
        loader = PackedLoader(data_dir, T, B, split="val", rank=rank, world_size=world_size, seed=7)
        ids = loader.rank_sequences(0).tolist()
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch
        rows = torch.cat([x for x, _ in batches])
        assert len(rows) == len(ids)
        for s, row in zip(ids, rows):
            assert row.tolist() == tokens[s * T : s * T + T].tolist()
            covered[s * T : s * T + T] += 1
        seen_ids += ids
    n = (len(tokens) - 1) // T
    assert sorted(seen_ids) == list(range(n))  # union = all sequences, no sequence twice
    assert (covered[: n * T] == 1).all()
    # training: the ranks' sets partition the epoch, and every rank yields the same number of batches
    train_sets = [set(PackedLoader(data_dir, T, B, rank=r, world_size=world_size, seed=7).rank_sequences(2).tolist())
                  for r in range(world_size)]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not train_sets[a] & train_sets[b]
    n_train = PackedLoader(data_dir, T, B, seed=7).num_sequences
    dropped = n_train - sum(map(len, train_sets))
    assert 0 <= dropped < B * world_size + world_size
    assert len({len(s) for s in train_sets}) == 1


def test_epochs_reshuffle_and_train_is_infinite(data_dir):
    loader = PackedLoader(data_dir, 64, 8, split="train", seed=1)
    per_epoch = loader.batches_per_epoch
    it = iter(loader)
    for _ in range(per_epoch * 2 + 3):
        next(it)
    assert loader.epoch == 2 and loader.step == 3
    assert not np.array_equal(loader.rank_sequences(0), loader.rank_sequences(1))
    val = PackedLoader(data_dir, 64, 8, split="val")
    assert len(list(val)) == val.batches_per_epoch and len(list(val)) == val.batches_per_epoch  # finite, repeatable


def test_state_dict_resumes_exactly(data_dir):
    a = PackedLoader(data_dir, 32, 4, split="train", seed=5)
    it = iter(a)
    per_epoch = a.batches_per_epoch
    for _ in range(per_epoch - 2):  # stop just before an epoch boundary
        next(it)
    state = a.state_dict()
    expected = [next(it) for _ in range(5)]
    b = PackedLoader(data_dir, 32, 4, split="train", seed=5)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    it_b = iter(b)
    got = [next(it_b) for _ in range(5)]
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert b.state_dict() == a.state_dict()
    with pytest.raises(VelocisError, match="seq_len"):
        PackedLoader(data_dir, 16, 4).load_state_dict(state)


def test_bytes_per_token(data_dir):
    index = json.loads((data_dir / "index.json").read_text())
    for split in ("train", "val"):
        loader = PackedLoader(data_dir, 8, 1, split=split)
        info = index["splits"][split]
        assert loader.bytes_per_token == pytest.approx(info["utf8_bytes"] / info["tokens"])
        assert 1.0 < loader.bytes_per_token < 20


def test_errors(data_dir, tmp_path):
    n_val = json.loads((data_dir / "index.json").read_text())["splits"]["val"]["tokens"]
    with pytest.raises(VelocisError, match=r"val split has \d+ tokens, fewer than seq_len \+ 1"):
        PackedLoader(data_dir, n_val, 1, split="val")
    PackedLoader(data_dir, n_val - 1, 1, split="val")  # exactly seq_len + 1 tokens is enough
    with pytest.raises(VelocisError, match="no index.json"):
        PackedLoader(tmp_path, 8, 1)
    with pytest.raises(VelocisError, match="rank"):
        PackedLoader(data_dir, 8, 1, rank=2, world_size=2)
    with pytest.raises(VelocisError, match="batch_size x world_size"):
        PackedLoader(data_dir, 512, 10_000)


def test_reads_only_what_the_mix_keeps(data_dir):
    root = data_dir.parent
    mixed = prepare_dataset([root / "corpus" / "zh.txt"], [root / "corpus" / "en.txt"], root / "tok", root / "mixed",
                            mix=0.1, num_workers=1, shard_mb=0.1, val_fraction=0.05)
    info = json.loads((mixed / "index.json").read_text())["splits"]["train"]
    assert any(s["used_tokens"] < s["tokens"] for s in info["shards"])  # some shards cut short
    assert any(s["used_tokens"] == 0 for s in info["shards"])  # and some left out entirely
    loader = PackedLoader(mixed, 32, 4)
    assert loader.num_tokens == info["tokens"] == sum(s["used_tokens"] for s in info["shards"])
    tokens = stream(mixed, "train")
    assert loader.read_tokens(0, len(tokens)).tolist() == tokens.tolist()
    zh_tokens = info["tokens_by_language"]["zh"]
    assert zh_tokens / info["tokens"] == pytest.approx(0.1, abs=0.01)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 32)
