"""The Python face of Velocis: `velocis.load(dir)` and `velocis.generate(model, tokenizer, prompt)`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from velocis.errors import VelocisError
from velocis.utils.device import default_dtype, resolve_device


def load(path: str | Path, device: str | torch.device | None = "auto", dtype: torch.dtype | None = None):
    """A Velocis model dir, a training run dir (latest model at its root), a Hugging Face dir or a
    GGUF file -> (model, tokenizer). The tokenizer is None when the directory holds none."""
    from velocis import model_io
    from velocis.interop import hf

    from velocis.utils.output_dir import as_path

    path = as_path(path, "path")
    if dtype is not None:
        model_io.require_dtype(dtype, "dtype")
    if not path.exists():
        raise VelocisError(f"{path}: no such directory; pass a Velocis model, run or Hugging Face directory")
    dev = resolve_device(device)
    if path.is_file() and path.suffix == ".gguf":  # a llama.cpp file: dequantized into a Velocis model
        from velocis.interop.gguf import load_gguf

        return load_gguf(path, device=dev, dtype=dtype)
    if path.is_file():
        path = path.parent
    dtype = dtype or default_dtype(dev)
    if model_io.is_velocis_dir(path):
        return model_io.load_model_dir(path, device=dev, dtype=dtype)
    if not (path / "config.json").is_file():
        if (path / "checkpoints").is_dir():
            raise VelocisError(f"{path}: a run directory without a model at its root yet; "
                               f"pass one of {path}/checkpoints/step_N")
        raise VelocisError(f"{path}: no config.json; pass a Velocis model, run or Hugging Face directory")
    return hf.load_hf(path, device=dev, dtype=dtype)


def _is_batch(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)


def generate(model, tokenizer, prompt: str | list[int] | list[str] | list[list[int]], max_new_tokens: int = 128,
             temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None, seed: int | None = None,
             prompt_start: bool = True, stop_at_eos: bool = True, stream: bool = False,
             callback: Callable[[str], None] | None = None, stats: dict | None = None) -> str | list[str] | Iterator[str]:
    """Continue `prompt`; returns the generated text (without the prompt).

    A list of prompts (strings or token-id lists) runs as one batch and returns a list of texts;
    each row stops at its own EOS, and greedy outputs equal each prompt run alone.
    prompt_start: put the model's prompt-start token first (`config.prompt_start_token_id`: the token
    that precedes a document in its training data, EOS for Velocis models, BOS for Llama imports).
    stream=True (one prompt) returns an iterator of text pieces as they are produced (UTF-8 safe);
    callback(piece) is called for each piece either way. `stats`, if given, receives
    prompt_tokens, new_tokens, seconds and tokens_per_s. Every check runs before the first token,
    also with stream=True.
    """
    from velocis.infer.generate import check_length, check_sampling

    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise VelocisError(f"seed (--seed) must be an integer, got {seed!r}")
    if tokenizer is None:
        raise VelocisError("this model directory has no tokenizer (tokenizer.json); add one, or call "
                           "velocis.infer.generate.generate_ids with token ids")
    stats = stats if stats is not None else {}
    batch = _is_batch(prompt)
    if batch and (stream or callback is not None):
        raise VelocisError("stream and callback take one prompt; for a list of prompts call without them")
    rows = [_prompt_ids(model, tokenizer, p, prompt_start) for p in (prompt if batch else [prompt])]
    for ids in rows:
        check_length(len(ids), max_new_tokens, model.config.max_seq_len)
    gen, stop = _sampling_setup(model, tokenizer, seed, stop_at_eos)
    if batch:
        return _generate_batch(model, tokenizer, rows, max_new_tokens, temperature, top_k, top_p, gen, stop, stats)
    pieces = _generate_pieces(model, tokenizer, rows[0], max_new_tokens, temperature, top_k, top_p, gen, stop,
                              callback, stats)
    return pieces if stream else "".join(pieces)


def _prompt_ids(model, tokenizer, prompt, prompt_start: bool) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = list(prompt)
    else:
        raise VelocisError(f"prompt must be a string or a list of token ids (or a list of those), got "
                           f"{type(prompt).__name__}")
    start = model.config.prompt_start_token_id if prompt_start else None
    if start is not None and ids[:1] != [start]:
        ids = [start] + ids
    if not ids:
        raise VelocisError("the prompt is empty and this model has no prompt-start token; give a prompt")
    vocab = model.config.vocab_size
    if max(ids) >= vocab or min(ids) < 0:
        raise VelocisError(f"the prompt has token id {max(ids)} but the model's vocabulary has {vocab} ids; "
                           f"is the tokenizer the one this model was trained with?")
    return ids


def _sampling_setup(model, tokenizer, seed, stop_at_eos):
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(seed)
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    stop = {eos} if (stop_at_eos and eos is not None) else set()
    return gen, stop


def _generate_batch(model, tokenizer, rows, max_new_tokens, temperature, top_k, top_p, gen, stop, stats) -> list[str]:
    import time

    from velocis.infer.generate import generate_ids

    out: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    t0 = time.perf_counter()
    for nxt in generate_ids(model, rows, max_new_tokens, temperature, top_k or None, top_p, gen, stop):
        for b, t in enumerate(nxt.tolist()):
            if finished[b] or t in stop:
                finished[b] = True
                continue
            out[b].append(t)
    seconds = time.perf_counter() - t0
    new = sum(len(o) for o in out)
    stats.update(prompt_tokens=sum(map(len, rows)), new_tokens=new, seconds=seconds,
                 tokens_per_s=new / max(seconds, 1e-9))
    return [tokenizer.decode(o) for o in out]


def _generate_pieces(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, gen, stop, callback,
                     stats) -> Iterator[str]:
    import time

    from velocis.infer.generate import StreamDecoder, generate_ids

    decoder = StreamDecoder(tokenizer)
    stats.update(prompt_tokens=len(ids), new_tokens=0)
    t0 = time.perf_counter()
    for nxt in generate_ids(model, [ids], max_new_tokens, temperature, top_k or None, top_p, gen, stop):
        t = int(nxt[0])
        if t in stop:
            break
        stats["new_tokens"] += 1
        piece = decoder.push(t)
        if piece:
            if callback:
                callback(piece)
            yield piece
    stats["seconds"] = time.perf_counter() - t0
    stats["tokens_per_s"] = stats["new_tokens"] / max(stats["seconds"], 1e-9)
    rest = decoder.flush()
    if rest:
        if callback:
            callback(rest)
        yield rest
