"""The OpenAI API over the engine loop, independent of HTTP: a handler takes a parsed JSON body and
returns the response body (a dict) or, for stream=true, an `EventStream` of server-sent events. The
HTTP app (app.py) and `velocis batch` both call it, so they answer the same way.

    api = OpenAIApi(served, engine_loop, metrics)
    body = await api.completions({"prompt": "从前", "max_tokens": 16})
    stream = await api.chat({"messages": [...], "stream": True})
    async for event in stream.events(): ...      # "data: {...}\\n\\n", ending with "data: [DONE]\\n\\n"

Every check (fields, model name, prompt length, response_format) runs and every prompt is in the
engine before the handler returns, so mistakes are HTTP errors, never half-sent streams.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import AsyncIterator

from velocis.errors import VelocisError
from velocis.serve import params as P
from velocis.serve.engine_loop import EngineLoop, Submission
from velocis.serve.errors import ApiError, bad_request, error_body
from velocis.serve.model import ServedModel


def _lp(value: float) -> float:
    """JSON has no -inf (a token a response_format forbids): clamp as vLLM does."""
    return max(float(value), -9999.0)


def sse(data) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


@dataclasses.dataclass
class _Choice:
    """One output sequence as it accumulates."""
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list = dataclasses.field(default_factory=list)  # (token id, logprob, top [(id, lp)])


class _Call:
    """One API call in flight: its engine requests, timing and usage."""

    def __init__(self, api: "OpenAIApi", kind: str, sub: Submission, prompt_lens: list[int], n: int,
                 arrival: float):
        self.api, self.kind, self.sub, self.n = api, kind, sub, n
        self.prompt_lens = prompt_lens
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrival = arrival
        self.first_token: float | None = None
        self.choices = [_Choice() for _ in range(len(prompt_lens) * n)]

    async def outputs(self) -> AsyncIterator[tuple[int, object]]:
        """(choice index, Output), recording tokens, logprobs and timing."""
        async for number, out in self.sub.outputs():
            i = number * self.n + out.index
            c = self.choices[i]
            c.tokens += len(out.token_ids)
            if out.token_ids and self.first_token is None:
                self.first_token = time.perf_counter()
            if out.logprobs:
                c.logprobs += [(t, lp, top) for t, (lp, top) in zip(out.token_ids, out.logprobs)]
            c.text = out.text
            if out.finished:
                c.finish_reason = out.finish_reason
            yield i, out

    def usage(self) -> dict:
        done = sum(c.tokens for c in self.choices)
        prompt = sum(self.prompt_lens)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def finish(self, record: bool = True) -> None:
        """Always called (finally): abort what is left, record metrics once (not for a call the engine
        refused, which is an error, not a request)."""
        aborted = not self.sub.finished
        self.sub.close()
        if record and self.api.metrics is not None and self.arrival is not None:
            now = time.perf_counter()
            reasons = ["abort" if aborted and c.finish_reason is None else c.finish_reason or "abort"
                       for c in self.choices]
            self.api.metrics.observe_call(None if self.first_token is None else self.first_token - self.arrival,
                                          now - self.arrival, reasons)
            self.arrival = None


class EventStream:
    """A started streaming call: events() yields SSE strings; close() (idempotent) aborts the
    engine requests if the stream did not run to its end (the client went away)."""

    def __init__(self, call: _Call, events: AsyncIterator[str]):
        self._call, self._events = call, events

    async def events(self) -> AsyncIterator[str]:
        try:
            async for event in self._events:
                yield event
        except Exception as e:  # the engine failed mid-stream: the status is sent already, say it in the stream
            yield sse(error_body(f"generation failed: {type(e).__name__}: {e}", "internal_server_error"))
            yield sse("[DONE]")
        finally:
            self.close()

    def close(self) -> None:
        self._call.finish()


class OpenAIApi:
    def __init__(self, served: ServedModel, engine_loop: EngineLoop, metrics=None):
        self.served, self.engine_loop, self.metrics = served, engine_loop, metrics
        self.created = int(time.time())

    # -- shared -------------------------------------------------------------------------------
    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.served.name:
            raise ApiError(404, f"The model `{model}` does not exist. This server serves `{self.served.name}`.",
                           "model", "model_not_found")

    def _ids(self, prompt: str | list[int], prompt_start: bool = True) -> list[int]:
        if isinstance(prompt, str):
            ids = self.served.prompt_ids(prompt, prompt_start)
        else:
            ids = list(prompt)
            vocab = self.served.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})", "prompt")
        if not ids:
            raise bad_request("the prompt is empty", "prompt")
        return ids

    async def _response_format(self, response_format: dict | None, params) -> dict | None:
        """Check (400) and compile a response_format off the event loop; the engine applies it, finding
        the compiled grammar in structured's cache (same format, tokenizer and stop ids)."""
        if response_format is None or response_format.get("type") == "text":
            if response_format is not None and set(response_format) != {"type"}:
                raise bad_request('response_format {"type": "text"} takes no other field', "response_format")
            return None
        stop_ids = sorted(params.stop_ids(self.engine_loop.engine.eos)) or None
        try:
            from velocis.infer.structured import compile_response_format
        except ImportError:
            raise bad_request("response_format is not supported by this installation", "response_format") from None
        try:  # compiling can take a while (a large schema): not on the event loop
            await asyncio.to_thread(compile_response_format, response_format, self.served.tokenizer,
                                    stop_ids=stop_ids)
        except VelocisError as e:
            raise bad_request(str(e), "response_format") from None
        return response_format

    async def _start(self, kind: str, rows: list[list[int]], gen: P.Generation, extra_stop: list[int],
                     arrival: float | None, what: str) -> _Call:
        fitted = [P.fit_max_tokens(gen, len(ids), self.served.context, what) for ids in rows]
        if gen.params.ignore_eos:  # the turn-end and other EOS ids count as EOS (vLLM does the same)
            extra_stop = []
        gen.params.stop_token_ids = sorted(set(gen.params.stop_token_ids) | set(extra_stop))
        response_format = await self._response_format(gen.response_format, gen.params)
        sub = Submission(self.engine_loop, "chat" if kind == "chat" else "cmpl")
        call = _Call(self, kind, sub, [len(r) for r in rows], gen.params.n,
                     time.perf_counter() if arrival is None else arrival)
        try:
            for ids, max_tokens in zip(rows, fitted):
                await sub.add(ids, dataclasses.replace(gen.params, max_tokens=max_tokens), response_format)
        except VelocisError as e:  # the engine's refusal (a prompt its KV cache cannot hold)
            call.finish(record=False)
            raise bad_request(str(e), "messages" if kind == "chat" else "prompt") from None
        except BaseException:
            call.finish(record=False)
            raise
        return call

    def _head(self, call: _Call, obj: str) -> dict:
        return {"id": call.id, "object": obj, "created": call.created, "model": self.served.name}

    # -- logprobs -------------------------------------------------------------------------------
    def _completion_logprobs(self, entries: list, offset: int) -> tuple[dict, int]:
        text = self.served.token_text
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in entries:
            piece = text(token)
            out["tokens"].append(piece)
            out["token_logprobs"].append(_lp(lp))
            out["top_logprobs"].append({text(t): _lp(v) for t, v in top})
            out["text_offset"].append(offset)
            offset += len(piece)
        return out, offset

    def _chat_logprobs(self, entries: list) -> dict:
        s = self.served

        def one(t, lp):
            return {"token": s.token_text(t), "logprob": _lp(lp), "bytes": s.token_bytes(t)}

        return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in entries],
                "refusal": None}

    # -- /v1/completions ------------------------------------------------------------------------
    async def completions(self, body: dict, arrival: float | None = None) -> dict | EventStream:
        self.check_model(body)
        prompts = P.prompts(body)
        P.unsupported(body, "suffix", "logit_bias")
        echo = P.flag(body, "echo")
        gen = P.generation(body, P.completion_logprobs(body))
        best_of = P.number(body, "best_of", None, 1, P.MAX_N, integer=True)
        if best_of is not None and best_of != gen.params.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        if echo and gen.params.logprobs is not None:
            raise bad_request("echo with logprobs (prompt logprobs) is not supported", "echo")
        rows = [self._ids(p) for p in prompts]
        texts = [p if isinstance(p, str) else self.served.tokenizer.decode(p) for p in prompts] if echo else []
        call = await self._start("completion", rows, gen, self.served.stop_token_ids, arrival, "prompt")
        want_lp = gen.params.logprobs is not None
        if gen.stream:
            return EventStream(call, self._completion_events(call, texts if echo else None, want_lp,
                                                              gen.include_usage))
        try:
            async for _ in call.outputs():
                pass
        finally:
            call.finish()
        choices = []
        for i, c in enumerate(call.choices):
            prefix = texts[i // call.n] if echo else ""
            lp = self._completion_logprobs(c.logprobs, len(prefix))[0] if want_lp else None
            choices.append({"index": i, "text": prefix + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {**self._head(call, "text_completion"), "choices": choices, "usage": call.usage()}

    async def _completion_events(self, call: _Call, echo: list[str] | None, want_lp: bool,
                                 include_usage: bool) -> AsyncIterator[str]:
        head = self._head(call, "text_completion")
        usage = {"usage": None} if include_usage else {}
        offsets = [0] * len(call.choices)

        def chunk(i, text, lp=None, finish=None):
            return sse({**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}],
                        **usage})

        if echo:
            for i in range(len(call.choices)):
                offsets[i] = len(echo[i // call.n])
                yield chunk(i, echo[i // call.n])
        async for i, out in call.outputs():
            lp = None
            if want_lp and out.logprobs and out.token_ids:  # (a stop token has logprobs but no token)
                entries = [(t, v, top) for t, (v, top) in zip(out.token_ids, out.logprobs)]
                lp, offsets[i] = self._completion_logprobs(entries, offsets[i])
            if out.delta or out.finished or lp:
                yield chunk(i, out.delta, lp, out.finish_reason if out.finished else None)
        if include_usage:
            yield sse({**head, "choices": [], "usage": call.usage()})
        yield sse("[DONE]")

    # -- /v1/chat/completions -------------------------------------------------------------------
    def chat_prompt_ids(self, body: dict) -> list[int]:
        msgs = P.messages(body)
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise bad_request("chat_template_kwargs must be an object", "chat_template_kwargs")
        try:
            text = self.served.chat_prompt(msgs, P.flag(body, "add_generation_prompt", True), **kwargs)
        except VelocisError as e:
            raise bad_request(str(e), "messages") from None
        return self._ids(text)

    def _chat_stop_ids(self) -> list[int]:
        own = self.served.chat.stop_token_ids if self.served.chat is not None else []
        return sorted(set(own) | set(self.served.stop_token_ids))

    async def chat(self, body: dict, arrival: float | None = None) -> dict | EventStream:
        self.check_model(body)
        P.unsupported(body, "tools", "functions", "logit_bias")
        gen = P.generation(body, P.chat_logprobs(body), ("max_tokens", "max_completion_tokens"))
        ids = self.chat_prompt_ids(body)
        call = await self._start("chat", [ids], gen, self._chat_stop_ids(), arrival, "messages")
        want_lp = gen.params.logprobs is not None
        if gen.stream:
            return EventStream(call, self._chat_events(call, want_lp, gen.include_usage))
        try:
            async for _ in call.outputs():
                pass
        finally:
            call.finish()
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c.logprobs) if want_lp else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(call.choices)]
        return {**self._head(call, "chat.completion"), "choices": choices, "usage": call.usage()}

    async def _chat_events(self, call: _Call, want_lp: bool, include_usage: bool) -> AsyncIterator[str]:
        head = self._head(call, "chat.completion.chunk")
        usage = {"usage": None} if include_usage else {}

        def chunk(i, delta, lp=None, finish=None):
            return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                        **usage})

        for i in range(len(call.choices)):  # the role first, as OpenAI sends it
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, out in call.outputs():
            lp = None
            if want_lp and out.logprobs and out.token_ids:
                lp = self._chat_logprobs([(t, v, top) for t, (v, top) in zip(out.token_ids, out.logprobs)])
            if out.delta or lp:
                yield chunk(i, {"content": out.delta}, lp, out.finish_reason if out.finished else None)
            elif out.finished:
                yield chunk(i, {}, None, out.finish_reason)
        if include_usage:
            yield sse({**head, "choices": [], "usage": call.usage()})
        yield sse("[DONE]")

    # -- the rest --------------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.served.name, "object": "model", "created": self.created,
                                            "owned_by": "velocis", "max_model_len": self.served.context}]}

    def tokenize(self, body: dict) -> dict:
        self.check_model(body)
        if "messages" in body:
            ids = self.chat_prompt_ids(body)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad_request("tokenize takes \"prompt\" (a string) or \"messages\"", "prompt")
            ids = self.served.prompt_ids(prompt, P.flag(body, "add_special_tokens", True))
        return {"count": len(ids), "max_model_len": self.served.context, "tokens": ids}

    def detokenize(self, body: dict) -> dict:
        self.check_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request("tokens must be a list of token ids", "tokens")
        vocab = self.served.tokenizer.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the tokenizer's vocabulary (0..{vocab - 1})", "tokens")
        return {"prompt": self.served.tokenizer.decode(tokens)}
