"""Does the default recipe train without divergence? Each preset, several seeds, Velocis' defaults.

For every (preset, seed): `velocis train --preset P --data D --max-steps N --seed S --log-every 1`
with no recipe flags (the preset's own optimizer, lr and schedule), then every logged training loss
after warmup (its steps, or 10% of the run if less: the schedule's cap) is compared with the running
mean of the `--window` losses before it; a loss above `--spike` (1.5) times that mean is a spike.
Prints one row per run (steps, first/last loss, the largest loss / running-mean ratio after warmup,
spikes) and exits 1 if any run spiked or diverged
(a non-finite loss).

    python benchmarks/bench_stability.py --data DIR [--presets micro,small] [--seeds 1,2,3]
        [--steps 300] [--threads 2] [--parallel 1] [--work /tmp/velocis_stability] [-- extra train flags]

A prepared data dir (velocis data prepare) is required; the model's vocabulary follows its tokenizer.
--parallel runs that many trainings at once (each with --threads), for a machine with spare cores.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def spikes(losses: list[tuple[int, float]], after: int, window: int, factor: float) -> tuple[float, list[int]]:
    """(largest loss / mean of the `window` losses before it, the steps above `factor`), past step `after`."""
    worst, hits = 0.0, []
    for i, (step, loss) in enumerate(losses):
        if step <= after or i < window:
            continue
        mean = sum(x for _, x in losses[i - window:i]) / window
        ratio = loss / mean if math.isfinite(loss) else math.inf
        worst = max(worst, ratio)
        if ratio > factor:
            hits.append(step)
    return worst, hits


def train(preset: str, seed: int, args, extra: list[str]) -> dict:
    out = args.work / f"{preset}_seed{seed}"
    cmd = [sys.executable, "-m", "velocis", "train", "--preset", preset, "--data", str(args.data),
           "--output-dir", str(out), "--overwrite", "--max-steps", str(args.steps), "--seed", str(seed),
           "--log-every", "1", "--eval-every", "100000", "--save-every", "100000", "--monitor", "plain",
           "--no-plot", "--threads", str(args.threads), *extra]
    print("$", " ".join(cmd), flush=True)
    run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    config = json.loads((out / "train_config.json").read_text()) if (out / "train_config.json").is_file() else {}
    losses = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    # the schedule ramps over warmup_steps but never over more than 10% of the run (train/schedule.py)
    warmup = min(config.get("warmup_steps", 50), math.ceil(0.1 * args.steps))
    worst, hits = spikes(losses, warmup, args.window, args.spike)
    finite = run.returncode == 0 and losses and all(math.isfinite(x) for _, x in losses)
    return {"preset": preset, "seed": seed, "steps": len(losses), "first_loss": losses[0][1] if losses else None,
            "last_loss": losses[-1][1] if losses else None, "max_ratio": worst, "spikes": hits,
            "optimizer": config.get("optimizer"), "schedule": config.get("schedule"), "lr": config.get("lr"),
            "ok": bool(finite) and not hits, "error": run.stderr[-400:] if run.returncode else ""}


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--presets", default="micro,small")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--window", type=int, default=20, help="running mean over this many steps")
    ap.add_argument("--spike", type=float, default=1.5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/velocis_stability"))
    args = ap.parse_args(argv)
    if not (args.data / "index.json").is_file():
        sys.exit(f"--data {args.data}: not a prepared data dir (velocis data prepare)")
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(p, int(s)) for p in args.presets.split(",") for s in args.seeds.split(",")]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda job: train(*job, args, extra), jobs))
    print(f"\n{'preset':<8} {'seed':>4} {'optimizer':>9} {'schedule':>8} {'lr':>8} {'steps':>5} {'loss first':>10} "
          f"{'last':>7} {'max loss/mean':>13} {'spikes':>6}")
    for r in rows:
        print(f"{r['preset']:<8} {r['seed']:>4} {r['optimizer']!s:>9} {r['schedule']!s:>8} {r['lr']!s:>8} {r['steps']:>5} "
              f"{r['first_loss'] or float('nan'):>10.3f} {r['last_loss'] or float('nan'):>7.3f} {r['max_ratio']:>13.3f} "
              f"{len(r['spikes']):>6}" + ("" if r["ok"] else "  FAILED " + (r["error"] or "")))
    with open(args.work / "results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
