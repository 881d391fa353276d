"""Exact resume: SIGKILL a real `velocis train-custom` subprocess after a checkpoint, resume it,
and the following steps reproduce an uninterrupted run's losses (CPU, fp32)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STATE = "trainer_state.json"
TINY = ["--hidden-dim", "64", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1",
        "--mlp-dim", "128", "--max-seq-len", "64"]


def make_data(root: Path) -> Path:
    """A small prepared data dir from the built-in corpus with a tiny tokenizer."""
    from velocis.data import default_corpus, prepare_dataset
    from velocis.tokenizer import Tokenizer

    zh, en = default_corpus.write_default_corpus(root / "corpus")
    tok = Tokenizer.train([str(zh), str(en)], vocab_size=512, progress=False)
    tok.save(root / "tok")
    return Path(prepare_dataset([str(zh)], [str(en)], root / "tok", root / "data"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("resume"))


def velocis_cmd(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "velocis", "train-custom", "--data", str(data_dir), "--output-dir", str(out),
            *TINY, "--batch-size", "8", "--seq-len", "64", "--max-steps", "60", "--save-every", "5",
            "--eval-every", "10", "--eval-batches", "2", "--keep-last", "3", "--device", "cpu", "--precision", "fp32",
            "--threads", "1", "--monitor", "plain", "--no-plot", *extra]


def train_losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    full = tmp_path_factory.mktemp("full") / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(velocis_cmd(data_dir, full), check=True, env=env, capture_output=True, timeout=300)
    losses = train_losses(full)
    assert sorted(losses) == list(range(1, 61))
    return full, losses


def assert_resume_matches(data_dir, run, reference) -> None:
    full, ref = reference
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    steps = sorted(int(d.name.split("_")[1]) for d in (run / "checkpoints").glob("step_*")
                   if (d / STATE).exists())
    k = steps[-1]
    assert k < 60, "the run finished before it was stopped; nothing was tested"
    r = subprocess.run(velocis_cmd(data_dir, run, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"at step {k}" in r.stdout
    resumed = train_losses(run)
    assert sorted(resumed) == list(range(1, 61))  # metrics.jsonl reads as one run: no step missing or doubled
    for step in range(k + 1, 61):
        assert abs(resumed[step] - ref[step]) <= 1e-6, (step, resumed[step], ref[step])
    # and the weights at the end are the same too
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name


def start_and_wait_for(data_dir, run, step: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(velocis_cmd(data_dir, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "checkpoints" / f"step_{step}" / STATE).exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    return proc


def test_sigkill_then_resume_matches_uninterrupted(data_dir, tmp_path, reference):
    run = tmp_path / "killed"
    proc = start_and_wait_for(data_dir, run, 10)  # killed hard right after a checkpoint lands
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_resume_matches(data_dir, run, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_step_boundary(data_dir, tmp_path, reference, sig):
    """SIGTERM (what schedulers and `docker stop` send) and SIGINT stop after the current step and save
    it: the run resumes exactly, with no metrics line missing and none doubled. Before, SIGTERM saved
    nothing and SIGINT saved a data position one batch past the saved step."""
    run = tmp_path / sig.name
    proc = start_and_wait_for(data_dir, run, 5)
    time.sleep(0.3)  # mid-way between checkpoints
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 128 + sig
    err = proc.stderr.read().decode()
    assert f"stopped by {sig.name}" in err, err
    logged = sorted(train_losses(run))
    saved = max(int(d.name.split("_")[1]) for d in (run / "checkpoints").glob("step_*"))
    assert logged == list(range(1, saved + 1))  # the last logged step is the saved one
    assert_resume_matches(data_dir, run, reference)
