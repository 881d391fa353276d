"""--lr-find: the range test's rates grow geometrically, the loss is recorded, the suggestion lies
on the falling part of the curve, and nothing is left in the run dir."""
from __future__ import annotations

import pytest

from velocis.errors import VelocisError
from velocis.train.lr_find import find_lr, lr_schedule


def test_schedule_is_geometric_and_checked():
    lrs = lr_schedule(1e-4, 1.0, 5)
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(VelocisError, match="start"):
        lr_schedule(1.0, 1e-3, 10)


def test_range_test_on_a_tiny_model(tiny_data_dir, tmp_path):
    from velocis.config import get_preset
    from velocis.train import TrainConfig, Trainer

    cfg = TrainConfig(output_dir=str(tmp_path / "run"), data_dir=str(tiny_data_dir), batch_size=4, seq_len=32,
                      max_steps=40, device="cpu", precision="fp32", monitor="none", plot=False, threads=1)
    model_cfg = get_preset("micro", hidden_dim=64, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=128,
                           max_seq_len=64)
    trainer = Trainer(cfg, model_cfg)
    try:
        result = find_lr(trainer, start=1e-4, stop=3.0, steps=40)
    finally:
        trainer.close()
    assert result.lrs == sorted(result.lrs) and len(result.lrs) == len(result.losses) >= 10
    lowest = min(result.losses)
    assert lowest < result.losses[0]  # the loss fell somewhere in the range
    assert 1e-5 <= result.suggestion <= 0.3
    assert "lr" in result.table()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_lr_find_cli_prints_a_suggestion_and_leaves_the_output_dir_alone(tiny_data_dir, tmp_path, capsys):
    from velocis.cli import main

    out = tmp_path / "run"
    argv = ["train-custom", "--data", str(tiny_data_dir), "--output-dir", str(out), "--hidden-dim", "64",
            "--num-layers", "2", "--num-heads", "2", "--mlp-dim", "96", "--max-seq-len", "64", "--feed-forward",
            "relu2", "--qk-norm", "--zero-init-residual", "--no-tie-embeddings", "--batch-size", "4", "--seq-len",
            "32", "--device", "cpu", "--threads", "1", "--lr-find", "--lr-find-steps", "30", "--optimizer", "muon"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "suggested --lr" in text
    assert not out.exists() or not any(out.iterdir())
