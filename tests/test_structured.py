"""Structured output (velocis/infer/structured.py): every constrained generation is valid.

The "model" is a random-weight tiny VelocisModel (no training) plus a fixed bias (closing_bias) that makes it
like quotes, closing brackets and EOS, dislike commas, openers, digits and whitespace, and love the ids past the
tokenizer's vocabulary (the model's vocabulary is padded). On its own it writes garbage
(test_without_the_mask_the_model_writes_garbage), so a valid output is the mask's doing; the bias only keeps
outputs short enough to finish (checked over 30 model seeds)."""
from __future__ import annotations

import ast
import json
import random
import re
import time
from pathlib import Path

import pytest
import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.infer.generate import sample
from velocis.infer.structured import (TokenNotAllowed, apply_masks, clear_cache,
                                      compile_response_format)
from velocis.models import VelocisModel
from velocis.tokenizer import Tokenizer

EXTRA_IDS = 45  # the model's vocabulary is the tokenizer's + these (never valid tokens), past the last mask word
MAX_NEW = 300

WORDS = ("the model writes json text name city value list item data user score color red green blue alpha beta "
         "true false null open close number string object array date time book river stone light").split()
ZH = ["北京", "上海", "你好", "世界", "我们", "中文", "模型", "数据", "学习", "天气很好", "城市", "名字", "今天", "书"]


def _value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 2 and r < 0.15:
        return {rng.choice(WORDS): _value(rng, depth + 1) for _ in range(rng.randint(1, 3))}
    if depth < 2 and r < 0.3:
        return [_value(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    if r < 0.5:
        return rng.randint(-500, 5000)
    if r < 0.6:
        return round(rng.uniform(-100, 100), 2)
    if r < 0.7:
        return rng.choice([True, False, None])
    if r < 0.85:
        return rng.choice(ZH) + rng.choice(ZH)
    return " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))


def corpus(n: int = 600) -> str:
    rng = random.Random(0)
    lines = []
    for i in range(n):
        doc = {rng.choice(WORDS): _value(rng) for _ in range(rng.randint(1, 4))}
        lines.append(json.dumps(doc, ensure_ascii=False, indent=rng.choice([None, 2])))
        lines.append(f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                     + " ".join(rng.choices(WORDS, k=8)) + "。" + "".join(rng.choices(ZH, k=4)) + "，" + rng.choice(ZH))
        lines.append(f"({rng.randint(0, 99)}+{rng.randint(0, 99)})*{rng.randint(0, 9)}-{rng.randint(0, 9)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("structured_tok")
    (d / "mixed.txt").write_text(corpus(), encoding="utf-8")
    t = Tokenizer.train([d / "mixed.txt"], vocab_size=420, min_frequency=2, progress=False)
    assert 300 <= t.vocab_size <= 420
    return t


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = VelocisModel(ModelConfig(vocab_size=tok.vocab_size + EXTRA_IDS, hidden_dim=32, num_layers=1, num_heads=2,
                                 mlp_dim=64, max_seq_len=512))
    return m.eval()


def token_bytes(tok) -> list[bytes]:
    """Each id's raw bytes (GPT-2 byte-level alphabet inverted), to check UTF-8 strictly."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    inverse = {chr(c): b for b, c in zip(bs, cs)}
    out = []
    for i in range(tok.vocab_size):
        s = tok.id_to_token(i)
        out.append(s.encode() if s.startswith("<|") else bytes(inverse[ch] for ch in s))
    return out


def closing_bias(tok, strength: float = 2.5) -> torch.Tensor:
    """A taste for short, compact JSON: quotes and brackets up, commas and whitespace down, EOS above all."""
    weight = {'"': 1.5, "}": 0.9, "]": 0.9, ",": -1.3, "{": -1.0, "[": -1.0}
    bias = torch.zeros(tok.vocab_size + EXTRA_IDS)
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        bias[i] = strength * (sum(w for c, w in weight.items() if c in text) - 2.0 * text.isspace()
                              - 2.0 * text.isdigit())
    bias[tok.eos_id] = 2 * strength
    bias[tok.vocab_size:] = 50.0  # the padded ids: the model loves them; the mask must remove them
    return bias


@torch.inference_mode()
def run(model, tok, grammar, *, seed: int, temperature: float, bias: torch.Tensor, prompt: str = "Answer: ",
        constrained: bool = True, max_new: int = MAX_NEW) -> list[int]:
    """Plain decoding loop: model logits + bias, masked by the matcher; returns the generated ids (without EOS)."""
    gen = torch.Generator().manual_seed(seed)
    m = grammar.matcher() if constrained else None
    ids = tok.encode(prompt)
    cache = model.new_cache(1, len(ids) + max_new + 1)
    logits = model(torch.tensor([ids]), cache=cache)[0, -1]
    out = []
    for _ in range(max_new):
        row = logits.float() + bias
        if m is not None:
            m.apply_mask(row)
        t = int(sample(row[None], temperature, generator=gen)[0])
        if m is not None:
            m.advance(t)  # raises TokenNotAllowed if the mask let something through
        if t == tok.eos_id:
            assert m is None or (m.ended and m.is_finished())
            return out
        out.append(t)
        logits = model(torch.tensor([[t]]), cache=cache)[0, -1]
    if m is not None:
        raise AssertionError(f"no EOS after {max_new} tokens: {tok.decode(out)!r}")
    return out


def validate(x, schema: dict, path: str = "$") -> None:
    """A small JSON-schema checker for the keywords used here (jsonschema is not a dependency)."""
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = {"string": isinstance(x, str), "boolean": isinstance(x, bool), "null": x is None,
              "integer": isinstance(x, int) and not isinstance(x, bool),
              "number": isinstance(x, (int, float)) and not isinstance(x, bool),
              "object": isinstance(x, dict), "array": isinstance(x, list)}
        assert any(ok[n] for n in names), f"{path}: {x!r} is not {types}"
    if "enum" in schema:
        assert x in schema["enum"], f"{path}: {x!r} not in {schema['enum']}"
    if isinstance(x, str):
        assert len(x) <= schema.get("maxLength", len(x)), f"{path}: {x!r} longer than {schema['maxLength']}"
        assert len(x) >= schema.get("minLength", 0), f"{path}: {x!r} shorter than {schema['minLength']}"
        if "pattern" in schema:
            assert re.search(schema["pattern"], x), f"{path}: {x!r} does not match {schema['pattern']}"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        assert x >= schema.get("minimum", x) and x <= schema.get("maximum", x), f"{path}: {x} out of range"
    if isinstance(x, dict):
        for k in schema.get("required", []):
            assert k in x, f"{path}: missing {k!r}"
        props = schema.get("properties", {})
        for k, v in x.items():
            if k in props:
                validate(v, props[k], f"{path}.{k}")
            else:
                assert schema.get("additionalProperties", True) is not False, f"{path}: extra key {k!r}"
    if isinstance(x, list):
        assert schema.get("minItems", 0) <= len(x) <= schema.get("maxItems", len(x)), f"{path}: {len(x)} items"
        for i, v in enumerate(x):
            validate(v, schema.get("items", {}), f"{path}[{i}]")


def check_schema(x, schema: dict) -> None:
    validate(x, schema)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(x, schema)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 10},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "history": {"type": "array", "maxItems": 2,
                    "items": {"type": "object", "properties": {"year": {"type": "integer"}},
                              "required": ["year"], "additionalProperties": False}},
        "note": {"type": ["string", "null"], "maxLength": 8},
    },
    "required": ["name", "age", "score", "active", "color", "address", "tags", "history"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


# -- generation is valid -----------------------------------------------------------------

@pytest.mark.parametrize("seed,temperature", [(0, 0.0), (1, 0.8), (2, 1.0), (3, 1.3)])
def test_json_object_output_parses(tok, model, seed, temperature):
    g = compile_response_format({"type": "json_object"}, tok)
    out = run(model, tok, g, seed=seed, temperature=temperature, bias=closing_bias(tok, 1.5))
    assert all(i < tok.vocab_size for i in out)  # the padded ids (biased +50) never came through
    value = json.loads(tok.decode(out))
    assert isinstance(value, dict)


def test_json_object_outputs_vary(tok, model):
    """Not one trivial answer: sampling gives objects with keys and different values."""
    g = compile_response_format({"type": "json_object"}, tok)
    texts = {tok.decode(run(model, tok, g, seed=s, temperature=1.0, bias=closing_bias(tok, 1.0))) for s in range(6)}
    values = [json.loads(t) for t in texts]
    assert len(texts) >= 4 and any(v for v in values), texts


@pytest.mark.parametrize("seed,temperature", [(0, 0.0), (1, 0.7), (2, 1.0), (3, 1.0), (4, 1.5)])
def test_json_schema_output_validates(tok, model, seed, temperature):
    g = compile_response_format(PERSON_FORMAT, tok)
    text = tok.decode(run(model, tok, g, seed=seed, temperature=temperature, bias=closing_bias(tok)))
    check_schema(json.loads(text), PERSON)


def test_without_the_mask_the_model_writes_garbage(tok, model):
    """The control: the same biased model and loop, unconstrained, gives no valid person (so the tests above
    can fail, and pass only because of the mask)."""
    g = compile_response_format(PERSON_FORMAT, tok)
    valid = 0
    for seed in range(4):
        out = run(model, tok, g, seed=seed, temperature=1.0, bias=closing_bias(tok), constrained=False, max_new=60)
        try:
            check_schema(json.loads(tok.decode([i for i in out if i < tok.vocab_size])), PERSON)
            valid += 1
        except (ValueError, AssertionError):
            pass
    assert valid == 0


@pytest.mark.parametrize("seed,temperature", [(0, 0.0), (1, 1.0), (2, 2.0)])
def test_regex_output_matches(tok, model, seed, temperature):
    pattern = r"\d{4}-\d{2}-\d{2}"
    g = compile_response_format({"type": "regex", "regex": pattern}, tok)
    text = tok.decode(run(model, tok, g, seed=seed, temperature=temperature, bias=closing_bias(tok)))
    assert re.fullmatch(pattern, text, re.ASCII), text  # \\d is [0-9]: no Devanagari digits, at any temperature


ARITH = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lark_grammar_output_parses(tok, model, seed):
    g = compile_response_format({"type": "grammar", "grammar": ARITH}, tok)
    bias = closing_bias(tok)
    for i in range(tok.vocab_size):  # keep the nesting shallow
        bias[i] += 3.0 * (")" in tok.decode([i])) - 5.0 * ("(" in tok.decode([i]))
    text = tok.decode(run(model, tok, g, seed=seed, temperature=1.0, bias=bias))
    tree = ast.parse(text, mode="eval")  # a Python expression of + - ( ) and integers only
    for node in ast.walk(tree):
        assert isinstance(node, (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.UnaryOp,
                                 ast.USub)), (text, node)


def test_gbnf_grammar_and_choices(tok, model):
    rf = {"type": "grammar", "syntax": "gbnf", "grammar": 'root ::= "yes" | "no" | "maybe later"'}
    g = compile_response_format(rf, tok)
    texts = {tok.decode(run(model, tok, g, seed=s, temperature=1.0, bias=closing_bias(tok))) for s in range(6)}
    assert texts <= {"yes", "no", "maybe later"} and len(texts) >= 2, texts


def test_chinese_strings_stay_valid_utf8(tok, model):
    """Byte-level tokens can hold half a Chinese character: the mask must only let through byte sequences that
    end as whole UTF-8 characters by the time a string closes."""
    schema = {"type": "object", "properties": {"title": {"type": "string", "minLength": 2, "maxLength": 12},
                                               "city": {"enum": ["北京", "上海", "Paris"]}},
              "required": ["title", "city"], "additionalProperties": False}
    g = compile_response_format({"type": "json_schema", "json_schema": {"name": "zh", "schema": schema}}, tok)
    raw = token_bytes(tok)
    bias = closing_bias(tok, 1.0)
    for i, b in enumerate(raw):
        if any(c >= 0x80 for c in b):
            bias[i] += 4.0  # the model prefers non-ASCII, including lone lead/continuation bytes
    partial, han = 0, 0
    for seed in range(5):
        out = run(model, tok, g, seed=seed, temperature=1.0, bias=bias)
        data = b"".join(raw[i] for i in out)
        text = data.decode("utf-8")  # strict: raises on any broken character
        value = json.loads(text)
        check_schema(value, schema)
        han += bool(re.search(r"[\u4e00-\u9fff]", value["title"]))
        for i in out:
            try:
                raw[i].decode("utf-8")
            except UnicodeDecodeError:
                partial += 1
    assert han >= 2  # Chinese was written
    assert partial >= 1  # and some tokens were fragments of a character


# -- the mask and the matcher --------------------------------------------------------------

def _walk(tok, g, seed: int, steps: int, check) -> None:
    """A random walk over allowed tokens, calling check(matcher, allowed) before each step."""
    rng = random.Random(seed)
    m = g.matcher()
    for _ in range(steps):
        allowed = m.allowed_mask()
        choices = allowed.nonzero().flatten().tolist()
        check(m, allowed)
        if m.is_finished():
            break
        non_stop = [c for c in choices if c not in g.stop_ids]
        m.advance(rng.choice(non_stop or choices))


@pytest.mark.parametrize("rf", [PERSON_FORMAT, {"type": "regex", "regex": r"[a-z]{2,5}( [0-9]+)?"},
                                {"type": "grammar", "grammar": ARITH}])
def test_the_mask_never_allows_a_dead_end(tok, rf):
    """Every allowed token is accepted by advance() and leaves a state that can go on (a token or EOS); tokens
    the mask forbids are refused, with the state unchanged; the mask agrees with the per-token check."""
    g = compile_response_format(rf, tok)
    rng = random.Random(1)

    def check(m, allowed):
        assert allowed.any()
        for t in allowed.nonzero().flatten().tolist():
            c = m.copy()
            c.advance(t)
            assert c.can_stop() or c.allowed_mask().any()
        forbidden = (~allowed).nonzero().flatten().tolist()
        for t in rng.sample(forbidden, min(25, len(forbidden))):
            with pytest.raises(TokenNotAllowed):
                m.advance(t)
            assert torch.equal(m.allowed_mask(), allowed)
        stale = m.copy()
        stale._fresh = False  # no mask computed: is_allowed asks llguidance token by token
        for t in rng.sample(range(tok.vocab_size), 40):
            assert stale.is_allowed(t) == bool(allowed[t]), t

    for seed in range(2):
        _walk(tok, g, seed, 40, check)


def test_eos_only_when_complete(tok):
    g = compile_response_format({"type": "json_object"}, tok)
    m = g.matcher()
    assert not m.is_allowed(tok.eos_id) and not m.can_stop()
    for t in tok.encode('{"a": [1, "x"]'):
        assert not m.can_stop()
        m.advance(t)
    with pytest.raises(TokenNotAllowed):
        m.advance(tok.eos_id)
    m.advance(tok.encode("}")[0])
    assert m.can_stop() and m.is_finished() and not m.ended
    mask = m.allowed_mask(tok.vocab_size + EXTRA_IDS)
    assert mask.nonzero().flatten().tolist() == [tok.eos_id]  # only EOS, never a padded id
    m.advance(tok.eos_id)
    assert m.ended and m.is_finished()
    m.rollback(1)
    assert not m.ended and m.is_finished()

    r = compile_response_format({"type": "regex", "regex": r"[0-9]+"}, tok).matcher()
    r.advance_many(tok.encode("12"))
    assert r.can_stop() and not r.is_finished()  # more digits could follow
    allowed = r.allowed_mask()
    assert allowed[tok.eos_id] and allowed[tok.encode("3")[0]]


def test_special_tokens_never_allowed(tok):
    """Chat markers and padding cannot sneak into an output, not even inside a JSON string."""
    specials = [tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|pad|>", "<|system|>", "<|user|>",
                                             "<|assistant|>", "<|end|>")]
    m = compile_response_format({"type": "json_object"}, tok).matcher()
    for text in ('{"a": "', 'x', '", "b": ['):
        m.advance_many(tok.encode(text))
        allowed = m.allowed_mask()
        assert allowed.sum() > 10 and not allowed[specials].any() and not allowed[tok.eos_id]


def test_bare_hf_tokenizer(tok):
    """A plain `tokenizers.Tokenizer` works too, given its stop ids."""
    with pytest.raises(VelocisError, match="stop_ids"):
        compile_response_format({"type": "json_object"}, tok.backend)
    g = compile_response_format({"type": "regex", "regex": "[0-9]{3}"}, tok.backend, stop_ids=[tok.eos_id])
    m = g.matcher()
    m.advance_many(tok.encode("123"))
    assert m.is_finished() and m.allowed_mask().nonzero().flatten().tolist() == [tok.eos_id]


def test_custom_stop_ids(tok):
    end = tok.token_to_id("<|end|>")
    g = compile_response_format({"type": "regex", "regex": "ok"}, tok, stop_ids=[tok.eos_id, end])
    m = g.matcher()
    m.advance_many(tok.encode("ok"))
    assert m.allowed_mask().nonzero().flatten().tolist() == sorted([tok.eos_id, end])
    m.advance(end)
    assert m.ended
    assert compile_response_format({"type": "regex", "regex": "ok"}, tok) is not g


def test_padded_vocabulary_is_masked(tok):
    m = compile_response_format({"type": "json_object"}, tok).matcher()
    V = tok.vocab_size + EXTRA_IDS
    mask = m.allowed_mask(V)
    assert mask.shape == (V,) and mask.dtype == torch.bool and not mask[tok.vocab_size:].any()
    logits = torch.zeros(2, V)
    m.apply_mask(logits)
    assert torch.equal(torch.isfinite(logits[0]), mask) and torch.equal(logits[0], logits[1])
    assert not m.is_allowed(tok.vocab_size + 3)
    assert V > 32 * ((tok.vocab_size + 31) // 32)  # ids past the bitmask's last word, too
    for size in (tok.vocab_size - 5, tok.vocab_size + 1, V):
        assert torch.equal(m.allowed_mask(size)[:tok.vocab_size], m.allowed_mask()[:size])


def test_accelerator_unpacking_agrees(tok):
    """The shift-based unpacking used for logits on a GPU gives the same bits as numpy's (checked on the CPU)."""
    from velocis.infer.structured import _unpack_shifts

    words = torch.tensor([[0, -1, 1, -(2**31), 0x12345678], [7, 2**31 - 1, -2, 5, 0]], dtype=torch.int32)
    expect = torch.tensor([[(int(w) >> j) & 1 for w in row for j in range(32)] for row in words.tolist()],
                          dtype=torch.bool)
    assert torch.equal(_unpack_shifts(words), expect)
    m = compile_response_format(PERSON_FORMAT, tok).matcher()
    m.advance_many(tok.encode('{"name": "'))
    assert torch.equal(_unpack_shifts(m.bitmask())[:tok.vocab_size], m.allowed_mask())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_on_cuda(tok):
    g = compile_response_format(PERSON_FORMAT, tok)
    ms = [g.matcher(), None, g.matcher()]
    ms[2].advance_many(tok.encode('{"name": "'))
    V = tok.vocab_size + EXTRA_IDS
    cpu = torch.randn(3, V)
    gpu = cpu.cuda()
    apply_masks(gpu, ms)
    for row, m in zip(cpu, ms):
        if m is not None:
            m.apply_mask(row)
    assert torch.equal(gpu.cpu(), cpu)
    one = torch.randn(V, device="cuda", dtype=torch.bfloat16)
    ms[0].apply_mask(one)
    assert torch.equal(torch.isfinite(one).cpu(), ms[0].allowed_mask(V))


def test_rollback_restores_the_state(tok):
    g = compile_response_format(PERSON_FORMAT, tok)
    rng = random.Random(3)
    m = g.matcher()
    masks, taken = [], []
    for _ in range(60):
        masks.append(m.allowed_mask())
        if m.is_finished():
            break
        choices = [c for c in masks[-1].nonzero().flatten().tolist() if c != tok.eos_id]
        taken.append(rng.choice(choices))
        m.advance(taken[-1])
    assert m.num_tokens == len(taken) >= 20
    for k in (1, 3, 7, len(taken)):
        c = m.copy()
        c.rollback(k)
        assert c.num_tokens == len(taken) - k
        assert torch.equal(c.allowed_mask(), masks[len(taken) - k])
        c.advance_many(taken[len(taken) - k:])  # the same tokens are taken again
        assert torch.equal(c.allowed_mask(), m.allowed_mask())
    before = m.allowed_mask()
    with pytest.raises(ValueError):
        m.rollback(len(taken) + 1)
    assert torch.equal(m.allowed_mask(), before) and m.num_tokens == len(taken)  # a refused rollback changed nothing
    fresh = g.matcher()
    assert fresh.validate_tokens(taken + [0, 0]) == len(taken)  # a draft: how much of it is acceptable
    assert fresh.num_tokens == 0


def test_copy_is_independent(tok):
    g = compile_response_format({"type": "json_object"}, tok)
    a = g.matcher()
    a.advance_many(tok.encode('{"k": '))
    b = a.fork()
    b.advance_many(tok.encode("1}"))
    a.advance_many(tok.encode('"v'))
    assert b.is_finished() and not a.can_stop()
    assert not torch.equal(a.allowed_mask(), b.allowed_mask())
    assert a.num_tokens == len(tok.encode('{"k": ')) + len(tok.encode('"v')) and b.num_tokens < a.num_tokens + 2


def test_apply_masks_batch(tok):
    g1 = compile_response_format(PERSON_FORMAT, tok)
    g2 = compile_response_format({"type": "regex", "regex": r"\d+"}, tok)
    ms = [g1.matcher(), None, g2.matcher(), g1.matcher()]
    ms[3].advance_many(tok.encode('{"name": "'))
    V = tok.vocab_size + EXTRA_IDS
    logits = torch.randn(4, V)
    expect = logits.clone()
    for row, m in zip(expect, ms):
        if m is not None:
            m._fresh = False  # apply_masks computes them again, together
            m.apply_mask(row)
    for m in ms:
        if m is not None:
            m._fresh = False
    apply_masks(logits, ms)
    assert torch.equal(logits, expect)
    assert torch.isfinite(logits[1]).all()  # the unconstrained row is untouched


# -- compiling: cache and errors ----------------------------------------------------------

def test_compiled_once_and_cached(tok):
    clear_cache()
    t = time.perf_counter()
    g = compile_response_format(PERSON_FORMAT, tok)
    first = time.perf_counter() - t
    same = json.loads(json.dumps(PERSON_FORMAT))  # an equal dict, built again (keys in another order)
    same["json_schema"] = dict(reversed(list(same["json_schema"].items())))
    t = time.perf_counter()
    assert compile_response_format(same, tok) is g
    assert time.perf_counter() - t < first
    assert compile_response_format({"type": "json_object"}, tok) is not g
    assert compile_response_format({"type": "text"}, tok) is None and compile_response_format(None, tok) is None
    assert g.matcher() is not g.matcher()


BAD = [
    ("not a dict", "json_object", "must be an object"),
    ({"type": "xml"}, None, "response_format.type"),
    ({"type": "json_object", "schema": {}}, None, "'schema'"),
    ({"type": "json_schema"}, None, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strin"}}}, None, "strin"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "maxLength": "abc"}}},
     None, "maxLength"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/$defs/nowhere"}}}, None, "nowhere"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 2}}},
     None, "minimum"),
    ({"type": "json_schema", "json_schema": {"schema": {"properties": {"a": 5}}}}, None, "schema must be"),
    ({"type": "json_schema", "json_schema": {"schema": "{not json"}}, None, "not JSON"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(a"}}}, None, "unclosed"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, None, "strict"),
    ({"type": "json_schema", "json_schema": {"strict": True, "schema": {"type": "array", "uniqueItems": True}}},
     None, "uniqueItems"),
    ({"type": "regex", "regex": r"(\d"}, None, "unclosed group"),
    ({"type": "regex", "regex": r"[a-"}, None, "regex"),
    ({"type": "regex", "regex": "ab\\"}, None, "invalid regex"),  # a trailing backslash
    ({"type": "grammar", "syntax": "regex", "definition": "(x"}, None, "unclosed group"),
    ({"type": "regex"}, None, "response_format.regex"),
    ({"type": "grammar", "grammar": "start: foo"}, None, "foo"),
    ({"type": "grammar", "grammar": "start: 'a"}, None, "Lark grammar"),
    ({"type": "grammar", "syntax": "gbnf", "grammar": 'root ::= "yes'}, None, "GBNF"),
    ({"type": "grammar", "syntax": "peg", "grammar": "x"}, None, "syntax"),
]


@pytest.mark.parametrize("rf,_,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_invalid_formats_raise(tok, rf, _, needle):
    with pytest.raises(VelocisError) as e:
        compile_response_format(rf, tok)
    message = str(e.value)
    assert needle in message, message
    assert "<state>" not in message and len(message) < 2100


def test_non_strict_ignores_unsupported_keywords(tok):
    rf = {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True,
                                                                         "items": {"type": "integer"}}}}
    g = compile_response_format(rf, tok)
    assert any("uniqueItems" in w for w in g.warnings)
    m = g.matcher()
    m.advance_many(tok.encode("[1,1]"))
    assert m.can_stop()  # best effort: the array's type is enforced, uniqueness is not


# -- speed (a 32K vocabulary) --------------------------------------------------------------

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "en").is_dir(), reason="needs ../shared/data")
def test_mask_speed_32k_vocab():
    big = Tokenizer.train([SHARED / "en", SHARED / "zh"], vocab_size=32000, progress=False)
    g = compile_response_format(PERSON_FORMAT, big)
    value = {"name": "Alice", "age": 42, "score": 3.5, "active": True, "color": "red",
             "address": {"city": "北京", "zip": "10001"}, "tags": ["a", "b"], "history": [{"year": 2020}]}
    ids = big.encode(json.dumps(value, ensure_ascii=False, indent=2)) + [big.eos_id]
    logits = torch.randn(big.vocab_size + 64)
    best = float("inf")
    for _ in range(3):
        m = g.matcher()
        t = time.perf_counter()
        for i in ids:
            m.apply_mask(logits.clone())
            m.advance(i)
        best = min(best, (time.perf_counter() - t) / len(ids))
    assert m.ended
    assert best < 1e-3, f"{best * 1e6:.0f} us per step"
