"""Alignment commands on several processes: each rank reads its own share of the pairs, and a
2-rank `velocis dpo` (gloo, 127.0.0.1) ends with the weights of one process over the same global batch."""
from __future__ import annotations

import json

import pytest
import torch

from velocis.align.preference import PreferenceLoader, PreferencePair, PreferenceSet


def _set(n: int) -> PreferenceSet:
    return PreferenceSet([PreferencePair(prompt=[1, 2], chosen=[3 + i], rejected=[4 + i]) for i in range(n)], "train")


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
    from velocis.align import tasks
    from velocis.cli import main
    from velocis.config import ModelConfig
    from velocis.model_io import save_model
    from velocis.models import VelocisModel
    from velocis.tokenizer import Tokenizer

    task = tasks.write_task("arithmetic", tmp_path / "task", n_train=200, n_eval=10, seed=0, lang="en")
    tok = Tokenizer.train([str(task / "pretrain_en.txt")], vocab_size=300, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                      max_seq_len=128, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                      prompt_start_token_id=tok.eos_id)
    model = VelocisModel(cfg)
    model.init_weights()
    save_model(model, tok, tmp_path / "base")
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
