"""A training run writes only its own files, into a directory no other process is writing."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from velocis.cli import main

TINY = ["--hidden-dim", "32", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1", "--mlp-dim", "64",
        "--max-seq-len", "32", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--monitor", "plain",
        "--eval-batches", "1", "--no-plot"]


def test_a_model_directory_is_not_a_run_directory(tiny_data_dir, tmp_path, capsys):
    """Before: training into a model directory (no checkpoints/) replaced its model.safetensors."""
    model_dir = tmp_path / "model"
    assert main(["train-custom", "--data", str(tiny_data_dir), "--output-dir", str(tmp_path / "r"), *TINY,
                 "--max-steps", "1"]) == 0
    model_dir.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (model_dir / name).write_bytes((tmp_path / "r" / name).read_bytes())
    before = (model_dir / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train-custom", "--data", str(tiny_data_dir), "--output-dir", str(model_dir), *TINY,
                 "--max-steps", "1"]) == 2
    assert "holds a Velocis model" in capsys.readouterr().err
    assert (model_dir / "model.safetensors").read_bytes() == before
    # the user's own files in a directory are never deleted, even with --overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    argv = ["train-custom", "--data", str(tiny_data_dir), "--output-dir", str(tmp_path / "mine"), *TINY,
            "--max-steps", "1"]
    assert main(argv) == 2 and "notes.txt" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_second_writer_is_refused_while_a_run_trains(tiny_data_dir, tmp_path):
    """Before: a second training into the same --output-dir deleted the first's checkpoints, and two
    --resume runs both wrote. Now the run dir is locked while a process trains into it."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "velocis", "train-custom", "--data", str(tiny_data_dir), "--output-dir", str(run),
           *TINY, "--threads", "1"]
    first = subprocess.Popen(cmd + ["--max-steps", "100000", "--save-every", "5"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "step_5").exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.05)
        for extra in (["--max-steps", "3", "--overwrite"], ["--max-steps", "100000", "--resume"]):
            r = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, r.stderr
            assert "in use by a training run" in r.stderr and f"pid {first.pid}" in r.stderr
        assert first.poll() is None  # the first run trains on, its checkpoints kept
        assert list((run / "checkpoints").glob("step_*"))
    finally:
        first.terminate()
        first.wait(timeout=60)
    assert not (run / ".velocis.lock").exists()  # released when the run stopped
