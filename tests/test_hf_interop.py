"""Hugging Face parity: random HF models load into Velocis with the same logits, and Velocis
exports load back into transformers with the same logits."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import velocis  # noqa: E402
from velocis.cli import main  # noqa: E402
from velocis.errors import VelocisError  # noqa: E402
from velocis.interop.hf import export_hf  # noqa: E402

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)


def _hf_model(kind, **kw):
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    cfg = cls_cfg(**{**SHAPE, **kw})
    model = cls_model(cfg).eval()
    with torch.no_grad():  # HF zero-inits some parts (biases, norms = 1): randomise so they matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _max_diff(hf_model, vmodel, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, SHAPE["vocab_size"], (2, T), generator=g)
    with torch.no_grad():
        return (hf_model(x).logits - vmodel(x)).abs().max().item()


@pytest.mark.parametrize("kind, kw", [
    ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),  # GQA, untied
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),  # MQA, tied
    ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    ("qwen3", dict(num_key_value_heads=2, head_dim=24)),  # explicit head_dim + q/k norm
])
def test_hf_import_logits_match(tmp_path, kind, kw):
    hf_model = _hf_model(kind, **kw)
    hf_model.save_pretrained(tmp_path / "hf")
    vmodel, _ = velocis.load(tmp_path / "hf", device="cpu")
    assert vmodel.config.num_kv_heads == kw["num_key_value_heads"]
    assert _max_diff(hf_model, vmodel) < 1e-4


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=2.0),
    dict(rope_type="dynamic", factor=2.0),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=16, beta_slow=2,
         mscale=1.0, mscale_all_dim=0.5),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=16),
])
def test_hf_rope_scaling_matches(tmp_path, rope):
    # dynamic NTK extends past max_position_embeddings; the others' context is max_position_embeddings
    mpe = 32 if rope["rope_type"] == "dynamic" else 64
    hf_model = _hf_model("llama", num_key_value_heads=2, max_position_embeddings=mpe,
                         rope_parameters={"rope_theta": 10000.0, **rope})
    hf_model.save_pretrained(tmp_path / "hf")
    vmodel, _ = velocis.load(tmp_path / "hf", device="cpu")
    assert vmodel.config.rope_scaling["type"] == rope["rope_type"]
    # 48 > 16 or 32: past the original context, where the scaling schemes differ from plain RoPE
    assert _max_diff(hf_model, vmodel, T=48) < 1e-4
    # and back out: HF loads the export with the same logits (same seq length as above)
    export_hf(vmodel, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert _max_diff(back, vmodel, T=48) < 1e-4


@pytest.mark.parametrize("qkv_bias, qk_norm, arch", [(False, False, "LlamaForCausalLM"),
                                                     (True, False, "Qwen2ForCausalLM"),
                                                     (False, True, "Qwen3ForCausalLM")])
def test_export_loads_in_transformers(tmp_path, qkv_bias, qk_norm, arch):
    from velocis.model_io import save_model
    from velocis.models import VelocisModel

    torch.manual_seed(0)
    cfg = velocis.ModelConfig(vocab_size=96, hidden_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              mlp_dim=80, max_seq_len=64, tie_embeddings=not qkv_bias, qkv_bias=qkv_bias,
                              qk_norm=qk_norm)
    vmodel = VelocisModel(cfg).eval()
    save_model(vmodel, None, tmp_path / "v")
    assert main(["export", "--format", "hf", "--model", str(tmp_path / "v"), "--output", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [arch]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert _max_diff(hf_model, vmodel) < 1e-4


def test_convert_cli_and_sharded_checkpoint(tmp_path):
    Tokenizer = pytest.importorskip("velocis.tokenizer").Tokenizer
    hf_model = _hf_model("qwen2", num_key_value_heads=2)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    (tmp_path / "t.txt").write_text("abc abd 你好 " * 20)  # the tokenizer files travel with the model
    Tokenizer.train([tmp_path / "t.txt"], vocab_size=263, progress=False).save(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "v")]) == 0
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["architecture"] == "velocis" and cfg["qkv_bias"] is True
    vmodel, tok = velocis.load(tmp_path / "v", device="cpu")
    assert _max_diff(hf_model, vmodel) < 1e-4
    assert tok is not None and (tmp_path / "v" / "tokenizer.json").is_file()


def test_bf16_checkpoint_stays_bf16(tmp_path):
    hf_model = _hf_model("llama", num_key_value_heads=2).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "v")]) == 0
    vmodel, _ = velocis.load(tmp_path / "v", device="cpu", dtype=torch.bfloat16)
    assert vmodel.dtype == torch.bfloat16
    assert (tmp_path / "v" / "model.safetensors").stat().st_size < 0.6 * 4 * vmodel.num_params()
    assert _max_diff(hf_model, vmodel) < 0.05


def test_sliding_window_caps_the_context(tmp_path):
    hf_model = _hf_model("mistral", num_key_value_heads=2, sliding_window=16)
    hf_model.save_pretrained(tmp_path / "hf")
    vmodel, _ = velocis.load(tmp_path / "hf", device="cpu")
    assert vmodel.config.max_seq_len == 16  # exact within the window, refused beyond it
    assert _max_diff(hf_model, vmodel, T=16) < 1e-4
    with pytest.raises(VelocisError, match="past the end of the model's context"):
        vmodel(torch.zeros(1, 17, dtype=torch.long))


def test_unknown_architecture_is_clear(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(VelocisError, match="GPT2LMHeadModel is not supported"):
        velocis.load(tmp_path, device="cpu")
    assert main(["convert", "--from-hf", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "GPT2LMHeadModel is not supported" in capsys.readouterr().err


def test_mismatched_weights_are_clear(tmp_path):
    hf_model = _hf_model("llama", num_key_value_heads=2)
    hf_model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the config promises a layer the weights lack
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VelocisError, match="missing"):
        velocis.load(tmp_path / "hf", device="cpu")


def test_greedy_generation_matches_transformers(tmp_path):
    from velocis.infer.generate import generate_ids

    hf_model = _hf_model("llama", num_key_value_heads=2, initializer_range=0.2)
    hf_model.save_pretrained(tmp_path / "hf")
    vmodel, _ = velocis.load(tmp_path / "hf", device="cpu")
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    ours = torch.stack(list(generate_ids(vmodel, prompt, 20, temperature=0)), 1)
    theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[:, 6:]
    assert ours.tolist() == theirs.tolist()
