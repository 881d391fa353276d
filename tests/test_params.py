import json

import pytest

from velocis.cli import main
from velocis.config import get_preset
from velocis.models import VelocisModel
from velocis.models.count import count_params


def test_counts_add_up_and_tied_counted_once():
    cfg = get_preset("micro")
    c = count_params(cfg)
    assert c["total"] == sum(c["parts"].values()) == VelocisModel(cfg).num_params()
    assert c["parts"]["head"] == 0 and cfg.tie_embeddings
    untied = count_params(cfg.replace(tie_embeddings=False))
    assert untied["total"] - c["total"] == cfg.vocab_size * cfg.hidden_dim
    # K and V, bf16, every layer
    assert c["kv_cache_bytes_per_token"] == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2


def test_llama3_8b_shape_on_meta_device(capsys):
    args = ["params", "--hidden-dim", "4096", "--num-layers", "32", "--num-heads", "32", "--num-kv-heads", "8",
            "--mlp-dim", "14336", "--vocab-size", "128256", "--max-seq-len", "8192", "--untied", "--json"]
    assert main(args) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["total"] == 8_030_261_248  # Meta-Llama-3-8B
    assert c["kv_cache_bytes_per_token"] == 128 * 1024


def test_moe_preset_reports_activated(capsys):
    assert main(["params", "--preset", "small"]) == 0
    out = capsys.readouterr().out
    assert "moe" in out and "activated per token" in out and "KV cache (bf16)" in out
    c = count_params(get_preset("small"))
    assert c["active"] < c["total"]


def test_params_from_model_dir_and_errors(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    cfg.save_pretrained(tmp_path)
    assert main(["params", "--model", str(tmp_path), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["total"] == transformers.LlamaForCausalLM(cfg).num_parameters()
    assert main(["params", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("preset, total", [("llama3-8b", 8_030_261_248), ("qwen2.5-0.5b", 494_032_768)])
def test_known_model_presets(preset, total):
    assert count_params(get_preset(preset))["total"] == total  # the published checkpoints' counts
