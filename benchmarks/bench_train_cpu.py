"""CPU training throughput: Velocis against transformers' LlamaForCausalLM of the same shape.

Both models get the same batch, the same AdamW (fused where the build has it) and the same
step: forward, cross-entropy, backward, optimizer step. Each runs in its own process (as a user's
training would: one library's allocations never page-fault or trim the other's heap); the parent
alternates them, one step each per round after warmup, so they never overlap. The table reports
the mean step time (a run's tokens/s is tokens / mean step), the median, the best (this VM's
step times swing by +-30%; the best is the steadiest estimate of each one's cost) and "paired":
the median over rounds of transformers' step / the contestant's step in the same round.
torch.compile's one-off compile time is reported separately.

    python benchmarks/bench_train_cpu.py [--preset micro] [--batch 16] [--seq-len 256]
        [--rounds 10] [--threads N] [--compile] [--precision fp32[,bf16]]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from velocis.config import get_preset
from velocis.utils.device import hardware_bf16, resolve_precision


def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
        attn_implementation="sdpa", use_cache=False,
    )
    return LlamaForCausalLM(hf_cfg).float().train()


def make_optimizer(model):
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


class Contestant:
    """A model, its loss function and its optimizer; `step()` is one full training step."""

    def __init__(self, name, model, loss_fn):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.opt = make_optimizer(model)

    def step(self, x, y, autocast: bool = False) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = self.loss_fn(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t


CONTESTANTS = {  # name -> (library, compiled)
    "transformers Llama (eager)": ("hf", False),
    "velocis (eager)": ("velocis", False),
    "velocis (eager, no C++ kernels)": ("velocis-plain", False),
    "velocis (torch.compile)": ("velocis", True),
    "transformers Llama (torch.compile)": ("hf", True),
}


def build_contestant(name, cfg):
    from velocis.models import VelocisModel

    library, compiled = CONTESTANTS[name]
    if library == "velocis-plain":  # this worker's process only: the plain-PyTorch paths
        os.environ["VELOCIS_CPU_KERNELS"] = "0"
    torch.manual_seed(0)
    if library.startswith("velocis"):
        model = VelocisModel(cfg).train()

        def loss_fn(x, y):
            return model(x, y).loss
    else:
        model = hf_llama(cfg)

        def loss_fn(x, y):
            # The same loss as Velocis (next-token CE on given targets); HF's own `labels=` path
            # shifts internally and would score one token fewer per row.
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    return Contestant(name, model, torch.compile(loss_fn) if compiled else loss_fn)


def worker(conn, name, preset, batch, seq_len, threads, bf16) -> None:
    """One contestant in its own process: its allocations and heap never touch the other's."""
    if threads:
        torch.set_num_threads(threads)
    cfg = get_preset(preset)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    y = torch.roll(x, -1, dims=1)
    c = build_contestant(name, cfg)
    conn.send((sum(p.numel() for p in c.model.parameters()), bool(c.opt.defaults.get("fused"))))
    while conn.recv() == "step":
        conn.send(c.step(x, y, bf16))


class Remote:
    """The parent's handle on a worker: `step()` runs one step there and returns its time."""

    def __init__(self, name, args, bf16):
        ctx = mp.get_context("spawn")
        self.name, self.times, self.setup_s = name, [], 0.0
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, name, args.preset, args.batch, args.seq_len,
                                                     args.threads, bf16), daemon=True)
        self.proc.start()
        self.n_params, self.fused = self.conn.recv()

    def step(self) -> float:
        self.conn.send("step")
        dt = self.conn.recv()
        time.sleep(0.05)  # let the idle worker's OpenMP threads stop spinning before the next one runs
        return dt

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join()


def summary(times: list[float]) -> tuple[float, float, float]:
    """(mean, median, best) step time; tokens/s over a run is tokens / mean step time."""
    return statistics.fmean(times), statistics.median(times), min(times)


def paired_ratio(base: list[float], times: list[float]) -> float:
    """Median over rounds of base step / this step, the two taken back to back in one round: the
    VM's slow and fast stretches hit both steps of a pair alike."""
    return statistics.median(b / t for b, t in zip(base, times))


def run(contestants, rounds: int, warmup: int) -> None:
    for c in contestants:  # warmup; the first compiled step is the compile
        c.setup_s = c.step()
        for _ in range(warmup - 1):
            c.step()
    for r in range(rounds):  # one step each, alternating order: machine noise hits everyone alike
        for c in contestants if r % 2 == 0 else reversed(contestants):
            c.times.append(c.step())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds of one step per contestant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd Velocis and transformers")
    ap.add_argument("--precision", default=None,
                    help="comma list of fp32 | bf16 (bf16 = autocast with fp32 weights, for every contestant); "
                         "default fp32,bf16 on a CPU with bf16 matrix hardware, else fp32 (emulated bf16 is ~20x slower)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = "fp32,bf16" if hardware_bf16(torch.device("cpu")) else "fp32"
    precisions = [p.strip() for p in args.precision.split(",")]
    if any(p not in ("fp32", "bf16") for p in precisions):
        raise SystemExit(f"--precision takes fp32 and/or bf16, got {args.precision!r}")

    tokens = args.batch * args.seq_len
    print(f"# bench_train_cpu  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; bf16 matmul in hardware: {hardware_bf16(torch.device('cpu'))}")
    header = True
    results = {}  # (precision, contestant) -> (median, best)
    names = list(CONTESTANTS)[:5 if args.compile else 3]
    for precision in precisions:
        contestants = [Remote(name, args, precision == "bf16") for name in names]
        run(contestants, args.rounds, args.warmup)
        for c in contestants:
            c.close()
        if header:
            n_hf, n_vel = contestants[0].n_params, contestants[1].n_params
            print(f"# preset {args.preset}: velocis {n_vel / 1e6:.2f}M params, transformers {n_hf / 1e6:.2f}M params; "
                  f"batch {args.batch} x {args.seq_len} = {tokens} tokens/step; AdamW "
                  f"{'fused' if contestants[0].fused else 'foreach'}; "
                  f"{args.rounds} alternating rounds, each contestant in its own process; "
                  f"ratio = transformers eager time / contestant time")
            print()
            print(f"| {'precision':9s} | {'contestant':36s} | {'mean ms':>8s} | {'median ms':>9s} | {'best ms':>8s} "
                  f"| {'tokens/s':>9s} | {'x mean':>7s} | {'x median':>8s} | {'x best':>7s} | {'x paired':>8s} "
                  f"| {'first step s':>12s} |")
            print(f"|{'-' * 11}|{'-' * 38}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 9}"
                  f"|{'-' * 10}|{'-' * 14}|")
            header = False
        base = summary(contestants[0].times)
        for c in contestants:
            mean, med, best = results[precision, c.name] = summary(c.times)
            paired = paired_ratio(contestants[0].times, c.times)
            print(f"| {precision:9s} | {c.name:36s} | {mean * 1e3:8.1f} | {med * 1e3:9.1f} | {best * 1e3:8.1f} "
                  f"| {tokens / mean:9.0f} | {base[0] / mean:6.2f}x | {base[1] / med:7.2f}x | {base[2] / best:6.2f}x "
                  f"| {paired:7.2f}x | {c.setup_s:12.1f} |", flush=True)

    # What each user gets without flags: transformers trains in fp32 on a CPU; `velocis train`'s
    # --precision auto picks bf16 autocast on a CPU with bf16 hardware (fp32 elsewhere).
    auto = resolve_precision("auto", torch.device("cpu"))
    hf_key, vel_key = ("fp32", "transformers Llama (eager)"), (auto, "velocis (eager)")
    if hf_key in results and vel_key in results:
        ratios = [h / v for h, v in zip(results[hf_key], results[vel_key])]
        print(f"\nDefaults on this machine (transformers fp32 eager vs velocis --precision auto = {auto}, eager): "
              f"{ratios[0]:.2f}x tokens/s (mean step), {ratios[1]:.2f}x median step, {ratios[2]:.2f}x best step")


if __name__ == "__main__":
    main()
