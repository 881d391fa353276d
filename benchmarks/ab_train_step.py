"""A/B of two Velocis source trees on one CPU training step: is a change faster, beyond the noise?

This VM's step times drift by +-20% over minutes, so two separate runs cannot tell a 3% change
from the weather. Here each tree trains in its own process (its own C++ kernel build, in its own
TORCH_EXTENSIONS_DIR) and the parent alternates single steps between them, so the drift hits both
alike. Both start from the same seed and batch, so their losses must agree (a check that the
change kept the math).

    git worktree add /tmp/base HEAD~1
    python benchmarks/ab_train_step.py /tmp/base/src src [--rounds 24] [--preset micro]

Prints mean / median / best step per tree and B's speedup over A (mean, median, and the median of
per-round ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train_cpu import paired_ratio, run, summary  # the same alternation and statistics

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from velocis.config import get_preset
from velocis.kernels import cpu_ops
from velocis.models import VelocisModel
cpu_ops.available()  # build the kernels before the first timed step
cfg = get_preset(sys.argv[2])
torch.manual_seed(0)
model = VelocisModel(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
x = torch.randint(0, cfg.vocab_size, (int(sys.argv[3]), int(sys.argv[4])))
y = torch.roll(x, -1, dims=1)
print("ready", flush=True)
for _ in sys.stdin:
    t = time.perf_counter()
    # the training loss through the tree's API (trees before the seams change had compute_loss)
    loss = model.compute_loss(x, y)[0] if hasattr(model, "compute_loss") else model(x, y).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(json.dumps([time.perf_counter() - t, loss.item()]), flush=True)
"""


class Tree:
    def __init__(self, src: Path, args, ext_dir: Path):
        if not (src / "velocis" / "__init__.py").exists():
            raise SystemExit(f"{src} is not a Velocis source tree (no velocis/__init__.py in it); "
                             f"pass the tree's src/ directory")
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext_dir))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(src), args.preset, str(args.batch),
                                      str(args.seq_len)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the worker for {src} did not start (see its error above)")
        self.times: list[float] = []
        self.setup_s = 0.0
        self.loss = float("nan")

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        dt, self.loss = json.loads(self.proc.stdout.readline())
        time.sleep(0.05)  # let this worker's OpenMP threads stop spinning before the other runs
        return dt

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src_a", type=Path, help="tree A's src/ directory (the baseline)")
    ap.add_argument("src_b", type=Path, help="tree B's src/ directory (the change)")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = [Tree(src.resolve(), args, Path(tmp) / f"ext_{i}") for i, src in enumerate((args.src_a, args.src_b))]
        run(trees, args.rounds, args.warmup)
        for t in trees:
            t.close()
    a, b = trees
    (mean_a, med_a, _), (mean_b, med_b, _) = summary(a.times), summary(b.times)
    for name, t in (("A", a), ("B", b)):
        mean, med, best = summary(t.times)
        print(f"{name}: mean {mean * 1e3:7.1f} ms  median {med * 1e3:7.1f} ms  best {best * 1e3:7.1f} ms  "
              f"last loss {t.loss:.6f}")
    print(f"B over A: {mean_a / mean_b:.3f}x mean, {med_a / med_b:.3f}x median, "
          f"{paired_ratio(a.times, b.times):.3f}x paired")
    if abs(a.loss - b.loss) > 1e-4 * max(1.0, abs(a.loss)):
        print(f"note: the losses differ ({a.loss:.6f} vs {b.loss:.6f}): the change altered the math")


if __name__ == "__main__":
    main()
