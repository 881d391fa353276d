"""Learning on real text (/work/shared/data): a micro model's validation bits-per-byte falls."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from velocis.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "en").is_dir(), reason="needs ../shared/data")
def test_micro_val_bpb_falls_on_shared_data(tmp_path):
    run = tmp_path / "micro"
    argv = ["train-micro", "--chinese-path", str(SHARED / "zh"), "--english-path", str(SHARED / "en"),
            "--output-dir", str(run), "--vocab-size", "4096", "--batch-size", "8", "--seq-len", "128",
            "--max-steps", "90", "--eval-every", "30", "--eval-batches", "4", "--warmup", "10", "--lr", "3e-3",
            "--device", "cpu", "--monitor", "plain"]
    assert main(argv) == 0
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    bpb = [r["val_bpb"] for r in evals]
    assert [r["step"] for r in evals] == [0, 30, 60, 90]
    assert all(a > b for a, b in zip(bpb, bpb[1:])), bpb  # falls at every evaluation
    assert bpb[-1] < 0.95 * bpb[0], bpb
