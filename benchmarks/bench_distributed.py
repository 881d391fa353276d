"""Step time and communication share of DDP, FSDP and expert parallelism on CPU ranks (gloo).

    .venv/bin/python benchmarks/bench_distributed.py [--ranks 2] [--steps 16] [--seq-len 128] [--batch-size 4]

Each layout trains the same model through the Trainer (train/loop.py, the code `velocis
train-cluster` runs) under torchrun, once on one rank and once on --ranks ranks, one thread per rank
and the same per-rank batch (weak scaling: every rank computes what the single rank computes).
Dense layouts train a 4-layer d256 model; `ep` its MoE version (8 experts of 256, top-2) with FSDP +
expert parallel over all ranks.

Per run, after 3 warm-up steps: the median and fastest of --steps timed steps, then 4 steps under
torch.profiler on rank 0 for the communication share: the time gloo spends in collectives (its
`gloo:*` events: all-reduce, all-gather, reduce-scatter, all-to-all) over the profiled steps' time.
Gloo runs collectives on its own threads, so part of that time may overlap the rank's compute; the
share is an upper bound. The extra time per step, (T_N - T_1) / T_N, is also printed: what the other
ranks add (collectives, waiting for the slowest, and on a machine with fewer free cores than ranks,
sharing them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DENSE = dict(hidden_dim=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=768)
MOE = dict(num_experts=8, num_experts_per_token=2, moe_dim=256, balance="aux_free")
LAYOUTS = {"ddp": (DENSE, "ddp"), "fsdp": (DENSE, "fsdp"), "ep": ({**DENSE, **MOE}, "fsdp")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_data(root: Path) -> Path:
    from velocis.data import default_corpus, prepare_dataset
    from velocis.tokenizer import Tokenizer

    zh, en = default_corpus.write_default_corpus(root / "corpus")
    tok = Tokenizer.train([str(zh), str(en)], vocab_size=2048, progress=False)
    tok.save(root / "tok")
    return prepare_dataset([str(zh)], [str(en)], root / "tok", root / "data")


# --- one run, on every rank (under torchrun) -----------------------------------------------------------
def worker(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    from velocis.config import get_preset
    from velocis.tokenizer import Tokenizer
    from velocis.train import Trainer, distributed
    from velocis.train.config import TrainConfig

    shape, parallel = LAYOUTS[args.worker]
    env = distributed.setup(device="cpu")
    tok = Tokenizer.load(args.data)
    model_config = get_preset("micro", **shape, vocab_size=tok.vocab_size, max_seq_len=args.seq_len)
    cfg = TrainConfig(output_dir=args.run, data_dir=args.data, max_steps=10**6, batch_size=args.batch_size,
                      seq_len=args.seq_len, device="cpu", precision="fp32", threads=1, lr=1e-3, monitor="none",
                      parallel=parallel if env.active else "ddp",
                      expert_parallel=env.world_size if args.worker == "ep" and env.active else 1)
    trainer = Trainer(cfg, model_config)
    try:
        for _ in range(3):
            trainer.train_step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        distributed.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(4):
                trainer.train_step()
            profiled = time.perf_counter() - t0
        comm = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("gloo:")) / 1e6
    finally:
        trainer.close()
        distributed.shutdown()
    if env.is_main:
        Path(args.out).write_text(json.dumps({"median": statistics.median(times), "fastest": min(times),
                                              "comm_share": min(1.0, comm / profiled)}))


def run(layout: str, ranks: int, data: Path, tmp: Path, args) -> dict:
    out = tmp / f"{layout}{ranks}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), __file__, "--", "--worker", layout, "--data", str(data),
           "--run", str(tmp / f"run_{layout}{ranks}"), "--out", str(out), "--steps", str(args.steps),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{layout} x{ranks} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="timed steps per run")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--worker", choices=list(LAYOUTS), help=argparse.SUPPRESS)  # set by this script for torchrun
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d')}; batch {args.batch_size} x {args.seq_len} tokens per rank, "
          f"{args.steps} timed steps, 1 thread per rank, gloo")
    print("| layout | ranks | median step (ms) | fastest step (ms) | tokens/s (all ranks, median) "
          "| time in collectives | extra time per step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tokens = args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(Path(tmp))
        for layout in args.layouts:
            one = run(layout, 1, data, Path(tmp), args)
            many = run(layout, args.ranks, data, Path(tmp), args)
            print(f"| {layout} | 1 | {one['median'] * 1e3:.0f} | {one['fastest'] * 1e3:.0f} | "
                  f"{tokens / one['median']:,.0f} | - | - |")
            extra = max(0.0, (many["median"] - one["median"]) / many["median"])
            print(f"| {layout} | {args.ranks} | {many['median'] * 1e3:.0f} | {many['fastest'] * 1e3:.0f} | "
                  f"{tokens * args.ranks / many['median']:,.0f} | {many['comm_share']:.0%} | {extra:.0%} |",
                  flush=True)
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
