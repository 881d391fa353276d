"""The Python face of Velocis: `velocis.load(dir)` and `velocis.generate(model, tokenizer, prompt)`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from velocis.errors import VelocisError
from velocis.utils.device import default_dtype, resolve_device


def load(path: str | Path, device: str | torch.device | None = "auto", dtype: torch.dtype | None = None):
    """A Velocis model dir, a training run dir (latest model at its root) or a Hugging Face dir
    -> (model, tokenizer). The tokenizer is None when the directory holds none."""
    from velocis import model_io
    from velocis.interop import hf

    path = Path(path)
    if not path.exists():
        raise VelocisError(f"{path}: no such directory; pass a Velocis model, run or Hugging Face directory")
    if path.is_file():
        path = path.parent
    dev = resolve_device(device)
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
             add_bos: bool = True, stop_at_eos: bool = True, stream: bool = False,
             callback: Callable[[str], None] | None = None, stats: dict | None = None) -> str | list[str] | Iterator[str]:
    """Continue `prompt`; returns the generated text (without the prompt).

    A list of prompts (strings or token-id lists) runs as one batch and returns a list of texts;
    each row stops at its own EOS, and greedy outputs equal each prompt run alone.
    stream=True (one prompt) returns an iterator of text pieces as they are produced (UTF-8 safe);
    callback(piece) is called for each piece either way. `stats`, if given, receives
    new_tokens, seconds and tokens_per_s.
    """
    stats = stats if stats is not None else {}
    if _is_batch(prompt):
        if stream or callback is not None:
            raise VelocisError("stream and callback take one prompt; for a list of prompts call without them")
        return _generate_batch(model, tokenizer, list(prompt), max_new_tokens, temperature, top_k, top_p, seed,
                               add_bos, stop_at_eos, stats)
    pieces = _generate_pieces(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, add_bos,
                              stop_at_eos, callback, stats)
    return pieces if stream else "".join(pieces)


def _prompt_ids(model, tokenizer, prompt, add_bos: bool) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise VelocisError("this model directory has no tokenizer (tokenizer.json); pass token ids or add one")
        bos = add_bos and getattr(tokenizer, "bos_id", None) is not None
        ids = tokenizer.encode(prompt, add_bos=bos)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        bos = getattr(tokenizer, "bos_id", None)
        if bos is None:
            raise VelocisError("the prompt is empty and the tokenizer has no BOS token; give a prompt")
        ids = [bos]
    vocab = model.config.vocab_size
    if max(ids) >= vocab or min(ids) < 0:
        raise VelocisError(f"the prompt has token id {max(ids)} but the model's vocabulary has {vocab} ids; "
                           f"is the tokenizer the one this model was trained with?")
    return ids


def _sampling_setup(model, tokenizer, seed, stop_at_eos):
    device = model.device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    stop = {eos} if (stop_at_eos and eos is not None) else set()
    return gen, stop


def _generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, add_bos,
                    stop_at_eos, stats) -> list[str]:
    import time

    from velocis.infer.generate import generate_ids

    if tokenizer is None:
        raise VelocisError("this model directory has no tokenizer (tokenizer.json); use generate_ids with token ids")
    rows = [_prompt_ids(model, tokenizer, p, add_bos) for p in prompts]
    gen, stop = _sampling_setup(model, tokenizer, seed, stop_at_eos)
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


def _generate_pieces(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, add_bos,
                     stop_at_eos, callback, stats) -> Iterator[str]:
    import time

    from velocis.infer.generate import StreamDecoder, generate_ids

    if tokenizer is None:
        raise VelocisError("this model directory has no tokenizer (tokenizer.json); pass token ids or add one")
    ids = _prompt_ids(model, tokenizer, prompt, add_bos)
    gen, stop = _sampling_setup(model, tokenizer, seed, stop_at_eos)
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
