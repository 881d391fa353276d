"""`velocis plot RUN_DIR`: PNG curves (loss, val bits-per-byte, learning rate) from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from velocis.errors import VelocisError
from velocis.train.monitor import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise VelocisError(f"{run_dir}: no metrics.jsonl here; pass a training run directory")
    recs = read_metrics(path)
    train = [r for r in recs if r.get("type") == "train"]
    val = [r for r in recs if r.get("type") == "eval"]
    if not train:
        raise VelocisError(f"{path}: no training steps logged yet")

    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bpb, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.5, label="train loss")
    # A moving average makes the trend readable through batch noise.
    k = max(1, len(train) // 50)
    if k > 1:
        ys = [r["loss"] for r in train]
        avg = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        ax_loss.plot(steps, avg, lw=1.5, label=f"train loss (avg {k})")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", lw=1.5, ms=3, label="val loss")
        ax_bpb.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "o-", color="C2", ms=3)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="validation bits-per-byte")
    ax_lr.plot(steps, [r["lr"] for r in train], color="C3")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    for ax in (ax_loss, ax_bpb, ax_lr):
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()

    out = Path(out) if out else run_dir / "curves.png"
    from velocis.utils.atomic import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
