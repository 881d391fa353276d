"""`velocis sft`: supervised fine-tuning on chat conversations, the loss on the assistant's replies only.

    velocis sft --data chat.jsonl --model-dir runs/base --output-dir runs/sft
    velocis sft --data chat.jsonl --model-dir runs/base --output-dir runs/sft-lora --lora-rank 8
    velocis chat --model runs/sft

--data: one conversation per line, {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}
(align/chat_data.py). Conversations are rendered with the model's chat template, packed several to a
row with attention and positions reset at each one, and only assistant tokens are scored, the loss
normalised over the step's assistant tokens (align/sft.py). The output dir is a run dir (checkpoints,
metrics.jsonl) and a model dir with the chat template, so `velocis chat` / `generate` / `serve` load it;
with --lora-rank it holds the merged model plus the adapters (adapter_model.safetensors).
The run flags are TrainConfig's (as for `velocis train`), with fine-tuning defaults.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from velocis.align.lora import add_lora_arguments
from velocis.train.config import TrainConfig
from velocis.utils.cli_fields import add_dataclass_arguments

FULL_LR, LORA_LR = 1e-4, 1e-3


def register(sub) -> None:
    help_ = "fine-tune a model on chat conversations (loss on the assistant's replies)"
    p = sub.add_parser("sft", help=help_, description=help_)
    p.add_argument("--data", required=True, metavar="FILE", help="jsonl, one {\"messages\": [...]} per line")
    p.add_argument("--model-dir", required=True, metavar="DIR", help="the Velocis model (or run dir) to fine-tune")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="run directory; ends as the fine-tuned model")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the conversations held out for validation (default 0.05; 0 = none)")
    p.add_argument("--epochs", type=float, default=3.0,
                   help="passes over the data, unless --max-steps / --time-budget say otherwise (default 3)")
    add_lora_arguments(p)
    g = p.add_argument_group("run", "fine-tuning defaults in place of those below: --seq-len the model's context "
                             "up to 1024, --batch-size 8, --lr 1e-4 (1e-3 with LoRA), --warmup 3% of the steps, "
                             "--weight-decay 0, --max-steps from --epochs, --eval-every a fifth of the steps")
    add_dataclass_arguments(g, TrainConfig)
    g.add_argument("--resume", nargs="?", const="auto", metavar="DIR",
                   help="continue from the newest checkpoint of --output-dir (or of DIR)")
    g.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds a run")
    p.set_defaults(func=run)


def run(args) -> int:
    from velocis.align.lora import lora_settings
    from velocis.errors import VelocisError
    from velocis.model_io import is_velocis_dir
    from velocis.train.run_dir import check_run_dir, locked_run_dir
    from velocis.utils.output_dir import check_not_input

    lora_settings(args)  # the flags' numbers, before any slow work
    if args.epochs <= 0:
        raise VelocisError(f"--epochs must be positive, got {args.epochs}")
    model_dir, output_dir = Path(args.model_dir), Path(args.output_dir)
    if not is_velocis_dir(model_dir):
        raise VelocisError(f"--model-dir {model_dir}: not a Velocis model dir (config.json with architecture "
                           f"\"velocis\"); for a Hugging Face model run `velocis convert` first")
    check_not_input(output_dir, model_dir, "--model-dir", "--output-dir")
    check_run_dir(output_dir, args.overwrite, bool(args.resume))
    with locked_run_dir(output_dir):  # one writer: a second run or resume here is refused
        return _run(args, model_dir, output_dir)


def _run(args, model_dir: Path, output_dir: Path) -> int:
    from velocis.align.chat_data import ChatFormat, chat_train_data
    from velocis.align.lora import lora_settings, lora_trainer_hooks, save_adapters
    from velocis.align.sft import SFTObjective
    from velocis.config import ModelConfig
    from velocis.errors import VelocisError
    from velocis.train import Trainer, distributed
    from velocis.utils.cli_fields import dataclass_args

    model_config = ModelConfig.load(model_dir / "config.json")
    if model_config.quantization is not None:
        raise VelocisError(f"--model-dir {model_dir}: a quantized model cannot be fine-tuned; use the float model")
    lora = lora_settings(args)
    given = dataclass_args(args, TrainConfig)
    seq_len = given.get("seq_len") or min(model_config.max_seq_len, 1024)
    batch_size = given.get("batch_size") or 8
    seed = given.get("seed", TrainConfig.seed)
    fmt = ChatFormat.from_model_dir(model_dir)
    ranks = distributed.launcher_env()  # under torchrun: each rank reads its own share of the conversations
    data, report = chat_train_data(args.data, fmt, seq_len, batch_size, seed=seed, val_fraction=args.val_fraction,
                                   rank=ranks.rank, world_size=ranks.world_size)
    if ranks.is_main:
        print(report.summary())

    defaults = {"seq_len": seq_len, "batch_size": batch_size, "lr": LORA_LR if lora else FULL_LR,
                "weight_decay": 0.0}
    if given.get("max_steps") is None and given.get("time_budget") is None:
        per_epoch = math.ceil(len(data.train) / given.get("grad_accum", 1))
        defaults["max_steps"] = max(1, math.ceil(args.epochs * per_epoch))
    steps = given.get("max_steps") or defaults.get("max_steps")
    if steps:
        defaults["warmup_steps"] = max(1, round(0.03 * steps))
        defaults["eval_every"] = max(1, min(100, steps // 5))
    else:
        defaults["warmup_steps"] = 10
    cfg = TrainConfig(output_dir=str(output_dir), init_from=str(model_dir), **{**defaults, **given})
    if args.resume:
        _check_resume_matches(args.resume, output_dir, lora is not None)
    trainer = Trainer(cfg, model_config, objective=SFTObjective(), data=data, resume=args.resume,
                      overwrite=args.overwrite, **lora_trainer_hooks(args))
    result = trainer.run()
    if lora is not None:
        save_adapters(trainer.model, output_dir, base_model=str(model_dir))
    summary = f"done: {result.step} steps in {result.elapsed_s / 60:.1f} min"
    if result.first_loss is not None:
        summary += f"; train loss {result.first_loss:.3f} -> {result.last_loss:.3f}"
    if result.val:
        summary += f"; val loss (assistant tokens) {result.val[0][1]:.3f} -> {result.val[-1][1]:.3f}"
    print(summary + f"; the model is {output_dir}" + (" (merged; adapters beside it)" if lora else ""))
    if report.too_long:
        print(f"velocis sft: warning: {report.skipped()}", file=sys.stderr)
    return 0


def _check_resume_matches(resume: str, output_dir: Path, lora: bool) -> None:
    """A LoRA run resumes only with --lora-rank, a full one only without (else the weights do not fit)."""
    from safetensors import safe_open

    from velocis.errors import VelocisError
    from velocis.train.checkpoint import find_checkpoint

    ckpt = find_checkpoint(output_dir if resume == "auto" else resume)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        had = any(k.endswith(".lora_A") for k in f.keys())
    if had != lora:
        how = "with the same --lora-rank / --lora-targets" if had else "without --lora-rank"
        raise VelocisError(f"--resume {ckpt}: the run was trained {'with' if had else 'without'} LoRA adapters; "
                           f"resume it {how}")
