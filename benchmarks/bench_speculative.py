"""Speculative decoding in the engine: acceptance rate and speed-up against plain decoding.

A target with one MTP module (and a smaller draft model) are trained for a few hundred steps on
arithmetic progressions (t_{i+1} = t_i + step mod V: learnable in seconds on a CPU, so drafts have
something to agree on), then 16 greedy requests of 64 new tokens run through the engine without a
draft, with the MTP self-draft, and with the draft model, side by side in one process, each the
median of --repeats runs. Greedy outputs must be identical in all three (checked).

    python benchmarks/bench_speculative.py [--steps 300] [--repeats 3]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from velocis.config import ModelConfig
from velocis.infer.engine import Engine
from velocis.infer.sampling import SamplingParams
from velocis.models import VelocisModel

V = 128


def batch(n: int, T: int, g: torch.Generator):
    start = torch.randint(0, V, (n, 1), generator=g)
    step = torch.randint(1, 5, (n, 1), generator=g)
    seq = (start + step * torch.arange(T + 1)) % V
    return seq[:, :-1], seq[:, 1:]


def train(cfg: ModelConfig, steps: int, seed: int) -> VelocisModel:
    torch.manual_seed(seed)
    model = VelocisModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = batch(16, 48, g)
        loss = model(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def run(engine_kwargs: dict, model, prompts, params) -> tuple[float, list, dict]:
    engine = Engine(model, max_num_seqs=16, **engine_kwargs)
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    return time.perf_counter() - t0, [r["token_ids"] for r in out], engine.stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    common = dict(vocab_size=V, num_heads=4, max_seq_len=256, tie_embeddings=False)
    target = train(ModelConfig(hidden_dim=128, num_layers=4, mlp_dim=352, mtp_depth=1, **common), args.steps, 0)
    draft = train(ModelConfig(hidden_dim=64, num_layers=1, mlp_dim=176, **common), args.steps, 1)
    prompts = batch(16, 12, torch.Generator().manual_seed(7))[0].tolist()
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows = {"plain": {}, "MTP self-draft": dict(draft_model="mtp"),
            "draft model (k=4)": dict(draft_model=draft, num_speculative_tokens=4)}
    times = {name: [] for name in rows}
    outputs, stats = {}, {}
    for _ in range(args.repeats):
        for name, kw in rows.items():  # alternating, so the machine's drift hits all alike
            t, outputs[name], stats[name] = run(kw, target, prompts, params)
            times[name].append(t)
    same = all(outputs[n] == outputs["plain"] for n in rows)
    tokens = 16 * args.new_tokens
    base = statistics.median(times["plain"])
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"16 greedy requests x {args.new_tokens} tokens; outputs identical: {same}")
    print(f"| decoding | tokens/s | speed-up | acceptance rate |")
    print(f"|---|---:|---:|---:|")
    for name in rows:
        t = statistics.median(times[name])
        acc = stats[name]["draft_acceptance_rate"]
        print(f"| {name} | {tokens / t:.0f} | {base / t:.2f}x | {acc:.2f} |" if name != "plain" else
              f"| {name} | {tokens / t:.0f} | 1.00x | - |")


if __name__ == "__main__":
    main()
