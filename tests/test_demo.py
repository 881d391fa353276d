"""`velocis demo` end to end, cut down to a few steps (the real one trains for minutes)."""
from __future__ import annotations

import json

from velocis.cli import main


def test_demo_short(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--max-steps", "6", "--batch-size", "4", "--seq-len", "64",
            "--max-new-tokens", "8", "--monitor", "plain", "--device", "cpu", "--prompt", "Once upon a time"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "[4/4] samples" in text and "> Once upon a time" in text and "demo done" in text
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6
    assert (out / "model.safetensors").is_file() and (out / "curves.png").is_file()
    # re-running is fine: it starts over in the same dir, reusing the prepared data
    mtime = (out / "data" / "index.json").stat().st_mtime
    assert main(argv) == 0
    assert (out / "data" / "index.json").stat().st_mtime == mtime
