"""`velocis train-micro | train-small | train-custom | train | train-cluster`: pretrain a model.

    velocis train-micro --chinese-path zh/ --english-path en/ --output-dir runs/micro
    velocis train-custom --data runs/micro/data --hidden-dim 64 --num-layers 2 --num-heads 2 \
        --num-kv-heads 1 --mlp-dim 128 --batch-size 8 --max-steps 200 --output-dir runs/tiny
    velocis train --preset micro --data DIR --time-budget 10 --output-dir runs/x
    torchrun --nproc-per-node 8 -m velocis -- train-cluster --preset small --data DIR --parallel fsdp \
        --expert-parallel 8 --world-size 8 --output-dir runs/small

Every train command runs under torchrun (train/distributed.py); train-cluster is the one meant for
it: --preset is required, shape flags apply on top, and it refuses to start without a launcher.

The run flags are generated from TrainConfig's fields (velocis/train/config.py), the shape flags'
choices from the part registries.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from velocis.config import ModelConfig, get_preset
from velocis.errors import VelocisError
from velocis.models.registry import MIXERS
from velocis.train.config import TrainConfig, recipe_for
from velocis.utils.cli_fields import add_dataclass_arguments, dataclass_args

# Per-preset defaults of the data side for what the user does not say (the training recipe: train/config.py)
VOCAB_SIZES = {"micro": 8192, "small": 32000, "custom": 8192}


def _defaults_key(args, preset: str) -> str:
    """Whose defaults a run takes: its preset's, else custom's (train-custom) or micro's."""
    return preset if preset in VOCAB_SIZES else ("custom" if args.custom else "micro")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--chinese-path", nargs="+", metavar="PATH", help="Chinese text files or directories")
    g.add_argument("--english-path", nargs="+", metavar="PATH", help="English text files or directories")
    g.add_argument("--data", metavar="DIR", help="a prepared data dir (velocis data prepare) instead of raw text")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer to use with raw text (default: train one)")
    g.add_argument("--vocab-size", type=int, help="size of the tokenizer to train (default fits the preset)")
    g.add_argument("--on-invalid-utf8", choices=["error", "replace"], default="error",
                   help="raw text: stop at invalid UTF-8 (default) or replace it with U+FFFD")
    g.add_argument("--encoding", default="utf-8", metavar="NAME",
                   help="raw text: encoding of the .txt/.jsonl input, e.g. gb18030 (default utf-8)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="run directory (default runs/<preset>)")
    add_dataclass_arguments(g, TrainConfig, shown_defaults={k: "fits the preset" for k in (
        "batch_size", "seq_len", "lr", "optimizer", "schedule")})
    g.add_argument("--resume", nargs="?", const="auto", metavar="DIR",
                   help="continue from the newest checkpoint of --output-dir (or of DIR)")
    g.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds a run")
    g.add_argument("--lr-find", action="store_true",
                   help="instead of training: a learning-rate range test (rates 1e-5 -> 1 over --lr-find-steps "
                        "steps) on this model, data and optimizer; prints the loss curve and a suggested --lr")
    g.add_argument("--lr-find-steps", type=int, default=100, metavar="N")


def add_shape_arguments(p: argparse.ArgumentParser, preset_required: bool = False) -> None:
    g = p.add_argument_group("model shape (on top of --preset)")
    if preset_required:
        g.add_argument("--preset", required=True, help="the preset to start from")
    else:
        g.add_argument("--preset", default="micro", help="the preset to start from (default micro)")
    g.add_argument("--hidden-dim", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--num-kv-heads", type=int)
    g.add_argument("--head-dim", type=int)
    g.add_argument("--mlp-dim", type=int)
    g.add_argument("--max-seq-len", type=int, help="the model's context length")
    g.add_argument("--mixer", choices=sorted(MIXERS))
    g.add_argument("--num-experts", type=int, help="routed experts (0 = dense)")
    g.add_argument("--experts-per-token", type=int, dest="num_experts_per_token")
    g.add_argument("--moe-dim", type=int)
    g.add_argument("--balance", choices=["aux_loss", "aux_free", "none"])
    g.add_argument("--feed-forward", dest="dense_feed_forward", choices=["mlp", "relu2"],
                   help="dense layers: SwiGLU (mlp) or ReLU² (relu2: two matrices, so 1.5x --mlp-dim for equal size)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="RMSNorm on each head's queries and keys")
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the output head with the token embedding")
    g.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=None,
                   help="start the residual branches' output projections at zero")


SHAPE_FIELDS = ("hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len",
                "mixer", "num_experts", "num_experts_per_token", "moe_dim", "balance", "dense_feed_forward",
                "qk_norm", "tie_embeddings", "zero_init_residual")


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
    p = sub.add_parser("train-cluster", help="train on several processes or machines (run under torchrun)",
                       description=CLUSTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p, preset_required=True)
    add_train_arguments(p)
    p.set_defaults(func=run, fixed_preset=None, custom=True, cluster=True)


CLUSTER_HELP = """train a --preset (shape flags on top) on the processes torchrun starts; --world-size checks
their number. One machine:
  torchrun --nproc-per-node 8 -m velocis -- train-cluster --preset small --data DIR --parallel fsdp
Two machines (run on each; the same --rdzv-endpoint, a host of the first one):
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN \\
      -m velocis -- train-cluster --preset small --data DIR --world-size 16 --output-dir /shared/runs/small
The run directory must be on a file system every machine sees (each rank writes its checkpoint shards).
The `--` after `-m velocis` keeps torchrun's own parser off Velocis' flags (without it, torchrun takes
--monitor for an ambiguous abbreviation of its --monitor-interval and stops)."""


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
                     eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                     prompt_start_token_id=tokenizer.eos_id)
    return get_preset(preset, **overrides)


def train_config_for(args, output_dir: Path, data_dir: Path, model_config: ModelConfig) -> TrainConfig:
    """The preset's defaults under the flags the user gave."""
    preset = args.fixed_preset or args.preset
    d = recipe_for(_defaults_key(args, preset), getattr(args, "parallel", None) or "ddp")
    given = dataclass_args(args, TrainConfig)
    kwargs = {k: d[k] for k in ("batch_size", "lr", "optimizer", "schedule")}
    kwargs["seq_len"] = min(d["seq_len"], model_config.max_seq_len)
    if given.get("max_steps") is None and given.get("time_budget") is None:
        kwargs["max_steps"] = d["max_steps"]
    return TrainConfig(output_dir=str(output_dir), data_dir=str(data_dir), **{**kwargs, **given})


def run(args) -> int:
    from velocis.train import distributed
    from velocis.train.run_dir import check_run_dir, locked_run_dir

    preset = args.fixed_preset or args.preset
    get_preset(preset)  # an unknown preset fails here, before any work
    if getattr(args, "cluster", False) and "WORLD_SIZE" not in os.environ:
        raise VelocisError("train-cluster runs under a launcher: start it with `torchrun --nproc-per-node N -m "
                           "velocis -- train-cluster ...` (one machine) or torchrun --nnodes on each machine; for one "
                           "process use `velocis train`")
    named = preset if getattr(args, "cluster", False) or not args.custom else "custom"
    output_dir = Path(args.output_dir or f"runs/{named}")
    check_run_dir(output_dir, args.overwrite, bool(args.resume))  # before any data is prepared into it
    # under torchrun: join the other processes (checking --world-size) before any of them writes
    distributed.setup(args.world_size, args.device or TrainConfig.device, args.dist_timeout or TrainConfig.dist_timeout)
    with locked_run_dir(output_dir):  # one writer (rank 0): a second training or resume here is refused
        return _run(args, preset, output_dir)  # velocis.cli.main leaves the process group


def _run(args, preset: str, output_dir: Path) -> int:
    from velocis.tokenizer import Tokenizer
    from velocis.train import distributed, train
    from velocis.train.prepare import prepare_run_data

    vocab_size = VOCAB_SIZES[_defaults_key(args, preset)]
    if args.data and (args.chinese_path or args.english_path):
        raise VelocisError("pass either --data DIR or --chinese-path/--english-path, not both")
    if args.data:
        data_dir = Path(args.data)
        if not (data_dir / "index.json").is_file():
            raise VelocisError(f"--data {data_dir}: not a prepared data directory (no index.json)")
    else:
        with warnings.catch_warnings(record=True) as caught:  # e.g. "the text only supports N tokens"
            warnings.simplefilter("always", UserWarning)
            # several processes: rank 0 prepares, the others then find it prepared
            data_dir = distributed.main_first(lambda: prepare_run_data(
                output_dir, args.chinese_path, args.english_path, vocab_size=args.vocab_size or vocab_size,
                tokenizer_dir=args.tokenizer, on_invalid_utf8=args.on_invalid_utf8, encoding=args.encoding,
                progress=distributed.is_main()))
        for w in caught if distributed.is_main() else ():
            print(f"velocis {args.command}: warning: {w.message}", file=sys.stderr)
    tokenizer = Tokenizer.load(data_dir)
    model_config = model_config_for(args, tokenizer)
    cfg = train_config_for(args, output_dir, data_dir, model_config)
    if args.lr_find:
        return _lr_find(args, cfg, model_config)
    result = train(cfg, model_config, resume=args.resume, overwrite=args.overwrite)
    if not distributed.is_main():
        return 0
    summary = f"done: {result.step} steps, {result.tokens:,} tokens in {result.elapsed_s / 60:.1f} min"
    if result.val:
        summary += f"; val bpb {result.val[0][2]:.3f} -> {result.val[-1][2]:.3f}"
    print(summary)
    print(f"model: {output_dir}  (try: velocis generate --model {output_dir} --prompt 'Once upon a time')")
    return 0


def _lr_find(args, cfg: TrainConfig, model_config: ModelConfig) -> int:
    """The range test in a scratch run dir: the real --output-dir is left as it was."""
    import dataclasses
    import tempfile

    from velocis.train import Trainer, distributed
    from velocis.train.lr_find import find_lr

    with tempfile.TemporaryDirectory(prefix="velocis-lr-find-") as scratch:
        cfg = dataclasses.replace(cfg, output_dir=scratch, monitor="none", plot=False,
                                  max_steps=max(args.lr_find_steps, 2), time_budget=None)
        trainer = Trainer(cfg, model_config)
        try:
            result = find_lr(trainer, steps=args.lr_find_steps)
        finally:
            trainer.close()
    if distributed.is_main():
        print(result.table())
        if result.suggestion is None:
            raise VelocisError("the range test diverged at its first step; check the data and the model shape")
        print(f"suggested --lr {result.suggestion:.2e}  (the lowest loss was at {result.suggestion * 10:.2e}; "
              f"a tenth of it keeps a margin){' - stopped early: the loss blew up' if result.stopped_early else ''}")
    return 0
