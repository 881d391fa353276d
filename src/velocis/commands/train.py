"""`velocis train-micro | train-small | train-custom | train`: pretrain a model.

    velocis train-micro --chinese-path zh/ --english-path en/ --output-dir runs/micro
    velocis train-custom --data runs/micro/data --hidden-dim 64 --num-layers 2 --num-heads 2 \
        --num-kv-heads 1 --mlp-dim 128 --batch-size 8 --max-steps 200 --output-dir runs/tiny
    velocis train --preset micro --data DIR --time-budget 10 --output-dir runs/x
"""
from __future__ import annotations

import argparse
from pathlib import Path

from velocis.config import ModelConfig, get_preset
from velocis.errors import VelocisError

# Per-preset defaults for what the user does not say: tokenizer size, batch, peak lr, steps.
DEFAULTS = {
    "micro": dict(vocab_size=8192, batch_size=16, seq_len=256, lr=2e-3, max_steps=2000),
    "small": dict(vocab_size=32000, batch_size=16, seq_len=1024, lr=1e-3, max_steps=10000),
    "custom": dict(vocab_size=8192, batch_size=16, seq_len=256, lr=2e-3, max_steps=1000),
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--chinese-path", nargs="+", metavar="PATH", help="Chinese text files or directories")
    g.add_argument("--english-path", nargs="+", metavar="PATH", help="English text files or directories")
    g.add_argument("--data", metavar="DIR", help="a prepared data dir (velocis data prepare) instead of raw text")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer to use with raw text (default: train one)")
    g.add_argument("--vocab-size", type=int, help="size of the tokenizer to train (default fits the preset)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="run directory (default runs/<preset>)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default fits the preset, unless --time-budget)")
    g.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop (and finish the schedule) after this long")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, help="training sequence length (<= the model's context)")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    g.add_argument("--warmup", type=int, default=50, help="warmup steps")
    g.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                   help="cosine decay, or warmup-stable-decay (decays over the last 20%%)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slower start, faster steps on a GPU; on a CPU eager with the C++ kernels is faster)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast where the hardware multiplies bf16 (CUDA, AVX512-BF16/AMX CPUs), else fp32")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--eval-batches", type=int, default=8)
    g.add_argument("--save-every", type=int, default=200)
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (plus best/)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--resume", nargs="?", const="auto", metavar="DIR",
                   help="continue from the newest checkpoint of --output-dir (or of DIR)")
    g.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds a run")
    g.add_argument("--monitor", choices=["auto", "live", "plain", "none"], default="auto",
                   help="live dashboard (default on a terminal) or plain log lines")
    g.add_argument("--no-plot", action="store_true", help="do not write curves.png at the end")


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model shape (on top of --preset)")
    g.add_argument("--preset", default="micro", help="the preset to start from (default micro)")
    g.add_argument("--hidden-dim", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--num-kv-heads", type=int)
    g.add_argument("--head-dim", type=int)
    g.add_argument("--mlp-dim", type=int)
    g.add_argument("--max-seq-len", type=int, help="the model's context length")
    g.add_argument("--mixer", choices=["attention", "mla"])
    g.add_argument("--num-experts", type=int, help="routed experts (0 = dense)")
    g.add_argument("--experts-per-token", type=int, dest="num_experts_per_token")
    g.add_argument("--moe-dim", type=int)
    g.add_argument("--balance", choices=["aux_loss", "aux_free", "none"])


SHAPE_FIELDS = ("hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len",
                "mixer", "num_experts", "num_experts_per_token", "moe_dim", "balance")


def register(sub) -> None:
    for name, preset, help_ in (
        ("train-micro", "micro", "train the micro model (d256 x 6 layers; minutes on a CPU)"),
        ("train-small", "small", "train the small sparse-MoE model (wants a GPU)"),
        ("train-custom", None, "train a model of any shape (flags on top of --preset, default micro)"),
        ("train", None, "train a named --preset"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        if preset is None:
            add_shape_arguments(p) if name == "train-custom" else p.add_argument("--preset", required=True)
        add_train_arguments(p)
        p.set_defaults(func=run, fixed_preset=preset, custom=name == "train-custom")


def model_config_for(args, tokenizer) -> ModelConfig:
    preset = args.fixed_preset or args.preset
    overrides = {}
    if getattr(args, "custom", False):
        overrides = {f: getattr(args, f) for f in SHAPE_FIELDS if getattr(args, f, None) is not None}
        if args.num_heads is not None and args.num_kv_heads is None:
            overrides["num_kv_heads"] = args.num_heads  # a new head count: MHA unless told
        if "hidden_dim" in overrides and args.head_dim is None:
            overrides["head_dim"] = None  # follow hidden_dim / num_heads
    overrides.update(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                     eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    cfg = get_preset(preset, **overrides)
    return cfg


def run(args) -> int:
    from velocis.tokenizer import Tokenizer
    from velocis.train import TrainConfig, train
    from velocis.train.prepare import prepare_run_data

    preset = args.fixed_preset or args.preset
    get_preset(preset)  # an unknown preset fails here, before any work
    d = DEFAULTS.get(preset, DEFAULTS["custom"] if args.custom else DEFAULTS["micro"])
    output_dir = Path(args.output_dir or f"runs/{preset if not args.custom else 'custom'}")

    if args.data and (args.chinese_path or args.english_path):
        raise VelocisError("pass either --data DIR or --chinese-path/--english-path, not both")
    if args.data:
        data_dir = Path(args.data)
        if not (data_dir / "index.json").is_file():
            raise VelocisError(f"--data {data_dir}: not a prepared data directory (no index.json)")
    else:
        data_dir = prepare_run_data(output_dir, args.chinese_path, args.english_path,
                                    vocab_size=args.vocab_size or d["vocab_size"], tokenizer_dir=args.tokenizer)
    tokenizer = Tokenizer.load(data_dir)
    model_config = model_config_for(args, tokenizer)

    max_steps = args.max_steps
    if max_steps is None and args.time_budget is None:
        max_steps = d["max_steps"]
    seq_len = args.seq_len or min(d["seq_len"], model_config.max_seq_len)
    cfg = TrainConfig(
        output_dir=str(output_dir), data_dir=str(data_dir), max_steps=max_steps, time_budget=args.time_budget,
        batch_size=args.batch_size or d["batch_size"], grad_accum=args.grad_accum, seq_len=seq_len,
        lr=args.lr or d["lr"], min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, device=args.device, compile=args.compile,
        precision=args.precision,
        seed=args.seed, threads=args.threads, eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every, monitor=args.monitor,
        plot=not args.no_plot,
    )
    result = train(cfg, model_config, resume=args.resume, overwrite=args.overwrite)
    summary = f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed_s / 60:.1f} min"
    if result.val:
        summary += f"; val bpb {result.val[0][2]:.3f} -> {result.val[-1][2]:.3f}"
    print(summary)
    print(f"model: {output_dir}  (try: velocis generate --model {output_dir} --prompt 'Once upon a time')")
    return 0
