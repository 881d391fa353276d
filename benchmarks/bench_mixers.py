"""Token mixers on CPU: dense attention, Mamba-2, Gated DeltaNet and a 3:1 DeltaNet/attention hybrid
(Qwen3-Next's layout) at equal parameter count (byte-level vocabulary, ~12M parameters).

  1. decode: ms per generated token and the model cache's bytes per sequence at contexts 1K..32K,
     batch 1, through the model's own cache (`model.new_cache`, the path `velocis generate` takes).
     Prefilling 32K tokens on two cores takes minutes per model, and the cost of a decode step does
     not depend on what the cache holds, so by default the cache is filled with random keys/values/
     states and its lengths set to the context (--prefill-upto N runs a real prefill for contexts <= N).
     Cache bytes are those of the allocated cache buffers (KV slots for context + the decoded tokens).
  2. training: tokens/s of a whole step (forward, backward, AdamW), interleaved, best of --train-steps.
  3. quality at equal training time: dense attention vs the hybrid, trained on /work/shared/data
     (UTF-8 bytes as tokens: half the windows from en/, half from zh/, the last 5% of every file held
     out) for --train-seconds of each model's own compute time. The two runs alternate step by step,
     so a busy stretch of the (shared) machine slows both alike; validation bits-per-byte on the
     held-out bytes (loss in nats / ln 2, exact since a token is a byte) is taken at the end.

    python benchmarks/bench_mixers.py [--contexts 1024,4096,16384,32768] [--train-seconds 300]
        [--hidden-dim 384] [--num-layers 8] [--skip-decode] [--skip-train] [--skip-quality] [--threads N]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from velocis.config import ModelConfig
from velocis.models import VelocisModel
from velocis.models.count import count_params

DATA = Path(os.environ.get("VELOCIS_SHARED_DATA", "/work/shared/data"))

# The common shape (default): 8 layers of width 384 (6 heads of 64, 2 KV heads), byte vocabulary;
# --hidden-dim / --num-layers rescale it (heads of 64, DeltaNet key heads = heads / 2).
BASE = dict(vocab_size=256, hidden_dim=384, num_layers=8, num_heads=6, num_kv_heads=2, head_dim=64, mlp_dim=1024,
            max_seq_len=32768 + 64, tie_embeddings=True, init_std=0.02)
LINEAR = dict(linear_num_key_heads=3, linear_num_value_heads=6, linear_key_head_dim=64, linear_value_head_dim=64)
MAMBA = dict(ssm_state_size=64, ssm_head_dim=64, ssm_num_groups=1, ssm_expand=2, ssm_chunk_size=64)


def rescale(hidden: int, layers: int) -> None:
    """Set BASE / LINEAR to another width and depth (hidden a multiple of 128, layers of 4)."""
    if hidden % 128 or layers % 4:
        raise SystemExit(f"--hidden-dim {hidden} must be a multiple of 128 and --num-layers {layers} of 4 "
                         f"(heads of 64 in pairs; the hybrid repeats 3 DeltaNet + 1 attention layers)")
    heads = hidden // 64
    BASE.update(hidden_dim=hidden, num_layers=layers, num_heads=heads, mlp_dim=int(round(hidden * 8 / 3 / 32)) * 32)
    LINEAR.update(linear_num_key_heads=heads // 2, linear_num_value_heads=heads)


def _total(cfg: ModelConfig) -> int:
    return count_params(cfg)["total"]


def _match_mlp(cfg: ModelConfig, target: int) -> ModelConfig:
    """cfg with the MLP width (a multiple of 32) that brings its parameter count nearest `target`."""
    a, b = _total(cfg.replace(mlp_dim=256)), _total(cfg.replace(mlp_dim=512))
    width = 256 + (target - a) * 256 / (b - a)
    return cfg.replace(mlp_dim=max(32, int(round(width / 32)) * 32))


def models() -> dict[str, ModelConfig]:
    """The four contestants, each within a few percent of the attention model's parameters."""
    attention = ModelConfig(**BASE)
    target = _total(attention)
    deltanet = _match_mlp(ModelConfig(**BASE, **LINEAR, mixer="gated_deltanet"), target)
    hybrid = _match_mlp(ModelConfig(**BASE, **LINEAR, mixer_pattern=["gated_deltanet"] * 3 + ["gated_attention"],
                                    qk_norm=True, partial_rotary_factor=0.25), target)
    # Mamba-2 as published: mixer-only layers (no MLP), as many as match the parameter count
    per_layer = _total(ModelConfig(**{**BASE, "num_layers": 2}, **MAMBA, mixer="mamba2",
                                   layer_feed_forwards=["none"] * 2)) - _total(
        ModelConfig(**{**BASE, "num_layers": 1}, **MAMBA, mixer="mamba2", layer_feed_forwards=["none"]))
    base1 = _total(ModelConfig(**{**BASE, "num_layers": 1}, **MAMBA, mixer="mamba2", layer_feed_forwards=["none"]))
    n = max(1, round(1 + (target - base1) / per_layer))
    mamba = ModelConfig(**{**BASE, "num_layers": n}, **MAMBA, mixer="mamba2", layer_feed_forwards=["none"] * n)
    return {"attention": attention, "mamba2": mamba, "gated_deltanet": deltanet, "hybrid 3:1": hybrid}


def describe(name: str, cfg: ModelConfig) -> str:
    mixers = cfg.mixers()
    layers = ", ".join(f"{mixers.count(m)} {m}" for m in dict.fromkeys(mixers))
    ff = "no MLP" if set(cfg.feed_forwards()) == {"none"} else f"MLP {cfg.mlp_dim}"
    return f"{name:15s} {_total(cfg) / 1e6:6.2f}M params: {cfg.num_layers} layers ({layers}), {ff}"


# --------------------------------------------------------------------------- decode
def cache_bytes(cache) -> int:
    return sum(b.numel() * b.element_size() for layer in cache.layers for b in layer.buffers())


@torch.no_grad()
def fill_random(cache, context: int, seed: int = 0) -> None:
    """Every buffer random (small values), every row `context` tokens long: what a prefill leaves, in cost."""
    g = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        for buf in layer.buffers():
            if buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g, dtype=torch.float32).mul_(0.1).to(buf.dtype))
    cache.lengths.fill_(context)


@torch.no_grad()
def prefill(model, cache, context: int, chunk: int = 2048) -> None:
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    for start in range(0, context, chunk):
        model(ids[:, start:start + chunk], cache=cache, logits_to_keep=1)


@torch.no_grad()
def decode_ms(model, context: int, steps: int, real_prefill: bool) -> tuple[float, int]:
    """(median ms per token over `steps` decode steps after `context` tokens, cache bytes per sequence)."""
    cache = model.new_cache(1, context + steps + 2)
    if real_prefill:
        prefill(model, cache, context)
    else:
        fill_random(cache, context)
    tok = torch.tensor([[65]])
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        logits = model(tok, cache=cache)
        tok = logits[:, -1:].argmax(-1)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t)
    assert int(cache.lengths[0]) == context + steps + 2
    return statistics.median(times) * 1e3, cache_bytes(cache)


def bench_decode(cfgs, contexts, steps, prefill_upto) -> None:
    print(f"\n## decode, batch 1: ms per token (median of {steps}) | cache MB per sequence (fp32 cache)")
    label = {c: f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts}
    print("| model | " + " | ".join(f"{label[c]} ms | {label[c]} cache MB" for c in contexts) + " |")
    print("|---|" + "---:|---:|" * len(contexts))
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = VelocisModel(cfg).eval()
        cells = []
        for c in contexts:
            ms, nbytes = decode_ms(model, c, steps, real_prefill=c <= prefill_upto)
            cells += [f"{ms:.1f}", f"{nbytes / 2**20:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


# --------------------------------------------------------------------------- training speed
def bench_train_speed(cfgs, batch, seq_len, steps) -> None:
    runs = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = VelocisModel(cfg.replace(max_seq_len=seq_len)).train()
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4),
                      torch.randint(0, cfg.vocab_size, (batch, seq_len + 1)))

    def step(name):
        model, opt, x = runs[name]
        t = time.perf_counter()
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for name in runs:
        step(name)  # warm-up: optimizer state, allocator
    best = {name: math.inf for name in runs}
    for _ in range(steps):  # interleaved: the shared machine's load hits every model alike
        for name in runs:
            best[name] = min(best[name], step(name))
    print(f"\n## training step (fwd + bwd + AdamW), batch {batch} x {seq_len} tokens, best of {steps}")
    print("| model | params | tokens/s | vs attention |")
    print("|---|---:|---:|---:|")
    first = None
    for name, t in best.items():
        tps = batch * seq_len / t
        first = first or tps
        print(f"| {name} | {_total(runs[name][0].config) / 1e6:.2f}M | {tps:.0f} | {tps / first:.2f} |")


# --------------------------------------------------------------------------- quality at equal time
def byte_splits(held_out: float = 0.05) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """language -> (train bytes, validation bytes): every file's last `held_out` fraction is validation."""
    out = {}
    for lang in ("en", "zh"):
        files = sorted((DATA / lang).glob("*.txt"))
        if not files:
            raise SystemExit(f"no text under {DATA / lang}; set VELOCIS_SHARED_DATA or pass --skip-quality")
        train, val = [], []
        for f in files:
            raw = torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8).long()
            cut = int(len(raw) * (1 - held_out))
            train.append(raw[:cut])
            val.append(raw[cut:])
        out[lang] = (torch.cat(train), torch.cat(val))
    return out


def windows(data: torch.Tensor, n: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq_len - 1, (n,), generator=g)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])


def batch_of(splits, batch: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    half = batch // 2
    return torch.cat([windows(splits["en"][0], half, seq_len, g), windows(splits["zh"][0], batch - half, seq_len, g)])


@torch.no_grad()
def val_bpb(model, val: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """Bits per byte over the whole validation text in consecutive windows (scored tokens only)."""
    model.eval()
    n = (len(val) - 1) // seq_len
    x = val[: n * seq_len + 1]
    inputs, targets = x[:-1].view(n, seq_len), x[1:].view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch):
        total += model(inputs[i:i + batch], targets[i:i + batch], reduction="sum").loss.item()
    model.train()
    return total / (n * seq_len) / math.log(2)


def bench_quality(cfgs, seconds, batch, seq_len, lr, val_bytes) -> None:
    splits = byte_splits()
    val = {lang: v[:val_bytes] for lang, (_, v) in splits.items()}
    runs = {}
    for name in ("attention", "hybrid 3:1"):
        torch.manual_seed(0)
        model = VelocisModel(cfgs[name].replace(max_seq_len=seq_len)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        runs[name] = dict(model=model, opt=opt, g=torch.Generator().manual_seed(1), used=0.0, steps=0, loss=[])
    warmup = 20
    while any(r["used"] < seconds for r in runs.values()):
        for r in runs.values():  # alternate: one step each, each on its own clock
            if r["used"] >= seconds:
                continue
            x = batch_of(splits, batch, seq_len, r["g"])  # the same batches for both (same seed)
            # warm-up, then a linear decay to 10% over the model's own time budget
            scale = min(1.0, (r["steps"] + 1) / warmup) * (1 - 0.9 * min(1.0, r["used"] / seconds))
            for group in r["opt"].param_groups:
                group["lr"] = lr * scale
            t = time.perf_counter()
            loss = r["model"](x[:, :-1], x[:, 1:]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 1.0)
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            r["used"] += time.perf_counter() - t
            r["steps"] += 1
            r["loss"].append(loss.item())
    print(f"\n## equal training time: {seconds:.0f} s of each model's own compute, batch {batch} x {seq_len} bytes "
          f"(half en, half zh), AdamW lr {lr}; validation: the first {val_bytes // 1000}K held-out bytes of each")
    print("| model | params | steps | train tokens | last-20 train bpb | val bpb en | val bpb zh | val bpb mean |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        en, zh = val_bpb(r["model"], val["en"], seq_len), val_bpb(r["model"], val["zh"], seq_len)
        train_bpb = statistics.mean(r["loss"][-20:]) / math.log(2)
        print(f"| {name} | {_total(r['model'].config) / 1e6:.2f}M | {r['steps']} | {r['steps'] * batch * seq_len:,} "
              f"| {train_bpb:.3f} | {en:.3f} | {zh:.3f} | {(en + zh) / 2:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--prefill-upto", type=int, default=0, help="run a real prefill for contexts up to this")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq-len", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps per model (speed)")
    ap.add_argument("--train-seconds", type=float, default=300, help="compute time per model (quality)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--val-bytes", type=int, default=200_000)
    ap.add_argument("--hidden-dim", type=int, default=BASE["hidden_dim"], help="width of every model")
    ap.add_argument("--num-layers", type=int, default=BASE["num_layers"], help="depth of the attention model")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    rescale(args.hidden_dim, args.num_layers)
    if max(contexts) + args.decode_steps + 2 > BASE["max_seq_len"]:
        raise SystemExit(f"--contexts up to {BASE['max_seq_len'] - args.decode_steps - 2} (the models' max_seq_len)")
    print(f"# bench_mixers  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32")
    cfgs = models()
    for name, cfg in cfgs.items():
        print("# " + describe(name, cfg))
    if not args.skip_decode:
        bench_decode(cfgs, contexts, args.decode_steps, args.prefill_upto)
    if not args.skip_train:
        bench_train_speed(cfgs, args.train_batch, args.train_seq_len, args.train_steps)
    if not args.skip_quality:
        bench_quality(cfgs, args.train_seconds, args.train_batch, args.train_seq_len, args.lr, args.val_bytes)


if __name__ == "__main__":
    main()
