"""Fault injection: kill training and data preparation with SIGKILL, SIGTERM and SIGINT at random
moments, over several runs, and check that (1) nothing half-written is ever read: every checkpoint
and every index.json present after a kill loads whole, and (2) resuming gives exactly the
uninterrupted result: the same losses and weights for training, byte-identical shards for data.

Slow (minutes): `pytest -m slow tests/test_fault_injection.py`. The moments are drawn from a
seeded generator, printed on failure, so a failing case can be replayed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SIGNALS = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
STEPS = 40
TRAIN = ["--hidden-dim", "32", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1", "--mlp-dim", "64",
         "--max-seq-len", "32", "--batch-size", "4", "--seq-len", "32", "--device", "cpu", "--precision", "fp32",
         "--threads", "1", "--monitor", "plain", "--no-plot", "--max-steps", str(STEPS), "--save-every", "3",
         "--eval-every", "7", "--eval-batches", "1", "--keep-last", "2"]


def train_cmd(data: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "velocis", "train-custom", "--data", str(data), "--output-dir", str(run), *TRAIN,
            *extra]


def interrupt(cmd: list[str], delay: float, sig: int) -> int:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=120)


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)  # a torn line would fail here
        if rec["type"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def check_checkpoints_whole(run: Path) -> None:
    from velocis.model_io import load_model_dir
    from velocis.train.state_io import load_state

    for ckpt in sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []:
        load_model_dir(ckpt)
        state = load_state(ckpt)
        assert state["step"] == int(ckpt.name.split("_")[1])
    if (run / "model.safetensors").exists():
        load_model_dir(run)


def test_training_survives_random_kills(tiny_data_dir, tmp_path):
    ref_run = tmp_path / "reference"
    subprocess.run(train_cmd(tiny_data_dir, ref_run), env=ENV, check=True, capture_output=True, timeout=300)
    ref = losses(ref_run)
    rng = random.Random(13)
    for round_ in range(2):
        run = tmp_path / f"run{round_}"
        kills = []
        for sig in SIGNALS:  # each run is cut three times, once by each signal, then finished
            delay = rng.uniform(1.0, 6.0)
            resume = ["--resume"] if (run / "checkpoints").is_dir() and list((run / "checkpoints").iterdir()) else []
            code = interrupt(train_cmd(tiny_data_dir, run, *resume), delay, sig)
            kills.append((sig.name, round(delay, 2), code))
            check_checkpoints_whole(run)
        resume = ["--resume"] if (run / "checkpoints").is_dir() and list((run / "checkpoints").iterdir()) else []
        r = subprocess.run(train_cmd(tiny_data_dir, run, *resume), env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (kills, r.stderr)
        got = losses(run)
        assert sorted(got) == list(range(1, STEPS + 1)), kills
        for step in got:
            assert abs(got[step] - ref[step]) <= 1e-6, (kills, step, got[step], ref[step])
        from safetensors.torch import load_file

        a, b = load_file(str(ref_run / "model.safetensors")), load_file(str(run / "model.safetensors"))
        assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a), kills


def digest(data: Path) -> dict[str, str]:
    """Content hashes of everything a finished preparation serves (index, shards, tokenizer copy)."""
    index = json.loads((data / "index.json").read_text())
    files = {"index.json"} | {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()
                              and p.parts[-2] in ("train", "val") and not p.name.startswith(".")}
    del index
    return {f: hashlib.sha256((data / f).read_bytes()).hexdigest() for f in sorted(files)}


def test_data_preparation_survives_random_kills(tmp_path):
    from velocis.data import default_corpus
    from velocis.tokenizer import Tokenizer

    zh, en = default_corpus.write_default_corpus(tmp_path / "corpus", documents=30000)
    tok = Tokenizer.train([str(zh), str(en)], vocab_size=512, progress=False)
    tok.save(tmp_path / "tok")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "velocis", "data", "prepare", "--chinese-path", str(zh), "--english-path",
                str(en), "--tokenizer", str(tmp_path / "tok"), "--output", str(out), "--shard-mb", "0.25",
                "--num-workers", "2", "--quiet"]

    subprocess.run(cmd(tmp_path / "reference"), env=ENV, check=True, capture_output=True, timeout=300)
    ref = digest(tmp_path / "reference")
    rng = random.Random(7)
    for round_ in range(2):
        out = tmp_path / f"data{round_}"
        kills = []
        for sig in SIGNALS:
            delay = rng.uniform(0.5, 4.0)
            kills.append((sig.name, round(delay, 2), interrupt(cmd(out), delay, sig)))
            if (out / "index.json").exists():  # whatever index is there must be whole and readable
                from velocis.data import PackedLoader

                next(iter(PackedLoader(out, 16, 2, split="train")))
        r = subprocess.run(cmd(out), env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (kills, r.stderr)
        assert digest(out) == ref, kills
