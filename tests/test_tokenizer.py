"""Tokenizer: exact round trip of any Unicode text, HF compatibility, special tokens, CLI errors."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velocis.cli import main
from velocis.data.default_corpus import write_default_corpus
from velocis.errors import VelocisError
from velocis.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer

CASES = [
    "",
    "Hello, world!",
    "你好，世界！今天天气很好。",
    "用Python编程很有趣, 2024年10月1日 it's 3.14159",
    "emoji 😀🎉👍🏽 and flags 🇨🇳🇬🇧 and ZWJ 👨‍👩‍👧",
    "tabs\tand\t\ttabs",
    "runs of spaces:     five, then one space at the end ",
    "   leading spaces",
    "windows\r\nline\r\nendings\r\n\r\n",
    "lone \r carriage return and \n\n\n newlines",
    " , spaces before punctuation . like this ?",
    "mixed 中英文 text with numbers 123456789 and symbols ©®™ §¶",
    "combining: e\u0301 (not normalized) and \u212b vs \u00c5",
    "\u0000 nul and \ufeff bom and \U0010ffff last code point",
    "الْعَرَبِيَّة हिन्दी 日本語のテキスト 한국어",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    zh, en = write_default_corpus(root / "corpus", documents=1500)
    tok = Tokenizer.train([zh, en], vocab_size=600, progress=False)
    tok.save(root / "tok")
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


@pytest.mark.parametrize("text", CASES)
def test_round_trip_cases(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["你", "好", " ", "  ", "\t", "\r\n", "\r", "a", "Ab", "1", "😀", ".", "'s", "<|"]),
                max_size=40))
def test_round_trip_tricky_alphabet(tok, parts):
    # the pieces the pre-tokenizer treats specially, in dense combinations st.text() rarely draws
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text


def test_batch_and_specials(tok):
    texts = ["你好", "hello world", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    ids = tok.encode("hi", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.vocab_size == 600


def test_chinese_is_compressed(tok):
    # merges were learned: common words are single tokens, fewer tokens than UTF-8 bytes
    text = "从前，有一只快乐的狗，名叫安娜。Once upon a time, there was a happy dog."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2
    # digits are split one by one, Han runs apart from Latin letters
    pieces = [tok.decode([i]) for i in tok.encode("12345用Python")]
    assert pieces[:5] == list("12345") and "Python" not in "".join(pieces[:6])


def test_save_load_same_hash_and_ids(tok, tok_dir, tmp_path):
    again = Tokenizer.load(tok_dir / "tokenizer.json")
    assert again.hash() == tok.hash()
    again.save(tmp_path / "copy")
    assert Tokenizer.load(tmp_path / "copy").hash() == tok.hash()
    text = "mixed 中文 and English 😀"
    assert again.encode(text) == tok.encode(text)


def test_transformers_gives_same_ids(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    for hf in (transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json")),
               transformers.AutoTokenizer.from_pretrained(str(tok_dir))):
        for text in CASES:
            ids = hf.encode(text, add_special_tokens=False)
            assert ids == tok.encode(text), text
            assert hf.decode(ids) == text, text
    auto = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert auto.eos_token == "<|end_of_text|>" and auto.pad_token_id == tok.pad_id and auto.bos_token_id == tok.bos_id


def test_cli_train(tmp_path, capsys):
    zh, en = write_default_corpus(tmp_path / "c", documents=200)
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text(json.dumps({"text": "json 文本"}) + "\n", encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(zh), str(en), str(jsonl), "--vocab-size", "300",
                 "--output", str(tmp_path / "out"), "--quiet"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).is_file()
    assert Tokenizer.load(tmp_path / "out").vocab_size == 300


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_cli_vocab_too_small(tmp_path, capsys):
    zh, _ = write_default_corpus(tmp_path / "c", documents=20)
    err = cli_error(capsys, ["tokenizer", "train", "--input", str(zh), "--vocab-size", str(MIN_VOCAB_SIZE - 1),
                             "--output", str(tmp_path / "out")])
    assert "--vocab-size" in err and str(MIN_VOCAB_SIZE) in err
    assert not (tmp_path / "out").exists()


def test_cli_bad_inputs(tmp_path, capsys):
    err = cli_error(capsys, ["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300",
                             "--output", str(tmp_path / "out")])
    assert "nope.txt" in err and "no such file" in err
    (tmp_path / "empty.txt").write_bytes(b"")
    err = cli_error(capsys, ["tokenizer", "train", "--input", str(tmp_path / "empty.txt"), "--vocab-size", "300",
                             "--output", str(tmp_path / "out")])
    assert "empty.txt" in err and "empty" in err
    (tmp_path / "bad.txt").write_bytes(b"good text\nbad \xff byte\n")
    err = cli_error(capsys, ["tokenizer", "train", "--input", str(tmp_path / "bad.txt"), "--vocab-size", "300",
                             "--output", str(tmp_path / "out")])
    assert "bad.txt" in err and "byte offset 14" in err
    assert not (tmp_path / "out").exists()
    assert main(["tokenizer", "train", "--input", str(tmp_path / "bad.txt"), "--vocab-size", "300",
                 "--output", str(tmp_path / "out"), "--on-invalid-utf8", "replace", "--quiet"]) == 0


def test_load_errors(tmp_path):
    with pytest.raises(VelocisError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(VelocisError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_load_foreign_tokenizer_finds_its_special_tokens(tmp_path):
    """A Llama/Qwen-style tokenizer.json: special tokens found by tokenizer_config.json, else by name."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 2, None)  # Qwen-like: no BOS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}))
    tok = Tokenizer.load(tmp_path)
    assert (tok.eos_id, tok.pad_id) == (4, 2)
    assert tok.encode("ab", add_eos=True) == [0, 1, 4]
    with pytest.raises(VelocisError, match="no beginning-of-text"):
        tok.encode("a", add_bos=True)
