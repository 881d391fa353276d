"""RL with verifiable rewards: GRPO's loss against TRL's own code, advantages, k3 KL, GAE and the
adaptive KL controller against hand computations, verifiers, tasks, and tiny end-to-end runs of
`velocis train-grpo`, `velocis ppo` and `velocis eval-task`."""
from __future__ import annotations

import json
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from velocis.align import rl, tasks, verifiers
from velocis.errors import VelocisError


# --- GRPO loss against TRL's GRPOTrainer._compute_loss -------------------------------------------------
@pytest.fixture(scope="module")
def trl_trainer_cls():
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer


class _Accelerator:  # one process: gather / reduce are the identity
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def gather_for_metrics(self, x):
        return x


def _trl_loss(cls, logps, old, ref, adv, mask, *, loss_type, beta, eps_low, eps_high, bias_correction, delta,
              max_len, num_items, grad_accum):
    """TRL's _compute_loss on a trainer built without __init__: only what the loss reads is set, and
    the model's per-token log-probs are the given tensor (so both sides start from the same numbers)."""
    tr = object.__new__(cls)
    tr.accelerator = _Accelerator()
    tr.args = types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta, steps_per_generation=grad_accum)
    tr.beta, tr.epsilon_low, tr.epsilon_high, tr.loss_type = beta, eps_low, eps_high, loss_type
    tr.importance_sampling_level, tr.top_entropy_quantile, tr.off_policy_mask_threshold = "token", 1.0, None
    tr.use_vllm = tr.vllm_importance_sampling_correction = False
    tr._entropy_bonus_enabled = tr.aux_loss_enabled = False
    tr.model = torch.nn.Linear(1, 1)  # .training: train mode
    tr.current_gradient_accumulation_steps = grad_accum
    tr.max_completion_length = max_len
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    B, C = logps.shape
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros(B, C), None)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": num_items}
    return tr._compute_loss(None, inputs), tr._metrics["train"]


CASES = [(lt, beta, eps_high, bc) for lt in rl.LOSS_TYPES for beta in (0.0, 0.04) for eps_high in (0.2, 0.28)
         for bc in (True, False) if not (beta == 0.0 and not bc)]


@pytest.mark.parametrize("loss_type,beta,eps_high,bias_correction", CASES)
def test_grpo_loss_matches_trl(trl_trainer_cls, loss_type, beta, eps_high, bias_correction):
    g = torch.Generator().manual_seed(hash((loss_type, beta, eps_high)) % 1000)
    B, C = 6, 7
    base = torch.randn(B, C, generator=g, dtype=torch.float64) * 0.5 - 1.5
    old = base + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.3  # ratios well outside the clip range
    ref = base + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, C, generator=g) > 0.25).double()
    mask[0] = 0
    mask[0, :2] = 1  # a short completion beside long ones
    num_items = mask.sum() * 2  # "dapo": the step's tokens, here two micro-batches' worth
    for grad_accum in (1, 2):
        kw = dict(loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=eps_high, bias_correction=bias_correction,
                  delta=None, max_len=C + 3, num_items=num_items, grad_accum=grad_accum)
        lp_trl = base.clone().requires_grad_(True)
        want, metrics = _trl_loss(trl_trainer_cls, lp_trl, old, ref, adv, mask, **kw)
        want.backward()
        lp = base.clone().requires_grad_(True)
        got, stats = rl.grpo_loss(lp, old, ref, adv, mask, loss_type=loss_type, beta=beta, epsilon_low=0.2,
                                  epsilon_high=eps_high, kl_bias_correction=bias_correction, max_completion_length=C + 3,
                                  num_items=num_items, grad_accum=grad_accum)
        got.backward()
        assert abs(float(got) - float(want)) < 1e-6, (loss_type, grad_accum)
        torch.testing.assert_close(lp.grad, lp_trl.grad, atol=1e-8, rtol=1e-6)
        assert float(stats["clip_fraction"]) == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=1e-6)
        if beta:
            assert float(stats["kl"]) == pytest.approx(metrics["kl"][-1], abs=1e-6)
    assert float(stats["clip_fraction"]) > 0  # the inputs do exercise the clipping


def test_grpo_loss_two_sided_delta_matches_trl(trl_trainer_cls):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 5, generator=g, dtype=torch.float64) - 1
    old = base - 0.8 * torch.rand(4, 5, generator=g, dtype=torch.float64)  # ratios up to e^0.8 > delta
    adv = torch.tensor([-1.0, 0.5, -0.3, 2.0], dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.float64)
    want, _ = _trl_loss(trl_trainer_cls, base, old, None, adv, mask, loss_type="bnpo", beta=0.0, eps_low=0.2,
                        eps_high=0.2, bias_correction=True, delta=1.5, max_len=5, num_items=mask.sum(), grad_accum=1)
    got, _ = rl.grpo_loss(base, old, None, adv, mask, loss_type="bnpo", beta=0.0, delta=1.5)
    assert abs(float(got) - float(want)) < 1e-6


def test_grpo_on_policy_gradient_is_the_policy_gradient():
    """On-policy (old = logp): the clipped surrogate's gradient is -A / tokens per sampled token."""
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 2)
    loss, _ = rl.grpo_loss(lp, None, None, adv, mask, loss_type="bnpo", beta=0.0)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv[:, None].expand(2, 2) / 4)


def test_k3_kl_estimator():
    # by hand: r = ref - logp; exp(r) - r - 1
    assert float(rl.k3_kl(torch.tensor(-1.0), torch.tensor(-1.0))) == 0.0
    assert float(rl.k3_kl(torch.tensor(0.0), torch.tensor(math.log(2)))) == pytest.approx(2 - math.log(2) - 1)
    assert float(rl.k3_kl(torch.tensor(-0.3), torch.tensor(-2.0))) == pytest.approx(math.exp(-1.7) + 1.7 - 1)
    # unbiased: the mean over samples of the policy is KL(policy || reference)
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = rl.k3_kl(p.log()[x], q.log()[x]).mean()
    assert float(estimate) == pytest.approx(float((p * (p / q).log()).sum()), abs=5e-3)


# --- advantages ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_as_trl(scale):
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0])
    G = 4
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    std = (nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if scale != "batch"
           else nanstd(rewards).expand_as(rewards))
    want = rewards - mean if scale == "none" else (rewards - mean) / (std + 1e-4)
    adv, got_std = rl.group_advantages(rewards, G, scale)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(got_std, std)
    assert torch.all(adv[4:8] == 0)  # an all-equal group carries no signal
    assert rl.equal_groups(rewards, G).tolist() == [False, True, False]


class _StubObjective:
    """Rollouts with scripted rewards, to test the loader without a model."""

    def __init__(self, scripted, G, max_resample=3, iterations=1):
        self.scripted = list(scripted)  # per rollout draw: the rewards of its rows
        self.config = types.SimpleNamespace(num_generations=G, skip_equal_groups=True, max_resample=max_resample,
                                            num_iterations=iterations)
        self.device = torch.device("cpu")

    def rollout(self, examples, prompt_ids, index, positions=None):
        rewards = torch.tensor(self.scripted[index - 1], dtype=torch.float32)
        G = self.config.num_generations
        adv, _ = rl.group_advantages(rewards, G)
        rows = [p for p in prompt_ids for _ in range(G)]
        return {"rows": rows, "completions": [[index, i] for i in range(len(rows))], "rewards": rewards,
                "advantages": adv, "equal": rl.equal_groups(rewards, G), "stats": {"reward_mean": float(rewards.mean())}}

    def finish(self, parts):
        ids, targets = rl.build_rows(parts["rows"], parts["completions"], 0, "cpu")
        return {"input_ids": ids, "targets": targets, "advantages": parts["advantages"]}


def test_skip_equal_groups_resamples_and_counts():
    examples = [{"prompt": f"p{i}", "answer": "1"} for i in range(8)]
    ids = [[7, i] for i in range(8)]
    # draw 1: groups (equal, mixed); draw 2: (equal, equal); draw 3: (mixed, mixed) -> two mixed groups kept
    obj = _StubObjective([[1, 1, 0, 1], [0, 0, 1, 1], [1, 0, 0, 1]], G=2)
    loader = rl.RolloutLoader(obj, examples, ids, prompts_per_rollout=2, grad_accum=1, seed=0)
    batch = next(iter(loader))
    assert batch["stats"]["skipped_groups"] == 3 and batch["stats"]["rollout_draws"] == 3
    assert batch["input_ids"].shape[0] == 4  # two kept groups of G = 2
    assert torch.all(batch["advantages"] != 0)
    # nothing but equal groups within the resample limit: the first draw is trained on, and said so
    obj = _StubObjective([[1, 1, 0, 0], [1, 1, 1, 1]], G=2, max_resample=1)
    batch = next(iter(rl.RolloutLoader(obj, examples, ids, 2, seed=0)))
    assert batch["stats"]["skipped_groups"] == 4 and batch["input_ids"].shape[0] == 4
    assert torch.all(batch["advantages"] == 0)


def test_loader_serves_each_rollout_num_iterations_times_and_resumes():
    examples = [{"prompt": f"p{i}", "answer": "1"} for i in range(8)]
    ids = [[7, i] for i in range(8)]
    scripted = [[1, 0, 0, 1, 1, 0, 0, 1]] * 6
    obj = _StubObjective(scripted, G=2, iterations=2)
    loader = rl.RolloutLoader(obj, examples, ids, prompts_per_rollout=4, grad_accum=2, seed=0)
    it = iter(loader)
    served = [next(it) for _ in range(4)]  # rollout 1: 2 micro-batches, twice over
    assert served[0] is served[2] and served[1] is served[3] and served[0] is not served[1]
    assert loader.rollouts == 1
    state = loader.state_dict()
    nxt = next(it)  # rollout 2 starts
    assert loader.rollouts == 2 and torch.equal(nxt["input_ids"][:, -1], torch.arange(4))
    again = rl.RolloutLoader(_StubObjective(scripted, G=2, iterations=2), examples, ids, 4, 2, seed=0)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))["input_ids"], nxt["input_ids"])


def test_build_rows_scores_exactly_the_completion_tokens():
    from velocis.config import ModelConfig
    from velocis.models import VelocisModel

    ids, targets = rl.build_rows([[5, 6, 7], [5]], [[8, 9], [10, 11, 12]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 10, 11, 12, 0]]
    assert targets.tolist() == [[-100, -100, 8, 9, -100], [10, 11, 12, -100, -100]]
    torch.manual_seed(0)
    model = VelocisModel(ModelConfig(vocab_size=16, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                                     max_seq_len=16))
    model.init_weights()
    lp, _ = rl.token_logps(model, ids, targets)
    want = torch.log_softmax(model(ids).float(), -1)
    for b in range(2):
        for t in range(5):
            if targets[b, t] != -100:
                assert float(lp[b, t]) == pytest.approx(float(want[b, t, targets[b, t]]), abs=1e-5)
            else:
                assert float(lp[b, t]) == 0.0


# --- PPO pieces ----------------------------------------------------------------------------------------
def test_gae_matches_hand_computation():
    gamma, lam = 0.9, 0.8
    # row 0: prompt at t=0, completion tokens at t=1..3; row 1: completion at t=0..1, then padding
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    r = torch.tensor([[9.0, 0.1, -0.2, 1.0], [0.5, 2.0, 7.0, 7.0]], dtype=torch.float64)
    v = torch.tensor([[5.0, 0.3, 0.4, 0.6], [0.2, 0.1, 3.0, 3.0]], dtype=torch.float64)
    adv, ret = rl.gae(r, v, mask, gamma, lam)
    # row 0, by hand from the end (V after the last token is 0)
    d3 = 1.0 - 0.6
    d2 = -0.2 + gamma * 0.6 - 0.4
    d1 = 0.1 + gamma * 0.4 - 0.3
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    torch.testing.assert_close(adv[0], torch.tensor([0, a1, a2, a3], dtype=torch.float64))
    b1 = 2.0 - 0.1
    b0 = 0.5 + gamma * 0.1 - 0.2 + gamma * lam * b1
    torch.testing.assert_close(adv[1], torch.tensor([b0, b1, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(ret, (adv + v) * mask)


def test_adaptive_kl_controller_and_whitening():
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(9.0, 100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ctl.update(5.4, 50)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 50 / 1000))
    fixed = rl.AdaptiveKLController(0.1, target=None, horizon=1000)
    fixed.update(100.0, 100)
    assert fixed.value == 0.1
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = rl.masked_whiten(x, m)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


def test_ppo_loss_clips_policy_and_value():
    lp = torch.tensor([[0.0, math.log(2.0)]], requires_grad=True)  # ratios 1 and 2 against old = 0
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[0.0, 1.0]], requires_grad=True)
    old_values = torch.zeros(1, 2)
    returns = torch.tensor([[0.5, 2.0]])
    loss, stats = rl.ppo_loss(lp, old, values, old_values, adv, returns, torch.ones(1, 2), cliprange=0.2,
                              cliprange_value=0.2, vf_coef=0.5)
    # policy: max(-1*1, -1*1) = -1 and max(-2, -1.2) = -1.2 -> mean -1.1
    # value: token 0: 0.5*0.25; token 1: v=1 clipped to 0.2: max((1-2)^2, (0.2-2)^2) = 3.24 -> 0.5*3.24
    assert float(stats["policy_loss"]) == pytest.approx(-1.1)
    assert float(stats["value_loss"]) == pytest.approx((0.125 + 1.62) / 2)
    assert float(loss) == pytest.approx(-1.1 + 0.5 * (0.125 + 1.62) / 2)
    loss.backward()
    assert lp.grad[0, 1] == 0  # the clipped token gives no policy gradient
    assert float(stats["clip_fraction"]) == 0.5


# --- verifiers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("response,answer,score", [
    ("37 + 85 = 122.\nAnswer: 122", "122", 1.0),
    ("37 + 85 = 122。\n答案：122", "122", 1.0),
    ("答案：１２２", 122, 1.0),  # full-width digits
    ("The answer is 1,234", "1234", 1.0),
    ("23 - 58 = -35\nAnswer: −35", "-35", 1.0),  # the Unicode minus
    ("Answer: 121, not 122", "122", 0.0),  # the number after the marker counts, not the last one
    ("12 + 3 = 15 so 16", "15", 0.0),  # without a marker: the last number
    ("no number here", "3", 0.0),
    ("Answer: 2.50", "2.5", 1.0),
])
def test_exact_numeric(response, answer, score):
    assert verifiers.exact_numeric(response, answer) == score


def test_format_verifier():
    assert verifiers.format_reward("37 + 85 = 122.\nAnswer: 122") == 1.0
    assert verifiers.format_reward("37 + 85 = 122。\n答案：122\n") == 1.0
    assert verifiers.format_reward("答案: 122") == 1.0
    assert verifiers.format_reward("Answer: 122\nbut also more") == 0.0
    assert verifiers.format_reward("122") == 0.0
    assert verifiers.format_reward("Answer:") == 0.0


def test_countdown_verifier_parses_never_evaluates():
    ans = {"target": 24, "numbers": [3, 8, 2, 5]}
    assert verifiers.countdown("8 * 3 = 24.\nAnswer: 8 * 3", ans) == 1.0
    assert verifiers.countdown("答案：(5 - 2) × 8", ans) == 1.0
    assert verifiers.countdown("Answer: 8 * 3 * 1", ans) == 0.0  # 1 is not a given number
    assert verifiers.countdown("Answer: 8 + 8 + 8", ans) == 0.0  # 8 used three times
    assert verifiers.countdown("Answer: 5 * 5 - 1", ans) == 0.0
    assert verifiers.countdown("Answer: __import__('os').getcwd()", ans) == 0.0
    assert verifiers.countdown("Answer: 8 / (2 - 2)", ans) == 0.0
    assert verifiers.countdown("Answer: 2 ** 5", ans) == 0.0
    with pytest.raises(ValueError):
        verifiers.countdown("Answer: 24", "24")  # a malformed answer is the data's fault: raised, then counted


def test_unknown_and_custom_verifiers(tmp_path):
    with pytest.raises(VelocisError, match="unknown verifier 'exact'"):
        verifiers.get_verifier("exact")
    with pytest.raises(VelocisError, match="cannot import module"):
        verifiers.get_verifier("no_such_module_xyz:f")
    f = tmp_path / "my_reward.py"
    f.write_text("def length(response, answer):\n    return len(response) / 10\n"
                 "def broken(response, answer):\n    raise KeyError('boom')\n"
                 "def wrong_type(response, answer):\n    return 'high'\n")
    with pytest.raises(VelocisError, match="has no function 'nope'"):
        verifiers.get_verifier(f"{f}:nope")
    assert verifiers.get_verifier(f"{f}:length")("abcde", None) == 0.5
    assert verifiers.get_verifier("velocis.align.verifiers:format_reward")("Answer: 1", None) == 1.0
    rewards = verifiers.Rewards(["exact_numeric", f"{f}:broken", f"{f}:wrong_type"], weights=[1.0, 1.0, 1.0])
    scores = rewards(["Answer: 4", "Answer: 5"], ["4", "4"])
    assert scores == [1.0, 0.0]  # the failing verifiers score 0, the others still count
    assert rewards.errors[f"{f}:broken"] == 2 and rewards.errors[f"{f}:wrong_type"] == 2
    report = rewards.report()
    assert "failed on 2 of 2 responses" in report and "KeyError" in report and "'high'" in report
    with pytest.raises(VelocisError, match="one finite number per verifier"):
        verifiers.Rewards(["exact_numeric", "format"], weights=[1.0])


# --- tasks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_tasks_deterministic_disjoint_and_self_consistent(name):
    task = tasks.make_task(name, difficulty=2)
    train, held_out = tasks.generate(task, 400, 60, seed=5)
    train2, held_out2 = tasks.generate(tasks.make_task(name, difficulty=2), 400, 60, seed=5)
    assert [p.record() for p in train] == [p.record() for p in train2]
    assert [p.record() for p in held_out] == [p.record() for p in held_out2]
    assert [p.record() for p in tasks.generate(task, 400, 60, seed=6)[0]] != [p.record() for p in train]
    assert not {p.key for p in train} & {p.key for p in held_out}
    assert len({p.key for p in held_out}) == 60
    assert {p.lang for p in train} == {"en", "zh"}
    assert any("？" in p.prompt or "。" in p.prompt for p in train if p.lang == "zh")
    check = verifiers.get_verifier(task.verifier)
    for p in train[:100] + held_out:  # every worked answer is right and in the format
        assert check(p.response, p.answer) == 1.0, p
        assert verifiers.format_reward(p.response) == 1.0


def test_arithmetic_difficulty_and_worked_multiplication():
    assert tasks._multiply_steps(37, 85) == "37 × 85 = 37 × 80 + 37 × 5 = 2960 + 185 = 3145"
    easy = tasks.make_task("arithmetic", difficulty=1)
    train, _ = tasks.generate(easy, 300, 10, seed=0)
    assert all(p.key[1] == "+" and p.key[0] < 100 and p.key[2] < 100 for p in train)
    with pytest.raises(VelocisError, match="difficulty"):
        tasks.make_task("arithmetic", difficulty=9)
    with pytest.raises(VelocisError, match="unknown task"):
        tasks.make_task("chess")
    with pytest.raises(VelocisError, match="too many held-out"):
        tasks.generate(tasks.make_task("countdown", difficulty=1), 10, 10**9, 0)


def test_write_task_and_read_examples(tmp_path):
    out = tasks.write_task("arithmetic", tmp_path / "t", n_train=50, n_eval=10, seed=1, lang="zh")
    rows = [json.loads(l) for l in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 50 and set(rows[0]) == {"prompt", "answer"}
    sft = json.loads((out / "sft.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert [m["role"] for m in sft["messages"]] == ["user", "assistant"]
    assert sft["messages"][1]["content"].splitlines()[-1].startswith("答案：")
    assert json.loads((out / "task.json").read_text())["verifier"] == "exact_numeric"
    assert tasks.read_examples(out / "eval.jsonl")[0] == json.loads((out / "eval.jsonl").read_text().splitlines()[0])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(VelocisError, match="holds other files"):
        tasks.write_task("arithmetic", tmp_path / "other", n_train=5, n_eval=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "answer": "1"}\n{"question": "x"}\n')
    with pytest.raises(VelocisError, match="line 2"):
        tasks.read_examples(bad)


# --- end to end: tiny model, the CLI --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A task dir, and a tiny random model whose tokenizer was trained on the task's text."""
    from velocis.config import ModelConfig
    from velocis.model_io import save_model
    from velocis.models import VelocisModel
    from velocis.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("rl")
    task = tasks.write_task("arithmetic", root / "task", n_train=200, n_eval=20, seed=0)
    tok = Tokenizer.train([str(task / "pretrain_en.txt"), str(task / "pretrain_zh.txt")], vocab_size=300,
                          progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=96,
                      eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                      prompt_start_token_id=tok.eos_id)
    model = VelocisModel(cfg)
    model.init_weights()
    save_model(model, tok, root / "base")
    # a reward a random model earns unevenly, so its first steps have a signal to follow
    (root / "shaped.py").write_text("def length(response, answer):\n    return len(response) / 10\n")
    return root, task


def _cli(*argv) -> int:
    from velocis.cli import main

    return main([str(a) for a in argv])


RUN = ["--max-completion-length", 8, "--monitor", "none", "--threads", 1, "--device", "cpu", "--no-plot"]


def test_train_grpo_and_eval_task_cli(tiny_setup, capsys, one_thread):
    root, task = tiny_setup
    out = root / "grpo"
    verifier = f"exact_numeric,format,{root / 'shaped.py'}:length"
    assert _cli("train-grpo", "--data", task / "train.jsonl", "--model-dir", root / "base", "--output-dir", out,
                "--verifier", verifier, "--num-generations", 4, "--batch-size", 8, "--grad-accum", 2,
                "--max-steps", 3, "--num-iterations", 2, "--beta", 0.04, "--epsilon-high", 0.28, "--lr", 1e-3,
                "--temperature", 1.5, "--eval-every", 2, "--eval-n", 6, "--save-every", 2, *RUN) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert len(train) == 3 and [e["step"] for e in evals] == [0, 2, 3]
    for key in ("reward_mean", "reward_std", "kl", "clip_fraction", "entropy", "completion_length",
                "reward/exact_numeric", "reward/format", "verifier_errors"):
        assert key in train[-1], key
    assert train[-1]["entropy"] > 0 and 0 <= evals[-1]["heldout_accuracy"] <= 1
    # on the second pass over a rollout the policy has moved: the KL to the reference is no longer 0
    assert train[1]["kl"] > 0
    # the run dir is a model dir, with the chat template
    import velocis

    model, tok = velocis.load(out, device="cpu")
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert _cli("eval-task", "--model", out, "--task", "arithmetic", "--n", 5, "--max-completion-length", 8,
                "--json", "--device", "cpu") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 5 and 0 <= res["accuracy"] <= 1 and res["verifier"] == "exact_numeric"
    # resume continues from the step-2 checkpoint to step 4
    assert _cli("train-grpo", "--data", task / "train.jsonl", "--model-dir", root / "base", "--output-dir", out,
                "--verifier", verifier, "--num-generations", 4, "--batch-size", 8, "--grad-accum", 2,
                "--max-steps", 4, "--num-iterations", 2, "--beta", 0.04, "--epsilon-high", 0.28, "--lr", 1e-3,
                "--temperature", 1.5, "--eval-every", 2, "--eval-n", 6, "--save-every", 2, "--resume", *RUN) == 0
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["type"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_ppo_cli_and_bad_input(tiny_setup, capsys, one_thread):
    root, task = tiny_setup
    out = root / "ppo"
    assert _cli("ppo", "--task", "arithmetic", "--n-train", 50, "--n-eval", 4, "--model-dir", root / "base",
                "--output-dir", out, "--num-generations", 2, "--batch-size", 4, "--max-steps", 2, "--num-iterations", 2,
                "--lr", 1e-3, "--eval-every", 10, *RUN) == 0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    for key in ("policy_loss", "value_loss", "kl", "kl_coef", "clip_fraction", "entropy", "reward_mean"):
        assert key in recs[-1], key
    state = json.loads((out / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert "value_head" in state["objective_state"]
    capsys.readouterr()
    # an unknown verifier, a prompt longer than the context: one clear line each, exit status 2
    assert _cli("train-grpo", "--data", task / "train.jsonl", "--model-dir", root / "base", "--output-dir",
                root / "x1", "--verifier", "exact_numerc", *RUN) == 2
    assert "unknown verifier 'exact_numerc'" in capsys.readouterr().err
    long = root / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1 + 1 " * 60, "answer": "2"}) + "\n")
    assert _cli("train-grpo", "--data", long, "--model-dir", root / "base", "--output-dir", root / "x2", *RUN) == 2
    err = capsys.readouterr().err
    assert "example 1: the prompt is" in err and "context (96)" in err
    assert _cli("train-grpo", "--data", task / "train.jsonl", "--model-dir", root / "base", "--output-dir",
                root / "x3", "--num-generations", 3, "--batch-size", 8, *RUN) == 2
    assert "multiple of --num-generations 3" in capsys.readouterr().err


def test_grpo_with_a_reward_model_and_lora(tiny_setup, one_thread):
    """--reward-model scores with a trained reward model (velocis train-reward's layout); --lora-rank
    trains adapters only and the run dir is the merged model, the adapters beside it."""
    import shutil

    from velocis.align.preference import save_reward_head

    root, task = tiny_setup
    rm = root / "rm"
    shutil.copytree(root / "base", rm)
    torch.manual_seed(1)
    save_reward_head(torch.nn.Linear(32, 1, bias=False), rm)
    out = root / "grpo-rm-lora"
    assert _cli("train-grpo", "--data", task / "train.jsonl", "--model-dir", root / "base", "--output-dir", out,
                "--reward-model", rm, "--num-generations", 4, "--batch-size", 8, "--max-steps", 2, "--lr", 1e-2,
                "--lora-rank", 2, "--eval-n", 4, "--eval-every", 10, *RUN) == 0
    rec = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l][-1]
    assert rec["reward_std"] > 0  # the reward model's scores vary from completion to completion
    assert (out / "adapter_model.safetensors").is_file()
    import velocis

    base, _ = velocis.load(root / "base", device="cpu")
    merged, _ = velocis.load(out, device="cpu")
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted projections moved


def test_grpo_trainer_raises_a_learnable_reward(tiny_setup, one_thread):
    """The whole train-grpo path (sampling, rows, advantages, loss, optimizer) moves the policy towards
    what is rewarded: a random tiny model, rewarded for the share of digits in its completion, earns
    clearly more of it after a few steps than at the start."""
    root, task = tiny_setup
    (root / "digits.py").write_text("def digits(response, answer):\n"
                                    "    return sum(c.isdigit() for c in response) / max(1, len(response))\n")
    out = root / "grpo-digits"
    assert _cli("train-grpo", "--data", task / "train.jsonl", "--model-dir", root / "base", "--output-dir", out,
                "--verifier", f"{root / 'digits.py'}:digits", "--num-generations", 8, "--batch-size", 64,
                "--max-steps", 30, "--lr", 3e-3, "--beta", 0.0, "--eval-n", 0, "--eval-every", 100,
                "--save-every", 100, *RUN) == 0
    rewards = [json.loads(l)["reward_mean"] for l in (out / "metrics.jsonl").read_text().splitlines()
               if '"train"' in l]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > 2 * first and last > first + 0.05, (first, last)  # measured: 0.030 -> 0.120
