"""`velocis train-grpo | ppo | eval-task | task write`: RL with verifiable rewards, and its tasks.

    velocis task write --task arithmetic --output-dir data/arith            # train/eval/sft jsonl
    velocis train-grpo --data data/arith/train.jsonl --model-dir runs/sft --output-dir runs/grpo \\
        --verifier exact_numeric,format --num-generations 8 --beta 0.04 --max-steps 200
    velocis ppo --task arithmetic --model-dir runs/sft --output-dir runs/ppo
    velocis eval-task --model runs/grpo --task arithmetic --n 200            # held-out accuracy (greedy)

--data is a `prompt`/`answer` jsonl; next to a `velocis task write` output its eval.jsonl is the
held-out set and task.json names the verifier. --task NAME generates the splits instead. The run
flags (--max-steps, --lr, --batch-size = completions per micro-batch, ...) are the Trainer's; the
output dir is a loadable model dir (the chat template kept) with metrics.jsonl and checkpoints.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from velocis.errors import VelocisError
from velocis.train.config import TrainConfig
from velocis.utils.cli_fields import add_dataclass_arguments, dataclass_args

# What an RL run does unless told otherwise: a constant, small learning rate, frequent logs.
RL_DEFAULTS = dict(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, max_steps=200, batch_size=64,
                   eval_every=25, save_every=50, log_every=1)


def _task_arguments(g, seed_flag: str) -> None:
    from velocis.align.tasks import LANGS, TASKS

    g.add_argument("--task", choices=sorted(TASKS), help="a built-in task with verifiable answers")
    g.add_argument("--difficulty", type=int, default=None, help="task difficulty, 1 (easiest) .. 5 (default 1)")
    g.add_argument("--lang", choices=LANGS, default=None, help="prompt language: en, zh or mix (default mix)")
    g.add_argument(seed_flag, type=int, default=0, dest="task_seed", help="seed of the task's splits (default 0)")


def _reward_arguments(g) -> None:
    g.add_argument("--verifier", default=None, metavar="NAMES",
                   help="comma-separated verifiers whose scores are summed: exact_numeric, format, countdown, or "
                        "module:function / file.py:function (default: the task's verifier, else exact_numeric)")
    g.add_argument("--reward-weights", default=None, metavar="W,...", help="one weight per verifier (default 1 each)")
    g.add_argument("--accuracy-verifier", default=None, metavar="NAME",
                   help="what held-out accuracy counts (default: the task's verifier, else the first --verifier)")
    g.add_argument("--reward-model", default=None, metavar="DIR",
                   help="score with a reward model (velocis train-reward) instead of verifiers")


def _rl_parser(sub, name: str, help_: str, config_cls, func) -> None:
    p = sub.add_parser(name, help=help_, description=help_)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE", help="prompt/answer jsonl (e.g. from `velocis task write`)")
    g.add_argument("--eval-data", metavar="FILE", help="held-out prompt/answer jsonl (default: eval.jsonl next to "
                                                         "--data, or the task's held-out split)")
    _task_arguments(g, "--task-seed")
    g.add_argument("--n-train", type=int, default=5000, help="--task: training prompts generated (default 5000)")
    g.add_argument("--n-eval", type=int, default=200, help="--task: held-out prompts generated (default 200)")
    g = p.add_argument_group("model")
    g.add_argument("--model-dir", required=True, metavar="DIR", help="the model to start from (and the KL reference)")
    g.add_argument("--output-dir", required=True, metavar="DIR", help="run directory (a loadable model dir at the end)")
    g = p.add_argument_group("reward")
    _reward_arguments(g)
    g = p.add_argument_group(f"{name} options")
    add_dataclass_arguments(g, config_cls)
    g = p.add_argument_group("run (the Trainer's flags; --batch-size counts completions per micro-batch)")
    add_dataclass_arguments(g, TrainConfig, skip={"seq_len"})
    g.add_argument("--resume", nargs="?", const="auto", metavar="DIR", help="continue from the newest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds a run")
    _maybe_lora_arguments(p)
    p.set_defaults(func=func, config_cls=config_cls)


def _maybe_lora_arguments(p) -> None:
    from velocis.align.lora import add_lora_arguments

    add_lora_arguments(p)


def register(sub) -> None:
    from velocis.align.rl import GRPOConfig, PPOConfig

    _rl_parser(sub, "train-grpo", "GRPO from a model dir, rewarded by verifiers (or a reward model)", GRPOConfig,
               run_rl)
    _rl_parser(sub, "ppo", "PPO (value head, GAE, adaptive KL) from a model dir", PPOConfig, run_rl)

    p = sub.add_parser("eval-task", help="held-out accuracy of a model on a task (greedy)",
                       description="held-out accuracy of a model on a task: greedy completions scored by the verifier")
    p.add_argument("--model", required=True, metavar="DIR")
    g = p.add_argument_group("data")
    _task_arguments(g, "--seed")
    g.add_argument("--data", metavar="FILE", help="a prompt/answer jsonl instead of --task")
    g.add_argument("--split", choices=["eval", "train"], default="eval", help="--task: which split (default eval)")
    g.add_argument("--n", type=int, default=200, help="prompts scored (default 200)")
    g.add_argument("--n-eval", type=int, default=200,
                   help="--task --split train: the held-out size the split was made with (default 200)")
    p.add_argument("--verifier", default=None, metavar="NAME", help="default: the task's verifier, else exact_numeric")
    p.add_argument("--max-completion-length", type=int, default=64, help="most tokens per answer (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch (default 64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--show", type=int, default=3, metavar="N", help="print N examples (default 3)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=run_eval_task)

    p = sub.add_parser("task", help="built-in tasks with verifiable answers",
                       description="built-in tasks with verifiable answers (arithmetic, countdown)")
    tsub = p.add_subparsers(dest="task_command", metavar="ACTION")
    tsub.required = True
    w = tsub.add_parser("write", help="write a task's train/eval prompt+answer jsonl, SFT messages and pretraining text")
    _task_arguments(w, "--seed")
    w.add_argument("--output-dir", required=True, metavar="DIR")
    w.add_argument("--n-train", type=int, default=5000)
    w.add_argument("--n-eval", type=int, default=200)
    w.add_argument("--overwrite", action="store_true", help="replace a previous task's files in --output-dir")
    w.set_defaults(func=run_task_write)


# --- task write -----------------------------------------------------------------------------------
def run_task_write(args) -> int:
    from velocis.align.tasks import write_task

    if not args.task:
        raise VelocisError("give --task (arithmetic or countdown)")
    out = write_task(args.task, args.output_dir, n_train=args.n_train, n_eval=args.n_eval, seed=args.task_seed,
                     overwrite=args.overwrite, difficulty=args.difficulty, lang=args.lang)
    print(f"wrote {args.task} to {out}: train.jsonl ({args.n_train}), eval.jsonl ({args.n_eval}), sft.jsonl, "
          f"sft_eval.jsonl, pretrain_en.txt, pretrain_zh.txt, task.json")
    return 0


# --- data -------------------------------------------------------------------------------------------
def _task_meta(data: Path) -> dict:
    f = data.parent / "task.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except ValueError:
        return {}


def _load_data(args) -> tuple[list[dict], list[dict], str | None, str]:
    """(training examples, held-out examples, the task's verifier or None, a name for errors)."""
    from velocis.align.tasks import generate, make_task, read_examples

    if args.data and args.task:
        raise VelocisError("give either --data FILE or --task NAME, not both")
    if args.task:
        task = make_task(args.task, difficulty=args.difficulty, lang=args.lang)
        train, held_out = generate(task, args.n_train, args.n_eval, args.task_seed)
        if args.eval_data:
            return [p.record() for p in train], read_examples(args.eval_data, "--eval-data"), task.verifier, args.task
        return [p.record() for p in train], [p.record() for p in held_out], task.verifier, args.task
    if not args.data:
        raise VelocisError("give --data FILE (prompt/answer jsonl) or --task NAME")
    data = Path(args.data)
    train = read_examples(data, "--data")
    meta = _task_meta(data)
    eval_file = Path(args.eval_data) if args.eval_data else data.parent / "eval.jsonl"
    held_out = read_examples(eval_file, "--eval-data") if (args.eval_data or (meta and eval_file.is_file()
                                                                               and eval_file != data)) else []
    return train, held_out, meta.get("verifier"), str(data)


def _rewards(args, default_verifier: str | None):
    from velocis.align.verifiers import Rewards, parse_verifiers

    if args.reward_model:
        return _reward_model_scorer(args.reward_model, args)
    names = parse_verifiers(args.verifier or default_verifier or "exact_numeric")
    weights = None
    if args.reward_weights:
        try:
            weights = [float(w) for w in args.reward_weights.split(",")]
        except ValueError:
            raise VelocisError(f"--reward-weights {args.reward_weights!r}: give numbers separated by commas") from None
    return Rewards(names, weights)


def _reward_model_scorer(path: str, args):
    try:
        from velocis.align import preference
    except ImportError:
        raise VelocisError("--reward-model needs velocis.align.preference (velocis train-reward), which this "
                           "installation lacks; use --verifier") from None
    loader = getattr(preference, "load_reward_model", None)
    if loader is None:
        raise VelocisError("--reward-model: velocis.align.preference has no load_reward_model; use --verifier")
    from velocis.align.rl import RewardModelScorer
    from velocis.utils.device import resolve_device

    return RewardModelScorer(loader(path, device=resolve_device(args.device or "auto")), path)


# --- train-grpo / ppo --------------------------------------------------------------------------------
def run_rl(args) -> int:
    from velocis.config import ModelConfig
    from velocis.model_io import is_velocis_dir
    from velocis.serve.chat_template import find_chat_template
    from velocis.tokenizer import Tokenizer
    from velocis.train.data_source import TrainData
    from velocis.train import distributed
    from velocis.train.run_dir import check_run_dir, locked_run_dir
    from velocis.utils.output_dir import check_not_input

    from velocis.align import rl

    from velocis.align.lora import lora_settings, lora_trainer_hooks, save_adapters

    t0 = time.perf_counter()
    lora = lora_settings(args)  # the flags' numbers, before any slow work
    rl_cfg = args.config_cls(**dataclass_args(args, args.config_cls))
    model_dir, out = Path(args.model_dir), Path(args.output_dir)
    if not is_velocis_dir(model_dir):
        raise VelocisError(f"--model-dir {model_dir}: not a Velocis model directory (config.json with "
                           f"\"architecture\": \"velocis\"); convert a Hugging Face model with `velocis convert`")
    check_not_input(out, model_dir, "--model-dir", "--output-dir")
    check_run_dir(out, args.overwrite, bool(args.resume))
    model_config = ModelConfig.load(model_dir / "config.json")
    if model_config.quantization is not None:
        raise VelocisError(f"--model-dir {model_dir} is quantized; RL trains float weights: start from the "
                           f"unquantized model")
    tokenizer = Tokenizer.load(model_dir)
    template = find_chat_template(model_dir, tokenizer)
    train, held_out, task_verifier, where = _load_data(args)
    rewards = _rewards(args, task_verifier)
    accuracy = args.accuracy_verifier or task_verifier or (
        rewards.names[0] if not isinstance(rewards, rl.RewardModelScorer) else "exact_numeric")

    given = dataclass_args(args, TrainConfig)
    G = rl_cfg.num_generations
    batch_size = given.get("batch_size", RL_DEFAULTS["batch_size"])
    grad_accum = given.get("grad_accum", 1)
    if (batch_size * grad_accum) % G:
        raise VelocisError(f"--batch-size {batch_size} x --grad-accum {grad_accum} completions per step must be a "
                           f"multiple of --num-generations {G} (whole groups of one prompt)")
    start = model_config.prompt_start_token_id
    if start is None:
        start = tokenizer.eos_id
    encoder = rl.PromptEncoder(tokenizer, template, start)
    context = model_config.max_seq_len
    prompt_ids = rl.encode_examples(train, encoder, context, rl_cfg.max_completion_length, where)
    eval_ids = rl.encode_examples(held_out, encoder, context, rl_cfg.max_completion_length, "held-out data")
    seq_len = max(len(p) for p in prompt_ids + eval_ids) + rl_cfg.max_completion_length
    kwargs = {**RL_DEFAULTS, **given}
    cfg = TrainConfig(output_dir=str(out), init_from=str(model_dir), seq_len=min(seq_len, context), **kwargs)
    if cfg.max_steps is not None and "max_steps" not in given and cfg.time_budget is not None:
        cfg.max_steps = None  # a time budget alone decides
    ranks = distributed.launcher_env()  # under torchrun: each rank samples its share of every rollout
    if ranks.active and (cfg.parallel == "fsdp" or cfg.expert_parallel > 1):
        raise VelocisError("train-grpo / train-ppo on several processes run data parallel (--parallel ddp): "
                           "rollouts generate a different number of tokens on each rank, which sharded "
                           "parameters (--parallel fsdp, --expert-parallel) cannot follow")
    cls = rl.GRPOObjective if args.config_cls is rl.GRPOConfig else rl.PPOObjective
    objective = cls(rl_cfg, rewards, encoder, reference_dir=model_dir, accuracy_verifier=accuracy,
                    precision=cfg.precision, grad_accum=cfg.grad_accum, seed=cfg.seed, rank=ranks.rank,
                    world_size=ranks.world_size)
    loader = rl.RolloutLoader(objective, train, prompt_ids, cfg.batch_size * cfg.grad_accum // G, cfg.grad_accum,
                              seed=cfg.seed, rank=ranks.rank, world_size=ranks.world_size)
    data = TrainData(tokenizer, loader, None, None, where)
    with locked_run_dir(out):
        trainer = rl.make_trainer(cfg, model_config, objective, data, held_out, eval_ids, resume=args.resume,
                                  overwrite=args.overwrite, **lora_trainer_hooks(args))
        result = trainer.run()
        if lora is not None and ranks.is_main:  # the root holds the merged model; rank 0 writes the adapters
            save_adapters(trainer.model, out, base_model=str(model_dir))
    accs = [(s, 1 - v) for s, v, _ in result.val]
    line = f"done: {result.step} steps in {(time.perf_counter() - t0) / 60:.1f} min"
    if accs:
        line += f"; held-out accuracy {accs[0][1]:.3f} (step {accs[0][0]}) -> {accs[-1][1]:.3f} (step {accs[-1][0]})"
    print(line)
    report = rewards.report() if hasattr(rewards, "report") else ""
    if report:
        print(report)
    if objective.accuracy_errors:
        print(f"the accuracy verifier {accuracy} failed on {objective.accuracy_errors} held-out responses "
              f"(counted as wrong)")
    print(f"model: {out}" + (" (merged; adapters beside it)" if lora else "")
          + f"  (try: velocis eval-task --model {out} ...)")
    return 0


# --- eval-task ---------------------------------------------------------------------------------------
def run_eval_task(args) -> int:
    import velocis
    from velocis.align import rl
    from velocis.align.tasks import generate, make_task, read_examples
    from velocis.align.verifiers import get_verifier
    from velocis.serve.chat_template import find_chat_template

    if args.data and args.task:
        raise VelocisError("give either --data FILE or --task NAME, not both")
    if args.n < 1 or args.batch_size < 1 or args.max_completion_length < 1:
        raise VelocisError("--n, --batch-size and --max-completion-length must be positive")
    if args.task:
        task = make_task(args.task, difficulty=args.difficulty, lang=args.lang)
        if args.split == "eval":
            _, problems = generate(task, 0, args.n, args.task_seed)
        else:
            problems, _ = generate(task, args.n, args.n_eval, args.task_seed)
        examples = [p.record() for p in problems]
        default_verifier, what = task.verifier, (f"{args.task} (difficulty {task.difficulty}, lang {task.lang}, "
                                                 f"seed {args.task_seed}) {args.split} split")
    elif args.data:
        examples = read_examples(args.data, "--data")[:args.n]
        default_verifier, what = _task_meta(Path(args.data)).get("verifier"), args.data
    else:
        raise VelocisError("give --task NAME or --data FILE")
    name = args.verifier or default_verifier or "exact_numeric"
    verifier = get_verifier(name)
    model, tokenizer = velocis.load(args.model, device=args.device)
    if tokenizer is None:
        raise VelocisError(f"--model {args.model}: no tokenizer (tokenizer.json)")
    template = find_chat_template(args.model, tokenizer)
    start = model.config.prompt_start_token_id
    encoder = rl.PromptEncoder(tokenizer, template, start)
    ids = rl.encode_examples(examples, encoder, model.config.max_seq_len, args.max_completion_length, what)
    t0 = time.perf_counter()
    acc, responses, errors = rl.greedy_accuracy(model, encoder, examples, verifier, args.max_completion_length,
                                                args.batch_size, encoder.stop_ids(tokenizer.eos_id), ids)
    took = time.perf_counter() - t0
    correct = round(acc * len(examples))
    if args.json:
        print(json.dumps({"accuracy": acc, "correct": correct, "n": len(examples), "verifier": name, "data": what,
                          "verifier_errors": errors, "seconds": round(took, 2)}, ensure_ascii=False))
    else:
        for ex, r in list(zip(examples, responses))[:args.show]:
            mark = "ok " if float(_safe(verifier, r, ex["answer"])) >= 1 else "no "
            print(f"[{mark}] {ex['prompt']!r} -> {r!r} (answer {ex['answer']!r})")
        print(f"accuracy {acc:.4f} ({correct}/{len(examples)}) on {what}, verifier {name}, greedy, {took:.1f}s")
        if errors:
            print(f"the verifier {name} failed on {errors} responses (counted as wrong)")
    return 0


def _safe(fn, response, answer) -> float:
    try:
        return float(fn(response, answer))
    except Exception:
        return 0.0
