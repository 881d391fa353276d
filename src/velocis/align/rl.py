"""RL with verifiable rewards: GRPO and PPO as objectives of the one training loop.

    objective = GRPOObjective(GRPOConfig(num_generations=8, beta=0.04), Rewards(["exact_numeric"]), ...)
    data = TrainData(tokenizer, RolloutLoader(objective, examples, ...))
    RLTrainer(train_config, model_config, objective=objective, data=data, eval_examples=held_out).run()

A rollout batch is sampled from the current policy (the objective holds it from `setup`): G
completions per prompt (infer/generate.py's batched sampler, or the engine), scored by the
verifiers (align/verifiers.py) or a reward model. The loader serves it as `grad_accum`
micro-batches, `num_iterations` times over (several optimisation passes with the rollout's
log-probabilities fixed as the "old" policy), then samples the next one. Each micro-batch is a
dict of tensors over whole rows (prompt + completion, right-padded): `targets` holds the
completion tokens at the positions that predict them (-100 elsewhere), so the model's per-token
NLL (`forward(..., reduction="none")`) is minus the log-probability of each sampled token.

GRPO (`grpo_loss`) is TRL's GRPOTrainer._compute_loss (trl 1.16, token-level importance sampling):
ratio exp(logp - old), clipped to [1 - epsilon, 1 + epsilon_high] (asymmetric clip-higher), minus
the smaller of ratio*A and clip(ratio)*A, plus beta times the k3 estimate of KL to the frozen
reference, exp(ref - logp) - (ref - logp) - 1 (times the ratio with `kl_bias_correction`, TRL's
use_bias_correction_kl). Advantages are normalised within each group of G (TRL's scale_rewards:
"group", "batch", or "none" as in Dr. GRPO). loss_type, with TRL's names: "grpo" averages each
sequence's tokens then the sequences, "bnpo" averages the micro-batch's tokens, "dapo" the
step's tokens, "dr_grpo" divides by (sequences x max_completion_length).

PPO (`PPOObjective`): a value head (nn.Linear(hidden, 1) on the trunk's normed hidden state, an
extra trainable module), per-token rewards = -kl_coef x (logp_old - logp_ref) plus the score on
the last completion token, GAE (gamma, lambda), whitened advantages, clipped policy and value
losses, and Ziegler et al.'s adaptive KL coefficient (target KL, horizon).

`RLTrainer` is the Trainer with the evaluation swapped for held-out accuracy (greedy, the task's
verifier) every eval interval, the best model by it in RUN/best/, and the objective's own state
(value head, KL coefficient) in checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from velocis.errors import VelocisError
from velocis.train import distributed
from velocis.train.objectives import IGNORE_INDEX, Objective
from velocis.utils.fields import check_field_types

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
SAMPLERS = ("generate", "engine")


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class RolloutConfig:
    """What both algorithms share: sampling, rollout batches, held-out evaluation."""
    num_generations: int = _f(8, "completions sampled per prompt (G)")
    max_completion_length: int = _f(64, "most tokens per completion")
    temperature: float = _f(1.0, "sampling temperature of the rollouts")
    top_p: float = _f(1.0, "nucleus sampling of the rollouts (1 = off)")
    num_iterations: int = _f(1, "optimisation passes over each rollout batch (old log-probs fixed)")
    sampler: str = _f("generate", "rollouts from the batched sampler (infer/generate.py) or the engine",
                      choices=list(SAMPLERS))
    eval_n: int = _f(200, "held-out prompts scored (greedy) at each evaluation; 0 = none")
    eval_batch_size: int = _f(64, "prompts per greedy generation batch in evaluations")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_field_types(self, type(self).__name__)

        def bad(msg):
            raise VelocisError(msg)

        for name in ("num_generations", "max_completion_length", "num_iterations", "eval_batch_size"):
            if getattr(self, name) < 1:
                bad(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {getattr(self, name)}")
        if self.eval_n < 0:
            bad(f"eval_n (--eval-n) must be >= 0, got {self.eval_n}")
        if not self.temperature > 0:
            bad(f"temperature (--temperature) must be > 0 for rollouts (RL needs varied samples), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p (--top-p) must be in (0, 1], got {self.top_p}")
        if self.sampler not in SAMPLERS:
            bad(f"sampler (--sampler) {self.sampler!r} must be one of {', '.join(SAMPLERS)}")


@dataclass
class GRPOConfig(RolloutConfig):
    beta: float = _f(0.04, "weight of the k3 KL to the reference model (0 = no reference model)")
    epsilon: float = _f(0.2, "lower clip of the ratio: 1 - epsilon")
    epsilon_high: float | None = _f(None, "upper clip: 1 + epsilon_high (default epsilon; DAPO's clip-higher "
                                    "uses 0.28)")
    delta: float | None = _f(None, "two-sided clipping: cap the unclipped ratio at delta (INTELLECT-2)")
    loss_type: str = _f("dapo", "token normalisation, TRL's names: grpo (per sequence), bnpo (micro-batch "
                        "tokens), dapo (step tokens), dr_grpo (sequences x max completion length)",
                        choices=list(LOSS_TYPES))
    scale_rewards: str = _f("group", "divide advantages by the group's reward std (group), the batch's "
                            "(batch), or not at all (none: Dr. GRPO)", choices=list(SCALE_REWARDS))
    kl_bias_correction: bool = _f(True, "multiply the KL term by the ratio (TRL's use_bias_correction_kl)")
    skip_equal_groups: bool = _f(False, "drop groups whose rewards are all equal (no signal) and sample "
                                 "more prompts in their place (DAPO's dynamic sampling)")
    max_resample: int = _f(3, "with --skip-equal-groups: extra prompt batches drawn at most per rollout")

    def validate(self) -> None:
        super().validate()
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.beta < 0 or self.epsilon < 0 or self.epsilon_high < 0:
            raise VelocisError(f"beta, epsilon and epsilon_high (--beta, --epsilon, --epsilon-high) must be >= 0, got "
                               f"{self.beta}, {self.epsilon}, {self.epsilon_high}")
        if self.delta is not None and self.delta <= 1 + self.epsilon_high:
            raise VelocisError(f"delta (--delta) {self.delta} must be > 1 + epsilon_high ({1 + self.epsilon_high})")
        if self.loss_type not in LOSS_TYPES:
            raise VelocisError(f"loss_type (--loss-type) {self.loss_type!r} must be one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise VelocisError(f"scale_rewards (--scale-rewards) {self.scale_rewards!r} must be one of "
                               f"{', '.join(SCALE_REWARDS)}")
        if self.max_resample < 0:
            raise VelocisError(f"max_resample (--max-resample) must be >= 0, got {self.max_resample}")

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0


@dataclass
class PPOConfig(RolloutConfig):
    num_generations: int = _f(1, "completions sampled per prompt")
    num_iterations: int = _f(4, "PPO epochs over each rollout batch")
    epsilon: float = _f(0.2, "policy ratio clip (PPO's cliprange)")
    cliprange_value: float = _f(0.2, "value clip around the rollout's values")
    vf_coef: float = _f(0.1, "weight of the value loss")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    kl_coef: float = _f(0.05, "initial weight of the per-token KL penalty in the reward")
    kl_estimator: str = _f("k1", "per-token KL in the reward: k1 (logp - ref) or k3", choices=["k1", "k3"])
    target_kl: float | None = _f(6.0, "adaptive KL control (Ziegler et al.): the target KL per sequence; "
                                 "None keeps kl_coef fixed")
    kl_horizon: int = _f(10000, "adaptive KL control: the horizon in samples")
    whiten_advantages: bool = _f(True, "whiten the advantages over each rollout batch")

    def validate(self) -> None:
        super().validate()
        for name in ("epsilon", "cliprange_value", "vf_coef", "kl_coef"):
            if getattr(self, name) < 0:
                raise VelocisError(f"{name} (--{name.replace('_', '-')}) must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise VelocisError(f"gamma and lam (--gamma, --lam) must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise VelocisError(f"target_kl (--target-kl) must be positive, got {self.target_kl}")
        if self.kl_horizon < 1:
            raise VelocisError(f"kl_horizon (--kl-horizon) must be positive, got {self.kl_horizon}")
        if self.kl_estimator not in ("k1", "k3"):
            raise VelocisError(f"kl_estimator (--kl-estimator) {self.kl_estimator!r} must be k1 or k3")

    needs_reference = True


# =============================================================================================
# Losses and estimators (pure functions of tensors: what the tests hold to TRL and to hand math)
# =============================================================================================
def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per sampled token: exp(r) - r - 1,
    r = ref - logp; non-negative, unbiased, low variance."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     batch_rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, std) per completion, as TRL computes them: reward minus its group's mean,
    divided by (std + 1e-4) where std is the group's ("group") or the batch's ("batch") sample
    standard deviation, or not divided ("none"). `rewards` is [groups * group_size], grouped;
    `batch_rewards`: the batch the "batch" std is taken over, when larger (every rank's rollout)."""
    if rewards.numel() % group_size:
        raise VelocisError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)
    if scale_rewards in ("group", "none"):
        std = grouped.std(1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        batch = rewards if batch_rewards is None else batch_rewards.float()
        std = batch.std().expand_as(rewards) if batch.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise VelocisError(f"scale_rewards {scale_rewards!r} must be one of {', '.join(SCALE_REWARDS)}")
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return adv, std


def equal_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] True where every reward of the group is the same (no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "dapo", beta: float = 0.04,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: float | None = None,
              kl_bias_correction: bool = True, max_completion_length: int | None = None,
              num_items: torch.Tensor | float | None = None, grad_accum: int = 1
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one micro-batch and its stats, TRL's formula.

    logps / old_logps / ref_logps / mask: [B, T] over the sampled tokens (mask 1 where a completion
    token is scored); advantages [B] (or [B, T]); old_logps None = on-policy (logps detached).
    num_items: the completion tokens of the whole optimizer step (loss_type "dapo"); grad_accum:
    micro-batches per step (the other loss types average each micro-batch, then divide by it)."""
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = logps.detach() if old_logps is None else old_logps
    coef_1 = torch.exp(logps - old)
    if beta != 0.0:
        if ref_logps is None:
            raise VelocisError("beta != 0 needs the reference model's log-probabilities")
        per_token_kl = k3_kl(logps, ref_logps)
        if kl_bias_correction:
            per_token_kl = per_token_kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / grad_accum
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise VelocisError("loss_type dr_grpo needs max_completion_length")
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / grad_accum
    elif loss_type == "dapo":
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype, device=mask.device)
        loss = (per_token_loss * mask).sum() / n.clamp(min=1.0)
    else:
        raise VelocisError(f"loss_type {loss_type!r} must be one of {', '.join(LOSS_TYPES)}")
    with torch.no_grad():
        low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
        high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
        stats = {"clip_low": _masked_mean(low.float(), mask), "clip_high": _masked_mean(high.float(), mask),
                 "clip_fraction": _masked_mean((low | high).float(), mask)}
        if beta != 0.0:
            stats["kl"] = _masked_mean(per_token_kl, mask)
    return loss, stats


# --- PPO ---------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion tokens (mask 1, contiguous):
    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0), A_t = delta_t + gamma *
    lam * A_{t+1}. Returns (advantages, returns = advantages + values), 0 outside the mask."""
    mask = mask.to(values.dtype)
    T = values.shape[1]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        nxt = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[:, t + 1] * nxt if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * nxt
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL's masked_whiten)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n
    if n > 1:
        var = var * n / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the observed KL tracks a target.
    error = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + error * n_samples / horizon."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, cliprange: float = 0.2,
             cliprange_value: float = 0.2, vf_coef: float = 0.1, num_items: torch.Tensor | float | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + vf_coef x clipped value loss (0.5 x the larger squared error), summed
    over the masked tokens and divided by num_items (the step's tokens; default this micro-batch's)."""
    mask = mask.to(logps.dtype)
    n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype, device=mask.device)
    n = n.clamp(min=1.0)
    ratio = torch.exp(logps - old_logps)
    pg = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    pg_loss = (pg * mask).sum() / n
    vf_loss = (vf * mask).sum() / n
    with torch.no_grad():
        stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                 "clip_fraction": _masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
                 "value_clip_fraction": _masked_mean(((values - old_values).abs() > cliprange_value).float(), mask)}
    return pg_loss + vf_coef * vf_loss, stats


# =============================================================================================
# Rollouts
# =============================================================================================
def token_logps(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, return_hidden: bool = False):
    """(log-probability of each target token [B, T] (0 where ignored), the model's output)."""
    out = model(input_ids, targets, reduction="none", ignore_index=IGNORE_INDEX, return_hidden=return_hidden)
    return -out.lm_loss, out


@torch.no_grad()
def token_entropy(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean entropy of the policy's next-token distribution over the masked positions."""
    h = hidden[mask.bool()]
    if h.shape[0] == 0:
        return torch.zeros((), device=hidden.device)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        logp = torch.log_softmax(model.lm_head(model.norm(h[i:i + chunk])).float(), dim=-1)
        total += -(logp.exp() * logp).sum()
    return total / h.shape[0]


def build_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [R, T] (prompt + completion, right-padded) and targets [R, T]: the completion
    tokens at the positions that predict them, IGNORE_INDEX elsewhere."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    targets = torch.full((len(prompts), T), IGNORE_INDEX, dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        row = list(p) + list(c)
        ids[r, :len(row)] = torch.tensor(row)
        targets[r, len(p) - 1:len(row) - 1] = torch.tensor(list(c))
    return ids.to(device), targets.to(device)


def sample_completions(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float,
                       top_p: float, stop_ids: set[int], generator: torch.Generator | None = None,
                       engine=None, seeds: Sequence[int] | None = None) -> list[list[int]]:
    """One completion per prompt row, ending with its stop token when it stopped (the stop token
    is what the policy chose there, so it is trained like any other). With the engine, each row
    samples from its own seed (`seeds`), whatever rows share its batch."""
    if engine is not None:
        from velocis.infer.sampling import SamplingParams

        (stop,) = stop_ids  # the engine drops the stop token from its output; we know which it was
        params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 stop_token_ids=[stop], ignore_eos=True, seed=None if seeds is None else seeds[i])
                  for i in range(len(prompts))]
        outs = engine.generate([list(p) for p in prompts], params)
        return [o["token_ids"] + ([stop] if o["finish_reason"] == "stop" else []) for o in outs]
    from velocis.infer.generate import generate_ids

    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in generate_ids(model, [list(p) for p in prompts], max_new_tokens, temperature,
                             None, top_p if top_p < 1 else None, generator, stop_ids=stop_ids):
        for i, t in enumerate(step.tolist()):
            if not done[i]:
                outs[i].append(t)
                done[i] = t in stop_ids
    return outs


class PromptEncoder:
    """Prompts (strings or message lists) as token ids through the model's chat template, starting
    the way the model's training documents do (its prompt-start token)."""

    def __init__(self, tokenizer, template, start_id: int | None):
        self.tokenizer, self.template, self.start_id = tokenizer, template, start_id

    def text(self, prompt) -> str:
        from velocis.align.tasks import prompt_messages

        if self.template is None:
            if not isinstance(prompt, str):
                raise VelocisError("this model has no chat template, so prompts must be plain strings")
            return prompt
        return self.template.render(prompt_messages(prompt), add_generation_prompt=True)

    def __call__(self, prompt) -> list[int]:
        ids = self.tokenizer.encode(self.text(prompt))
        if self.start_id is not None and ids[:1] != [self.start_id]:
            ids = [self.start_id] + ids
        return ids

    def stop_ids(self, eos_id: int | None) -> set[int]:
        """What ends a completion: the template's end-of-turn token, else EOS."""
        stops = list(getattr(self.template, "stop_token_ids", []) or [])
        if stops:
            return {stops[0]}
        if eos_id is None:
            raise VelocisError("the model has neither an end-of-turn nor an end-of-text token to stop completions")
        return {eos_id}


def encode_examples(examples: Sequence[dict], encoder: PromptEncoder, context: int, max_completion_length: int,
                    where: str) -> list[list[int]]:
    """Every prompt's ids; a prompt that leaves no room for the completion is an error naming it."""
    out = []
    for i, ex in enumerate(examples):
        ids = encoder(ex["prompt"])
        if len(ids) + max_completion_length > context:
            raise VelocisError(f"{where} example {i + 1}: the prompt is {len(ids)} tokens and with "
                               f"--max-completion-length {max_completion_length} needs more than the model's context "
                               f"({context}); shorten the prompt or lower --max-completion-length")
        out.append(ids)
    return out


class RewardModelScorer:
    """Rewards from a reward model: `score_fn(prompts, responses) -> a float per response`."""

    def __init__(self, score_fn, where: str):
        self.score_fn, self.where = score_fn, where
        self.names = [f"reward_model:{where}"]

    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        scores = [float(s) for s in self.score_fn(prompts, responses)]
        if len(scores) != len(responses) or not all(math.isfinite(s) for s in scores):
            raise VelocisError(f"the reward model {self.where} returned {len(scores)} scores for {len(responses)} "
                               f"responses, or a non-finite one")
        return scores

    def report(self) -> str:
        return ""


class RolloutObjective(Objective):
    """What GRPO and PPO share: the policy (from setup), the frozen reference, rollouts and scoring."""

    name = "rl"

    def __init__(self, config: RolloutConfig, rewards, encoder: PromptEncoder, *, reference_dir: str | Path | None,
                 accuracy_verifier: str, precision: str = "fp32", grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.config, self.rewards, self.encoder = config, rewards, encoder
        self.reference_dir = reference_dir
        from velocis.align.verifiers import get_verifier

        self.accuracy_name = accuracy_verifier
        self.accuracy_fn = get_verifier(accuracy_verifier)
        # the ranks' gradients are summed: a per-micro-batch mean divides by every rank's micro-batches
        self.precision, self.grad_accum, self.seed = precision, grad_accum * world_size, seed
        self.rank, self.world_size = rank, world_size
        self.model: nn.Module | None = None
        self.ref: nn.Module | None = None
        self.engine = None
        self.accuracy_errors = 0

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, model, device) -> None:
        self.model, self.device = model, device
        if self.config.needs_reference:
            if self.reference_dir is None:
                raise VelocisError("a KL penalty needs the reference model's directory (the --model-dir)")
            from velocis.model_io import load_model_dir

            ref, _ = load_model_dir(self.reference_dir, device=device)
            self.ref = ref.eval().requires_grad_(False)
        self.stop_ids = self.encoder.stop_ids(getattr(self.encoder.tokenizer, "eos_id", None))
        self.pad_id = next(iter(self.stop_ids))

    def _autocast(self):
        from velocis.utils.device import autocast_for

        return autocast_for(self.device, self.precision)

    # -- sampling and scoring -----------------------------------------------------------------------
    def sample(self, prompt_ids: list[list[int]], n: int, rollout_index: int,
               positions: Sequence[int] | None = None) -> list[list[int]]:
        """n completions of each prompt (rows grouped by prompt), from the current policy.
        `positions`: each prompt's place in the rollout over all ranks; the engine seeds every row
        from it, so a rollout split over ranks samples what one process would."""
        c = self.config
        rows = [p for p in prompt_ids for _ in range(n)]
        seed = (self.seed * 1_000_003 + rollout_index) % 2**62
        if positions is None:
            positions = range(len(prompt_ids))
        was_training = self.model.training
        try:
            if c.sampler == "engine":
                if self.engine is None or self.engine.max_num_seqs < len(rows):
                    from velocis.infer.engine import Engine

                    # no prefix caching: cached KV would outlive the weights that computed it
                    self.engine = Engine(self.model, None, max_num_seqs=len(rows), kv_cache_memory=0.2,
                                         prefix_caching=False, max_prefill_tokens=4096)
                self.model.eval()
                seeds = [seed + pos * n + g for pos in positions for g in range(n)]
                return sample_completions(self.model, rows, c.max_completion_length, temperature=c.temperature,
                                          top_p=c.top_p, stop_ids=self.stop_ids, engine=self.engine, seeds=seeds)
            gen = torch.Generator(device=self.device)
            gen.manual_seed((seed + 7919 * self.rank) % 2**62)  # one stream per rank (the batch shares it)
            return sample_completions(self.model, rows, c.max_completion_length, temperature=c.temperature,
                                      top_p=c.top_p, stop_ids=self.stop_ids, generator=gen)
        finally:
            self.model.train(was_training)

    def decode(self, completion: list[int]) -> str:
        ids = completion[:-1] if completion and completion[-1] in self.stop_ids else completion
        return self.encoder.tokenizer.decode(ids)

    def score(self, responses: list[str], answers: list, prompts: list | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
        """Rewards [R] and the per-verifier mean scores."""
        if isinstance(self.rewards, RewardModelScorer):
            total = self.rewards(prompts, responses)
            return torch.tensor(total, dtype=torch.float32, device=self.device), {}
        per = self.rewards.per_verifier(responses, answers)
        total = self.rewards.combine(per)
        stats = {f"reward/{n}": sum(s) / len(s) for n, s in zip(self.rewards.names, per)}
        stats["verifier_errors"] = float(self.rewards.total_errors)
        return torch.tensor(total, dtype=torch.float32, device=self.device), stats

    @torch.no_grad()
    def logps_of(self, model, input_ids, targets, return_hidden=False):
        with self._autocast():
            lp, out = token_logps(model, input_ids, targets, return_hidden)
        return lp.float(), out

    # -- held-out accuracy ----------------------------------------------------------------------------
    @torch.no_grad()
    def heldout_accuracy(self, examples: Sequence[dict], prompt_ids: Sequence[list[int]] | None = None
                         ) -> tuple[float, list[str]]:
        """Greedy completions of `examples`, scored by the accuracy verifier (1.0 = correct)."""
        acc, responses, errors = greedy_accuracy(self.model, self.encoder, examples, self.accuracy_fn,
                                                 self.config.max_completion_length, self.config.eval_batch_size,
                                                 self.stop_ids, prompt_ids)
        self.accuracy_errors += errors
        return acc, responses

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def rollout(self, examples: list[dict], prompt_ids: list[list[int]], rollout_index: int,
                positions: Sequence[int] | None = None) -> dict | None:
        raise NotImplementedError


def greedy_accuracy(model, encoder: PromptEncoder, examples: Sequence[dict], verifier, max_new_tokens: int,
                    batch_size: int, stop_ids: set[int], prompt_ids=None) -> tuple[float, list[str], int]:
    """(fraction of examples whose greedy completion the verifier scores >= 1, the completions, how
    often the verifier raised: those count as wrong)."""
    if not examples:
        return 0.0, [], 0
    prompt_ids = prompt_ids or [encoder(ex["prompt"]) for ex in examples]
    responses: list[str] = []
    was_training = model.training
    try:
        # similar lengths together: less padding in each batch
        order = sorted(range(len(examples)), key=lambda i: len(prompt_ids[i]))
        texts: dict[int, str] = {}
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            outs = sample_completions(model, [prompt_ids[i] for i in idx], max_new_tokens, temperature=0.0, top_p=1.0,
                                      stop_ids=stop_ids)
            for i, o in zip(idx, outs):
                ids = o[:-1] if o and o[-1] in stop_ids else o
                texts[i] = encoder.tokenizer.decode(ids)
        responses = [texts[i] for i in range(len(examples))]
    finally:
        model.train(was_training)
    correct, errors = 0, 0
    for r, ex in zip(responses, examples):
        try:
            correct += float(verifier(r, ex["answer"])) >= 1.0
        except Exception:
            errors += 1
    return correct / len(examples), responses, errors


class GRPOObjective(RolloutObjective):
    name = "grpo"

    def rollout(self, examples, prompt_ids, rollout_index, positions=None):
        c: GRPOConfig = self.config
        G = c.num_generations
        completions = self.sample(prompt_ids, G, rollout_index, positions)
        answers = [ex["answer"] for ex in examples for _ in range(G)]
        prompts = [ex["prompt"] for ex in examples for _ in range(G)]
        rewards, stats = self.score([self.decode(x) for x in completions], answers, prompts)
        # "batch": the std of the whole rollout, every rank's rewards included
        batch = distributed.gather_tensors(rewards) if c.scale_rewards == "batch" else None
        advantages, std = group_advantages(rewards, G, c.scale_rewards, batch_rewards=batch)
        equal = equal_groups(rewards, G)
        rows = [p for p in prompt_ids for _ in range(G)]
        lengths = torch.tensor([len(x) for x in completions], dtype=torch.float32)
        stats.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
                     completion_length=float(lengths.mean()),
                     truncated=sum(1 for x in completions if x[-1] not in self.stop_ids) / len(completions),
                     equal_groups=float(equal.float().mean()))
        return {"rows": rows, "completions": completions, "rewards": rewards, "advantages": advantages,
                "equal": equal, "stats": stats}

    def finish(self, parts: dict) -> dict:
        """Tensors of a rollout (after any filtering): ids, targets, advantages, old/ref log-probs."""
        ids, targets = build_rows(parts["rows"], parts["completions"], self.pad_id, self.device)
        batch = {"input_ids": ids, "targets": targets, "advantages": parts["advantages"].to(self.device)}
        if self.config.num_iterations > 1:  # the policy moves between passes: keep the sampling one's
            batch["old_logps"] = self.logps_of(self.model, ids, targets)[0]
        if self.ref is not None:
            batch["ref_logps"] = self.logps_of(self.ref, ids, targets)[0]
        return batch

    def num_tokens(self, batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def __call__(self, model, batch, num_tokens):
        c: GRPOConfig = self.config
        logps, out = token_logps(model, batch["input_ids"], batch["targets"], return_hidden=True)
        mask = (batch["targets"] != IGNORE_INDEX).float()
        loss, stats = grpo_loss(logps.float(), batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"],
                                mask, loss_type=c.loss_type, beta=c.beta, epsilon_low=c.epsilon,
                                epsilon_high=c.epsilon_high, delta=c.delta, kl_bias_correction=c.kl_bias_correction,
                                max_completion_length=c.max_completion_length, num_items=num_tokens,
                                grad_accum=self.grad_accum)
        stats["entropy"] = token_entropy(model, out.hidden, mask)
        if out.aux_loss is not None and out.aux_loss.requires_grad:
            loss = loss + out.aux_loss / self.grad_accum
        return loss, {**stats, **batch.get("stats", {})}


class PPOObjective(RolloutObjective):
    name = "ppo"

    def setup(self, model, device) -> None:
        super().setup(model, device)
        self.value_head = nn.Linear(model.config.hidden_dim, 1).to(device)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no reward scale is assumed
        nn.init.zeros_(self.value_head.bias)
        c: PPOConfig = self.config
        self.kl_ctl = AdaptiveKLController(c.kl_coef, c.target_kl, c.kl_horizon)

    def modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head}

    def values(self, model, out) -> torch.Tensor:
        return self.value_head(model.norm(out.hidden)).squeeze(-1).float()

    def rollout(self, examples, prompt_ids, rollout_index, positions=None):
        c: PPOConfig = self.config
        G = c.num_generations
        completions = self.sample(prompt_ids, G, rollout_index, positions)
        answers = [ex["answer"] for ex in examples for _ in range(G)]
        prompts = [ex["prompt"] for ex in examples for _ in range(G)]
        scores, stats = self.score([self.decode(x) for x in completions], answers, prompts)
        lengths = torch.tensor([len(x) for x in completions], dtype=torch.float32)
        stats.update(reward_mean=float(scores.mean()), reward_std=float(scores.std()) if len(scores) > 1 else 0.0,
                     completion_length=float(lengths.mean()),
                     truncated=sum(1 for x in completions if x[-1] not in self.stop_ids) / len(completions))
        return {"rows": [p for p in prompt_ids for _ in range(G)], "completions": completions, "rewards": scores,
                "stats": stats}

    def finish(self, parts: dict) -> dict:
        c: PPOConfig = self.config
        ids, targets = build_rows(parts["rows"], parts["completions"], self.pad_id, self.device)
        mask = (targets != IGNORE_INDEX).float()
        old_logps, out = self.logps_of(self.model, ids, targets, return_hidden=True)
        with torch.no_grad(), self._autocast():
            old_values = self.values(self.model, out) * mask
        ref_logps = self.logps_of(self.ref, ids, targets)[0]
        diff = (old_logps - ref_logps) * mask
        per_token_kl = diff if c.kl_estimator == "k1" else k3_kl(old_logps, ref_logps) * mask
        rewards = -self.kl_ctl.value * per_token_kl
        last = mask.cumsum(1).argmax(1)  # each row's last completion position
        rewards[torch.arange(len(last)), last] += parts["rewards"].to(self.device)
        adv, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            adv = masked_whiten(adv, mask)
        seq_kl = diff.sum(1).mean()
        parts["stats"].update(kl=float(seq_kl), kl_coef=self.kl_ctl.value,
                              non_score_reward=float((-self.kl_ctl.value * per_token_kl).sum(1).mean()))
        # every rank moves the coefficient alike: by the KL of the whole rollout
        rows = distributed.sum_over_ranks(len(ids))
        self.kl_ctl.update(distributed.sum_over_ranks(float(diff.sum())) / rows, rows)
        return {"input_ids": ids, "targets": targets, "old_logps": old_logps, "old_values": old_values,
                "advantages": adv, "returns": returns}

    def num_tokens(self, batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def __call__(self, model, batch, num_tokens):
        c: PPOConfig = self.config
        logps, out = token_logps(model, batch["input_ids"], batch["targets"], return_hidden=True)
        mask = (batch["targets"] != IGNORE_INDEX).float()
        values = self.values(model, out)
        loss, stats = ppo_loss(logps.float(), batch["old_logps"], values, batch["old_values"], batch["advantages"],
                               batch["returns"], mask, cliprange=c.epsilon, cliprange_value=c.cliprange_value,
                               vf_coef=c.vf_coef, num_items=num_tokens)
        stats["entropy"] = token_entropy(model, out.hidden, mask)
        if out.aux_loss is not None and out.aux_loss.requires_grad:
            loss = loss + out.aux_loss / self.grad_accum
        return loss, {**stats, **batch.get("stats", {})}

    def state_dict(self) -> dict[str, Any]:
        return {"value_head": {k: v for k, v in self.value_head.state_dict().items()}, "kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "value_head" in state:
            self.value_head.load_state_dict(state["value_head"])
        if "kl_coef" in state:
            self.kl_ctl.value = float(state["kl_coef"])


# =============================================================================================
# The loader of rollout batches
# =============================================================================================
class RolloutLoader:
    """Rollout batches from the current policy, as the Trainer's train loader.

    Each rollout covers `prompts_per_rollout` prompts (in a shuffled order, a new one each epoch);
    it is cut into `grad_accum` micro-batches and served `num_iterations` times. The state (order,
    position, the rollout being served and how far) is saved with checkpoints, so a resumed run
    serves the same batches.

    Several processes: a rollout covers `prompts_per_rollout` prompts per rank, taken from one
    shuffled order that every rank shares; rank r samples every world_size-th of them from r. The
    ranks draw together (also when --skip-equal-groups draws again), so their positions stay equal."""

    def __init__(self, objective: RolloutObjective, examples: list[dict], prompt_ids: list[list[int]],
                 prompts_per_rollout: int, grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1):
        if prompts_per_rollout < 1:
            raise VelocisError("a rollout needs at least one prompt")
        if prompts_per_rollout * world_size > len(examples):
            ranks = f" x {world_size} processes" if world_size > 1 else ""
            raise VelocisError(f"a rollout takes {prompts_per_rollout} prompts{ranks} but the data has "
                               f"{len(examples)}; lower --batch-size or give more prompts")
        self.objective, self.examples, self.prompt_ids = objective, examples, prompt_ids
        self.per_rollout, self.grad_accum, self.seed = prompts_per_rollout, grad_accum, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position, self.rollouts = 0, 0, 0
        self.pending: list[dict] = []  # the current rollout's micro-batches
        self.served = 0  # how many of pending * num_iterations were served

    def _order(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        return order

    def _next_prompts(self) -> tuple[list[int], list[int]]:
        """This rank's prompts of the next rollout (indices into the data) and their places in it."""
        count = self.per_rollout * self.world_size
        order = self._order()
        if self.position + count > len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._order()
        idx = order[self.position:self.position + count]
        self.position += count
        places = list(range(self.rank, count, self.world_size))
        return [idx[j] for j in places], places

    def _draw(self, sample: bool = True) -> dict | None:
        """The next rollout; sample=False: only move past it (this rank needs no more, another does)."""
        idx, places = self._next_prompts()
        self.rollouts += 1
        if not sample:
            return None
        return self.objective.rollout([self.examples[i] for i in idx], [self.prompt_ids[i] for i in idx],
                                      self.rollouts, positions=places)

    def _new_rollout(self) -> list[dict]:
        obj = self.objective
        parts = self._draw()
        skip = getattr(obj.config, "skip_equal_groups", False)
        stats = parts["stats"]
        if skip:
            parts = self._without_equal_groups(parts)
        batch = obj.finish(parts)
        batch_stats = {k: float(v) for k, v in stats.items()}
        rows = batch["input_ids"].shape[0]
        pieces = min(self.grad_accum, rows)
        bounds = [round(i * rows / pieces) for i in range(pieces + 1)]
        micro = []
        for a, b in zip(bounds, bounds[1:]):
            mb = {k: v[a:b] for k, v in batch.items()}
            mb["stats"] = batch_stats
            micro.append(mb)
        while len(micro) < self.grad_accum:  # fewer rows than micro-batches: repeat the last (rare)
            micro.append(micro[-1])
        return micro

    def _without_equal_groups(self, parts: dict) -> dict:
        """Keep the groups with different rewards, drawing more prompts while too few are left."""
        obj = self.objective
        G = obj.config.num_generations
        want = len(parts["rows"]) // G
        kept: list[dict] = []
        skipped = drawn = 0
        current = parts
        for attempt in range(obj.config.max_resample + 1):
            if attempt:
                if not distributed.any_over_ranks(len(kept) < want):
                    break
                if len(kept) >= want:  # another rank draws again: keep in step with it
                    self._draw(sample=False)
                    continue
                current = self._draw()
            drawn += 1
            for g in range(len(current["rows"]) // G):
                if bool(current["equal"][g]):
                    skipped += 1
                elif len(kept) < want:
                    kept.append({k: current[k][g * G:(g + 1) * G] for k in ("rows", "completions", "rewards",
                                                                             "advantages")})
        parts["stats"].update(skipped_groups=float(skipped), rollout_draws=float(drawn))
        if not kept:  # nothing but equal groups: train on the first draw (its advantages are all 0)
            return parts
        out = {"rows": [r for g in kept for r in g["rows"]], "completions": [c for g in kept for c in g["completions"]],
               "rewards": torch.cat([g["rewards"] for g in kept]),
               "advantages": torch.cat([g["advantages"] for g in kept]), "stats": parts["stats"]}
        return out

    def __iter__(self):
        iterations = self.objective.config.num_iterations
        while True:
            if self.served >= len(self.pending) * iterations:
                self.pending, self.served = self._new_rollout(), 0
            mb = self.pending[self.served % len(self.pending)]
            self.served += 1
            yield mb

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "rollouts": self.rollouts, "served": self.served,
                "pending": self.pending}

    @staticmethod
    def gather_state(state: dict[str, Any]) -> dict[str, Any]:
        """A state with every rank's pending micro-batches (rank 0 alone writes it): a collective."""
        if not distributed.current().active:
            return state
        cpu = [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in mb.items()} for mb in state["pending"]]
        return {**state, "pending": distributed.gather_objects(cpu), "pending_by_rank": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.rollouts = state["epoch"], state["position"], state["rollouts"]
        self.served = state["served"]
        pending = state["pending"]
        if state.get("pending_by_rank"):
            if len(pending) != self.world_size:  # another world size: its rows cannot be split again
                pending, self.served = [], 0  # the interrupted rollout's rest is dropped; the next is drawn
            else:
                pending = pending[self.rank]
        elif self.world_size > 1:
            pending, self.served = [], 0
        device = getattr(self.objective, "device", None)
        self.pending = [{k: (v.to(device) if isinstance(v, torch.Tensor) and device is not None else v)
                         for k, v in mb.items()} for mb in pending]


# =============================================================================================
# The trainer: the one loop, with held-out accuracy as its evaluation
# =============================================================================================
def make_trainer(cfg, model_config, objective, data, eval_examples, eval_prompt_ids=None, **kw):
    from velocis.train.loop import Trainer

    class RLTrainer(Trainer):
        """Evaluation = held-out accuracy of greedy completions (several processes: each rank scores
        every world_size-th prompt); best/ = the most accurate model; checkpoints carry the objective's
        state (value head, KL coefficient) and every rank's pending rollout."""

        def _eval_and_record(self, monitor) -> None:
            n = min(objective.config.eval_n, len(eval_examples or []))
            if n == 0:
                return
            rank, world = self.dist.rank, self.dist.world_size
            mine = list(range(rank, n, world))
            correct = 0.0
            if mine:
                acc, _ = objective.heldout_accuracy([eval_examples[i] for i in mine],
                                                    [eval_prompt_ids[i] for i in mine] if eval_prompt_ids else None)
                correct = round(acc * len(mine))
            acc = distributed.sum_over_ranks(correct) / n
            self._last_eval = self.step
            self.val_history.append((self.step, 1.0 - acc, None))
            rec = {"type": "eval", "step": self.step, "heldout_accuracy": acc, "val_loss": 1.0 - acc,
                   "val_bpb": None, "heldout_n": n}
            self.metrics.write(rec)
            monitor.eval(rec)
            monitor.note(f"held-out accuracy at step {self.step}: {acc:.3f}")
            if 1.0 - acc < self.best_val and self.step > 0:
                from velocis.train import checkpoint as ckpt_io

                self.best_val = 1.0 - acc
                model = self._model_to_write()  # several processes: gathered on rank 0 (None elsewhere)
                if model is not None:
                    ckpt_io.save_best(self.run_dir, model, self.tokenizer, {"step": self.step, "heldout_accuracy": acc})

        def trainer_state(self) -> dict[str, Any]:  # every rank calls it when saving
            state = super().trainer_state()
            state["train_loader"] = RolloutLoader.gather_state(state["train_loader"])
            return {**state, "objective_state": objective.state_dict()}

        def _load(self, path) -> None:
            from velocis.train import checkpoint as ckpt_io

            super()._load(path)
            objective.load_state_dict(ckpt_io.load_trainer_state(path).get("objective_state", {}))

    return RLTrainer(cfg, model_config, objective=objective, data=data, **kw)


def config_from(cls, values: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})
