"""Generation: streaming (UTF-8 safe), the CLI, the Python API, run dirs."""
import pytest
import torch

import velocis
from velocis.cli import main
from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.infer.generate import StreamDecoder
from velocis.model_io import save_model
from velocis.models import VelocisModel

Tokenizer = pytest.importorskip("velocis.tokenizer").Tokenizer

TEXT = "hello world, the model writes text. 你好，世界！我们用中文写字。\n" * 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "a.txt").write_text(TEXT, encoding="utf-8")
    return Tokenizer.train([d / "a.txt"], vocab_size=300, min_frequency=1, progress=False)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=64, max_seq_len=128, init_std=0.1)
    d = tmp_path_factory.mktemp("m") / "model"
    save_model(VelocisModel(cfg), tok, d)
    return d


def test_stream_decoder_never_splits_a_character(tok):
    text = "你好，世界！abc 中文"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # some Han character's bytes were split across tokens and held back


def test_stream_decoder_holds_partial_utf8():
    class Bytes:  # a byte-per-token tokenizer: every Han character takes 3 tokens
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    dec = StreamDecoder(Bytes())
    out = [dec.push(b) for b in "中a".encode()]
    assert out == ["", "", "中", "a"]


def test_stream_decoder_sentencepiece_style():
    """Llama-2 style pieces: "▁" marks a space, the decoder strips the first one, bytes fall back."""
    vocab = ["▁Hello", "▁world", "<0xE4>", "<0xBD>", "<0xA0>", "▁!", "ok"]

    class SP:
        def decode(self, ids):
            b = b"".join(bytes([int(vocab[i][3:5], 16)]) if vocab[i].startswith("<0x") else
                         vocab[i].replace("▁", " ").encode() for i in ids)
            text = b.decode("utf-8", errors="replace")
            return text[1:] if text.startswith(" ") else text

    ids = [0, 1, 2, 3, 4, 5, 6, 1]
    dec = StreamDecoder(SP())
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == SP().decode(ids) == "Hello world你 !ok world"
    assert pieces[2:5] == ["", "", "你"]


def test_api_generate_greedy_stream_and_callback(model_dir):
    model, tok = velocis.load(model_dir, device="cpu")
    assert tok is not None and model.config.bos_token_id == tok.bos_id
    text = velocis.generate(model, tok, "你好", max_new_tokens=20, temperature=0)
    seen = []
    stats = {}
    streamed = list(velocis.generate(model, tok, "你好", max_new_tokens=20, temperature=0, stream=True,
                                     callback=seen.append, stats=stats))
    assert "".join(streamed) == text == "".join(seen)
    assert 0 < stats["new_tokens"] <= 20
    a = velocis.generate(model, tok, "hello", max_new_tokens=15, temperature=1.0, top_p=0.9, seed=3)
    b = velocis.generate(model, tok, "hello", max_new_tokens=15, temperature=1.0, top_p=0.9, seed=3)
    assert a == b


def test_cli_generate_streams(model_dir, capsys):
    model, tok = velocis.load(model_dir, device="cpu")
    expected = velocis.generate(model, tok, "hello", max_new_tokens=12, temperature=0)
    assert main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out == "hello" + expected + "\n"
    assert "tokens/s" in out.err


def test_cli_generate_bad_input(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "500"]) == 2
    assert "exceeds the model's context (128)" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--temperature", "-1"]) == 2
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_run_dir_loads_like_a_model_dir(model_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints").mkdir()
    model, tok = velocis.load(run, device="cpu")
    assert tok is not None and model.config.num_layers == 2
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)  # a run that has not saved a model yet
    with pytest.raises(VelocisError, match="run directory without a model"):
        velocis.load(tmp_path / "run2")
