"""CPU training throughput: Velocis against transformers' LlamaForCausalLM of the same shape.

Both models get the same batch, the same AdamW (fused where the build has it) and the same
step: forward, cross-entropy, backward, optimizer step. They run alternately, round by round,
after warmup steps, and the table reports the median step time. torch.compile's one-off
compile time is measured and reported separately.

    python benchmarks/bench_train_cpu.py [--preset micro] [--batch 16] [--seq-len 256]
        [--rounds 5] [--steps 3] [--threads N] [--no-compile]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from velocis.config import get_preset


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
        self.times: list[float] = []
        self.setup_s = 0.0

    def step(self, x, y, autocast: bool = False) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = self.loss_fn(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contestant per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--hf-compile", action="store_true", help="also time torch.compile'd transformers Llama")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU for every contestant (fp32 weights)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from velocis.models import VelocisModel

    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
    y = torch.roll(x, -1, dims=1)

    vel = VelocisModel(cfg).train()
    hf = hf_llama(cfg)
    n_vel = sum(p.numel() for p in vel.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())

    def vel_loss(x, y):
        return vel.compute_loss(x, y)[0]

    def hf_loss(x, y):
        # The same loss as Velocis (next-token CE on given targets); HF's own `labels=` path
        # shifts internally and would score one token fewer per row.
        logits = hf(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    contestants = [Contestant("transformers Llama (eager)", hf, hf_loss), Contestant("velocis (eager)", vel, vel_loss)]
    if not args.no_compile:
        vel_c = VelocisModel(cfg).train()
        vel_c.load_state_dict(vel.state_dict())
        compiled = torch.compile(lambda x, y: vel_c.compute_loss(x, y)[0])
        contestants.append(Contestant("velocis (torch.compile)", vel_c, compiled))
    if args.hf_compile:
        hf_c = hf_llama(cfg)
        compiled_hf = torch.compile(
            lambda x, y: F.cross_entropy(hf_c(input_ids=x).logits.flatten(0, 1).float(), y.flatten()))
        contestants.append(Contestant("transformers Llama (torch.compile)", hf_c, compiled_hf))

    for c in contestants:  # warmup; the first compiled step is the compile
        t = time.perf_counter()
        c.step(x, y, args.bf16)
        c.setup_s = time.perf_counter() - t
        for _ in range(args.warmup - 1):
            c.step(x, y, args.bf16)
    for r in range(args.rounds):  # alternate so that machine noise hits everyone alike
        for c in contestants if r % 2 == 0 else reversed(contestants):
            for _ in range(args.steps):
                c.times.append(c.step(x, y, args.bf16))

    tokens = args.batch * args.seq_len
    base = statistics.median(contestants[0].times)
    print(f"# bench_train_cpu  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"# preset {args.preset}: velocis {n_vel / 1e6:.2f}M params, transformers {n_hf / 1e6:.2f}M params; "
          f"batch {args.batch} x {args.seq_len} = {tokens} tokens/step; "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; AdamW "
          f"{'fused' if contestants[0].opt.defaults.get('fused') else 'foreach'}; "
          f"{args.rounds} rounds x {args.steps} steps, median")
    print()
    print(f"| {'contestant':36s} | {'step ms':>8s} | {'tokens/s':>9s} | {'vs transformers':>15s} | {'first step s':>12s} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 11}|{'-' * 17}|{'-' * 14}|")
    for c in contestants:
        med = statistics.median(c.times)
        print(f"| {c.name:36s} | {med * 1e3:8.1f} | {tokens / med:9.0f} | {base / med:14.2f}x | {c.setup_s:12.1f} |")


if __name__ == "__main__":
    main()
