"""Autoregressive generation with the static KV cache (gpt-fast style).

    ids = generate_ids(model, prompts, max_new_tokens, temperature, top_k, top_p, generator)
yields the next token id of every row, one step at a time: one prefill forward over the (padded)
batch of prompts, then one single-token forward per step against the cache; rows stop
independently. `recompute=True` runs each row's full sequence every step instead (the reference
the cached path is tested against).

`StreamDecoder` turns a stream of token ids into text pieces safe to print as they come: byte-level
BPE can split a multi-byte UTF-8 character (Chinese) across tokens, so a piece is emitted only
once it decodes without a trailing replacement character.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from velocis.errors import VelocisError
from velocis.kernels.decode_cpu import decode_plan


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _number(value, name: str, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if kind is int else "a number"
        raise VelocisError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise VelocisError(f"{name} must be a finite number, got {value}")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    """Named both ways (Python argument and CLI flag): both kinds of caller read these errors."""
    _number(temperature, "temperature (--temperature)")
    _number(max_new_tokens, "max_new_tokens (--max-new-tokens)", int)
    if top_k is not None:
        _number(top_k, "top_k (--top-k)", int)
    if top_p is not None:
        _number(top_p, "top_p (--top-p)")
    if temperature < 0:
        raise VelocisError(f"temperature (--temperature) {temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise VelocisError(f"top_k (--top-k) {top_k} must be >= 0 (0 = off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise VelocisError(f"top_p (--top-p) {top_p} must be in (0, 1]")
    if max_new_tokens < 0:
        raise VelocisError(f"max_new_tokens (--max-new-tokens) {max_new_tokens} must be >= 0")


def check_length(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    if prompt_tokens >= context:
        raise VelocisError(f"the prompt is {prompt_tokens} tokens but the model's context is {context}: "
                           f"shorten the prompt to fewer than {context} tokens")
    if prompt_tokens + max_new_tokens > context:
        raise VelocisError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                           f"context ({context}); ask for at most {context - prompt_tokens} new tokens "
                           f"(max_new_tokens / --max-new-tokens) or shorten the prompt")


def _as_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        return [row.tolist() for row in (prompts[None] if prompts.dim() == 1 else prompts)]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return [list(p) for p in prompts]


@torch.inference_mode()
def generate_ids(model, prompts, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 stop_ids: set[int] | None = None, recompute: bool = False, pad_id: int | None = None
                 ) -> Iterator[torch.Tensor]:
    """Yields next ids [B], one step at a time, for a batch of prompts of any lengths (a tensor
    [B, T], or lists of ids). A row that produced a stop id is finished: it yields `pad_id` (default
    the first stop id, else 0) from then on and is no longer sampled. Stops after max_new_tokens, or
    when every row is finished.

    All rows prefill together, right-padded, each at positions 0..len-1; the cache is then rolled
    back to each row's own length, so every row continues from its last real token (padding slots
    are never visible and get overwritten). Greedy outputs equal each prompt run alone."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    rows = _as_rows(prompts)
    lens = [len(r) for r in rows]
    if min(lens) == 0:
        raise VelocisError("a prompt is empty; give at least one token")
    check_length(max(lens), max_new_tokens, model.config.max_seq_len)
    if max_new_tokens == 0:
        return
    model.eval()
    device = model.device
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=device)
    filler = int(stop[0]) if len(stop) else 0
    pad = pad_id if pad_id is not None else filler
    B, T = len(rows), max(lens)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    def pick(logits):
        nxt = sample(logits, temperature, top_k, top_p, generator)
        return torch.where(done, torch.full_like(nxt, pad), nxt)

    if recompute:  # the reference: every row alone, the whole sequence every step
        seqs = [torch.tensor([r], device=device) for r in rows]
        for _ in range(max_new_tokens):
            nxt = pick(torch.cat([model(s)[:, -1] for s in seqs]))
            yield nxt
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                return
            seqs = [torch.cat([s, n.view(1, 1).clamp(min=0)], dim=1) for s, n in zip(seqs, nxt)]
        return
    plan = decode_plan(model) if B == 1 else None
    if plan is not None:  # one C++ call per token (kernels/decode_cpu.py): what batch-1 CPU decoding is bound by
        yield from _generate_planned(plan, rows[0], max_new_tokens,
                                     lambda logits: sample(logits, temperature, top_k, top_p, generator),
                                     set(stop_ids or ()))
        return
    ids = torch.full((B, T), pad, dtype=torch.long, device=device)
    ids.fill_(filler)  # right padding: written to the cache, never visible, overwritten
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, device=device)
    length = torch.tensor(lens, device=device)
    cache = model.new_cache(B, T + max_new_tokens)
    if len(set(lens)) > 1 and any(layer.kind == "state" for layer in cache.layers):
        raise VelocisError("prompts of different lengths cannot share a batch with this model: its recurrent "
                           "state layers would absorb the padding; give prompts of equal length or one at a time")
    logits = model(ids, cache=cache, logits_at=length - 1)[:, -1]  # prefill
    cache.rollback(length)
    for i in range(max_new_tokens):
        nxt = pick(logits)
        yield nxt
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        feed = torch.where(done, torch.full_like(nxt, filler), nxt)  # finished rows idle on a valid id
        logits = model(feed[:, None], cache=cache)[:, -1]


def _generate_planned(plan, prompt: list[int], max_new_tokens: int, sample_row, stop: set[int]) -> Iterator[torch.Tensor]:
    """One row through a C++ decode plan: a prefill call, then one call per token."""
    cache = plan.new_cache(len(prompt) + max_new_tokens)
    logits = plan.forward(prompt, 0, cache)
    for i in range(max_new_tokens):
        nxt = sample_row(logits[None])
        yield nxt
        if i == max_new_tokens - 1 or int(nxt) in stop:
            return
        logits = plan.forward(nxt, len(prompt) + i, cache)


class StreamDecoder:
    """Incremental detokenizer: push(id) -> new text that is safe to print ('' while a UTF-8
    character is still incomplete); flush() -> whatever remains.

    Decodes a short window, not the whole sequence, each step (vLLM's prefix/read offsets): the
    window starts one emitted chunk back, so decoders that treat a leading space specially
    (SentencePiece's "▁") see the same context as a full decode would.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens already turned into printed text

    def _piece(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""  # nothing new, or a multi-byte character split across tokens: wait for the rest
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._piece(final=False)

    def flush(self) -> str:
        return self._piece(final=True)

    def text(self) -> str:
        return self.tok.decode(self.ids)
