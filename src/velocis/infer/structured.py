"""Structured output: constrained decoding to a JSON schema, a regex or a grammar (llguidance).

    grammar = compile_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": {...}}}, tok)
    m = grammar.matcher()                       # one per sequence (a copy of a compiled prototype: ~1 us)
    while not m.is_finished():
        logits = model(ids)[0, -1]
        m.apply_mask(logits)                    # in place: disallowed ids -> -inf (also ids past the tokenizer)
        t = int(sample(logits[None])[0]); m.advance(t)   # a stop id (EOS) is allowed only where the output is complete

`response_format` is OpenAI's, plus two Velocis types:

    {"type": "text"}                                        -> None (no constraint)
    {"type": "json_object"}                                 -> any JSON object
    {"type": "json_schema", "json_schema": {"name": str, "description": str, "schema": {...}, "strict": bool}}
    {"type": "regex", "regex": r"\\d{4}-\\d{2}-\\d{2}"}        -> the whole output matches (Rust `regex` syntax;
                                                               \\d is [0-9], as in JSON schema patterns)
    {"type": "grammar", "grammar": "start: ...", "syntax": "lark" | "gbnf" | "ebnf" | "regex"}
                                                            ("definition" may stand for "grammar", as in OpenAI's
                                                             custom-tool formats; the default syntax is "lark")

A mistake in the format, the schema, the regex or the grammar raises `VelocisError` naming it (the server answers
HTTP 400). `strict: true` also refuses schema keywords the library cannot enforce (`uniqueItems`, `not`, `if`, ...);
without it they are ignored and listed in `Grammar.warnings` (OpenAI's best effort).

JSON is generated with at most one newline and 64 spaces/tabs between tokens (pretty-printed or compact, never an
endless run of whitespace); a schema's "x-guidance" object may change that with llguidance's JSON options, e.g.
{"whitespace_pattern": ""} for compact JSON only. A json_schema without "schema" means any JSON object. Strings
hold raw UTF-8; `\\uXXXX` escapes are only allowed for control characters. Compiled grammars are cached per tokenizer
and format, so a format that comes with every request is compiled once.

Everything here works on token ids of the tokenizer; the model's vocabulary may be larger (padded): the extra ids are
always masked.
"""
from __future__ import annotations

import copy as _copy
import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np
import torch

from velocis.errors import VelocisError

try:  # a declared dependency; where it is missing, compiling a format says how to install it
    import llguidance as _llguidance
except ImportError:  # pragma: no cover - exercised only where llguidance is missing
    _llguidance = None

FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")
GRAMMAR_SYNTAXES = ("lark", "gbnf", "ebnf", "regex")
# between JSON tokens: compact or pretty-printed (one newline, then indentation), never unbounded whitespace
JSON_WHITESPACE = r"(?:\r?\n)?[\x20\x09]{0,64}"
CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)


class TokenNotAllowed(RuntimeError):
    """`Matcher.advance` got a token the constraint forbids (the caller did not apply the mask). The matcher's
    state is unchanged, so the caller may pick another token."""


def _llg():
    if _llguidance is None:
        raise VelocisError("structured output (response_format) needs the llguidance package: "
                           "pip install 'llguidance>=1.9,<2'")
    return _llguidance


# -- tokenizers --------------------------------------------------------------------------

class _TokInfo:
    """llguidance's view of one tokenizer (built once: ~0.1 s for 32K tokens)."""

    def __init__(self, ll_tokenizer, key: str, vocab_size: int):
        self.ll = ll_tokenizer
        self.key = key
        self.vocab_size = vocab_size


_tok_by_object: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_tok_by_key: "OrderedDict[tuple, _TokInfo]" = OrderedDict()
_grammars: "OrderedDict[tuple, Grammar]" = OrderedDict()
_lock = threading.Lock()


def _stop_ids(tokenizer, stop_ids) -> tuple[int, ...]:
    if stop_ids is None:
        if getattr(tokenizer, "eos_id", None) is None:
            raise VelocisError("this tokenizer has no end-of-text token: pass stop_ids to compile_response_format")
        return (int(tokenizer.eos_id),)
    ids = tuple(sorted({int(i) for i in stop_ids}))
    if not ids:
        raise VelocisError("stop_ids is empty: structured output needs a token that ends the output")
    return ids


def _tokenizer_info(tokenizer, stop: tuple[int, ...]) -> _TokInfo:
    """The llguidance tokenizer for a velocis Tokenizer (or a bare `tokenizers.Tokenizer`)."""
    llg = _llg()
    try:
        per_object = _tok_by_object.get(tokenizer)
    except TypeError:  # not weak-referenceable
        per_object = None
    if per_object is not None and stop in per_object:
        return per_object[stop]
    backend = _copy.copy(getattr(tokenizer, "backend", tokenizer))  # padding/truncation must not reach llguidance
    backend.no_padding()
    backend.no_truncation()
    text = backend.to_str()
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()
    with _lock:
        info = _tok_by_key.get((key, stop))
        if info is not None:
            _tok_by_key.move_to_end((key, stop))
    if info is None:
        vocab = backend.get_vocab_size(with_added_tokens=True)
        bad = [i for i in stop if not 0 <= i < vocab]
        if bad:
            raise VelocisError(f"stop id(s) {bad} are outside the tokenizer's vocabulary of {vocab}")
        try:
            ll = llg.LLTokenizer(text, eos_token=list(stop))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain exceptions
            raise VelocisError(f"structured output cannot use this tokenizer: {e}") from None
        info = _TokInfo(ll, key, ll.vocab_size)
        with _lock:
            _tok_by_key[(key, stop)] = info
            while len(_tok_by_key) > 16:
                _tok_by_key.popitem(last=False)
    try:
        _tok_by_object.setdefault(tokenizer, {})[stop] = info
    except TypeError:
        pass
    return info


# -- compiling ---------------------------------------------------------------------------

def _check_keys(obj: dict, allowed: Iterable[str], where: str) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise VelocisError(f"{where}: unknown field(s) {', '.join(map(repr, extra))}; "
                           f"allowed: {', '.join(map(repr, allowed))}")


def _string_field(obj: dict, name: str, where: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        got = "missing" if name not in obj else f"{type(value).__name__} {value!r}"[:80]
        raise VelocisError(f"{where}.{name} must be a non-empty string ({got})")
    return value


def _json_schema_grammar(rf: dict) -> tuple[str, str]:
    llg = _llg()
    _check_keys(rf, ("type", "json_schema"), "response_format")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise VelocisError('response_format.json_schema must be an object: {"name": ..., "schema": {...}, '
                           f'"strict": true}} (got {type(spec).__name__})')
    _check_keys(spec, ("name", "description", "schema", "strict"), "response_format.json_schema")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise VelocisError(f"response_format.json_schema.name must be a string, not {type(name).__name__}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise VelocisError(f"response_format.json_schema.strict must be true or false, not {strict!r}")
    what = f"JSON schema {name!r}" if name else "JSON schema"
    schema = spec.get("schema", {"type": "object"})  # OpenAI: optional; none = any JSON object
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise VelocisError(f"response_format.json_schema.schema: the {what} is a string that is not JSON ({e})") \
                from None
    if schema is True:
        schema = {}
    if schema is False:
        raise VelocisError(f"invalid {what}: the schema false accepts nothing")
    if not isinstance(schema, dict):
        raise VelocisError(f"response_format.json_schema.schema must be an object (a JSON schema), "
                           f"not {type(schema).__name__}")
    options = {"lenient": False} if strict else {}
    defaults = {"whitespace_pattern": JSON_WHITESPACE} if strict else \
        {"whitespace_pattern": JSON_WHITESPACE, "lenient": True}
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=defaults, overrides=options)
    except (ValueError, TypeError) as e:
        raise VelocisError(f"invalid {what}: {e}") from None
    return grammar, what


def _regex_grammar(regex: str) -> str:
    """The whole output matches `regex` (Rust regex syntax), with \\d meaning [0-9] as in JSON schema patterns:
    the regex crate's Unicode \\d would let a date pattern through in Devanagari or Gurung Khema digits."""
    llg = _llg()
    if (len(regex) - len(regex.rstrip("\\"))) % 2:  # llguidance would drop it silently
        raise VelocisError(f"invalid regex {regex[-40:]!r}: it ends with a lone backslash")
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(llg.LLMatcher.grammar_from_regex(regex))
    if failed:
        raise VelocisError(f"invalid regex: {_clean(messages[0])}")
    return llg.LLMatcher.grammar_from_lark("start: /" + llg.regex_to_lark(regex, "d") + "/")


def _grammar_source(rf: dict) -> tuple[str, str]:
    """(llguidance grammar, what to call it in errors) for a response_format other than text."""
    llg = _llg()
    kind = rf["type"]
    if kind == "json_object":
        _check_keys(rf, ("type",), "response_format")
        schema = {"type": "object"}
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE}), \
            "JSON object"
    if kind == "json_schema":
        return _json_schema_grammar(rf)
    if kind == "regex":
        _check_keys(rf, ("type", "regex"), "response_format")
        return _regex_grammar(_string_field(rf, "regex", "response_format")), "regex"
    # grammar
    _check_keys(rf, ("type", "grammar", "definition", "syntax"), "response_format")
    if "grammar" in rf and "definition" in rf:
        raise VelocisError('response_format: give the grammar as "grammar" or "definition", not both')
    text = _string_field(rf, "definition" if "definition" in rf else "grammar", "response_format")
    syntax = rf.get("syntax", "lark")
    if syntax not in GRAMMAR_SYNTAXES:
        raise VelocisError(f"response_format.syntax {syntax!r} is not one of {', '.join(GRAMMAR_SYNTAXES)}")
    if syntax == "regex":
        return _regex_grammar(text), "regex"
    if syntax == "lark":
        return llg.LLMatcher.grammar_from_lark(text), "Lark grammar"
    from llguidance.gbnf_to_lark import any_to_lark  # GBNF (llama.cpp's EBNF) -> Lark

    try:
        return llg.LLMatcher.grammar_from_lark(any_to_lark(text)), f"{syntax.upper()} grammar"
    except Exception as e:  # noqa: BLE001 - GbnfToLarkError and friends
        raise VelocisError(f"invalid {syntax.upper()} grammar: {e}") from None


def _clean(message: str) -> str:
    message = message.split("\n<state>")[0].strip()  # drop the parser's state dump
    return message if len(message) <= 2000 else message[:2000] + " ..."


def compile_response_format(response_format: dict | None, tokenizer, *, stop_ids: Iterable[int] | None = None
                            ) -> "Grammar | None":
    """Compile an OpenAI-style `response_format` for `tokenizer` (cached: the same format and tokenizer give the
    same Grammar). Returns None for no constraint (None or {"type": "text"}). `stop_ids`: the tokens that may end
    the output once it is complete (default: the tokenizer's EOS). Raises VelocisError on any mistake."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise VelocisError('response_format must be an object such as {"type": "json_object"}, '
                           f"not {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in FORMAT_TYPES:
        raise VelocisError(f"response_format.type must be one of {', '.join(FORMAT_TYPES)} (got {kind!r})")
    if kind == "text":
        _check_keys(response_format, ("type",), "response_format")
        return None
    stop = _stop_ids(tokenizer, stop_ids)
    try:
        canonical = json.dumps(response_format, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise VelocisError(f"response_format is not plain JSON: {e}") from None
    info = _tokenizer_info(tokenizer, stop)
    key = (info.key, stop, canonical)
    with _lock:
        grammar = _grammars.get(key)
        if grammar is not None:
            _grammars.move_to_end(key)
            return grammar
    source, what = _grammar_source(response_format)
    grammar = Grammar(kind, source, what, info, stop)
    with _lock:
        grammar = _grammars.setdefault(key, grammar)  # a racing thread's copy wins: the same grammar
        while len(_grammars) > CACHE_SIZE:
            _grammars.popitem(last=False)
    return grammar


def clear_cache() -> None:
    """Forget compiled grammars and tokenizers (tests, or to free memory)."""
    with _lock:
        _grammars.clear()
        _tok_by_key.clear()
    _tok_by_object.clear()


# -- masks -------------------------------------------------------------------------------

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _unpack_shifts(words: torch.Tensor) -> torch.Tensor:
    shifts = _SHIFTS.get(words.device)
    if shifts is None:
        shifts = _SHIFTS[words.device] = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)


def _unpack(words: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """int32 bitmask [..., W] (bit j of word i = token 32*i + j) -> bool [..., size] on `device`; ids past 32*W
    are False."""
    if device.type == "cpu":  # numpy's unpackbits: ~7 us for 32K ids, 8x faster than the shifts below on a CPU
        bits = torch.from_numpy(np.unpackbits(words.numpy().view(np.uint8), axis=-1, bitorder="little")
                                .view(np.bool_))
    else:  # an accelerator: move the 32x smaller bitmask, unpack it there
        bits = _unpack_shifts(words.to(device, non_blocking=True))
    n = bits.shape[-1]
    if n >= size:
        return bits[..., :size]
    pad = torch.zeros(*bits.shape[:-1], size - n, dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=-1)


def _mask_logits(logits: torch.Tensor, words: torch.Tensor) -> None:
    allowed = _unpack(words, logits.shape[-1], logits.device)
    logits.masked_fill_(~allowed, float("-inf"))


class Grammar:
    """A compiled constraint for one tokenizer: immutable, shared by every request that uses the same format."""

    def __init__(self, kind: str, source: str, what: str, info: _TokInfo, stop: tuple[int, ...]):
        llg = _llg()
        self.kind = kind  # "json_object" | "json_schema" | "regex" | "grammar"
        self.source = source  # the llguidance grammar (JSON or Lark text)
        self.stop_ids = stop
        self.vocab_size = info.vocab_size  # the tokenizer's; a bitmask has ceil(vocab_size / 32) words
        self._info = info
        proto = llg.LLMatcher(info.ll, source, log_level=0)  # compiles (outside the GIL); never raises
        if proto.is_error():
            raise VelocisError(f"invalid {what}: {_clean(proto.get_error())}")
        self.warnings: list[str] = list(proto.get_grammar_warnings())  # e.g. keywords a non-strict schema ignores
        self._proto = proto
        self._proto_lock = threading.Lock()
        stop_words = np.zeros((self.vocab_size + 31) // 32, dtype=np.uint32)
        for i in stop:  # the mask once the output has ended: stop ids only
            stop_words[i // 32] |= np.uint32(1 << (i % 32))
        self._stop_words = torch.from_numpy(stop_words.view(np.int32))

    @property
    def mask_words(self) -> int:
        return self._stop_words.numel()

    def matcher(self) -> "Matcher":
        """A fresh matcher at the start of the output (one per sequence)."""
        with self._proto_lock:
            ll = self._proto.deep_copy()
        return Matcher(self, ll)

    def __repr__(self) -> str:
        return f"Grammar({self.kind}, vocab_size={self.vocab_size}, stop_ids={list(self.stop_ids)})"


class Matcher:
    """The state of one sequence under a Grammar. Not thread-safe (one sequence, one thread at a time).

    Every method is O(1) in the sequence length; the mask for a state is computed once (~10-30 us for a 32K vocab
    and a JSON schema) and reused until the state changes."""

    def __init__(self, grammar: Grammar, ll, *, _ended: int = 0, _count: int = 0):
        self.grammar = grammar
        self._ll = ll
        self._ended = _ended  # stop tokens taken after the output was complete (kept out of llguidance)
        self._count = _count  # tokens llguidance consumed (rollback beyond them breaks it)
        self._words = torch.zeros(grammar.mask_words, dtype=torch.int32)
        self._fresh = False  # self._words holds the mask of the current state

    # -- the mask --------------------------------------------------------------------------
    def bitmask(self) -> torch.Tensor:
        """int32 [ceil(V/32)] on the CPU: bit j of word i allows token 32*i + j (V = tokenizer vocab). Shared, do
        not modify; it changes with the state."""
        if not self._fresh:
            if self._ended:
                self._words.copy_(self.grammar._stop_words)
            else:
                self._ll.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
                self._check()
            self._fresh = True
        return self._words

    def allowed_mask(self, vocab_size: int | None = None, device: torch.device | str | None = None
                     ) -> torch.Tensor:
        """BoolTensor [vocab_size] (default: the tokenizer's): True where the token may come next. Ids the
        tokenizer does not have (a model's padded vocabulary) are False."""
        size = self.grammar.vocab_size if vocab_size is None else int(vocab_size)
        return _unpack(self.bitmask(), size, torch.device(device or "cpu"))

    def apply_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Set disallowed entries of `logits` [..., vocab] (any device, vocab = the model's) to -inf, in place;
        every row gets this matcher's mask. Returns `logits`."""
        _mask_logits(logits, self.bitmask())
        return logits

    def is_allowed(self, token_id: int) -> bool:
        """Whether `token_id` may come next (a bit of the mask when it is computed, else asked directly)."""
        token_id = int(token_id)
        if not 0 <= token_id < self.grammar.vocab_size:
            return False
        if self._fresh:
            w, b = divmod(token_id, 32)
            return bool((int(self._words[w]) >> b) & 1)
        if self._ended:
            return token_id in self.grammar.stop_ids
        if token_id in self.grammar.stop_ids and self._ll.is_accepting():
            return True
        return self._ll.validate_tokens([token_id]) == 1

    def forced_tokens(self) -> list[int]:
        """Tokens the constraint forces next whatever the model says (jump-forward decoding may append them
        without a forward pass, each through `advance`). Empty when there is a choice."""
        if self._ended:
            return []
        return list(self._ll.compute_ff_tokens())

    # -- the state ------------------------------------------------------------------------
    def advance(self, token_id: int) -> None:
        """Take the sampled token. Raises TokenNotAllowed (state unchanged) if the mask forbids it."""
        token_id = int(token_id)
        if not self.is_allowed(token_id):
            raise TokenNotAllowed(f"token {token_id} is not allowed here by the {self.grammar.kind} constraint")
        if self._ended or (token_id in self.grammar.stop_ids and self._ll.is_accepting()):
            self._ended += 1  # the output is over; llguidance never sees the stop token
        else:
            if not self._ll.consume_token(token_id):
                self._check()
            self._count += 1
        self._fresh = False

    def advance_many(self, token_ids: Sequence[int]) -> None:
        """advance() each token in turn (e.g. forced tokens); stops at the first refused one, raising."""
        for t in token_ids:
            self.advance(t)

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids` (a speculative draft) the constraint accepts in a row from here, without
        changing this matcher."""
        probe = self.copy()
        n = 0
        for t in token_ids:
            if not probe.is_allowed(t):
                break
            probe.advance(t)
            n += 1
        return n

    def can_stop(self) -> bool:
        """True when a stop id (EOS) is allowed: the output so far is complete."""
        return bool(self._ended) or self._ll.is_accepting()

    def is_finished(self) -> bool:
        """True when nothing but a stop id can come (the output is complete and cannot grow, or has ended): the
        engine may end the sequence without another forward pass."""
        return bool(self._ended) or self._ll.is_stopped()

    @property
    def ended(self) -> bool:
        """A stop token has been taken."""
        return bool(self._ended)

    @property
    def num_tokens(self) -> int:
        """Tokens taken since the start (what rollback can undo)."""
        return self._count + self._ended

    def rollback(self, k: int) -> None:
        """Undo the last k advance() calls (speculative decoding's rejected draft tokens)."""
        k = int(k)
        if k < 0 or k > self.num_tokens:
            raise ValueError(f"cannot roll back {k} tokens: the matcher has taken {self.num_tokens}")
        undo_end = min(k, self._ended)
        self._ended -= undo_end
        k -= undo_end
        if k:
            if not self._ll.rollback(k):
                self._check()
            self._count -= k
        self._fresh = False

    def reset(self) -> None:
        """Back to the start of the output."""
        self._ll.reset()
        self._ended = self._count = 0
        self._fresh = False

    def copy(self) -> "Matcher":
        """An independent matcher in the same state (n > 1 samples, beams, speculative probes): ~1 us."""
        twin = Matcher(self.grammar, self._ll.deep_copy(), _ended=self._ended, _count=self._count)
        if self._fresh:
            twin._words.copy_(self._words)
            twin._fresh = True
        return twin

    fork = copy

    def _check(self) -> None:
        if self._ll.is_error():  # a grammar too complex for the parser's limits, or a bug
            raise RuntimeError(f"structured output failed: {_clean(self._ll.get_error())}")

    def __repr__(self) -> str:
        return (f"Matcher({self.grammar.kind}, tokens={self.num_tokens}, can_stop={self.can_stop()}, "
                f"finished={self.is_finished()})")


# -- batches -----------------------------------------------------------------------------

_executor = None


def apply_masks(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> torch.Tensor:
    """Mask a batch of logits [B, vocab] in place, row b by matchers[b] (None: unconstrained). The masks of
    stale matchers are computed in parallel (llguidance's thread pool, outside the GIL). Returns `logits`."""
    global _executor
    if logits.dim() != 2 or logits.shape[0] != len(matchers):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(matchers)} matchers")
    rows = [b for b, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    words = max(matchers[b].grammar.mask_words for b in rows)
    stale = [(matchers[b]._ll, b) for b in rows if not matchers[b]._fresh and not matchers[b]._ended]
    if len(stale) > 1 and all(matchers[b].grammar.mask_words == words for _, b in stale):
        if _executor is None:
            _executor = _llg().LLExecutor()
        batch = torch.zeros(len(matchers), words, dtype=torch.int32)
        _executor.unsafe_compute_mask_ptr(stale, batch.data_ptr(), words * 4, len(matchers))
        for ll, b in stale:
            m = matchers[b]
            m._words.copy_(batch[b])
            m._fresh = True
            m._check()
    bits = torch.zeros(len(rows), words, dtype=torch.int32)
    for i, b in enumerate(rows):
        w = matchers[b].bitmask()
        bits[i, :w.numel()] = w
    index = torch.tensor(rows, device=logits.device)
    if len(rows) == len(matchers):
        _mask_logits(logits, bits)
    else:
        sub = logits.index_select(0, index)
        _mask_logits(sub, bits)
        logits.index_copy_(0, index, sub)
    return logits
