"""The built-in corpus: deterministic, small, bilingual, correct, and learnable."""
from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest

from velocis.data.default_corpus import generate, write_default_corpus, zh_number


def test_deterministic_small_and_fast(tmp_path):
    t0 = time.perf_counter()
    zh, en = write_default_corpus(tmp_path / "a")
    assert time.perf_counter() - t0 < 5
    zh2, en2 = write_default_corpus(tmp_path / "b")
    assert zh.read_bytes() == zh2.read_bytes() and en.read_bytes() == en2.read_bytes()
    zh3, _ = write_default_corpus(tmp_path / "c", seed=1)
    assert zh3.read_bytes() != zh.read_bytes()
    for f in (zh, en):
        assert 500_000 < f.stat().st_size < 4_000_000


def test_languages_and_documents():
    zh, en = generate(seed=0, documents=500)
    assert len(zh) == len(en) == 500
    zh_text, en_text = "".join(zh), "".join(en)
    han = sum("\u4e00" <= c <= "\u9fff" for c in zh_text)
    assert han / len(zh_text) > 0.6
    assert en_text.isascii()
    assert all("\n\n" not in d for d in zh + en)  # blank lines separate documents in the .txt files
    assert len(set(en)) > 450  # varied, not a few sentences repeated


def test_arithmetic_is_right():
    zh, en = generate(seed=3, documents=400)
    sums = re.findall(r"^(\d+) ([+-]) (\d+) = (\d+)$", "\n".join(en), flags=re.M)
    assert len(sums) > 50
    for a, op, b, c in sums:
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
    value = {zh_number(n): n for n in range(100)}
    spoken = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)，(\S+?)(加|减)(\S+?)等于(\S+?)。", "\n".join(zh))
    assert len(spoken) > 50
    for a, op, b, c, za, word, zb, zc in spoken:
        assert (value[za], value[zb], value[zc]) == (int(a), int(b), int(c))
        assert word == ("加" if op == "+" else "减")
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
    assert [zh_number(n) for n in (0, 7, 10, 12, 20, 35, 99)] == ["零", "七", "十", "十二", "二十", "三十五", "九十九"]


@pytest.mark.slow
def test_a_small_model_learns_it_well_below_unigram_entropy(tmp_path):
    """250 steps of a 0.8M-parameter model (about a minute on 2 idle CPU cores): its loss falls
    below half the unigram entropy, i.e. it learned far more than word frequencies."""
    import torch

    from velocis.config import ModelConfig
    from velocis.data import PackedLoader, prepare_dataset
    from velocis.models import VelocisModel
    from velocis.tokenizer import Tokenizer

    zh, en = write_default_corpus(tmp_path / "corpus")
    Tokenizer.train([zh, en], vocab_size=2048, progress=False).save(tmp_path / "tok")
    data = prepare_dataset([zh], [en], tmp_path / "tok", tmp_path / "data", progress=False)
    counts = np.bincount(np.concatenate([np.fromfile(p, dtype=np.uint16) for p in (data / "train").glob("*.bin")]))
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats per token

    torch.manual_seed(0)
    model = VelocisModel(ModelConfig(vocab_size=2048, hidden_dim=128, num_layers=3, num_heads=4, mlp_dim=384,
                                     max_seq_len=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = PackedLoader(data, 64, 16, seed=0)
    losses = []
    for step, (x, y) in enumerate(loader):
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step + 1 == 250:
            break
    final = sum(losses[-10:]) / 10
    print(f"unigram entropy {unigram:.2f} nats/token; loss {losses[0]:.2f} -> {final:.2f} in {len(losses)} steps")
    assert final < 0.5 * unigram
