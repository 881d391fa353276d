"""Generation conditions like training, and bad input gets one-line errors before anything prints."""
import json

import pytest
import torch

import velocis
from velocis.api import _prompt_ids
from velocis.cli import main
from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.model_io import save_model
from velocis.models import VelocisModel
from velocis.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "a.txt").write_text("hello world, the model writes text. 你好，世界！\n" * 5, encoding="utf-8")
    return Tokenizer.train([d / "a.txt"], vocab_size=300, min_frequency=1, progress=False)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=32,
                      eos_token_id=tok.eos_id, prompt_start_token_id=tok.eos_id)
    d = tmp_path_factory.mktemp("m") / "model"
    save_model(VelocisModel(cfg), tok, d)
    return d


def test_trained_models_start_prompts_like_their_documents(tiny_data_dir, tmp_path):
    """Pretraining data has no BOS (each document ends with EOS): a prompt is conditioned as a
    document start, after an EOS, and the model's config records it. Before, generate put a BOS first."""
    from velocis.config import get_preset
    from velocis.train import TrainConfig, train

    tok = Tokenizer.load(tiny_data_dir)
    mc = get_preset("micro", vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    mlp_dim=64, max_seq_len=32)
    train(TrainConfig(output_dir=str(tmp_path / "r"), data_dir=str(tiny_data_dir), max_steps=1, batch_size=2,
                      seq_len=16, device="cpu", monitor="none", plot=False, eval_batches=1), mc)
    model, t = velocis.load(tmp_path / "r", device="cpu")
    assert model.config.prompt_start_token_id == t.eos_id != t.bos_id
    ids = _prompt_ids(model, t, "hello", prompt_start=True)
    assert ids[0] == t.eos_id and t.bos_id not in ids
    assert _prompt_ids(model, t, [5, 6], prompt_start=True) == [t.eos_id, 5, 6]  # token-id prompts too
    assert _prompt_ids(model, t, "hello", prompt_start=False) == t.encode("hello")


def test_imported_models_keep_their_convention():
    from velocis.interop.hf_dense import llama_config, qwen2_config

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    assert llama_config({**common, "model_type": "llama"}).prompt_start_token_id == 1  # Llama's tokenizer adds BOS
    assert qwen2_config({**common, "model_type": "qwen2"}).prompt_start_token_id is None  # Qwen's adds nothing


def test_cli_errors_print_no_prompt_first(model_dir, capsys):
    long_prompt = "hello world " * 40
    assert main(["generate", "--model", str(model_dir), "--prompt", long_prompt, "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # before: the prompt was echoed, then the error
    assert "shorten the prompt" in out.err and "--max-new-tokens 0" not in out.err
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--temperature", "nan"]) == 2
    assert "finite" in capsys.readouterr().err


def test_python_api_bad_types_name_the_parameter(model_dir):
    model, tok = velocis.load(model_dir, device="cpu")
    for kwargs, words in [(dict(max_new_tokens="5"), "max_new_tokens"), (dict(temperature=None), "temperature"),
                          (dict(top_k=2.5), "top_k"), (dict(seed="x"), "seed"), (dict(top_p=float("nan")), "top_p")]:
        with pytest.raises(VelocisError, match=words):
            velocis.generate(model, tok, "hi", **kwargs)
    with pytest.raises(VelocisError, match="prompt must be"):
        velocis.generate(model, tok, 3.5)
    with pytest.raises(VelocisError, match="path must be a path"):
        velocis.load(None)
    # a streamed call checks everything before its first piece
    with pytest.raises(VelocisError, match="shorten the prompt"):
        velocis.generate(model, tok, "hello world " * 40, stream=True)


def test_train_config_errors_name_both_spellings(capsys, tiny_data_dir, tmp_path):
    from velocis.train import TrainConfig

    with pytest.raises(VelocisError, match=r"TrainConfig.batch_size \(--batch-size\) must be an integer"):
        TrainConfig(batch_size="16")
    # --batch-size 0 was silently replaced by the preset's 16
    assert main(["train-micro", "--data", str(tiny_data_dir), "--output-dir", str(tmp_path / "r"),
                 "--batch-size", "0", "--max-steps", "1"]) == 2
    assert "batch_size (--batch-size) must be positive, got 0" in capsys.readouterr().err
