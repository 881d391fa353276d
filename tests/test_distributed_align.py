"""Alignment commands on several processes: each rank reads its own share of the pairs, and a
2-rank `velocis dpo` (gloo, 127.0.0.1) ends with the weights of one process over the same global batch."""
from __future__ import annotations

import json
import types

import pytest
import torch

from velocis.align.preference import PreferenceLoader, PreferencePair, PreferenceSet


def _set(n: int) -> PreferenceSet:
    return PreferenceSet([PreferencePair(prompt=[1, 2], chosen=[3 + i], rejected=[4 + i]) for i in range(n)], "train")


def _task_and_model(root, n_train: int, n_eval: int, max_seq_len: int):
    """ROOT/task (the arithmetic task, English) and ROOT/base (a tiny random model, its tokenizer
    trained on the task's text)."""
    from velocis.align import tasks
    from velocis.config import ModelConfig
    from velocis.model_io import save_model
    from velocis.models import VelocisModel
    from velocis.tokenizer import Tokenizer

    task = tasks.write_task("arithmetic", root / "task", n_train=n_train, n_eval=n_eval, seed=0, lang="en")
    tok = Tokenizer.train([str(task / "pretrain_en.txt")], vocab_size=300, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                      max_seq_len=max_seq_len, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                      pad_token_id=tok.pad_id, prompt_start_token_id=tok.eos_id)
    model = VelocisModel(cfg)
    model.init_weights()
    save_model(model, tok, root / "base")
    return task


@pytest.mark.parametrize("n", [16, 17])
def test_ranks_read_disjoint_shares_that_make_up_the_global_batches(n):
    one = PreferenceLoader(_set(n), 4, 0, seed=3, train=True)
    ranks = [PreferenceLoader(_set(n), 2, 0, seed=3, train=True, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # ranks stay in step
    first = [set(next(iter(r))["index"].tolist()) for r in ranks]
    assert not first[0] & first[1]
    assert first[0] | first[1] == set(next(iter(one))["index"].tolist())  # one process's first batch
    val = [PreferenceLoader(_set(n), 4, 0, train=False, rank=r, world_size=2) for r in range(2)]
    seen = [i for v in val for b in v for i in b["index"].tolist()]
    assert sorted(seen) == list(range(n))  # validation: every pair once, over the ranks


@pytest.mark.distributed
def test_dpo_two_ranks_equal_one_process(tmp_path):
    from safetensors.torch import load_file

    from test_distributed import torchrun
    from velocis.cli import main

    _task_and_model(tmp_path, n_train=200, n_eval=10, max_seq_len=128)
    assert main(["preference-pairs", "--n-train", "40", "--n-eval", "10", "--lang", "en",
                 "--output-dir", str(tmp_path / "pairs")]) == 0
    common = ["--data", str(tmp_path / "pairs" / "train.jsonl"), "--val-data", str(tmp_path / "pairs" / "eval.jsonl"),
              "--model-dir", str(tmp_path / "base"), "--seq-len", "64", "--max-steps", "3", "--lr", "1e-3",
              "--eval-every", "3", "--device", "cpu", "--precision", "fp32", "--threads", "1", "--no-plot",
              "--monitor", "plain"]
    torchrun(2, ["-m", "velocis", "--", "dpo", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")])
    n = torch.get_num_threads()
    try:
        assert main(["dpo", *common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(n)
    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    stats = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if '"eval_stats"' in line]
    assert stats[-1]["pairs"] == 10  # held-out stats summed over both ranks' halves


# --- GRPO / PPO: each rank samples its share of every rollout ------------------------------------------
class _Recorder:
    """Rollouts that remember which prompts (and places in the rollout) they were asked for."""

    def __init__(self):
        self.config = types.SimpleNamespace(num_generations=2, skip_equal_groups=False, num_iterations=1)
        self.device = torch.device("cpu")
        self.asked: list[tuple[list[int], list[int]]] = []

    def rollout(self, examples, prompt_ids, index, positions=None):
        self.asked.append(([p[1] for p in prompt_ids], list(positions)))
        rows = [p for p in prompt_ids for _ in range(2)]
        return {"rows": rows, "completions": [[1]] * len(rows), "advantages": torch.ones(len(rows)), "stats": {}}

    def finish(self, parts):
        from velocis.align import rl

        ids, targets = rl.build_rows(parts["rows"], parts["completions"], 0, "cpu")
        return {"input_ids": ids, "targets": targets, "advantages": parts["advantages"]}


def test_rollout_ranks_take_interleaved_shares_of_one_processes_rollout():
    from velocis.align import rl
    from velocis.errors import VelocisError

    examples = [{"prompt": f"p{i}", "answer": "1"} for i in range(10)]
    ids = [[7, i] for i in range(10)]
    one = _Recorder()
    it = iter(rl.RolloutLoader(one, examples, ids, prompts_per_rollout=4, seed=3))
    for _ in range(3):  # the third rollout starts the second epoch (10 prompts: two rollouts, 2 left over)
        next(it)
    ranks = [_Recorder() for _ in range(2)]
    for r, rec in enumerate(ranks):
        it = iter(rl.RolloutLoader(rec, examples, ids, prompts_per_rollout=2, seed=3, rank=r, world_size=2))
        for _ in range(3):
            next(it)
    for k, (prompts, places) in enumerate(one.asked):
        assert places == [0, 1, 2, 3]
        assert ranks[0].asked[k] == (prompts[0::2], [0, 2]) and ranks[1].asked[k] == (prompts[1::2], [1, 3])
    with pytest.raises(VelocisError, match="x 3 processes"):
        rl.RolloutLoader(one, examples, ids, prompts_per_rollout=4, rank=0, world_size=3)


def _rl_setup(root):
    task = _task_and_model(root, n_train=64, n_eval=8, max_seq_len=96)
    # rewards a random model earns unevenly (some groups all equal, some not)
    (root / "shaped.py").write_text("def length(response, answer):\n    return len(response) / 10\n\n"
                                    "def long(response, answer):\n    return float(len(response) > 12)\n")
    return task


def _rl_args(root, task, reward: str, *extra) -> list[str]:
    return ["--data", str(task / "train.jsonl"), "--model-dir", str(root / "base"), "--verifier",
            f"exact_numeric,{root / 'shaped.py'}:{reward}", "--sampler", "engine", "--num-generations", "4",
            "--max-completion-length", "8", "--temperature", "1.5", "--lr", "1e-3", "--grad-accum", "2",
            "--eval-n", "6", "--device", "cpu", "--precision", "fp32", "--threads", "1", "--no-plot",
            "--monitor", "plain", *extra]


@pytest.mark.distributed
def test_grpo_two_ranks_equal_one_process(tmp_path):
    """Rank r samples the rollout's prompts r, r+2, ... from the seeds one process gives them, and the
    ranks' gradients sum to the whole rollout's: the weights end equal."""
    from test_distributed import max_weight_diff, torchrun
    from velocis.cli import main

    task = _rl_setup(tmp_path)
    common = _rl_args(tmp_path, task, "length", "--max-steps", "3", "--num-iterations", "2", "--beta", "0.04",
                      "--eval-every", "3")
    torchrun(2, ["-m", "velocis", "--", "train-grpo", *common, "--batch-size", "8", "--output-dir",
                 str(tmp_path / "two")])
    n = torch.get_num_threads()
    try:
        assert main(["train-grpo", *common, "--batch-size", "16", "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(n)
    assert max_weight_diff(tmp_path / "two", tmp_path / "one") < 1e-5
    evals = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals[-1]["heldout_n"] == 6  # scored over both ranks' halves


@pytest.mark.distributed
@pytest.mark.parametrize("algo", ["train-grpo", "ppo"])
def test_rl_two_ranks_resume_mid_rollout(tmp_path, algo):
    """A checkpoint taken between the passes over a rollout holds every rank's pending micro-batches:
    stopping there and resuming ends where the uninterrupted run does (GRPO also with the ranks
    drawing extra prompts together for --skip-equal-groups)."""
    from test_distributed import max_weight_diff, torchrun

    task = _rl_setup(tmp_path)
    extra = ["--skip-equal-groups"] if algo == "train-grpo" else []
    common = _rl_args(tmp_path, task, "long", "--num-iterations", "2", "--batch-size", "8", "--save-every", "1",
                      "--eval-every", "100", *extra)
    launch = ["-m", "velocis", "--", algo, *common]
    torchrun(2, [*launch, "--max-steps", "3", "--output-dir", str(tmp_path / "whole")])
    torchrun(2, [*launch, "--max-steps", "1", "--output-dir", str(tmp_path / "cut")])
    torchrun(2, [*launch, "--max-steps", "3", "--output-dir", str(tmp_path / "cut"), "--resume"])
    assert max_weight_diff(tmp_path / "cut", tmp_path / "whole") < 1e-6


@pytest.mark.distributed
def test_sft_two_ranks_equal_one_process(tmp_path):
    """Each rank packs every second row of the global batch: the weights end as one process's."""
    from test_distributed import max_weight_diff, torchrun
    from velocis.cli import main

    task = _task_and_model(tmp_path, n_train=64, n_eval=8, max_seq_len=128)
    common = ["sft", "--data", str(task / "sft.jsonl"), "--model-dir", str(tmp_path / "base"), "--seq-len", "64",
              "--max-steps", "3", "--lr", "3e-3", "--device", "cpu", "--precision", "fp32", "--threads", "1",
              "--no-plot", "--monitor", "plain"]
    torchrun(2, ["-m", "velocis", "--", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")])
    n = torch.get_num_threads()
    try:
        assert main([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(n)
    assert max_weight_diff(tmp_path / "two", tmp_path / "one") < 1e-5
    assert max_weight_diff(tmp_path / "two", tmp_path / "base") > 1e-4  # it trained
