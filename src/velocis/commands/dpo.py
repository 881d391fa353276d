"""`velocis dpo | train-reward | eval-preference | preference-pairs`: learning from preference pairs.

    velocis preference-pairs --task arithmetic --n-train 600 --n-eval 200 --output-dir data/pairs
    velocis dpo --data data/pairs/train.jsonl --model-dir runs/sft --output-dir runs/dpo --beta 0.1
    velocis train-reward --data data/pairs/train.jsonl --model-dir runs/sft --output-dir runs/rm
    velocis eval-preference --model runs/dpo --data data/pairs/eval.jsonl --reference runs/sft

The data is a jsonl of {"prompt", "chosen", "rejected"} (strings or message lists; see
velocis/align/preference.py). The run flags are TrainConfig's (velocis/train/config.py) with
fine-tuning defaults; the output dir is a run dir whose root is a loadable model dir (with the
model's chat template), plus reward_head.safetensors for a reward model.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from velocis.errors import VelocisError
from velocis.train.config import TrainConfig
from velocis.utils.cli_fields import add_dataclass_arguments, dataclass_args

# Fine-tuning defaults under the flags the user gives (TrainConfig's are pretraining's).
DEFAULTS = {
    "dpo": dict(batch_size=8, lr=5e-6, weight_decay=0.0),
    "train-reward": dict(batch_size=8, lr=1e-5, weight_decay=0.0),
}
OWN_HELP = {  # TrainConfig fields whose default here differs: their flags say so
    "batch_size": "preference pairs per micro-batch (each is a chosen and a rejected row; default 8)",
    "seq_len": "longest prompt + response in tokens; longer pairs are skipped and counted (default: the "
               "model's context)",
    "lr": "peak learning rate (default: dpo 5e-6, train-reward 1e-5)",
    "max_steps": "optimizer steps (default one pass over the training pairs, unless --time-budget)",
    "warmup_steps": "warmup steps (default a tenth of the run, at most 50)",
    "weight_decay": "AdamW weight decay (default 0: decay pulls a fine-tuned model towards zero, not its start)",
}


def _add_common(p) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--data", required=True, metavar="FILE", help="preference jsonl: prompt, chosen, rejected")
    g.add_argument("--model-dir", required=True, metavar="DIR", help="the Velocis model to start from "
                   "(and, for dpo, the frozen reference)")
    g.add_argument("--output-dir", required=True, metavar="DIR", help="run directory (its root: the trained model)")
    g.add_argument("--val-data", metavar="FILE", help="held-out pairs (default: --val-fraction of --data)")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of --data held out by prompt for validation (default 0.05; 0 = none)")
    g = p.add_argument_group("run")
    add_dataclass_arguments(g, TrainConfig, skip=set(OWN_HELP))
    g.add_argument("--batch-size", dest="batch_size", type=int, help=OWN_HELP["batch_size"])
    g.add_argument("--seq-len", dest="seq_len", type=int, help=OWN_HELP["seq_len"])
    g.add_argument("--lr", dest="lr", type=float, help=OWN_HELP["lr"])
    g.add_argument("--max-steps", dest="max_steps", type=int, help=OWN_HELP["max_steps"])
    g.add_argument("--warmup", dest="warmup_steps", type=int, help=OWN_HELP["warmup_steps"])
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help=OWN_HELP["weight_decay"])
    g.add_argument("--resume", nargs="?", const="auto", metavar="DIR",
                   help="continue from the newest checkpoint of --output-dir (or of DIR)")
    g.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds a run")
    from velocis.align.lora import add_lora_arguments

    add_lora_arguments(p)


def register(sub) -> None:
    p = sub.add_parser("dpo", help="direct preference optimisation (DPO / IPO) against the frozen starting model",
                       description="DPO / IPO on prompt/chosen/rejected pairs; the reference is the starting model.")
    _add_common(p)
    g = p.add_argument_group("preference loss")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference "
                   "(ipo: its tau; default 0.1)")
    g.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "robust"],
                   help="sigmoid (DPO), ipo, or robust (rDPO, TRL's label-smoothed DPO); default sigmoid")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed share of flipped labels: sigmoid uses conservative DPO, robust rDPO (default 0)")
    g.add_argument("--precompute-ref", action="store_true",
                   help="score every pair with the reference once before training (cached in the output dir) "
                        "instead of keeping a frozen copy of the model in memory")
    p.set_defaults(func=run, kind="dpo")

    p = sub.add_parser("train-reward", help="train a Bradley-Terry reward model (the model + a scalar head)",
                       description="Reward model on prompt/chosen/rejected pairs: the trunk plus a scalar head "
                                   "on the last token, loss -log sigmoid(r_chosen - r_rejected).")
    _add_common(p)
    p.set_defaults(func=run, kind="train-reward")

    p = sub.add_parser("eval-preference", help="how often a model ranks chosen over rejected on held-out pairs",
                       description="Preference accuracy of a model on a pairs jsonl: by its log-probs (a policy), "
                                   "by its DPO implicit reward (with --reference), or by its score (a reward model).")
    p.add_argument("--model", required=True, metavar="DIR", help="a model dir, or a reward model dir")
    p.add_argument("--data", required=True, metavar="FILE", help="preference jsonl")
    p.add_argument("--reference", metavar="DIR", help="the DPO reference (the starting model): also report the "
                   "implicit-reward accuracy")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("preference-pairs", help="write preference pairs of a built-in task (correct vs wrong answer)",
                       description="train.jsonl and eval.jsonl of prompt/chosen/rejected pairs from the arithmetic "
                                   "task: chosen its worked answer, rejected the same working with a wrong result; "
                                   "no held-out problem is in train.")
    p.add_argument("--task", default="arithmetic", choices=["arithmetic"])
    p.add_argument("--output-dir", required=True, metavar="DIR")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=int, default=1)
    p.add_argument("--lang", default="en", choices=["en", "zh", "mix"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_pairs)


# --- training ------------------------------------------------------------------------------------
def _model_dir(path: str, flag: str = "--model-dir") -> Path:
    from velocis.model_io import is_velocis_dir
    from velocis.utils.output_dir import config_kind

    d = Path(path)
    if not (d / "config.json").is_file():
        raise VelocisError(f"{flag} {d}: not a model directory (no config.json)")
    if not is_velocis_dir(d):
        kind = config_kind(d)
        hint = "convert it first with `velocis convert`" if kind == "hf" else "give a Velocis model directory"
        raise VelocisError(f"{flag} {d}: not a Velocis model ({hint})")
    if not (d / "model.safetensors").is_file():
        raise VelocisError(f"{flag} {d}: no model.safetensors; was the save interrupted?")
    return d


def _train_config(args, kind: str, output_dir: Path, model_dir: Path, model_config, train_pairs: int,
                  val_pairs: int) -> TrainConfig:
    given = dataclass_args(args, TrainConfig)
    kw = {**DEFAULTS[kind], "seq_len": model_config.max_seq_len, **given}
    steps = kw.get("max_steps")
    if steps is None and kw.get("time_budget") is None:
        steps = kw["max_steps"] = max(1, math.ceil(train_pairs / (kw["batch_size"] * kw.get("grad_accum", 1))))
    if "warmup_steps" not in kw:
        kw["warmup_steps"] = min(50, (steps or 100) // 10)
    if "eval_batches" not in kw and val_pairs:  # the whole held-out set: its accuracy is the number to read
        kw["eval_batches"] = math.ceil(val_pairs / kw["batch_size"])
    return TrainConfig(output_dir=str(output_dir), init_from=str(model_dir), **kw)


def run(args) -> int:
    from velocis.align import preference as pref
    from velocis.align.lora import lora_settings, lora_trainer_hooks, save_adapters
    from velocis.config import ModelConfig
    from velocis.model_io import load_tokenizer
    from velocis.train import distributed
    from velocis.train.data_source import TrainData
    from velocis.train.run_dir import check_run_dir, locked_run_dir
    from velocis.utils.output_dir import check_not_input

    kind = args.kind
    lora = lora_settings(args)  # bad LoRA flags fail before any work
    model_dir = _model_dir(args.model_dir)
    output_dir = Path(args.output_dir)
    check_not_input(output_dir, model_dir, "--model-dir", "--output-dir")
    check_run_dir(output_dir, args.overwrite, bool(args.resume))
    model_config = ModelConfig.load(model_dir / "config.json")
    if model_config.quantization is not None:
        raise VelocisError(f"--model-dir {model_dir}: a quantized model cannot be trained; start from the float model")
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise VelocisError(f"--model-dir {model_dir}: no tokenizer (tokenizer.json); the pairs are text")
    if kind == "dpo":
        pref.check_loss_options(args.beta, args.label_smoothing, args.loss)
    seq_len = args.seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        raise VelocisError(f"--seq-len {seq_len} is longer than the model's context ({model_config.max_seq_len} "
                           f"tokens); use {model_config.max_seq_len} or less")
    encoder = pref.PairEncoder.for_model_dir(model_dir, tokenizer, model_config)
    data = pref.load_preference_data(args.data, encoder, seq_len, args.val_fraction,
                                     args.seed if args.seed is not None else TrainConfig.seed, args.val_data)
    ranks = distributed.launcher_env()  # under torchrun: each rank reads its own share of the pairs
    if data.skip_summary() and ranks.is_main:
        print(f"velocis {kind}: warning: {data.skip_summary()}", file=sys.stderr)
    cfg = _train_config(args, kind, output_dir, model_dir, model_config, len(data.train),
                        len(data.val) if data.val else 0)
    pad = pref.pad_id_for(tokenizer)
    train_loader = pref.PreferenceLoader(data.train, cfg.batch_size, pad, cfg.seed, train=True,
                                         rank=ranks.rank, world_size=ranks.world_size)
    val_loader = (pref.PreferenceLoader(data.val, cfg.batch_size, pad, cfg.seed, train=False, rank=ranks.rank,
                                        world_size=ranks.world_size) if data.val else None)
    if kind == "dpo":
        objective = pref.DPOObjective(args.beta, args.loss, args.label_smoothing,
                                      precompute=[data.train, data.val] if args.precompute_ref else None,
                                      cache_file=output_dir / pref.REF_CACHE, batch_size=cfg.batch_size, pad_id=pad)
    else:
        objective = pref.RewardObjective(seed=cfg.seed)
    with locked_run_dir(output_dir):  # one writer: a second run or resume here is refused
        trainer = pref.PreferenceTrainer(cfg, model_config, objective=objective,
                                         data=TrainData(tokenizer, train_loader, val_loader, None, str(args.data)),
                                         resume=args.resume, overwrite=args.overwrite, **lora_trainer_hooks(args))
        result = trainer.run()
        if lora is not None and ranks.is_main:  # the root holds the merged model; the adapters too, as sft and rl
            save_adapters(trainer.model, output_dir, base_model=str(model_dir))
    if not ranks.is_main:
        return 0
    summary = f"done: {result.step} steps, {len(data.train)} training pairs in {result.elapsed_s / 60:.1f} min"
    history = getattr(trainer, "eval_history", [])
    if history:
        key = "logps/accuracy" if kind == "dpo" else "accuracy"
        summary += (f"; held-out preference accuracy {history[0][key]:.3f} -> {history[-1][key]:.3f} "
                    f"({history[-1]['pairs']} pairs)")
        if kind == "dpo":
            summary += f", implicit-reward accuracy {history[-1]['rewards/accuracies']:.3f}"
    print(summary)
    print(f"model: {output_dir}" + (" (merged; adapters beside it)" if lora else "")
          + (" (reward model: velocis.align.preference.load_reward_model)" if kind == "train-reward" else ""))
    if data.skip_summary():
        print(f"velocis {kind}: {data.skip_summary()}", file=sys.stderr)
    return 0


# --- evaluation and data ---------------------------------------------------------------------------
def run_eval(args) -> int:
    from velocis.align import preference as pref
    from velocis.model_io import load_model_dir

    model_dir = _model_dir(args.model, "--model")
    reward = (model_dir / pref.HEAD_WEIGHTS).is_file()
    if reward:
        rm = pref.load_reward_model(model_dir, device=args.device)
        model, tokenizer, encoder = rm.model, rm.tokenizer, rm.encoder
    else:
        model, tokenizer = load_model_dir(model_dir, device=args.device)
        if tokenizer is None:
            raise VelocisError(f"--model {model_dir}: no tokenizer (tokenizer.json); the pairs are text")
        encoder = pref.PairEncoder.for_model_dir(model_dir, tokenizer, model.config)
    records = pref.read_preference_jsonl(args.data)
    pairs, skipped = pref.encode_pairs(records, encoder, model.config.max_seq_len, str(args.data))
    if skipped.count():
        print(f"velocis eval-preference: warning: {skipped.summary(len(records), str(args.data))}", file=sys.stderr)
    if not pairs:
        raise VelocisError(f"--data {args.data}: no pair to evaluate. {skipped.summary(len(records), str(args.data))}")
    data = pref.PreferenceSet(pairs, "eval")
    pad = pref.pad_id_for(tokenizer)
    if reward:
        rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        scores = rm.score_ids(rows)
        rc, rr = scores[:len(pairs)], scores[len(pairs):]
        out = {"pairs": len(pairs), "accuracy": sum(c > r for c, r in zip(rc, rr)) / len(pairs),
               "margin": sum(c - r for c, r in zip(rc, rr)) / len(pairs)}
    else:
        reference = None
        if args.reference:
            reference, _ = load_model_dir(_model_dir(args.reference, "--reference"), device=args.device)
        out = pref.preference_accuracy(model, data, args.batch_size, pad, reference)
    if args.json:
        print(json.dumps(out))
    else:
        what = "reward model score" if reward else "log-prob"
        print(f"{model_dir}: {out['pairs']} pairs, preference accuracy ({what}) {out['accuracy']:.3f}"
              + (f", implicit-reward accuracy {out['reward_accuracy']:.3f}" if "reward_accuracy" in out else ""))
    return 0


def run_pairs(args) -> int:
    from velocis.align.preference import arithmetic_pairs
    from velocis.utils.atomic import atomic_files
    from velocis.utils.output_dir import check_output_dir

    names = ("train.jsonl", "eval.jsonl")
    previous = check_output_dir(args.output_dir, names, "preference pairs", args.overwrite, flag="--output-dir")
    train, held_out = arithmetic_pairs(args.n_train, args.n_eval, args.seed, args.difficulty, args.lang)
    with atomic_files(args.output_dir, replace=previous) as tmp:
        for name, records in zip(names, (train, held_out)):
            (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                    encoding="utf-8")
    print(f"wrote {len(train)} training and {len(held_out)} held-out pairs to {args.output_dir}")
    return 0
