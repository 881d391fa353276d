"""Preference learning: DPO / IPO / robust DPO losses against TRL 1.16's DPOTrainer._compute_loss (on
the same per-token log-probs, and end to end from a tiny Velocis model through TRL's own collator),
the Bradley-Terry reward loss against TRL's RewardTrainer.compute_loss, bad pairs (identical chosen
and rejected, longer than the context) skipped, counted and reported, and `velocis dpo`,
`velocis train-reward`, `velocis eval-preference` and `velocis preference-pairs` end to end."""
from __future__ import annotations

import copy
import json
import types
from collections import defaultdict

import pytest
import torch

from velocis.align import preference as pref
from velocis.errors import VelocisError

pytestmark = pytest.mark.usefixtures("one_thread")


# --- TRL's trainers, built without __init__: only what the loss reads is set ----------------------------
class _Accelerator:  # one process: gathers are the identity
    num_processes = 1
    device = torch.device("cpu")

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


@pytest.fixture(scope="module")
def trl_dpo():
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    return DPOTrainer, DataCollatorForPreference


def _trl_dpo_loss(cls, per_token_logps, batch, ref_chosen, ref_rejected, *, loss_type, beta, label_smoothing=0.0):
    """TRL's DPO loss for a collated TRL batch whose policy per-token log-probs [2B, T-1] are given
    (TRL's fused LM head returns them with zeros off the completion); the reference log-probs go in
    precomputed, as TRL's precompute_ref_log_probs does. Returns (loss, TRL's logged metrics)."""
    tr = object.__new__(cls)
    tr.accelerator = _Accelerator()
    tr.model = torch.nn.Linear(1, 1)  # .training: train mode
    tr.aux_loss_enabled = tr.use_weighting = False
    tr.ld_alpha = None
    tr.precompute_ref_logps = True
    tr.f_divergence_type = "reverse_kl"
    tr.loss_types, tr.loss_weights = [loss_type], [1.0]
    tr.beta, tr.label_smoothing = beta, label_smoothing
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens, tr._tp_size = 0, 1
    shape = per_token_logps.shape

    def model(**kw):
        return types.SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(shape),
                                     mean_logits=torch.zeros(shape), is_top1=torch.zeros(shape, dtype=torch.bool))

    inputs = {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return tr._compute_loss(model, inputs, return_outputs=False), tr._metrics["train"]


def _random_batch(collator_cls, B, seed):
    """A TRL-collated batch of B random pairs with prompts and responses of different lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, 50, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    examples = [{"prompt_ids": ids(1, 6), "chosen_ids": ids(1, 9), "rejected_ids": ids(1, 9)} for _ in range(B)]
    return collator_cls(pad_token_id=0)(examples)


SETTINGS = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0),
            ("robust", 0.1, 0.0), ("robust", 0.1, 0.2), ("robust", 0.5, 0.4)]


@pytest.mark.parametrize("loss_type,beta,smoothing", SETTINGS)
def test_dpo_loss_matches_trl_on_the_same_logps(trl_dpo, loss_type, beta, smoothing):
    """Loss, gradient w.r.t. the policy's per-token log-probs, and the logged rewards."""
    cls, collator = trl_dpo
    B = 6
    batch = _random_batch(collator, B, seed=hash((loss_type, beta, smoothing)) % 997)
    mask = batch["completion_mask"][:, 1:].double()
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(mask.shape, generator=g, dtype=torch.float64) * 0.7 - 2) * mask
    ref_c, ref_r = (base.sum(1) + torch.randn(2 * B, generator=g, dtype=torch.float64) * 1.5).chunk(2)

    lp_trl = base.clone().requires_grad_(True)
    want, metrics = _trl_dpo_loss(cls, lp_trl, batch, ref_c, ref_r, loss_type=loss_type, beta=beta,
                                  label_smoothing=smoothing)
    want.backward()

    lp = base.clone().requires_grad_(True)
    pc, pr = (lp * mask).sum(1).chunk(2)
    lengths_c, lengths_r = batch["completion_mask"].sum(1).double().chunk(2)
    losses, rewards_c, rewards_r = pref.dpo_loss(pc, pr, ref_c, ref_r, beta, smoothing, loss_type,
                                                 lengths_c, lengths_r)
    got = losses.mean()
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10, abs=1e-12)
    # TRL sums every position (its LM head gives 0, with no gradient, off the completion): compare on it
    torch.testing.assert_close(lp.grad, lp_trl.grad * mask, rtol=1e-9, atol=1e-12)
    assert float(rewards_c.mean()) == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-9)
    assert float(rewards_r.mean()) == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-9)
    assert float((rewards_c > rewards_r).double().mean()) == pytest.approx(metrics["rewards/accuracies"][-1])
    assert float(pc.mean()) == pytest.approx(metrics["logps/chosen"][-1], abs=1e-9)


@pytest.mark.parametrize("beta,smoothing", [(0.1, 0.1), (0.5, 0.3)])
def test_label_smoothed_sigmoid_matches_trl(trl_dpo, beta, smoothing):
    """Conservative DPO (sigmoid + label smoothing): TRL 1.16's sigmoid has no smoothing term any more,
    but its aot loss on one pair (sorting a single value changes nothing) is exactly that term."""
    cls, collator = trl_dpo
    g = torch.Generator().manual_seed(7)
    for i in range(4):  # one pair per TRL call
        batch = _random_batch(collator, 1, seed=100 + i)
        mask = batch["completion_mask"][:, 1:].double()
        base = (torch.randn(mask.shape, generator=g, dtype=torch.float64) - 1.5) * mask
        ref_c, ref_r = (base.sum(1) + torch.randn(2, generator=g, dtype=torch.float64)).chunk(2)
        want, _ = _trl_dpo_loss(cls, base, batch, ref_c, ref_r, loss_type="aot", beta=beta, label_smoothing=smoothing)
        pc, pr = base.sum(1).chunk(2)
        got, _, _ = pref.dpo_loss(pc, pr, ref_c, ref_r, beta, smoothing, "sigmoid")
        assert float(got.mean()) == pytest.approx(float(want), rel=1e-10)
    # and with no smoothing, TRL's sigmoid and aot agree on one pair: the comparison above is the right one
    want_sig, _ = _trl_dpo_loss(cls, base, batch, ref_c, ref_r, loss_type="sigmoid", beta=beta)
    want_aot, _ = _trl_dpo_loss(cls, base, batch, ref_c, ref_r, loss_type="aot", beta=beta)
    assert float(want_sig) == pytest.approx(float(want_aot), rel=1e-12)


def test_loss_options_are_checked():
    z = torch.zeros(2)
    with pytest.raises(VelocisError, match="--loss"):
        pref.dpo_loss(z, z, z, z, 0.1, loss_type="hinge")
    with pytest.raises(VelocisError, match="--beta"):
        pref.dpo_loss(z, z, z, z, 0.0)
    with pytest.raises(VelocisError, match="--label-smoothing"):
        pref.dpo_loss(z, z, z, z, 0.1, label_smoothing=0.5, loss_type="robust")
    with pytest.raises(VelocisError, match="ipo"):
        pref.dpo_loss(z, z, z, z, 0.1, label_smoothing=0.1, loss_type="ipo")
    with pytest.raises(VelocisError, match="chosen_lengths"):
        pref.dpo_loss(z, z, z, z, 0.1, loss_type="ipo")


# --- end to end from a model: Velocis' batches and log-probs against TRL's collator and loss ------------------
@pytest.fixture(scope="module")
def tiny_model():
    from velocis.config import ModelConfig
    from velocis.models import VelocisModel

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64,
                      max_seq_len=32, init_std=0.3)
    model = VelocisModel(cfg).float()
    model.init_weights()
    return model


def _pairs(n, seed):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, 64, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [pref.PreferencePair(ids(1, 6), ids(1, 8), ids(1, 8), i + 1) for i in range(n)]


def _trl_per_token_logps(model, batch):
    """What TRL's fused LM head gives: log p(token t+1 | ..t) on completion tokens, 0 elsewhere."""
    logits = model(batch["input_ids"]).float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return lp * batch["completion_mask"][:, 1:]


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.25)])
def test_dpo_objective_matches_trl_from_the_model(trl_dpo, tiny_model, loss_type, smoothing):
    """DPOObjective on Velocis' batch == TRL's loss on TRL's batch of the same pairs, the per-token
    log-probs of both read from the same model (and the reference from the same frozen copy):
    loss and every parameter's gradient."""
    cls, collator = trl_dpo
    beta = 0.2
    pairs = _pairs(5, seed=3)
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():  # a reference unlike the policy, so the log-ratios are not all 0
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.requires_grad_(False).eval()

    trl_batch = collator(pad_token_id=0)([{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected}
                                          for p in pairs])
    with torch.no_grad():
        ref_c, ref_r = _trl_per_token_logps(reference, trl_batch).sum(1).chunk(2)
    policy = copy.deepcopy(tiny_model)
    want, metrics = _trl_dpo_loss(cls, _trl_per_token_logps(policy, trl_batch), trl_batch, ref_c, ref_r,
                                  loss_type=loss_type, beta=beta, label_smoothing=smoothing)
    want.backward()

    model = copy.deepcopy(tiny_model)
    objective = pref.DPOObjective(beta, loss_type, smoothing)
    objective.reference = reference
    batch = pref.collate(pairs, pad_id=0)
    loss, stats = objective(model, batch, objective.num_tokens(batch))  # the step's mean over its pairs
    loss.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), policy.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert float(stats[key]) == pytest.approx(metrics[key][-1], rel=1e-4, abs=1e-6), key


# --- the reward model ------------------------------------------------------------------------------------------
def test_reward_loss_matches_trl(tiny_model):
    """RewardObjective's loss and accuracy == TRL's RewardTrainer.compute_loss fed the same scores
    (TRL's sequence-classification model would give them as logits [2B, 1])."""
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    pairs = _pairs(6, seed=5)
    batch = pref.collate(pairs, pad_id=0)
    objective = pref.RewardObjective(seed=1)
    objective.setup(tiny_model, "cpu")
    with torch.no_grad():
        objective.head.weight.mul_(50)  # rewards far enough apart to disagree with each other
    rc, rr = objective.rewards(tiny_model, batch)
    scores = torch.cat([rc, rr]).detach()

    tr = object.__new__(RewardTrainer)
    tr.accelerator = _Accelerator()
    tr.model = torch.nn.Linear(1, 1)
    tr.args = types.SimpleNamespace(center_rewards_coefficient=None)
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens, tr._tp_size = 0, 1
    logits = scores[:, None].clone().requires_grad_(True)
    want = tr.compute_loss(lambda **kw: types.SimpleNamespace(logits=logits),
                           {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])})
    want.backward()

    s = scores.clone().requires_grad_(True)
    got = pref.bradley_terry_loss(*s.chunk(2)).mean()
    got.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    torch.testing.assert_close(s.grad, logits.grad.squeeze(-1))
    loss, stats = objective(tiny_model, batch, 6)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(stats["accuracy"]) == pytest.approx(tr._metrics["train"]["accuracy"][-1])
    assert float(stats["margin"]) == pytest.approx(tr._metrics["train"]["margin"][-1], rel=1e-5)


# --- bad pairs ---------------------------------------------------------------------------------------------------
class _CharTokenizer:
    eos_id = 1

    def encode(self, text):
        return [2 + (ord(c) % 60) for c in text]


def test_identical_and_too_long_pairs_are_skipped_counted_and_named(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "2+3=", "chosen": "5", "rejected": "5"},  # identical
        {"prompt": "x" * 40, "chosen": "1", "rejected": "2"},  # prompt longer than the context
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+2=", "chosen": "3", "rejected": "3"},  # identical
    ]) + "\n")
    encoder = pref.PairEncoder(_CharTokenizer(), prompt_start_id=0)
    loaded = pref.load_preference_data(data, encoder, max_len=16, val_fraction=0.0)
    assert [p.line for p in loaded.train.pairs] == [1, 4]
    assert loaded.skipped.identical == [2, 5] and loaded.skipped.too_long == [3]
    summary = loaded.skip_summary()
    assert "skipped 3 of 5 pairs" in summary and "2 with identical chosen and rejected (lines 2, 5)" in summary
    assert "1 longer than 16 tokens (line 3" in summary and "--seq-len" in summary
    # nothing left: an error that says why
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps({"prompt": "2+3=", "chosen": "5", "rejected": "5"}) + "\n")
    with pytest.raises(VelocisError, match="no pair left to train on.*identical"):
        pref.load_preference_data(only_bad, encoder, max_len=16)


@pytest.mark.parametrize("line,match", [
    ("not json", r"pairs.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "chosen": "b"}', r"pairs.jsonl:2: missing 'rejected'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "b"}', r"pairs.jsonl:2: \"chosen\" must be a string"),
    ('{"prompt": [{"content": "a"}], "chosen": "b", "rejected": "c"}', r"pairs.jsonl:2: \"prompt\" must be"),
])
def test_unreadable_lines_name_file_and_line(tmp_path, line, match):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + line + "\n")
    with pytest.raises(VelocisError, match=match):
        pref.read_preference_jsonl(data)


# --- the CLI end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_setup(tmp_path_factory):
    """A tiny chat model whose tokenizer was trained on arithmetic text, and arithmetic preference pairs
    (plus one identical pair and one too long for --seq-len, to be skipped and reported)."""
    from velocis.align import tasks
    from velocis.cli import main
    from velocis.config import ModelConfig
    from velocis.model_io import save_model
    from velocis.models import VelocisModel
    from velocis.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("dpo")
    task = tasks.write_task("arithmetic", root / "task", n_train=200, n_eval=10, seed=0, lang="en")
    tok = Tokenizer.train([str(task / "pretrain_en.txt")], vocab_size=300, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                      max_seq_len=128, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                      prompt_start_token_id=tok.eos_id)
    model = VelocisModel(cfg)
    model.init_weights()
    save_model(model, tok, root / "base")
    assert main(["preference-pairs", "--n-train", "40", "--n-eval", "10", "--lang", "en",
                 "--output-dir", str(root / "pairs")]) == 0
    train = (root / "pairs" / "train.jsonl").read_text()
    bad = [{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "2"},
           {"prompt": "What is " + " + ".join(["12"] * 60) + "?", "chosen": "720", "rejected": "721"}]
    (root / "pairs" / "train_with_bad.jsonl").write_text(train + "".join(json.dumps(r) + "\n" for r in bad))
    return root


RUN = ["--monitor", "none", "--threads", "1", "--device", "cpu", "--no-plot"]


def _cli(*argv) -> int:
    from velocis.cli import main

    return main([str(a) for a in argv])


def test_dpo_cli_end_to_end(pair_setup, capsys):
    root = pair_setup
    out = root / "dpo"
    assert _cli("dpo", "--data", root / "pairs" / "train_with_bad.jsonl", "--val-data", root / "pairs" / "eval.jsonl",
                "--model-dir", root / "base", "--output-dir", out, "--seq-len", 64, "--batch-size", 8,
                "--max-steps", 4, "--lr", 1e-3, "--beta", 0.1, "--eval-every", 4, *RUN) == 0
    captured = capsys.readouterr()
    assert "held-out preference accuracy" in captured.out and "(10 pairs)" in captured.out
    # the skipped pairs are reported when the data is read and again when the run ends
    assert captured.err.count("skipped 2 of 52 pairs") == 2, captured.err
    assert "1 with identical chosen and rejected (line 41)" in captured.err
    assert "1 longer than 64 tokens (line 42" in captured.err
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    stats = [r for r in recs if r["type"] == "eval_stats"]
    assert len(train) == 4 and all(k in train[-1] for k in ("rewards/margins", "rewards/accuracies"))
    assert stats[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 0: the policy is the reference
    assert stats[-1]["pairs"] == 10 and stats[-1]["rewards/margins"] != 0
    # the run dir is a model dir, and eval-preference reads it with its reference
    assert _cli("eval-preference", "--model", out, "--data", root / "pairs" / "eval.jsonl",
                "--reference", root / "base", "--json") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["pairs"] == 10 and 0 <= res["accuracy"] <= 1
    # the same model and pairs (training evaluates in bf16, so a near tie may fall the other way)
    assert res["reward_accuracy"] == pytest.approx(stats[-1]["rewards/accuracies"], abs=0.2)


def test_dpo_cli_ipo_with_precomputed_reference(pair_setup, capsys):
    root = pair_setup
    out = root / "ipo"
    args = ["dpo", "--data", root / "pairs" / "train.jsonl", "--model-dir", root / "base", "--output-dir", out,
            "--loss", "ipo", "--beta", 0.5, "--precompute-ref", "--max-steps", 2, "--batch-size", 8, "--lr", 1e-3,
            "--val-fraction", 0.2, "--eval-every", 2, *RUN]
    assert _cli(*args) == 0
    assert (out / pref.REF_CACHE).is_file()
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert len(recs) == 2 and all(r["loss"] > 0 for r in recs)
    # resume to step 3: the reference log-probs come from the cache (the starting weights are unchanged)
    cached = (out / pref.REF_CACHE).stat().st_mtime_ns
    args[args.index("--max-steps") + 1] = 3
    assert _cli(*args, "--resume") == 0
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert steps == [1, 2, 3] and (out / pref.REF_CACHE).stat().st_mtime_ns == cached


def test_dpo_cli_bad_input(pair_setup, capsys):
    root = pair_setup
    base = ["--model-dir", root / "base", "--max-steps", 1, *RUN]
    bad = root / "only_bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "2"}) + "\n")
    assert _cli("dpo", "--data", bad, "--output-dir", root / "bad1", *base) == 2
    assert "no pair left to train on" in capsys.readouterr().err
    assert _cli("dpo", "--data", root / "pairs" / "train.jsonl", "--output-dir", root / "bad2", "--loss", "ipo",
                "--label-smoothing", 0.1, *base) == 2
    assert "--label-smoothing" in capsys.readouterr().err
    assert _cli("dpo", "--data", root / "pairs" / "train.jsonl", "--output-dir", root / "bad3", "--seq-len", 4096,
                *base) == 2
    assert "longer than the model's context" in capsys.readouterr().err


def test_train_reward_cli_end_to_end(pair_setup, capsys):
    root = pair_setup
    out = root / "rm"
    assert _cli("train-reward", "--data", root / "pairs" / "train.jsonl", "--val-data", root / "pairs" / "eval.jsonl",
                "--model-dir", root / "base", "--output-dir", out, "--max-steps", 3, "--batch-size", 8, "--lr", 1e-3,
                "--eval-every", 3, *RUN) == 0
    assert "held-out preference accuracy" in capsys.readouterr().out
    assert (out / pref.HEAD_WEIGHTS).is_file() and (out / pref.HEAD_CONFIG).is_file()
    rm = pref.load_reward_model(out)
    record = json.loads((root / "pairs" / "eval.jsonl").read_text().splitlines()[0])
    a, b = rm.score_pairs([record["prompt"]] * 2, [record["chosen"], record["rejected"]])
    assert a != b and all(map(lambda x: x == x, (a, b)))  # finite, and the two answers are told apart
    assert _cli("eval-preference", "--model", out, "--data", root / "pairs" / "eval.jsonl", "--json") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["pairs"] == 10 and 0 <= res["accuracy"] <= 1
    stats = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval_stats"' in l]
    assert res["accuracy"] == pytest.approx(stats[-1]["accuracy"], abs=0.2)  # the saved head is the trained one


def test_dpo_cli_with_lora(pair_setup, capsys):
    """LoRA: the reference is the model with its adapters off (no copy), the output the merged model."""
    root = pair_setup
    out = root / "dpo-lora"
    assert _cli("dpo", "--data", root / "pairs" / "train.jsonl", "--val-data", root / "pairs" / "eval.jsonl",
                "--model-dir", root / "base", "--output-dir", out, "--lora-rank", 4, "--max-steps", 3,
                "--batch-size", 8, "--lr", 1e-2, "--eval-every", 3, *RUN) == 0
    assert "(merged; adapters beside it)" in capsys.readouterr().out
    stats = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval_stats"' in l]
    assert stats[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: policy = reference
    assert stats[-1]["rewards/margins"] != 0  # and they did train
    assert (out / "adapter_model.safetensors").is_file()
    assert _cli("eval-preference", "--model", out, "--data", root / "pairs" / "eval.jsonl",
                "--reference", root / "base", "--json") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["reward_accuracy"] == pytest.approx(stats[-1]["rewards/accuracies"], abs=0.2)
