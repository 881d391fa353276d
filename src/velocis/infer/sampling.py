"""Per-request sampling for a continuously batched decoder: every row of a batch is a different
request with its own `SamplingParams`, and all rows go through one vectorised code path.

    result = sample_batch(logits, params, generators, prompt_tokens, output_tokens)
    result.token_ids        # [B]

Order of operations (vLLM's), each step a no-op for a row that does not ask for it:

1. Penalties, on float32 logits:
   - repetition_penalty (HF / vLLM / CTRL): for every token seen in the prompt *or* the output,
     a positive logit is divided by the penalty and a negative one multiplied by it (once per
     token, however often it was seen);
   - frequency_penalty and presence_penalty (OpenAI): over the *generated* tokens only (as vLLM),
     ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``.
2. Greedy rows (temperature < 1e-5, vLLM's threshold: smaller temperatures overflow) take the
   argmax of the penalised logits and skip everything below.
3. temperature: logits / temperature.
4. min_p: drop tokens whose probability is below min_p x the top token's probability.
5. top_k: keep the k largest logits (ties with the k-th are kept, as HF and vLLM); 0, -1 or None = off.
6. top_p: keep the smallest set of most probable tokens whose mass reaches top_p (computed on what
   top_k and min_p left, renormalised), always at least one token. Equally likely tokens at the
   boundary are taken in a stable sort's order (the lower id is dropped first), so a row's mask
   never depends on its batch.
7. Draw: the exponential race, argmax(probs / E) with E ~ Exponential(1), which picks token j with
   probability probs[j]. A seeded row draws its E from its own `torch.Generator`, so its samples
   depend only on its seed and its own logits: not on which requests share the batch, nor where.
   Unseeded rows share the global RNG.

Steps 1 (repetition) and 3-6 give the same values and -inf masks as transformers'
RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, MinPLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper applied in this order (tests/test_sampling.py checks it). transformers' generate()
applies min_p last, after top_p; vLLM's order (min_p before top_k / top_p) is followed here. The
two differ only when min_p and top_p are combined.

Logprobs are those of the raw model distribution, log_softmax of the logits before penalties and
temperature: vLLM's default (`logprobs_mode="raw_logprobs"`), so they score the model, not the
sampling settings. The chosen token's logprob is returned for every row that asks, plus the top-N
(N = params.logprobs), most likely first, as OpenAI's `top_logprobs`.

Penalties need each row's token history as [B, V] tensors (`PenaltyTensors`): build them from lists
with `count_tensors`, or keep one `PenaltyState` per request, updated by one token per step, and
stack them (`stack_penalty_states`) so a decode step does not rebuild counts from lists.

Stop strings: `check_stop` finds a stop string ending in the newest piece of text (it may start in
earlier text) and cuts the output before it (the stop string is not returned, as OpenAI);
`safe_stream_len` says how much of the text can be streamed without showing the start of a stop
string that the next piece might complete.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from velocis.errors import VelocisError

GREEDY_EPS = 1e-5  # temperature below this = greedy (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs


def _check_number(name: str, value, integer: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise VelocisError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if not integer and not math.isfinite(value):
        raise VelocisError(f"{name} must be a finite number, got {value}")


@dataclass
class SamplingParams:
    """One request's sampling settings, with OpenAI / vLLM names and defaults (max_tokens None =
    until the context is full). Checked on construction; call validate() again after editing."""
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None, 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None = no logprobs; N = the chosen token's logprob + the top N

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # OpenAI accepts one string or a list
            self.stop = [self.stop]
        self.stop = list(self.stop) if isinstance(self.stop, (list, tuple)) else self.stop
        self.stop_token_ids = (list(self.stop_token_ids) if isinstance(self.stop_token_ids, (list, tuple, set))
                               else self.stop_token_ids)
        self.validate()

    def validate(self) -> "SamplingParams":
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise VelocisError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise VelocisError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise VelocisError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        _check_number("top_k", self.top_k, integer=True, optional=True)
        if self.top_k is not None and self.top_k < -1:
            raise VelocisError(f"top_k must be >= 1, or 0 or -1 to turn it off, got {self.top_k}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise VelocisError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        _check_number("presence_penalty", self.presence_penalty)
        _check_number("frequency_penalty", self.frequency_penalty)
        _check_number("seed", self.seed, integer=True, optional=True)
        _check_number("max_tokens", self.max_tokens, integer=True, optional=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VelocisError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise VelocisError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise VelocisError("stop_token_ids must be a list of token ids (integers >= 0), "
                               f"got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise VelocisError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        _check_number("n", self.n, integer=True)
        if self.n < 1:
            raise VelocisError(f"n must be >= 1, got {self.n}")
        _check_number("logprobs", self.logprobs, integer=True, optional=True)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise VelocisError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def stop_ids(self, eos_token_id: int | None) -> set[int]:
        """Token ids that finish the request: stop_token_ids, plus EOS unless ignore_eos."""
        ids = set(self.stop_token_ids)
        if eos_token_id is not None and not self.ignore_eos:
            ids.add(eos_token_id)
        return ids


def make_generator(params: SamplingParams, device: torch.device | str = "cpu", index: int = 0
                   ) -> torch.Generator | None:
    """The generator of sample `index` (0..n-1) of a seeded request, None when unseeded. Sample i
    uses seed + i, as vLLM's parallel sampling does, so the n samples differ."""
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((params.seed + index) % 2**64)  # any Python int is a valid seed
    return g


# ---------------------------------------------------------------------------------------------
# Token history for the penalties

@dataclass
class PenaltyTensors:
    """The batch's token history in the form the penalties use."""
    prompt_mask: torch.Tensor  # [B, V] bool: the token occurs in the prompt
    output_counts: torch.Tensor  # [B, V] int32: how often the token was generated


def count_tensors(prompt_tokens: Sequence[Sequence[int]], output_tokens: Sequence[Sequence[int]],
                  vocab_size: int, device: torch.device | str | None = None) -> PenaltyTensors:
    """[B, V] history from lists, with one scatter each (rows padded with a dump column V)."""
    def padded(rows: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), width), vocab_size, dtype=torch.long)
        for b, r in enumerate(rows):
            out[b, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        return out.to(device)

    B = len(prompt_tokens)
    prompt = padded(prompt_tokens)
    mask = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=device).scatter_(1, prompt, True)
    output = padded(output_tokens)
    counts = torch.zeros(B, vocab_size + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, output, torch.ones_like(output, dtype=torch.int32))
    return PenaltyTensors(mask[:, :vocab_size], counts[:, :vocab_size])


class PenaltyState:
    """One request's history as [V] tensors on the device: the prompt mask is built once, and
    append() adds a generated token with one indexed add (no list -> tensor rebuild per step)."""

    def __init__(self, prompt_tokens: Sequence[int], vocab_size: int, device: torch.device | str | None = None):
        self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if len(prompt_tokens):
            self.prompt_mask[torch.as_tensor(list(prompt_tokens), dtype=torch.long, device=device)] = True
        self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        self._one = torch.ones(1, dtype=torch.int32, device=device)

    def append(self, token_id: int | torch.Tensor) -> None:
        """Count one generated token: an int, or a 0-d tensor on the device (index_add_, not
        counts[t] += 1, which would copy the tensor index to the host: a sync per row)."""
        index = torch.as_tensor(token_id, dtype=torch.long, device=self.output_counts.device).view(1)
        self.output_counts.index_add_(0, index, self._one)


def stack_penalty_states(states: Sequence[PenaltyState | None], vocab_size: int,
                         device: torch.device | str | None = None) -> PenaltyTensors:
    """The batch form of per-request states; a None row (no penalties) has an empty history."""
    no_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    no_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
    return PenaltyTensors(torch.stack([s.prompt_mask if s else no_mask for s in states]),
                          torch.stack([s.output_counts if s else no_counts for s in states]))


# ---------------------------------------------------------------------------------------------
# Logits processing

def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row values as a [B, 1] float32 tensor. Built from Python doubles, so a derived value
    such as 1 - top_p is rounded once, exactly as transformers' scalar arithmetic rounds it."""
    return torch.tensor(list(values), dtype=torch.float32, device=like.device)[:, None]


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], history: PenaltyTensors
                    ) -> torch.Tensor:
    """Repetition (prompt + output), then frequency and presence (output only) penalties.
    Rows with neutral values come back unchanged bit for bit (x / 1, x - 0)."""
    logits = logits.float()
    rep = _column([p.repetition_penalty for p in params], logits)
    counts = history.output_counts
    generated = counts > 0
    seen = history.prompt_mask | generated
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - _column([p.frequency_penalty for p in params], logits) * counts
    return logits - _column([p.presence_penalty for p in params], logits) * generated


def apply_warpers(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p with per-row values; dropped tokens become -inf. Greedy
    rows are returned unchanged (they take the argmax and never see these)."""
    logits = logits.float()
    V = logits.size(-1)
    rows = [(p, p.greedy) for p in params]
    logits = logits / _column([1.0 if g else p.temperature for p, g in rows], logits)

    min_p = [0.0 if g else p.min_p for p, g in rows]
    if any(min_p):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < _column(min_p, logits) * probs.amax(-1, keepdim=True), float("-inf"))

    top_k = [V if g or not p.top_k or p.top_k < 0 else min(p.top_k, V) for p, g in rows]
    top_p = [1.0 if g else p.top_p for p, g in rows]
    if min(top_k) < V or min(top_p) < 1:
        # One ascending sort serves both: the k-th largest sits at V - k, and top-p accumulates
        # from the least likely token up, as HF and vLLM do (so the same sums, the same masks).
        # Stable, so tokens tied at the top-p boundary go in id order (the lower id is dropped
        # first): an unstable sort may order them differently in a batch of another shape.
        ordered, order = logits.sort(dim=-1, stable=True)
        kth = ordered.gather(1, torch.tensor([V - k for k in top_k], device=logits.device)[:, None])
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        cum = ordered.softmax(-1).cumsum(-1)
        drop = (cum <= _column([1.0 - p for p in top_p], logits)) & (_column(top_p, logits) < 1)
        drop[:, -1] = False  # the most likely token always stays
        drop |= ordered == float("-inf")
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))
    return logits


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # [B] long
    logprobs: torch.Tensor | None  # [B] float32, the chosen tokens' raw logprobs; None if no row asked
    top_logprobs: list[list[tuple[int, float]] | None] | None  # per row: top-N (id, logprob), best first


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None] | None = None,
                 prompt_tokens: Sequence[Sequence[int]] | None = None,
                 output_tokens: Sequence[Sequence[int]] | None = None,
                 *, history: PenaltyTensors | None = None) -> SampleResult:
    """Next token of every row. logits [B, V] (any float dtype); params and generators one per row
    (a None generator = the global RNG). Penalties need the history: `history` (precomputed, e.g.
    from stack_penalty_states) or prompt_tokens / output_tokens lists; without penalties neither."""
    B, V = logits.shape
    if len(params) != B or (generators is not None and len(generators) != B):
        raise ValueError(f"{B} rows of logits but {len(params)} params / "
                         f"{None if generators is None else len(generators)} generators")
    raw = logits.float()
    penalised = raw
    if any(p.uses_penalties for p in params):
        if history is None:
            if prompt_tokens is None and output_tokens is None:
                raise ValueError("penalties need the rows' history: pass history or prompt_tokens/output_tokens")
            empty: list[list[int]] = [[] for _ in range(B)]
            history = count_tensors(prompt_tokens or empty, output_tokens or empty, V, logits.device)
        penalised = apply_penalties(raw, params, history)

    greedy = [p.greedy for p in params]
    token_ids = penalised.argmax(-1)
    if not all(greedy):
        probs = apply_warpers(penalised, params).softmax(-1)
        race = torch.empty_like(probs)
        gens = list(generators) if generators is not None else [None] * B
        if any(g is None for g in gens):
            race.exponential_()
        for b, g in enumerate(gens):
            if g is not None and not greedy[b]:
                race[b].exponential_(generator=g)  # the row's own stream: independent of its neighbours
        # An exponential draw can round to 0; clamping keeps a dropped token (prob 0) at 0, not nan.
        sampled = (probs / race.clamp_(min=torch.finfo(race.dtype).tiny)).argmax(-1)
        token_ids = torch.where(torch.tensor(greedy, device=logits.device), token_ids, sampled)

    asked = [p.logprobs for p in params]
    if all(n is None for n in asked):
        return SampleResult(token_ids, None, None)
    logprobs = raw.log_softmax(-1)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    n_max = min(max(n or 0 for n in asked), V)
    top: list[list[tuple[int, float]] | None] = [None if n is None else [] for n in asked]
    if n_max:
        values, ids = logprobs.topk(n_max, -1)  # sorted, most likely first
        values, ids = values.tolist(), ids.tolist()  # one device -> host copy for the whole batch
        top = [None if n is None else list(zip(ids[b][:n], values[b][:n])) for b, n in enumerate(asked)]
    return SampleResult(token_ids, chosen, top)


# ---------------------------------------------------------------------------------------------
# Stop strings

def check_stop(text_so_far: str, new_text: str, stop: Sequence[str]) -> tuple[bool, str]:
    """(stopped, text): text is text_so_far + new_text, cut before the earliest stop string when
    one ends inside new_text (it may start in text_so_far). Only matches ending in the new piece
    are searched: text_so_far must already have been checked, piece by piece."""
    text = text_so_far + new_text
    cut = -1
    for s in stop:
        at = text.find(s, max(0, len(text_so_far) - len(s) + 1))
        if at != -1 and (cut == -1 or at < cut):
            cut = at
    return (True, text[:cut]) if cut != -1 else (False, text)


def safe_stream_len(text: str, stop: Sequence[str]) -> int:
    """How much of `text` (already checked with check_stop) can be streamed: all but its longest
    suffix that is the start of a stop string, which the next piece might complete."""
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return len(text) - hold
