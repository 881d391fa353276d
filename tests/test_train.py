"""Training loop, CLI errors, schedules, checkpoints rotation, NaN detection, plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from velocis.cli import main
from velocis.errors import VelocisError
from velocis.train.schedule import lr_multiplier

TINY = ["--hidden-dim", "64", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1",
        "--mlp-dim", "128", "--max-seq-len", "64"]
FAST = ["--batch-size", "4", "--seq-len", "32", "--device", "cpu", "--monitor", "plain", "--eval-batches", "2"]


@pytest.fixture
def data_dir(tiny_data_dir) -> Path:
    return Path(tiny_data_dir)


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


# --- a short run: everything a run dir should hold ----------------------------------------------
def test_short_run_writes_run_dir(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train-custom", "--data", str(data_dir), "--output-dir", str(run), *TINY, *FAST, "--max-steps", "12",
            "--eval-every", "4", "--save-every", "4", "--keep-last", "2", "--lr", "3e-3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step 12/12" in out and "val bpb" in out
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert all(r["val_bpb"] > 0 for r in evals)
    # keep-last 2 plus best/, and the latest model at the root
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_12", "step_8"]
    for d in (run / "checkpoints" / "step_12", run / "best", run):
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
        assert (d / "tokenizer.json").is_file()
    assert (run / "checkpoints" / "step_12" / "trainer_state.json").is_file()
    assert not (run / "checkpoints" / "step_12" / "trainer_state.pt").exists()  # no pickle
    assert json.loads((run / "best" / "best.json").read_text())["val_loss"] == min(r["val_loss"] for r in evals[1:])
    assert (run / "curves.png").stat().st_size > 1000
    # the root is a loadable model dir
    import velocis

    model, tok = velocis.load(run)
    assert model.config.hidden_dim == 64

    # a second run into the same dir without --resume/--overwrite is refused
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    # resuming a finished run with a bigger budget continues from step 12
    assert main(argv[:-8] + ["--max-steps", "14", "--eval-every", "4", "--save-every", "4", "--resume"]) == 0
    assert [r["step"] for r in records(run, "train")] == list(range(1, 15))
    capsys.readouterr()

    # resuming with a different shape is refused with the differing field named
    bad = [a if a != "64" else "32" for a in argv[:9]] + argv[9:] + ["--resume"]
    err = cli_error(capsys, bad)
    assert "different model" in err and "hidden_dim" in err


def test_plot_command(data_dir, tmp_path, capsys):
    run = tmp_path / "p"
    assert main(["train-custom", "--data", str(data_dir), "--output-dir", str(run), *TINY, *FAST,
                 "--max-steps", "3", "--eval-every", "2", "--no-plot"]) == 0
    assert not (run / "curves.png").exists()
    assert main(["plot", str(run), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert "no metrics.jsonl" in cli_error(capsys, ["plot", str(tmp_path)])


# --- bad input -----------------------------------------------------------------------------------
def test_unknown_preset(capsys, tmp_path):
    err = cli_error(capsys, ["train", "--preset", "giant", "--data", str(tmp_path)])
    assert "unknown preset 'giant'" in err and "micro" in err


def test_missing_data_paths(capsys, tmp_path):
    err = cli_error(capsys, ["train-micro", "--chinese-path", str(tmp_path / "nope.txt"), "--output-dir", str(tmp_path)])
    assert "nope.txt" in err and "no such file" in err
    err = cli_error(capsys, ["train-micro", "--data", str(tmp_path / "nodata"), "--output-dir", str(tmp_path)])
    assert "not a prepared data directory" in err
    err = cli_error(capsys, ["train-micro", "--output-dir", str(tmp_path)])
    assert "--chinese-path" in err


def test_seq_len_longer_than_context(data_dir, capsys, tmp_path):
    err = cli_error(capsys, ["train-custom", "--data", str(data_dir), "--output-dir", str(tmp_path), *TINY,
                             "--seq-len", "128", "--max-steps", "1"])
    assert "seq_len (--seq-len) 128" in err and "context (64" in err


def test_resume_without_checkpoint(data_dir, capsys, tmp_path):
    err = cli_error(capsys, ["train-custom", "--data", str(data_dir), "--output-dir", str(tmp_path / "r"), *TINY,
                             *FAST, "--max-steps", "1", "--resume", str(tmp_path)])
    assert "no checkpoint" in err


def test_nan_stops_naming_the_step(data_dir, tmp_path):
    from velocis.config import get_preset
    from velocis.tokenizer import Tokenizer
    from velocis.train import NextTokenObjective, TrainConfig, TrainingDiverged, train

    class NaNAtStep3(NextTokenObjective):
        calls = 0

        def __call__(self, model, batch, num_tokens):
            loss, stats = super().__call__(model, batch, num_tokens)
            self.calls += model.training  # count training steps, not validation batches
            return (loss * float("nan") if self.calls == 3 else loss), stats

    tok = Tokenizer.load(data_dir)
    mc = get_preset("micro", vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    mlp_dim=64, max_seq_len=32)
    cfg = TrainConfig(output_dir=str(tmp_path / "nan"), data_dir=str(data_dir), max_steps=10, batch_size=2,
                      seq_len=16, device="cpu", monitor="none", plot=False, save_every=2, eval_every=100)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: loss is nan.*step_2"):
        train(cfg, mc, objective=NaNAtStep3())


# --- pieces --------------------------------------------------------------------------------------
def test_schedules():
    cos = [lr_multiplier(s, s / 100, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1) for s in range(101)]
    assert cos[0] == pytest.approx(0.1 * (0.5 * (1 + math.cos(0)))) and max(cos) == pytest.approx(cos[10], rel=1e-2)
    assert cos[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    wsd = [lr_multiplier(s, s / 100, schedule="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
           for s in range(101)]
    assert wsd[10] == wsd[80] == 1.0 and wsd[90] == pytest.approx(0.5) and wsd[100] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(VelocisError):
        lr_multiplier(0, 0.0, schedule="linear")


def test_monitor_chart_and_plain(capsys):
    import io

    from velocis.train.monitor import LiveMonitor, PlainMonitor, chart, fmt_value

    rows = chart([5.0 - 0.01 * i for i in range(300)], width=40, height=4)
    assert len(rows) == 4 and all(len(r) == len(rows[0]) for r in rows)
    assert float(rows[0].split("│")[0]) > 4.9 and float(rows[-1].split("│")[0]) < 2.1  # y range labels
    assert rows[-1].split("│")[1][0] == "█" and rows[0].split("│")[1][-1] == " "  # falling curve
    assert fmt_value([1, 5, 9]).endswith("█") and fmt_value([7, 7, 8, 9])[0] != "▁" and fmt_value(0.123456) == "0.1235"
    buf = io.StringIO()
    m = PlainMonitor("t", 100, log_every=10, stream=buf)
    rec = dict(step=10, loss=3.0, lr=1e-3, grad_norm=0.5, tokens=100, tokens_per_s=1234.0, elapsed_s=3.0,
               eta_s=65, memory="RSS 1 MiB", stats={"aux_loss": 0.01, "expert_load": [[1, 2], [3, 4]]})
    m.train(rec)
    line = buf.getvalue()
    assert "step 10/100" in line and "1.2k tok/s" in line and "aux_loss 0.01" in line and "eta 1m05s" in line
    live = LiveMonitor("t", 100)  # renders generic stats (MoE expert load per layer) without a terminal
    live.train(rec)
    live.eval({"step": 10, "val_loss": 2.0, "val_bpb": 1.5})
    from rich.console import Console

    con = Console(file=io.StringIO(), width=100)
    con.print(live._render())
    text = con.file.getvalue()
    assert "expert_load[1]" in text and "1.5000" in text


@pytest.mark.slow
def test_compiled_run_matches_eager_start(data_dir, tmp_path, capsys):
    """--compile trains (inductor on CPU) and its first losses agree with eager."""
    base = ["train-custom", "--data", str(data_dir), *TINY, *FAST, "--max-steps", "3", "--eval-every", "3",
            "--no-plot", "--lr", "1e-3"]
    assert main(base + ["--output-dir", str(tmp_path / "eager")]) == 0
    assert main(base + ["--output-dir", str(tmp_path / "compiled"), "--compile"]) == 0
    assert "compiled + first step" in capsys.readouterr().out
    eager, compiled = records(tmp_path / "eager", "train"), records(tmp_path / "compiled", "train")
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-3, (a, b)


def test_precision_auto_follows_the_hardware_and_can_be_forced():
    import torch

    from velocis.train.loop import autocast_for, hardware_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if hardware_bf16(cpu) else "fp32")
    with autocast_for(cpu, "bf16"):
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.bfloat16
    with autocast_for(cpu, "fp32"):
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.float32


def test_forced_bf16_without_bf16_hardware_warns(data_dir, tmp_path, capsys, monkeypatch):
    import velocis.train.loop as loop

    monkeypatch.setattr(loop, "hardware_bf16", lambda device: False)
    argv = ["train-custom", "--data", str(data_dir), "--output-dir", str(tmp_path / "run"), *TINY, *FAST,
            "--max-steps", "1", "--precision", "bf16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "--precision bf16" in out and "far slower than fp32" in out


def test_unknown_precision_is_named(tmp_path):
    import pytest

    from velocis.errors import VelocisError
    from velocis.train.config import TrainConfig

    with pytest.raises(VelocisError, match=r"precision \(--precision\) 'fp8'"):
        TrainConfig(output_dir=str(tmp_path), data_dir=str(tmp_path), max_steps=1, precision="fp8")


def test_time_budget_running_out_during_eval_still_saves_the_model(data_dir, tmp_path, monkeypatch):
    """Regression: the budget crossed during the last step's eval ended the loop before any save."""
    import time

    from velocis.config import get_preset
    from velocis.tokenizer import Tokenizer
    from velocis.train.config import TrainConfig
    from velocis.train.loop import Trainer, train

    original = Trainer._eval_and_record

    def slow_eval(self, monitor):
        original(self, monitor)
        if self.step > 0:
            time.sleep(1.0)  # push elapsed past the budget after the save check of this step

    monkeypatch.setattr(Trainer, "_eval_and_record", slow_eval)
    tok = Tokenizer.load(data_dir)
    mc = get_preset("micro", vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    mlp_dim=64, max_seq_len=32)
    run = tmp_path / "budget"
    cfg = TrainConfig(output_dir=str(run), data_dir=str(data_dir), time_budget=0.5 / 60, batch_size=2, seq_len=16,
                      device="cpu", monitor="none", plot=False, save_every=1000, eval_every=1, eval_batches=1)
    train(cfg, mc)
    assert (run / "config.json").is_file() and (run / "model.safetensors").is_file()
