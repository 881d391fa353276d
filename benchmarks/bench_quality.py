"""Quality per compute: Velocis' training recipe against transformers' LlamaForCausalLM at equal
wall-clock, on the same tokenizer, data and machine, scored on held-out Chinese and English text.

The held-out text is the tail of each language's corpus (never trained on). Both contestants
train on the same prepared token shards (Velocis' PackedLoader feeds the transformers loop too),
with the same shape and sequence length, for the same minutes, one after the other; each
then is scored by the same function here: bits per byte = summed next-token NLL / ln 2 / UTF-8
bytes of the held-out text. Velocis trains through `velocis train-custom` with its defaults plus
any --velocis-args (the ablation knobs), its batch size included (the recipe's: 16 sequences), at
the shape Velocis picks for this budget (VELOCIS_SHAPE: the baseline's width, half its layers,
ReLU² MLP 1536; checked to have no more parameters than the baseline) or, with --velocis-shape
baseline, the baseline's own; the
baseline is transformers with AdamW lr 1e-3, linear warmup then cosine over the time budget, fp32,
batch 8 x 256 as the issue states it (--transformers-batch for a control at Velocis' batch).

    python benchmarks/bench_quality.py [--minutes 10] [--threads 2] [--work /tmp/vq]
        [--contestants transformers,velocis] [--velocis-args="--optimizer muon"] [--label NAME]
        [--velocis-shape pick|baseline]

(--velocis-args=... with "=": argparse takes a lone "--flag" value for an option of its own.)

Prints one table row per contestant: tokens seen, tokens/s, bits per byte on zh and en, and
Velocis' ratio against the baseline when both ran. Results are also appended to
WORK/results.jsonl, so ablations run one by one build one table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = {"zh": SHARED / "zh" / "classical.txt", "en": SHARED / "en" / "tinyshakespeare.txt"}
HELD_OUT_CHARS = {"zh": 30_000, "en": 60_000}  # about the same number of bytes per language
SHAPE = dict(hidden_dim=384, num_layers=8, num_heads=6, num_kv_heads=2, mlp_dim=1024, max_seq_len=256)
# Velocis' shape for budgets of minutes on a CPU (under 2M tokens): fewer, wider-MLP layers learn more
# in the same time (the ablation in RESULTS.md: 4 layers and ReLU² 1536 beat 8 layers SwiGLU 1024).
VELOCIS_SHAPE = dict(SHAPE, num_layers=4, dense_feed_forward="relu2", mlp_dim=1536)
FLAGS = {"dense_feed_forward": "feed-forward"}  # train-custom's flag where it is not the field's name
BATCH, SEQ, VOCAB = 8, 256, 8192


def run(cmd: list[str], **kw) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def prepare(work: Path) -> tuple[Path, dict[str, str]]:
    """Train/held-out split, tokenizer, token shards (reused when present)."""
    held_out, train_files = {}, {}
    for lang, path in CORPORA.items():
        if not path.is_file():
            sys.exit(f"bench_quality needs {path} (the shared corpus)")
        text = path.read_text(encoding="utf-8")
        cut = text.rfind("\n\n", 0, len(text) - HELD_OUT_CHARS[lang]) + 2  # at a document boundary
        held_out[lang] = text[cut:]
        train_files[lang] = work / f"train_{lang}.txt"
        if not train_files[lang].is_file():
            train_files[lang].write_text(text[:cut], encoding="utf-8")
    velocis = [sys.executable, "-m", "velocis"]
    if not (work / "tok" / "tokenizer.json").is_file():
        run([*velocis, "tokenizer", "train", "--input", *map(str, train_files.values()), "--vocab-size", str(VOCAB),
             "--output", str(work / "tok"), "--sample-mb", "8", "--quiet"])
    if not (work / "data" / "index.json").is_file():
        run([*velocis, "data", "prepare", "--chinese-path", str(train_files["zh"]), "--english-path",
             str(train_files["en"]), "--tokenizer", str(work / "tok"), "--output", str(work / "data"), "--quiet"])
    return work / "data", held_out


@torch.no_grad()
def bits_per_byte(logits_fn, tokenizer, text: str, window: int = SEQ) -> float:
    """Next-token NLL over the whole held-out text in non-overlapping windows (each window's first
    token is context only), per UTF-8 byte of the text it scores."""
    ids = tokenizer.encode(text)
    nll, scored = 0.0, []
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start:start + window + 1])
        if len(chunk) < 2:
            break
        logits = logits_fn(chunk[:-1].unsqueeze(0)).float()
        nll += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        scored.append(chunk[1:])
    n_bytes = len(tokenizer.decode(torch.cat(scored).tolist()).encode("utf-8"))
    return nll / math.log(2) / n_bytes


def train_transformers(data_dir: Path, out: Path, minutes: float, threads: int, seed: int,
                       steps: int | None = None, batch: int = BATCH) -> dict:
    """The baseline loop: AdamW 1e-3 (betas 0.9/0.95, wd 0.1), warmup 30 steps, cosine to 10% over
    the time budget (or over `steps`), grad clip 1, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from velocis.data.loader import PackedLoader

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=SHAPE["hidden_dim"], intermediate_size=SHAPE["mlp_dim"],
                      num_hidden_layers=SHAPE["num_layers"], num_attention_heads=SHAPE["num_heads"],
                      num_key_value_heads=SHAPE["num_kv_heads"], max_position_embeddings=SHAPE["max_seq_len"],
                      tie_word_embeddings=True, attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    loader = iter(PackedLoader(data_dir, SEQ, batch, seed=seed))
    budget, start, step = minutes * 60, time.perf_counter(), 0
    while True:
        progress = (time.perf_counter() - start) / budget if steps is None else step / steps
        if progress >= 1:
            break
        mult = min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = 1e-3 * mult
        x, y = next(loader)
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    return {"steps": step, "tokens": step * batch * SEQ, "seconds": seconds}


def parameters(shape: dict) -> int:
    from velocis.config import ModelConfig
    from velocis.models.count import count_params

    return count_params(ModelConfig(vocab_size=VOCAB, **shape))["total"]


def train_velocis(data_dir: Path, out: Path, minutes: float, threads: int, seed: int, extra: list[str],
                  steps: int | None = None, shape: dict = VELOCIS_SHAPE) -> dict:
    shape = [f"--{FLAGS.get(k, k.replace('_', '-'))}={v}" for k, v in shape.items()]
    stop = ["--time-budget", str(minutes)] if steps is None else ["--max-steps", str(steps)]
    run([sys.executable, "-m", "velocis", "train-custom", "--data", str(data_dir), "--output-dir", str(out),
         *shape, "--seq-len", str(SEQ), *stop,
         "--threads", str(threads), "--seed", str(seed), "--monitor", "plain", "--no-plot", "--overwrite",
         "--eval-every", "100000", *extra], stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = max((r for r in records if r.get("type") == "train"), key=lambda r: r["step"])
    return {"steps": last["step"], "tokens": last["tokens"], "seconds": last["elapsed_s"]}  # training time only


def score(kind: str, out: Path, tokenizer, held_out: dict[str, str]) -> dict[str, float]:
    if kind == "transformers":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(out).float().eval()
        fn = lambda x: model(input_ids=x).logits  # noqa: E731
    else:
        import velocis

        model, _ = velocis.load(out)
        model = model.float().eval()
        fn = lambda x: model(x)  # noqa: E731
    return {lang: bits_per_byte(fn, tokenizer, text) for lang, text in held_out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=None,
                    help="train each contestant this many steps instead (learning per step, whatever the load)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=Path, default=Path("/tmp/velocis_bench_quality"))
    ap.add_argument("--contestants", default="transformers,velocis")
    ap.add_argument("--velocis-args", default="", help="extra train-custom flags (an ablation knob)")
    ap.add_argument("--label", default=None, help="name of this Velocis row (default: its extra flags)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--transformers-batch", type=int, default=BATCH, help="the baseline's batch (default 8)")
    ap.add_argument("--velocis-shape", choices=["pick", "baseline"], default="pick",
                    help="Velocis' own shape for this budget (default) or the baseline's")
    args = ap.parse_args()
    velocis_shape = VELOCIS_SHAPE if args.velocis_shape == "pick" else SHAPE
    limit, mine = parameters(SHAPE), parameters(velocis_shape)
    if mine > limit:
        sys.exit(f"Velocis' shape has {mine:,} parameters, more than the baseline's {limit:,}")
    print(f"parameters: baseline {limit:,}; Velocis {mine:,} ({velocis_shape})", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    from velocis.tokenizer import Tokenizer

    data_dir, held_out = prepare(args.work)
    tokenizer = Tokenizer.load(args.work / "tok")
    rows = []
    for kind in args.contestants.split(","):
        label = (kind + (f" b{args.transformers_batch}" if args.transformers_batch != BATCH else "")
                 if kind == "transformers" else (args.label or f"velocis {args.velocis_shape} shape {args.velocis_args}".strip()))
        out = args.work / "runs" / label.replace(" ", "_").replace("/", "_")
        if kind == "transformers":
            info = train_transformers(data_dir, out, args.minutes, args.threads, args.seed, args.steps,
                                      args.transformers_batch)
        else:
            info = train_velocis(data_dir, out, args.minutes, args.threads, args.seed, shlex.split(args.velocis_args),
                                 args.steps, velocis_shape)
        bpb = score(kind, out, tokenizer, held_out)
        row = {"label": label, **info, "bpb_zh": bpb["zh"], "bpb_en": bpb["en"], "minutes": args.minutes, "fixed_steps": args.steps,
               "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores"}
        rows.append(row)
        with open(args.work / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["label"].startswith("transformers")), None)
    print(f"\n{'contestant':<34} {'steps':>6} {'tokens/s':>9} {'bpb zh':>8} {'bpb en':>8} {'zh vs tf':>9} {'en vs tf':>9}")
    for r in rows:
        rel = ("", "") if base is None else (f"{r['bpb_zh'] / base['bpb_zh'] - 1:+.1%}",
                                              f"{r['bpb_en'] / base['bpb_en'] - 1:+.1%}")
        print(f"{r['label']:<34} {r['steps']:>6} {r['tokens'] / r['seconds']:>9.0f} {r['bpb_zh']:>8.4f} "
              f"{r['bpb_en']:>8.4f} {rel[0]:>9} {rel[1]:>9}")


if __name__ == "__main__":
    main()
