"""Alignment on one CPU: pretraining + SFT, then GRPO and DPO, on the built-in arithmetic task.

Every stage is a `velocis` command (printed as it runs, so the README can show them):
  1. velocis task write      train/held-out splits of 1-2 digit addition (English + Chinese prompts),
                             SFT conversations and plain-text worked examples of the training split
  2. tokenizer               a small byte-level BPE trained on the task's text (Python API: one call)
  3. velocis train-custom    pretrain a tiny model on the worked examples (plain text)
  4. velocis sft             a short SFT on the chat conversations (loss on the answers only): 10
                             steps teach the answer format and about half the sums, leaving RL room
                             (--sft-steps; --sft-start-step picks an earlier checkpoint instead)
  5. velocis eval-task       held-out accuracy after SFT (greedy, exact_numeric)
  6. velocis train-grpo      GRPO from the SFT model, rewarded by exact_numeric + format (DAPO loss,
                             no KL, groups with equal rewards resampled, 10 warmup steps)
  7. velocis eval-task       held-out accuracy after GRPO
  8. velocis preference-pairs  correct-vs-wrong answer pairs of the same task (same held-out problems)
  9. velocis eval-preference held-out preference accuracy (chosen ranked above rejected by log-prob) of
                             the SFT model
 10. velocis dpo             DPO from the SFT model on the training pairs
 11. velocis eval-preference held-out preference accuracy after DPO (and its implicit-reward accuracy)

    python benchmarks/align_arithmetic.py [--work-dir /tmp/velocis-align] [--threads 1] [--reuse] [--skip-grpo]

--reuse keeps the stages whose output is already in --work-dir (to iterate on a later stage).
The held-out problems never appear in any training text. Prints the accuracies, seeds and time
per stage, and writes them to WORK/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def velocis(*args: str, threads: int) -> str:
    cmd = [sys.executable, "-m", "velocis", *args]
    print("$ velocis " + " ".join(args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:  # the stage's own log, as it comes
        lines.append(line)
        if line.strip():
            print("    " + line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"stage failed: velocis {args[0]}")
    return "".join(lines)


def accuracy(model: Path, args, threads: int) -> dict:
    out = velocis("eval-task", "--model", str(model), "--task", "arithmetic", "--difficulty", str(args.difficulty),
                  "--seed", str(args.task_seed), "--n", str(args.n_eval), "--max-completion-length", "24",
                  "--device", "cpu", "--json", threads=threads)
    return json.loads(out.strip().splitlines()[-1])


def preference(model: Path, pairs: Path, threads: int, reference: Path | None = None) -> dict:
    extra = ["--reference", str(reference)] if reference else []
    out = velocis("eval-preference", "--model", str(model), "--data", str(pairs), *extra, "--json", threads=threads)
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/velocis-align")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage (1 is fastest on a busy 2-core VM)")
    p.add_argument("--reuse", action="store_true", help="keep stages already done in --work-dir")
    p.add_argument("--task-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=1337, help="training seed of every stage")
    p.add_argument("--difficulty", type=int, default=1)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=10,
                   help="a short SFT (the answer format, about half the problems right) leaves RL room to teach")
    p.add_argument("--sft-start-step", type=int, default=0,
                   help="an SFT checkpoint (a multiple of 10) that GRPO and DPO start from instead of the final "
                        "SFT model (0)")
    p.add_argument("--grpo-steps", type=int, default=100)
    p.add_argument("--grpo-lr", type=float, default=1e-4)
    p.add_argument("--grpo-warmup", type=int, default=10, help="a fresh Adam at full lr wrecks the policy in 5 steps")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--grpo-batch", type=int, default=256, help="completions per GRPO step")
    p.add_argument("--grpo-temperature", type=float, default=0.7)
    p.add_argument("--no-skip-equal-groups", dest="skip_equal_groups", action="store_false",
                   help="GRPO: keep groups whose completions all earn the same reward (by default resampled)")
    p.add_argument("--skip-grpo", action="store_true", help="only the DPO stages after SFT")
    p.add_argument("--skip-dpo", action="store_true", help="only the GRPO stages after SFT")
    p.add_argument("--n-pairs", type=int, default=1000, help="DPO training pairs")
    p.add_argument("--dpo-steps", type=int, default=60)
    p.add_argument("--dpo-lr", type=float, default=1e-4)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    args = p.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t = args.threads
    common = ["--seed", str(args.seed), "--threads", str(t), "--monitor", "plain", "--no-plot", "--device", "cpu"]
    times: dict[str, float] = {}
    start = time.perf_counter()

    def stage(name: str, done: Path, fn) -> None:
        if args.reuse and done.exists():
            print(f"[{name}] reused {done}")
            return
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        fn()
        times[name] = round(time.perf_counter() - t0, 1)

    task, tok, pre, sft, grpo = (work / n for n in ("task", "tok", "pretrain", "sft", "grpo"))
    stage("task", task / "task.json", lambda: velocis(
        "task", "write", "--task", "arithmetic", "--difficulty", str(args.difficulty), "--lang", "mix",
        "--seed", str(args.task_seed), "--n-train", str(args.n_train), "--n-eval", str(args.n_eval),
        "--output-dir", str(task), "--overwrite", threads=t))

    def tokenizer():
        from velocis.tokenizer import Tokenizer

        print(f"$ python -c 'Tokenizer.train([pretrain_en.txt, pretrain_zh.txt], vocab_size={args.vocab_size})'")
        Tokenizer.train([str(task / "pretrain_en.txt"), str(task / "pretrain_zh.txt")], vocab_size=args.vocab_size,
                        progress=False).save(tok)

    stage("tokenizer", tok / "tokenizer.json", tokenizer)
    heads = max(2, args.hidden_dim // 32)
    stage("pretrain", pre / "model.safetensors", lambda: velocis(
        "train-custom", "--english-path", str(task / "pretrain_en.txt"), "--chinese-path", str(task / "pretrain_zh.txt"),
        "--tokenizer", str(tok), "--hidden-dim", str(args.hidden_dim), "--num-layers", str(args.num_layers),
        "--num-heads", str(heads), "--mlp-dim", str(args.hidden_dim * 3), "--max-seq-len", "128", "--seq-len", "128",
        "--batch-size", "32", "--max-steps", str(args.pretrain_steps), "--lr", "3e-3", "--warmup", "30",
        "--eval-every", str(args.pretrain_steps), "--log-every", "50", "--output-dir", str(pre), "--overwrite",
        *common, threads=t))
    stage("sft", sft / "model.safetensors", lambda: velocis(
        "sft", "--data", str(task / "sft.jsonl"), "--model-dir", str(pre), "--output-dir", str(sft), "--overwrite",
        "--max-steps", str(args.sft_steps), "--batch-size", "16", "--seq-len", "128", "--lr", "1e-3",
        "--val-fraction", "0.01", "--eval-every", str(args.sft_steps), "--log-every", "20",
        "--save-every", "10", "--keep-last", str((args.sft_steps - args.sft_start_step) // 10 + 1 if args.sft_start_step else 2), *common, threads=t))
    if args.sft_start_step:  # the checkpoint GRPO and DPO start from ("the SFT model" below)
        sft = sft / "checkpoints" / f"step_{args.sft_start_step}"
        if not sft.is_dir():
            raise SystemExit(f"--sft-start-step {args.sft_start_step}: no SFT checkpoint {sft} "
                             f"(checkpoints are every 10 steps up to --sft-steps {args.sft_steps})")
    t0 = time.perf_counter()
    acc_sft = accuracy(sft, args, t)
    times["eval_sft"] = round(time.perf_counter() - t0, 1)
    result = {"sft_model": str(sft), "accuracy_after_sft": acc_sft["accuracy"], "n_eval": args.n_eval, "task_seed": args.task_seed,
              "train_seed": args.seed, "threads": t}
    if not args.skip_grpo:
        stage("grpo", grpo / "model.safetensors", lambda: velocis(
            "train-grpo", "--data", str(task / "train.jsonl"), "--model-dir", str(sft), "--output-dir", str(grpo),
            "--overwrite", "--verifier", "exact_numeric,format", "--reward-weights", "1,0.1",
            "--num-generations", str(args.num_generations), "--batch-size", str(args.grpo_batch),
            "--max-completion-length", "24", "--beta", "0.0", "--loss-type", "dapo", "--epsilon-high", "0.28",
            "--temperature", str(args.grpo_temperature), *(["--skip-equal-groups"] if args.skip_equal_groups else []),
            "--max-steps", str(args.grpo_steps), "--lr", str(args.grpo_lr), "--warmup", str(args.grpo_warmup),
            "--eval-every", str(args.grpo_steps),
            "--eval-n", "0", "--save-every", str(args.grpo_steps), "--log-every", "10", *common, threads=t))
        t0 = time.perf_counter()
        acc_grpo = accuracy(grpo, args, t)
        times["eval_grpo"] = round(time.perf_counter() - t0, 1)
        result.update(accuracy_after_grpo=acc_grpo["accuracy"],
                      gain_points=round(100 * (acc_grpo["accuracy"] - acc_sft["accuracy"]), 1))
    if not args.skip_dpo:
        pairs, dpo = work / "pairs", work / "dpo"
        stage("pairs", pairs / "eval.jsonl", lambda: velocis(
            "preference-pairs", "--task", "arithmetic", "--difficulty", str(args.difficulty), "--lang", "mix",
            "--seed", str(args.task_seed), "--n-train", str(args.n_pairs), "--n-eval", str(args.n_eval),
            "--output-dir", str(pairs), "--overwrite", threads=t))
        t0 = time.perf_counter()
        pref_sft = preference(sft, pairs / "eval.jsonl", t)
        times["eval_pref_sft"] = round(time.perf_counter() - t0, 1)
        stage("dpo", dpo / "model.safetensors", lambda: velocis(
            "dpo", "--data", str(pairs / "train.jsonl"), "--model-dir", str(sft), "--output-dir", str(dpo),
            "--overwrite", "--beta", str(args.dpo_beta), "--batch-size", "16", "--seq-len", "128",
            "--max-steps", str(args.dpo_steps), "--lr", str(args.dpo_lr), "--val-fraction", "0.05",
            "--eval-every", str(args.dpo_steps), "--log-every", "10", *common, threads=t))
        t0 = time.perf_counter()
        pref_dpo = preference(dpo, pairs / "eval.jsonl", t, reference=sft)
        times["eval_pref_dpo"] = round(time.perf_counter() - t0, 1)
        result.update(preference_accuracy_sft=pref_sft["accuracy"], preference_accuracy_dpo=pref_dpo["accuracy"],
                      implicit_reward_accuracy_dpo=pref_dpo.get("reward_accuracy"))
    total = round(time.perf_counter() - start, 1)
    result.update(seconds=times, total_seconds=total, settings=vars(args))
    (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    line = f"\nheld-out accuracy (greedy, {args.n_eval} problems): after pretraining + SFT {acc_sft['accuracy']:.3f}"
    if "accuracy_after_grpo" in result:
        line += f", after GRPO {result['accuracy_after_grpo']:.3f} ({result['gain_points']:+.1f} points)"
    print(line)
    if "preference_accuracy_dpo" in result:
        print(f"held-out preference accuracy ({args.n_eval} pairs, log-prob of chosen above rejected): SFT "
              f"{result['preference_accuracy_sft']:.3f}, after DPO {result['preference_accuracy_dpo']:.3f} "
              f"(implicit-reward accuracy {result['implicit_reward_accuracy_dpo']:.3f})")
    print(f"seeds: task {args.task_seed}, training {args.seed}; time: " +
          ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"; total {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
