"""What the server serves: the model, its tokenizer, its name and chat template, and the token
helpers every front end (HTTP server, `velocis chat`, `velocis batch`) shares."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from velocis.errors import VelocisError
from velocis.serve.chat_template import ChatTemplate, find_chat_template


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE token uses -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


DTYPES = ("auto", "float32", "bfloat16", "float16")  # what --dtype takes


@dataclass
class ServedModel:
    model: object
    tokenizer: object
    name: str
    chat: ChatTemplate | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # generation_config.json's other EOS ids

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", name: str | None = None,
             dtype: str | None = None) -> "ServedModel":
        """dtype: "float32" | "bfloat16" | "float16", or None / "auto" for load's default (fp32 on a
        CPU, bf16 on a GPU that has it): the precision the engine computes in."""
        import torch

        import velocis

        if dtype not in (None, *DTYPES):
            raise VelocisError(f"dtype {dtype!r} must be one of {', '.join(DTYPES)}")
        model, tokenizer = velocis.load(path, device=device,
                                        dtype=None if dtype in (None, "auto") else getattr(torch, dtype))
        if tokenizer is None:
            raise VelocisError(f"{path}: no tokenizer (tokenizer.json); the server needs one to read text")
        path = Path(path)
        return cls(model, tokenizer, name or path.resolve().name, find_chat_template(path, tokenizer),
                   _generation_eos(path, tokenizer.eos_id))

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    def prompt_ids(self, text: str, prompt_start: bool = True) -> list[int]:
        """Token ids of a prompt, starting like a training document (the engine's rule for text):
        the model's prompt-start token first unless the text already begins with it."""
        ids = self.tokenizer.encode(text)
        start = self.model.config.prompt_start_token_id if prompt_start else None
        if start is not None and ids[:1] != [start]:
            ids = [start] + ids
        return ids

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self.chat is None:
            raise VelocisError("this model has no chat template (tokenizer_config.json has no \"chat_template\" "
                               "and its tokenizer no role tokens); use /v1/completions")
        return self.chat.render(messages, add_generation_prompt, **kwargs)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's raw bytes (OpenAI's logprobs "bytes"): a byte-level BPE token may hold half a
        UTF-8 character, which its decoded text cannot show."""
        piece = self.tokenizer.id_to_token(token_id)
        table = _byte_decoder()
        if piece is not None and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(self.token_text(token_id).encode("utf-8"))


def _generation_eos(path: Path, eos: int | None) -> list[int]:
    """generation_config.json may list several EOS ids (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>)."""
    try:
        got = json.loads((path / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    ids = got if isinstance(got, list) else [got]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0 and i != eos]
