"""Preference optimisation: DPO / IPO against a frozen reference, and Bradley-Terry reward models.

Data: a jsonl of {"prompt", "chosen", "rejected"} lines. Each field is a string or a list of
OpenAI-style messages. A pair with a message list anywhere is rendered with the model's chat
template (velocis.serve.chat_template): the prompt with the generation prompt, the response as
the conversation's continuation (a string response is one assistant turn), so the response
tokens end with the template's end-of-turn; a string prompt then is one user turn. A pair of
plain strings is plain text, the response followed by EOS (TRL's "standard" format). Either
way the prompt starts like every Velocis prompt (the model's prompt-start token first) and the
response tokens are the tokens of the rendered continuation, encoded apart from the prompt: the
tokens the engine sees when it generates that response after that prompt.

Only response tokens are scored. A batch of B pairs is [2B, T]: the B chosen rows, then the B
rejected rows, right-padded to the batch's longest row, targets -100 on prompt and padding.

Bad input: an unreadable line is an error naming file:line; a pair whose chosen and rejected
render to the same tokens, or whose prompt + response is longer than the run's --seq-len, is
skipped and counted, and the counts (with line numbers) are reported when the data is read and
when the run ends (all pairs skipped: an error).

Losses (on per-sequence log-probs summed over response tokens) follow TRL 1.16's
DPOTrainer._compute_loss term for term (tests/test_align_dpo.py holds them to it):
  sigmoid  -logsigmoid(beta * d), d = (pi_c - ref_c) - (pi_r - ref_r); with label smoothing e
           the conservative-DPO form -(1-e) logsigmoid(beta d) - e logsigmoid(-beta d) (TRL < 1.0's
           sigmoid; TRL 1.16 computes exactly this term in its aot/aot_unpaired losses for one pair)
  robust   TRL 1.16's label-smoothed DPO (rDPO): the unbiased estimator under flipped labels
  ipo      (d_avg - 1 / (2 beta))^2 where d_avg uses each response's log-ratio averaged over its
           tokens (TRL's convention, confirmed with the IPO authors; the paper's sums scale with length)
Rewards are beta * (pi - ref) summed log-ratios, as TRL logs them (also for ipo).

A reward model is the Velocis trunk plus a scalar head (nn.Linear(hidden, 1), no bias) on the
final-normed hidden state of the sequence's last token, trained with -logsigmoid(r_c - r_r).
Its directory is a loadable model dir plus reward_head.safetensors and reward_head.json;
`load_reward_model(dir)` scores token ids or (prompt, response) pairs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from velocis.errors import VelocisError
from velocis.train.loop import Trainer
from velocis.train.objectives import IGNORE_INDEX, Objective

LOSS_TYPES = ("sigmoid", "ipo", "robust")
HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"
REF_CACHE = "ref_logps.safetensors"


# --- losses ------------------------------------------------------------------------------------
def check_loss_options(beta: float, label_smoothing: float, loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise VelocisError(f"loss (--loss) {loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}")
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise VelocisError(f"beta (--beta) must be a positive number, got {beta!r}")
    if not 0 <= label_smoothing < 0.5:
        raise VelocisError(f"label smoothing (--label-smoothing) must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise VelocisError("label smoothing (--label-smoothing) has no meaning for the ipo loss; leave it at 0")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the (detached) chosen / rejected rewards beta * log-ratio [B].

    Inputs are per-sequence log-probs summed over response tokens; ipo also needs each response's
    token count (chosen_lengths, rejected_lengths) for its per-token average."""
    check_loss_options(beta, label_smoothing, loss_type)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * delta) * label_smoothing)
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:  # ipo
        if chosen_lengths is None or rejected_lengths is None:
            raise VelocisError("the ipo loss averages over response tokens: give chosen_lengths and rejected_lengths")
        chosen_avg = chosen_logratios / chosen_lengths.clamp(min=1.0)
        rejected_avg = rejected_logratios / rejected_lengths.clamp(min=1.0)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair -log P(chosen preferred) under the Bradley-Terry model (TRL's RewardTrainer loss)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


# --- encoding pairs --------------------------------------------------------------------------------
def _is_messages(value) -> bool:
    return isinstance(value, list)


def _check_messages(value, name: str, where: str) -> None:
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                            and isinstance(m.get("content"), (str, type(None))) for m in value):
        raise VelocisError(f"{where}: \"{name}\" must be a string or a non-empty list of "
                           f"{{\"role\", \"content\"}} messages")


class PairEncoder:
    """Prompt and response token ids, rendered the way the model is prompted at inference."""

    def __init__(self, tokenizer, chat_template=None, prompt_start_id: int | None = None,
                 eos_id: int | None = None):
        self.tokenizer = tokenizer
        self.template = chat_template
        self.prompt_start_id = prompt_start_id
        self.eos_id = eos_id if eos_id is not None else tokenizer.eos_id

    @classmethod
    def for_model_dir(cls, model_dir: str | Path, tokenizer, model_config) -> "PairEncoder":
        from velocis.serve.chat_template import find_chat_template

        return cls(tokenizer, find_chat_template(model_dir, tokenizer), model_config.prompt_start_token_id,
                   model_config.eos_token_id if model_config.eos_token_id is not None else tokenizer.eos_id)

    def _start(self, ids: list[int]) -> list[int]:
        if self.prompt_start_id is not None and ids[:1] != [self.prompt_start_id]:
            ids = [self.prompt_start_id] + ids
        return ids

    def encode(self, prompt, responses: list, where: str = "") -> tuple[list[int], list[list[int]]]:
        """(prompt ids, one list of response ids per response): chat format if any field is a list."""
        if not any(_is_messages(x) for x in (prompt, *responses)):
            prompt_ids = self._start(self.tokenizer.encode(prompt))
            if self.eos_id is None:
                raise VelocisError(f"{where}: plain-text pairs end each response with EOS, and this tokenizer "
                                   f"has none; give the pairs as chat messages")
            out = [self.tokenizer.encode(r) + [self.eos_id] for r in responses]
        else:
            if self.template is None:
                raise VelocisError(f"{where}: the pair is in chat format (message lists) but the model has no chat "
                                   f"template (tokenizer_config.json \"chat_template\", or the role tokens); give "
                                   f"plain strings or a model with a chat format")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            prompt_text = self.template.render(messages, add_generation_prompt=True)
            prompt_ids = self._start(self.tokenizer.encode(prompt_text))
            out = []
            for r in responses:
                turn = [{"role": "assistant", "content": r}] if isinstance(r, str) else list(r)
                full = self.template.render(messages + turn, add_generation_prompt=False)
                if not full.startswith(prompt_text):
                    raise VelocisError(f"{where}: the chat template renders the conversation with a different "
                                       f"beginning than the prompt alone, so the response cannot be cut off "
                                       f"from it; this template does not suit preference data")
                out.append(self.tokenizer.encode(full[len(prompt_text):]))
        if not prompt_ids:
            raise VelocisError(f"{where}: the prompt is empty and the model has no prompt-start token, so the "
                               f"first response token cannot be scored; give a prompt")
        return prompt_ids, out


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]  # response tokens only
    rejected: list[int]
    line: int = 0  # where it came from (1-based line of the jsonl; 0: built in memory)


@dataclass
class PreferenceSet:
    """Encoded pairs; ref_* are the reference log-probs once precomputed (DPOObjective)."""
    pairs: list[PreferencePair]
    name: str = "train"
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.pairs:
            h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
        return h.hexdigest()


@dataclass
class Skipped:
    """Pairs left out and why, with their line numbers: reported, never dropped silently."""
    identical: list[int] = field(default_factory=list)
    too_long: list[int] = field(default_factory=list)
    max_len: int = 0

    def count(self) -> int:
        return len(self.identical) + len(self.too_long)

    def summary(self, total: int, where: str) -> str:
        if not self.count():
            return ""

        def lines(xs):
            shown = ", ".join(map(str, xs[:8]))
            return f"line{'s' if len(xs) > 1 else ''} {shown}{', ...' if len(xs) > 8 else ''}"

        parts = []
        if self.identical:
            parts.append(f"{len(self.identical)} with identical chosen and rejected ({lines(self.identical)})")
        if self.too_long:
            parts.append(f"{len(self.too_long)} longer than {self.max_len} tokens ({lines(self.too_long)}; "
                         f"raise --seq-len up to the model's context to keep them)")
        return f"{where}: skipped {self.count()} of {total} pairs: " + "; ".join(parts)


def read_preference_jsonl(path: str | Path, flag: str = "--data") -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line; a bad line is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise VelocisError(f"{flag} {path}: no such file; give a jsonl of {{\"prompt\", \"chosen\", \"rejected\"}} lines")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise VelocisError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise VelocisError(f"{where}: a line must be a JSON object with prompt, chosen and rejected, "
                                   f"got {type(rec).__name__}")
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
            if missing:
                raise VelocisError(f"{where}: missing {', '.join(repr(k) for k in missing)}; a preference line needs "
                                   f"\"prompt\", \"chosen\" and \"rejected\"")
            for k in ("prompt", "chosen", "rejected"):
                if isinstance(rec[k], list):
                    _check_messages(rec[k], k, where)
                elif not isinstance(rec[k], str):
                    raise VelocisError(f"{where}: \"{k}\" must be a string or a list of messages, "
                                       f"got {type(rec[k]).__name__}")
            records.append((n, rec))
    if not records:
        raise VelocisError(f"{flag} {path}: no preference pairs in the file")
    return records


def encode_pairs(records: list[tuple[int, dict]], encoder: PairEncoder, max_len: int,
                 where: str = "") -> tuple[list[PreferencePair], Skipped]:
    """Encode records; identical or too-long pairs are skipped and counted."""
    pairs, skipped = [], Skipped(max_len=max_len)
    for n, rec in records:
        prompt, (chosen, rejected) = encoder.encode(rec["prompt"], [rec["chosen"], rec["rejected"]],
                                                    where=f"{where}:{n}" if where else f"pair {n}")
        if chosen == rejected:
            skipped.identical.append(n)
        elif len(prompt) + max(len(chosen), len(rejected)) > max_len:
            skipped.too_long.append(n)
        else:
            pairs.append(PreferencePair(prompt, chosen, rejected, n))
    return pairs, skipped


def split_by_prompt(pairs: list[PreferencePair], val_fraction: float, seed: int
                    ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, val): whole prompts go to one side (no prompt is in both), deterministic in the seed."""
    if not 0 <= val_fraction < 1:
        raise VelocisError(f"val fraction (--val-fraction) must be in [0, 1), got {val_fraction}")
    want = round(len(pairs) * val_fraction)
    if val_fraction > 0 and want == 0 and len(pairs) >= 2:
        want = 1
    groups: dict[tuple, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(tuple(p.prompt), []).append(p)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    val, train = [], []
    for k in keys:
        (val if len(val) < want else train).extend(groups[k])
    if not train:
        raise VelocisError(f"all {len(pairs)} pairs went to validation; lower --val-fraction or give more pairs")
    return train, val


@dataclass
class PreferenceData:
    train: PreferenceSet
    val: PreferenceSet | None
    skipped: Skipped
    total: int
    where: str

    def skip_summary(self) -> str:
        return self.skipped.summary(self.total, self.where)


def load_preference_data(path: str | Path, encoder: PairEncoder, max_len: int, val_fraction: float = 0.05,
                         seed: int = 0, val_path: str | Path | None = None) -> PreferenceData:
    """Read, encode and split a preference jsonl (val_path: a separate held-out file instead of a split)."""
    records = read_preference_jsonl(path)
    pairs, skipped = encode_pairs(records, encoder, max_len, str(path))
    total = len(records)
    val = None
    if val_path is not None:
        vrecords = read_preference_jsonl(val_path, "--val-data")
        val, vskipped = encode_pairs(vrecords, encoder, max_len, str(val_path))
        skipped.identical += [f"{Path(val_path).name}:{n}" for n in vskipped.identical]
        skipped.too_long += [f"{Path(val_path).name}:{n}" for n in vskipped.too_long]
        total += len(vrecords)
        train = pairs
    elif pairs:
        train, val = split_by_prompt(pairs, val_fraction, seed)
    else:
        train = []
    data = PreferenceData(PreferenceSet(train, "train"), PreferenceSet(val, "val") if val else None, skipped,
                          total, str(path))
    if not train:
        raise VelocisError(f"{path}: no pair left to train on. {data.skip_summary()}")
    return data


# --- batches -----------------------------------------------------------------------------------
def collate(pairs: list[PreferencePair], pad_id: int, indices: list[int] | None = None,
            ref: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> {"input_ids", "targets": [2B, T] (chosen rows then rejected rows; targets -100 on
    prompt and padding), "last_index": [2B] (each row's last token), "index": [B] pair indices},
    plus "ref_chosen_logps" / "ref_rejected_logps" [B] when the reference is precomputed."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (row, s) in enumerate(zip(rows, starts)):
        r = torch.tensor(row, dtype=torch.long)
        input_ids[i, :len(row)] = r
        targets[i, s - 1:len(row) - 1] = r[s:]  # position t predicts token t+1: only response tokens
    idx = torch.tensor(indices if indices is not None else list(range(len(pairs))), dtype=torch.long)
    batch = {"input_ids": input_ids, "targets": targets,
             "last_index": torch.tensor([len(r) - 1 for r in rows], dtype=torch.long), "index": idx}
    if ref is not None:
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[0][idx], ref[1][idx]
    return batch


class PreferenceLoader:
    """Batches of `batch_size` pairs. Training shuffles each epoch with (seed, epoch) and iterates
    forever; validation is one pass in file order. The position (epoch, step) is the state, so a
    resumed run continues at the same batch."""

    def __init__(self, data: PreferenceSet, batch_size: int, pad_id: int, seed: int = 0, train: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise VelocisError(f"batch size (--batch-size) must be positive, got {batch_size}")
        self.data, self.batch_size, self.pad_id, self.seed, self.train = data, batch_size, pad_id, seed, train
        self.rank, self.world_size = rank, world_size
        if train and len(data) < world_size:
            raise VelocisError(f"{len(data)} training pairs cannot be shared by {world_size} processes; give more "
                               f"pairs or start fewer processes")
        self.epoch = self.step = 0

    def _share(self) -> int:
        """Pairs this rank reads per epoch: training, the same count on every rank (ranks stay in step;
        the epoch's last len % world_size shuffled pairs wait for the next epoch); validation, all of its slice."""
        n = len(self.data)
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        return math.ceil(self._share() / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """This rank's pair indices for `epoch`: the shuffled order (file order for validation),
        every world_size-th from `rank`."""
        idx = list(range(len(self.data)))
        if self.train:
            random.Random(f"{self.seed}-{epoch}").shuffle(idx)
        return idx[self.rank::self.world_size][:self._share()]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = self.order(self.epoch)
            while self.step < len(self):
                idx = order[self.step * self.batch_size:(self.step + 1) * self.batch_size]
                self.step += 1  # advanced before yielding: the state points at the next batch
                ref = None
                if self.data.ref_chosen is not None:
                    ref = (self.data.ref_chosen, self.data.ref_rejected)
                yield collate([self.data.pairs[i] for i in idx], self.pad_id, idx, ref)
            self.epoch, self.step = self.epoch + 1, 0
            if not self.train:
                return

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "pairs": len(self.data), "split": self.data.name, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("pairs", len(self.data))):
            if key in state and state[key] != mine:
                raise VelocisError(f"the saved data position was taken with {key}={state[key]}, this run has "
                                   f"{mine}; resume with the same data and settings")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def pad_id_for(tokenizer, model_config=None) -> int:
    for tid in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None)):
        if tid is not None:
            return int(tid)
    return 0  # padding is never attended to by real tokens nor scored: any id does


# --- log-probs -----------------------------------------------------------------------------------
def sequence_logps(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor):
    """(per-row log-prob summed over scored tokens [N] float32, the model's output)."""
    out = model(input_ids, targets, reduction="none", ignore_index=IGNORE_INDEX)
    return -out.lm_loss.float().sum(-1), out


def _aux_loss(model, out) -> torch.Tensor:
    """The model's auxiliary losses (MoE balance) without MTP's next-token term, which would add
    supervised learning of chosen and rejected alike."""
    from velocis.models.registry import AUX_LOSSES

    total = torch.zeros((), device=out.lm_loss.device)
    for family, value in out.aux_losses.items():
        if family != "mtp":
            total = total + getattr(model.config, AUX_LOSSES[family]) * value
    return total


def _copy_of(model: nn.Module) -> nn.Module:
    """The model, copied: deepcopy on one process; from the full state dict under DDP / FSDP (their
    wrapped modules refuse deepcopy)."""
    from velocis.train import distributed

    if not distributed.current().active:
        return copy.deepcopy(model)
    from velocis.train.sharded_checkpoint import full_copy

    return full_copy(model)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- objectives -----------------------------------------------------------------------------------
class PairObjective(Objective):
    """Shared by DPO and the reward model: a step's weight is its number of pairs, held-out stats
    are summed over the evaluation and read (and reset) by eval_stats()."""

    def num_tokens(self, batch) -> int:
        return int(batch["index"].numel())

    def _reset_eval(self) -> None:
        self._eval = {"pairs": 0, "correct": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0, "logp_correct": 0.0}

    def _add_eval(self, chosen: torch.Tensor, rejected: torch.Tensor, logps: tuple | None = None) -> None:
        """Sum a batch's scores of chosen and rejected (and, for DPO, the policy's own log-probs)."""
        if not hasattr(self, "_eval"):
            self._reset_eval()
        e = self._eval
        e["pairs"] += chosen.numel()
        e["correct"] += float((chosen > rejected).float().sum())
        e["margin"] += float((chosen - rejected).sum())
        e["chosen"] += float(chosen.sum())
        e["rejected"] += float(rejected.sum())
        if logps is not None:
            e["logp_correct"] += float((logps[0] > logps[1]).float().sum())

    def eval_stats(self) -> dict[str, float]:
        """The held-out means since the last call (then reset), over every rank's share of the pairs."""
        from velocis.train import distributed

        e = getattr(self, "_eval", None)
        self._reset_eval()
        if e is not None and distributed.current().active:  # one all-reduce of the sums (every rank calls this)
            keys = sorted(e)
            summed = distributed.sum_over_ranks(torch.tensor([float(e[k]) for k in keys], dtype=torch.float64))
            e = {k: float(v) for k, v in zip(keys, summed.tolist())}
            e["pairs"] = int(e["pairs"])
        if not e or not e["pairs"]:
            return {}
        n = e["pairs"]
        out = {self.stat_names[0]: e["correct"] / n, self.stat_names[1]: e["margin"] / n,
               self.stat_names[2]: e["chosen"] / n, self.stat_names[3]: e["rejected"] / n}
        if self.name == "dpo":  # the policy's own ranking by log-prob: comparable with the starting model's
            out["logps/accuracy"] = e["logp_correct"] / n
        return {**out, "pairs": n}

    # extra modules saved beside the model (the reward head); none by default
    def save_extra(self, out_dir: Path) -> None:
        pass

    def load_extra(self, ckpt_dir: Path) -> None:
        pass


class DPOObjective(PairObjective):
    """DPO / IPO against the starting model, frozen. setup() runs once the starting weights are in
    (before a resume loads the trained ones), so the reference is the start on a resume too: a deep
    copy of the model, or, for a LoRA model, the model itself with its adapters switched off (no
    second copy in memory). With `precompute` (the train and val PreferenceSets) the reference
    log-probs of every pair are computed once at setup, stored in `cache_file` (written
    atomically; reused while the data and the starting weights are unchanged) and carried in the
    batches, and no reference copy stays in memory."""

    name = "dpo"
    stat_names = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 precompute: list[PreferenceSet] | None = None, cache_file: str | Path | None = None,
                 batch_size: int = 8, pad_id: int = 0):
        check_loss_options(beta, label_smoothing, loss_type)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.precompute = [s for s in (precompute or []) if s is not None]
        self.cache_file = Path(cache_file) if cache_file else None
        self.batch_size, self.pad_id = batch_size, pad_id
        self.reference: nn.Module | None = None
        self.adapters_off = False  # a LoRA policy: the reference is the policy without its adapters

    def setup(self, model, device) -> None:
        from velocis.align.lora import has_lora

        self.adapters_off = has_lora(model)
        if self.precompute:  # the model holds the starting weights now: score with it, no copy needed
            self._precompute(model, device)
        elif not self.adapters_off:
            self.reference = _frozen(_copy_of(model))

    def _reference_forward(self, model, input_ids, targets) -> torch.Tensor:
        from velocis.align.lora import lora_disabled

        with torch.no_grad():
            if self.adapters_off:
                with lora_disabled(model):
                    return sequence_logps(model, input_ids, targets)[0]
            if self.reference is None:
                raise VelocisError("the DPO objective has neither a reference model nor precomputed reference "
                                   "log-probs in the batch; call setup() first")
            return sequence_logps(self.reference, input_ids, targets)[0]

    # -- precomputed reference log-probs
    def _fingerprint(self, model) -> str:
        """The data and the starting weights (a checksum per tensor): what the cached log-probs depend on."""
        h = hashlib.sha256()
        for s in self.precompute:
            h.update(f"{s.name}:{s.fingerprint()}".encode())
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if t.is_floating_point():
                    t = t.double()
                    h.update(f"{name}:{tuple(t.shape)}:{float(t.sum())!r}:{float(t.abs().sum())!r}".encode())
        h.update(f"{self.adapters_off}".encode())
        return h.hexdigest()

    def _precompute(self, model: nn.Module, device) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        from velocis.align.lora import lora_disabled
        from velocis.utils.atomic import atomic_path

        fp = self._fingerprint(model)
        if self.cache_file is not None and self.cache_file.is_file():
            with safe_open(str(self.cache_file), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") == fp:
                    for s in self.precompute:
                        s.ref_chosen, s.ref_rejected = f.get_tensor(f"{s.name}.chosen"), f.get_tensor(f"{s.name}.rejected")
                    return
        tensors = {}
        with lora_disabled(model):
            for s in self.precompute:
                s.ref_chosen, s.ref_rejected = reference_logps(model, s, self.batch_size, self.pad_id, device)
                tensors[f"{s.name}.chosen"], tensors[f"{s.name}.rejected"] = s.ref_chosen, s.ref_rejected
        from velocis.train import distributed

        if self.cache_file is not None and distributed.is_main():  # every rank computed the same; one writes
            with atomic_path(self.cache_file) as tmp:
                save_file(tensors, tmp, metadata={"fingerprint": fp, "format": "velocis-ref-logps"})

    # -- the loss
    def _ref_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.precompute:
            raise VelocisError("the reference log-probs were to be precomputed but the batch has none; build the "
                               "batches from the PreferenceSets given to the objective")
        return self._reference_forward(model, batch["input_ids"], batch["targets"]).chunk(2)

    def losses(self, model, batch):
        logps, out = sequence_logps(model, batch["input_ids"], batch["targets"])
        pc, pr = logps.chunk(2)
        rc, rr = self._ref_logps(model, batch)
        lc, lr = (batch["targets"] != IGNORE_INDEX).sum(-1).float().chunk(2)
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing, self.loss_type, lc, lr)
        return losses, cr, rj, pc, pr, out

    def __call__(self, model, batch, num_tokens):
        losses, cr, rj, pc, pr, out = self.losses(model, batch)
        share = losses.numel() / num_tokens
        loss = losses.sum() / num_tokens + _aux_loss(model, out) * share
        stats = {"rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(), "rewards/margins": (cr - rj).mean(),
                 "rewards/accuracies": (cr > rj).float().mean(), "logps/chosen": pc.detach().mean(),
                 "logps/rejected": pr.detach().mean()}
        return loss, stats

    def evaluate(self, model, batch):
        losses, cr, rj, pc, pr, _ = self.losses(model, batch)
        self._add_eval(cr, rj, (pc, pr))
        return float(losses.sum()), int(losses.numel())


@torch.no_grad()
def reference_logps(model: nn.Module, data: PreferenceSet, batch_size: int, pad_id: int, device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N], rejected [N]) summed response log-probs of every pair, in order, on the CPU."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(data), batch_size):
        b = collate(data.pairs[i:i + batch_size], pad_id)
        logps, _ = sequence_logps(model, b["input_ids"].to(device), b["targets"].to(device))
        c, r = logps.cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def preference_accuracy(model: nn.Module, data: PreferenceSet, batch_size: int = 16, pad_id: int = 0,
                        reference: nn.Module | None = None, device=None) -> dict[str, float]:
    """How often the model ranks chosen over rejected on `data`: by its own log-probs ("accuracy",
    comparable across any two models) and, given the reference, by DPO's implicit reward
    ("reward_accuracy": the policy/reference log-ratio of chosen above that of rejected)."""
    device = device or next(model.parameters()).device
    pc, pr = reference_logps(model, data, batch_size, pad_id, device)
    out = {"pairs": len(data), "accuracy": float((pc > pr).float().mean()), "logp_margin": float((pc - pr).mean())}
    if reference is not None:
        rc, rr = reference_logps(reference, data, batch_size, pad_id, device)
        out["reward_accuracy"] = float(((pc - rc) > (pr - rr)).float().mean())
        out["reward_margin"] = float(((pc - rc) - (pr - rr)).mean())
    return out


# --- reward model -------------------------------------------------------------------------------
def new_reward_head(hidden_dim: int, std: float = 0.02, seed: int = 0) -> nn.Linear:
    head = nn.Linear(hidden_dim, 1, bias=False)  # a constant offset cancels in every comparison
    with torch.no_grad():  # its own generator: the global RNG stream (data, sampling) is left alone
        head.weight.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
    return head


def reward_scores(model: nn.Module, head: nn.Module, input_ids: torch.Tensor, last_index: torch.Tensor
                  ) -> torch.Tensor:
    """Scalar reward [N] of each row: the head on the final-normed hidden state of its last token
    (right padding after it is causal-invisible). MoE auxiliary losses are not part of it."""
    out = model(input_ids, logits_at=last_index, return_hidden=True)
    h = out.hidden.gather(1, last_index[:, None, None].expand(-1, 1, out.hidden.shape[-1])).squeeze(1)
    return head(model.norm(h).to(head.weight.dtype)).squeeze(-1).float()


class RewardObjective(PairObjective):
    """Bradley-Terry reward modelling: the trunk and a scalar head (an extra trainable module)."""

    name = "reward"
    stat_names = ("accuracy", "margin", "rewards/chosen", "rewards/rejected")

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.head: nn.Linear | None = None

    def setup(self, model, device) -> None:
        self.head = new_reward_head(model.config.hidden_dim, model.config.init_std, self.seed).to(device)

    def modules(self) -> dict[str, nn.Module]:
        return {"reward_head": self.head}

    def rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return reward_scores(model, self.head, batch["input_ids"], batch["last_index"]).chunk(2)

    def __call__(self, model, batch, num_tokens):
        rc, rr = self.rewards(model, batch)
        losses = bradley_terry_loss(rc, rr)
        rc, rr = rc.detach(), rr.detach()
        stats = {"accuracy": (rc > rr).float().mean(), "margin": (rc - rr).mean(), "rewards/chosen": rc.mean(),
                 "rewards/rejected": rr.mean()}
        return losses.sum() / num_tokens, stats

    def evaluate(self, model, batch):
        rc, rr = self.rewards(model, batch)
        self._add_eval(rc, rr)
        return float(bradley_terry_loss(rc, rr).sum()), int(rc.numel())

    def save_extra(self, out_dir: Path) -> None:
        save_reward_head(self.head, out_dir)

    def load_extra(self, ckpt_dir: Path) -> None:
        w = read_reward_head(ckpt_dir, self.head.in_features)
        with torch.no_grad():
            self.head.weight.copy_(w)


def save_reward_head(head: nn.Linear, out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    from velocis.utils.atomic import atomic_path, atomic_write_text

    out_dir = Path(out_dir)
    with atomic_path(out_dir / HEAD_WEIGHTS) as tmp:
        save_file({"weight": head.weight.detach().float().cpu().contiguous()}, tmp, metadata={"format": "pt"})
    atomic_write_text(out_dir / HEAD_CONFIG, json.dumps({
        "format": "velocis-reward-head", "hidden_dim": head.in_features, "bias": False,
        "reads": "the final-normed hidden state of the sequence's last token",
        "loss": "bradley-terry"}, indent=2) + "\n")


def read_reward_head(model_dir: str | Path, hidden_dim: int) -> torch.Tensor:
    from velocis.model_io import read_safetensors

    f = Path(model_dir) / HEAD_WEIGHTS
    if not f.is_file():
        raise VelocisError(f"{model_dir}: no {HEAD_WEIGHTS}; is this a reward model (velocis train-reward)?")
    w = read_safetensors(f).get("weight")
    if w is None or tuple(w.shape) != (1, hidden_dim):
        raise VelocisError(f"{f}: the head must be one [1, {hidden_dim}] 'weight' tensor for this trunk, got "
                           f"{None if w is None else tuple(w.shape)}")
    return w


class RewardModel:
    """A trained reward model, ready to score.

        rm = load_reward_model("runs/rm")
        rm.score("What is 2 + 2?", "4")                  # one float
        rm.score_pairs([p1, p2], [r1, r2])               # [float, ...]; prompts str or messages
        rm.score_ids([[...prompt + response ids...]])    # [float, ...] for token ids as they are

    score / score_pairs render each (prompt, response) exactly as training did (chat template and
    end-of-turn, or plain text + EOS); score_ids reads each sequence's last token as given."""

    def __init__(self, model: nn.Module, head: nn.Linear, tokenizer, encoder: PairEncoder, batch_size: int = 16):
        self.model, self.head, self.tokenizer, self.encoder = model, head, tokenizer, encoder
        self.batch_size = batch_size
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        if not sequences or any(len(s) == 0 for s in sequences):
            raise VelocisError("score_ids needs a non-empty list of non-empty token id lists")
        longest = max(len(s) for s in sequences)
        if longest > self.model.config.max_seq_len:
            raise VelocisError(f"a sequence of {longest} tokens is longer than the reward model's context "
                               f"({self.model.config.max_seq_len})")
        pad = pad_id_for(self.tokenizer)
        out = []
        for i in range(0, len(sequences), self.batch_size):
            rows = sequences[i:i + self.batch_size]
            ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            last = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
            out += reward_scores(self.model, self.head, ids.to(self.device), last.to(self.device)).cpu().tolist()
        return out

    def score_pairs(self, prompts: list, responses: list) -> list[float]:
        if len(prompts) != len(responses):
            raise VelocisError(f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
        seqs = []
        for n, (p, r) in enumerate(zip(prompts, responses)):
            prompt_ids, (resp,) = self.encoder.encode(p, [r], where=f"response {n}")
            seqs.append(prompt_ids + resp)
        return self.score_ids(seqs)

    def score(self, prompt, response) -> float:
        return self.score_pairs([prompt], [response])[0]

    __call__ = score_pairs


def load_reward_model(model_dir: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """A reward model directory (velocis train-reward's --output-dir) -> RewardModel."""
    from velocis.model_io import load_model_dir

    model_dir = Path(model_dir)
    if not (model_dir / HEAD_WEIGHTS).is_file():
        raise VelocisError(f"{model_dir}: no {HEAD_WEIGHTS}; give a directory written by velocis train-reward")
    model, tokenizer = load_model_dir(model_dir, device=device)
    if tokenizer is None:
        raise VelocisError(f"{model_dir}: no tokenizer (tokenizer.json); the reward model needs one to read text")
    head = nn.Linear(model.config.hidden_dim, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(read_reward_head(model_dir, model.config.hidden_dim))
    head = head.to(device)
    _frozen(model)
    head.requires_grad_(False)
    return RewardModel(model, head, tokenizer, PairEncoder.for_model_dir(model_dir, tokenizer, model.config))


# --- the trainer, with what pair objectives add ------------------------------------------------------
class PreferenceTrainer(Trainer):
    """The Trainer, plus: the objective's extra modules (the reward head) saved in every checkpoint,
    the run root and best/, and restored on resume; the objective's held-out stats written to
    metrics.jsonl as an "eval_stats" record after each evaluation (and kept in `eval_history`)."""

    eval_history: list[dict[str, float]]

    def save(self):
        path = super().save()
        self.objective.save_extra(path)
        self.objective.save_extra(self.run_dir)
        return path

    def _load(self, path):
        self.objective.load_extra(path)
        super()._load(path)

    def _eval_and_record(self, monitor):
        if not hasattr(self, "eval_history"):
            self.eval_history = []
        best = self.best_val
        super()._eval_and_record(monitor)
        if self.best_val != best:
            self.objective.save_extra(self.run_dir / "best")
        stats = self.objective.eval_stats()
        if stats:
            record = {"step": self.step, **stats}
            self.eval_history.append(record)
            self.metrics.write({"type": "eval_stats", **record})
            monitor.note("held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items() if k != "pairs"))


# --- generated pairs (the built-in arithmetic task) ----------------------------------------------------
def _wrong_result(a: int, op: str, b: int, result: int, rng: random.Random) -> int:
    """A plausible wrong result: off by one or ten, a dropped carry, or off by an operand (×)."""
    candidates = {result + d for d in (-10, -1, 1, 10)}
    if op == "+" and (a % 10) + (b % 10) >= 10:
        candidates.add(result - 10)  # the carry forgotten
    if op == "×":
        candidates |= {result + a, result - a}
    candidates = sorted(c for c in candidates if c != result and (c >= 0 or result < 0))
    return rng.choice(candidates)


def _replace_result(response: str, result: str, wrong: str) -> str:
    """The task's worked response with its result replaced at the end of each line (work and answer)."""
    lines = response.split("\n")
    out = []
    for line in lines:
        at = line.rfind(result)
        if at < 0:
            raise VelocisError(f"cannot build a wrong answer from the response {response!r}")
        out.append(line[:at] + wrong + line[at + len(result):])
    return "\n".join(out)


def arithmetic_pairs(n_train: int, n_eval: int = 0, seed: int = 0, difficulty: int = 1, lang: str = "en"
                     ) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference records on the built-in arithmetic task (velocis.align.tasks):
    prompt = the problem as a user message, chosen = its correct worked answer, rejected = the same
    working with a wrong result. Held-out problems never appear in training (tasks.generate)."""
    from velocis.align.tasks import generate, make_task

    task = make_task("arithmetic", difficulty=difficulty, lang=lang)
    train, held_out = generate(task, n_train, n_eval, seed)
    rng = random.Random(f"pairs-{seed}")

    def record(p) -> dict:
        a, op, b = p.key
        wrong = str(_wrong_result(a, op, b, int(p.answer), rng))
        return {"prompt": [{"role": "user", "content": p.prompt}],
                "chosen": [{"role": "assistant", "content": p.response}],
                "rejected": [{"role": "assistant", "content": _replace_result(p.response, p.answer, wrong)}]}

    return [record(p) for p in train], [record(p) for p in held_out]


def write_pairs(records: list[dict], path: str | Path) -> Path:
    from velocis.utils.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)
