"""Autoregressive generation with the static KV cache (gpt-fast style).

    ids = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator)
yields new token ids one at a time: one prefill forward over the prompt, then one single-token
forward per step against the cache. `recompute=True` runs the full sequence every step instead
(the reference the cached path is tested against).

`StreamDecoder` turns a stream of token ids into text pieces safe to print as they come: byte-level
BPE can split a multi-byte UTF-8 character (Chinese) across tokens, so a piece is emitted only
once it decodes without a trailing replacement character.
"""
from __future__ import annotations

from typing import Iterator

import torch

from velocis.errors import VelocisError


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


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise VelocisError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise VelocisError(f"--top-k {top_k} must be >= 0 (0 = off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise VelocisError(f"--top-p {top_p} must be in (0, 1]")
    if max_new_tokens < 0:
        raise VelocisError(f"--max-new-tokens {max_new_tokens} must be >= 0")


@torch.inference_mode()
def generate_ids(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 stop_ids: set[int] | None = None, recompute: bool = False) -> Iterator[torch.Tensor]:
    """prompt_ids [B, T] -> yields next ids [B] (stops at max_new_tokens, or when all rows hit a stop id)."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    B, T = prompt_ids.shape
    if T == 0:
        raise VelocisError("the prompt is empty; give at least one token (or a BOS token)")
    ctx = model.config.max_seq_len
    if T + max_new_tokens > ctx:
        raise VelocisError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                           f"({ctx}); use --max-new-tokens {max(ctx - T, 0)} or a shorter prompt")
    if max_new_tokens == 0:
        return
    model.eval()
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=prompt_ids.device)
    if recompute:
        seq = prompt_ids
        for _ in range(max_new_tokens):
            nxt = sample(model(seq)[:, -1], temperature, top_k, top_p, generator)
            yield nxt
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                return
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(prompt_ids, cache=cache)[:, -1]  # prefill
    for i in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, generator)
        yield nxt
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        logits = model(nxt[:, None], cache=cache)[:, -1]


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
