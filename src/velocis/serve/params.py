"""Request bodies -> checked values. Every mistake is an ApiError(400) naming the field, raised before
anything reaches the engine. OpenAI's fields and ranges, plus vLLM's extra sampling fields (top_k,
min_p, repetition_penalty, stop_token_ids, ignore_eos). Unknown fields are ignored, as OpenAI does."""
from __future__ import annotations

import math
from dataclasses import dataclass

from velocis.errors import VelocisError
from velocis.infer.sampling import MAX_LOGPROBS, SamplingParams
from velocis.serve.errors import bad_request

MAX_N = 128
MAX_STOP = 16


def _kind(value) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "array", dict: "object"}.get(type(value), type(value).__name__)


def number(body: dict, name: str, default=None, lo=None, hi=None, integer=False, lo_open=False):
    """body[name] as a number in [lo, hi] ((lo, hi] with lo_open); null or absent -> default."""
    value = body.get(name)
    if value is None:
        return default
    ok = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok) or (isinstance(value, float) and not math.isfinite(value)):
        raise bad_request(f"{name} must be {'an integer' if integer else 'a number'}, got {_kind(value)} {value!r}",
                          name)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        low = "-inf" if lo is None else lo
        raise bad_request(f"{name} must be in {'(' if lo_open else '['}{low}, {hi if hi is not None else 'inf'}], "
                          f"got {value}", name)
    return value


def flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {_kind(value)} {value!r}", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP:
        raise bad_request(f"stop takes at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    return stop


@dataclass
class Generation:
    """What a completion or chat request asks for, checked; max_tokens is fitted to the prompt later."""
    params: SamplingParams
    max_tokens: int | None
    stream: bool
    include_usage: bool
    response_format: dict | None


def generation(body: dict, logprobs: int | None, max_tokens_names=("max_tokens",)) -> Generation:
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = number(body, name, max_tokens, lo=1, integer=True)
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    include_usage = flag(options or {}, "include_usage")
    stop_token_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_token_ids):
        raise bad_request("stop_token_ids must be a list of token ids", "stop_token_ids")
    rf = body.get("response_format")
    if rf is not None and not isinstance(rf, dict):
        raise bad_request("response_format must be an object such as {\"type\": \"json_object\"}", "response_format")
    try:
        params = SamplingParams(
            temperature=number(body, "temperature", 1.0, 0, 2),
            top_p=number(body, "top_p", 1.0, 0, 1, lo_open=True),
            top_k=number(body, "top_k", None, -1, None, integer=True),
            min_p=number(body, "min_p", 0.0, 0, 1),
            repetition_penalty=number(body, "repetition_penalty", 1.0, 0, None, lo_open=True),
            presence_penalty=number(body, "presence_penalty", 0.0, -2, 2),
            frequency_penalty=number(body, "frequency_penalty", 0.0, -2, 2),
            seed=number(body, "seed", None, integer=True),
            stop=_stop(body), stop_token_ids=list(stop_token_ids), ignore_eos=flag(body, "ignore_eos"),
            n=number(body, "n", 1, 1, MAX_N, integer=True), logprobs=logprobs)
    except VelocisError as e:  # a rule SamplingParams has and the checks above do not
        raise bad_request(str(e)) from None
    return Generation(params, max_tokens, stream, include_usage, rf)


def fit_max_tokens(gen: Generation, prompt_tokens: int, context: int, what: str = "prompt") -> int:
    """The prompt and the completion share the context: refuse what cannot fit (vLLM's message).
    Returns the request's max_tokens: as asked, else the rest of the context."""
    if prompt_tokens >= context:
        raise bad_request(f"This model's maximum context length is {context} tokens. However, your {what} is "
                          f"{prompt_tokens} tokens; shorten it to at most {context - 1} tokens.",
                          "messages" if what == "messages" else "prompt", "context_length_exceeded")
    if gen.max_tokens is not None and prompt_tokens + gen.max_tokens > context:
        raise bad_request(f"This model's maximum context length is {context} tokens. However, you requested "
                          f"{prompt_tokens + gen.max_tokens} tokens ({prompt_tokens} in the {what}, "
                          f"{gen.max_tokens} in the completion). Please reduce the length of the {what} or "
                          f"max_tokens.", "max_tokens", "context_length_exceeded")
    return gen.max_tokens if gen.max_tokens is not None else context - prompt_tokens


def completion_logprobs(body: dict) -> int | None:
    return number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)


def chat_logprobs(body: dict) -> int | None:
    wanted = flag(body, "logprobs")
    top = number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if top is not None and not wanted:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    return (top or 0) if wanted else None


def prompts(body: dict) -> list[str | list[int]]:
    """A completion's prompt: a string, a list of strings, a list of token ids or a list of those."""
    p = body.get("prompt")
    if p is None:
        raise bad_request("prompt is required", "prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return [p]
        if all(isinstance(s, str) for s in p):
            return list(p)
        if all(isinstance(r, list) and r and all(isinstance(t, int) and not isinstance(t, bool) for t in r)
               for r in p):
            return list(p)
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of those "
                      "(none empty)", "prompt")


def messages(body: dict) -> list[dict]:
    """Chat messages with their content as a string (text parts joined), ready for a chat template."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad_request("messages is required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("messages must be a non-empty array of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"{where} must be an object with a string \"role\"", where)
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                      "are supported", f"{where}.content")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({**m, "content": content})
    return out


def unsupported(body: dict, *names: str) -> None:
    for name in names:
        if body.get(name):  # null, false, [] and {} mean "not used"
            raise bad_request(f"{name} is not supported by this server", name)
