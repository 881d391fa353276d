"""MoE speed on CPU: (1) one MoE layer's forward+backward — Velocis sorted dispatch (grouped matmul,
and its loop-over-experts fallback) against a naive masked per-expert loop and transformers'
MixtralSparseMoeBlock; (2) training-step tokens/s of the `small` MoE preset against a dense model
with the same activated parameters (num_experts=0, mlp_dim = top_k * moe_dim).

    python benchmarks/bench_moe.py [--tokens 2048] [--seq-len 256] [--batch 2] [--steps 3] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from velocis.config import get_preset
from velocis.models.moe import MoE, naive_moe_experts, route, update_expert_bias


def timeit(fn, warmup: int, reps: int) -> float:
    """Best of `reps` (the machine is shared: the minimum is the least disturbed run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def time_interleaved(fns: dict, reps: int) -> dict:
    """Best of `reps` rounds, each round running every candidate once (load drifts hit all alike)."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def bench_layer(tokens: int, reps: int, **overrides) -> list[tuple[str, float]]:
    cfg = get_preset("small", **overrides)
    torch.manual_seed(0)
    layer = MoE(cfg, 0).train()
    x = torch.randn(tokens, cfg.hidden_dim, requires_grad=True)
    g = torch.randn(tokens, cfg.hidden_dim)

    def velocis(impl):
        def run():
            layer.impl = impl
            layer.zero_grad(set_to_none=True)
            out = layer(x)
            out.backward(g)
        return run

    def naive():
        layer.zero_grad(set_to_none=True)
        h = x
        _, w, idx = route(layer.gate(h), layer.top_k)
        out = naive_moe_experts(h, w, idx, layer.experts.gate_up_proj, layer.experts.down_proj)
        out.backward(g)

    fns = {
        "velocis dispatch (auto: grouped_mm)": velocis("auto"),
        "velocis dispatch (loop over experts)": velocis("loop"),
        "naive masked per-expert loop": naive,
    }
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        x3 = x.detach().view(1, tokens, -1).requires_grad_()
        for impl in ("eager", "grouped_mm"):
            hf_cfg = MixtralConfig(hidden_size=cfg.hidden_dim, intermediate_size=cfg.moe_dim,
                                   num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_token)
            hf_cfg._experts_implementation = impl
            hf = MixtralSparseMoeBlock(hf_cfg).train()
            hf.load_state_dict({k: v for k, v in layer.state_dict().items() if "correction_bias" not in k})

            def hf_run(hf=hf):
                hf.zero_grad(set_to_none=True)
                hf(x3).backward(g.view(1, tokens, -1))
            fns[f"transformers MixtralSparseMoeBlock ({impl})"] = hf_run
    except Exception as e:  # transformers missing or changed
        print(f"(transformers Mixtral block skipped: {e})")
    return list(time_interleaved(fns, reps).items())


def bench_train(seq_len: int, batch: int, steps: int) -> list[tuple[str, float, float, int, int]]:
    """Rows (name, tokens/s of a whole step, tokens/s of fwd+bwd alone, total params, active params);
    the two models' steps are interleaved, best of `steps`."""
    try:
        from velocis.models import VelocisModel
    except ImportError as e:
        print(f"(training-step benchmark skipped: {e})")
        return []
    moe_cfg = get_preset("small", max_seq_len=max(seq_len, 2048))
    dense_cfg = moe_cfg.replace(num_experts=0, mlp_dim=moe_cfg.num_experts_per_token * moe_cfg.moe_dim)
    runs = {}
    for name, cfg in (("MoE small (8 experts, top-2)", moe_cfg), ("dense, same activated params", dense_cfg)):
        torch.manual_seed(0)
        model = VelocisModel(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
        total = sum(p.numel() for p in model.parameters())
        active = total
        if cfg.num_experts:
            per_expert = 3 * cfg.hidden_dim * cfg.moe_dim
            n_moe = cfg.feed_forwards().count("moe")
            active = total - n_moe * (cfg.num_experts - cfg.num_experts_per_token) * per_expert
        runs[name] = (model, opt, x, total, active)

    def step(name):
        model, opt, x, _, _ = runs[name]
        t0 = time.perf_counter()
        loss = model(x, x).loss
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model)
        return time.perf_counter() - t0, t1 - t0

    for name in runs:
        step(name)  # warm-up (optimizer state allocation)
    best = {name: [float("inf"), float("inf")] for name in runs}
    for _ in range(steps):
        for name in runs:
            whole, fb = step(name)
            best[name] = [min(best[name][0], whole), min(best[name][1], fb)]
    n = batch * seq_len
    return [(name, n / best[name][0], n / best[name][1], r[3], r[4]) for name, r in runs.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens through the single MoE layer")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-layer", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    layers = [
        ("`small` experts", {}),
        ("fine-grained (64 x 128, top-16)", dict(num_experts=64, num_experts_per_token=16, moe_dim=128)),
    ]
    for title, over in [] if args.skip_layer else layers:
        cfg = get_preset("small", **over)
        print(f"\n## one MoE layer fwd+bwd, {title}: {args.tokens} tokens, H={cfg.hidden_dim}, I={cfg.moe_dim}, "
              f"E={cfg.num_experts}, top-{cfg.num_experts_per_token} (best of {args.reps})")
        rows = bench_layer(args.tokens, args.reps, **over)
        base = rows[0][1]
        print(f"| {'implementation':<48} | {'ms':>8} | {'vs velocis':>10} |")
        print(f"|{'-' * 50}|{'-' * 10}|{'-' * 12}|")
        for name, t in rows:
            print(f"| {name:<48} | {t * 1e3:8.1f} | {t / base:9.2f}x |")
    if not args.skip_train:
        print(f"\n## training step (fwd+bwd+AdamW), batch {args.batch} x {args.seq_len} tokens, best of {args.steps}")
        trows = bench_train(args.seq_len, args.batch, args.steps)
        if trows:
            base = trows[0][1]
            print(f"| {'model':<30} | {'total':>8} | {'active':>8} | {'step tok/s':>10} | {'ratio':>5} "
                  f"| {'fwd+bwd tok/s':>13} | {'ratio':>5} |")
            print(f"|{'-' * 32}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 7}|{'-' * 15}|{'-' * 7}|")
            for name, tps, fb, total, active in trows:
                print(f"| {name:<30} | {total / 1e6:7.1f}M | {active / 1e6:7.1f}M | {tps:10.0f} | {tps / trows[0][1]:5.2f} "
                      f"| {fb:13.0f} | {fb / trows[0][2]:5.2f} |")


if __name__ == "__main__":
    main()
