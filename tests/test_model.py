import math

import pytest
import torch

from velocis.config import ModelConfig, get_preset
from velocis.errors import VelocisError
from velocis.infer.generate import generate_ids
from velocis.model_io import load_model_dir, save_model
from velocis.models import FEED_FORWARDS, MIXERS, VelocisModel


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=97, hidden_dim=48, num_layers=3, num_heads=4, mlp_dim=96,
                                 max_seq_len=64), **kw})


def test_registries_hold_the_parts():
    assert "attention" in MIXERS and "mlp" in FEED_FORWARDS


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = VelocisModel(tiny(num_kv_heads=2))
    x = torch.randint(0, 97, (2, 10))
    assert model(x).shape == (2, 10, 97)
    out = model(x, torch.randint(0, 97, (2, 10)))
    assert abs(out.loss.item() - math.log(97)) < 0.5  # small init: close to uniform
    assert set(out.stats) == {"lm_loss"} and out.aux_losses == {} and int(out.num_tokens) == 20
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_init_scales_output_projections():
    torch.manual_seed(0)
    cfg = tiny(hidden_dim=256, num_heads=4, mlp_dim=512, num_layers=8)
    m = VelocisModel(cfg)
    blk = m.layers[0]
    assert abs(blk.mixer.q_proj.weight.std().item() - 0.02) < 2e-3
    assert abs(blk.mixer.o_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 1e-3
    assert abs(blk.feed_forward.down_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 1e-3


def test_tied_and_untied_embeddings():
    m = VelocisModel(tiny(tie_embeddings=True))
    assert m.lm_head.weight is m.embed_tokens.weight
    u = VelocisModel(tiny(tie_embeddings=False))
    assert u.lm_head.weight is not u.embed_tokens.weight
    assert u.num_params() - m.num_params() == 97 * 48


@pytest.mark.parametrize("kv_heads, qkv_bias", [(4, False), (2, True), (1, False)], ids=["MHA", "GQA", "MQA"])
def test_kv_cache_generation_equals_recompute(kv_heads, qkv_bias):
    torch.manual_seed(kv_heads)
    model = VelocisModel(tiny(num_kv_heads=kv_heads, qkv_bias=qkv_bias, init_std=0.2)).eval()
    prompt = torch.randint(0, 97, (2, 7))
    cached = torch.stack(list(generate_ids(model, prompt, 30, temperature=0)), 1)
    full = torch.stack(list(generate_ids(model, prompt, 30, temperature=0, recompute=True)), 1)
    assert torch.equal(cached, full)
    assert len(set(cached[0].tolist())) > 3  # a non-degenerate continuation


def test_kv_cache_logits_match_chunked_prefill():
    torch.manual_seed(0)
    model = VelocisModel(tiny(num_kv_heads=2, rope_scaling={"type": "yarn", "factor": 4.0,
                                                             "original_max_seq_len": 16})).eval()
    x = torch.randint(0, 97, (1, 40))
    cache = model.new_cache(1, 40)
    with torch.no_grad():
        parts = [model(x[:, :13], cache=cache), model(x[:, 13:14], cache=cache), model(x[:, 14:], cache=cache)]
        assert (torch.cat(parts, 1) - model(x)).abs().max() < 1e-5


def test_sampling_is_seeded():
    model = VelocisModel(tiny()).eval()
    prompt = torch.randint(0, 97, (1, 5))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [int(t) for t in generate_ids(model, prompt, 12, temperature=1.0, top_k=20, top_p=0.9, generator=g)]

    assert run(1) == run(1)


@pytest.mark.parametrize("kw, words", [
    (dict(hidden_dim=50, num_heads=4), "not divisible by num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "must divide num_heads"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "original_max_seq_len"),
    (dict(rope_scaling={"type": "magic", "factor": 2.0}), "rope_scaling type 'magic'"),
])
def test_bad_config_errors(kw, words):
    with pytest.raises(VelocisError, match=words):
        tiny(**kw)


def test_sequence_longer_than_context_is_clear():
    model = VelocisModel(tiny(max_seq_len=16))
    with pytest.raises(VelocisError, match=r"position 16 is past the end of the model's context \(16 tokens\)"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(VelocisError, match="exceeds the model's context"):
        list(generate_ids(model, torch.zeros(1, 10, dtype=torch.long), 7))
    cache = model.new_cache(1, 8)
    with pytest.raises(VelocisError, match=r"past the end of the cache \(8 tokens\)"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_unknown_preset():
    with pytest.raises(VelocisError, match="unknown preset 'gigantic'"):
        get_preset("gigantic")


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_roundtrip(tmp_path, tied):
    torch.manual_seed(0)
    model = VelocisModel(tiny(num_kv_heads=2, tie_embeddings=tied, qkv_bias=True)).eval()
    save_model(model, None, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json"}
    loaded, tok = load_model_dir(tmp_path / "m")
    assert tok is None and loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    save_model(model, None, tmp_path / "m")  # overwriting an existing dir is atomic, not an error


def test_moe_model_loss_has_aux_and_load():
    torch.manual_seed(0)
    cfg = tiny(num_experts=4, num_experts_per_token=2, moe_dim=32, first_dense_layers=1)
    model = VelocisModel(cfg).train()
    assert [b.feed_forward_name for b in model.layers] == ["mlp", "moe", "moe"]
    x = torch.randint(0, 97, (2, 16))
    out = model(x, x)
    assert {"lm_loss", "moe_balance", "expert_load"} <= set(out.stats)
    assert torch.isclose(out.loss, out.stats["lm_loss"] + cfg.aux_loss_coef * out.stats["moe_balance"])


def test_meta_device_builds_huge_configs_for_free():
    cfg = tiny(hidden_dim=8192, num_heads=64, num_kv_heads=8, mlp_dim=28672, num_layers=80, vocab_size=128256,
               max_seq_len=8192, tie_embeddings=False)  # Llama-3-70B's shape
    with torch.device("meta"):
        m = VelocisModel(cfg)
    assert abs(m.num_params() - 70.55e9) < 0.01e9


def test_model_dir_without_weights_is_clear(tmp_path):
    tiny().save(tmp_path / "config.json")
    with pytest.raises(VelocisError, match="no model.safetensors"):
        load_model_dir(tmp_path)


def test_static_ntk_scales_the_base():
    from velocis.models.rope import rope_inv_freq

    plain, _ = rope_inv_freq(16, 10000.0, None)
    ntk, _ = rope_inv_freq(16, 10000.0, {"type": "ntk", "factor": 4.0})
    assert torch.allclose(ntk, rope_inv_freq(16, 10000.0 * 4.0 ** (16 / 14), None)[0])
    assert ntk[0] == plain[0] and ntk[-1] < plain[-1]  # low frequencies stretched, the highest kept
