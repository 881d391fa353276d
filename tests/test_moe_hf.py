"""Mixtral / Qwen3-MoE parity: random transformers models load into Velocis with the same logits,
and Velocis exports load back into transformers with the same logits."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import velocis  # noqa: E402
from velocis.config import ModelConfig  # noqa: E402
from velocis.errors import VelocisError  # noqa: E402
from velocis.interop.hf import export_hf  # noqa: E402
from velocis.models import VelocisModel  # noqa: E402

VOCAB = 96


def _hf_model(kind, **kw):
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=64,
            sliding_window=None, **kw)
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=3,
            max_position_embeddings=64, **kw)
        cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF zero-inits the router and sets norms to 1: randomise so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)  # decisive routing: near-ties would make parity depend on fp noise
    return model


def _logits_diff(hf_model, vmodel, T=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (2, T), generator=g)
    with torch.no_grad():
        out = vmodel(x)
        out = out.logits if hasattr(out, "logits") else out
        return (hf_model(x).logits - out).abs().max().item()


@pytest.mark.parametrize("kind, kw", [
    ("mixtral", dict(tie_word_embeddings=False)),
    ("qwen3_moe", dict(norm_topk_prob=False, tie_word_embeddings=False)),
    ("qwen3_moe", dict(norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=True)),  # a dense layer
])
def test_moe_hf_round_trip(tmp_path, kind, kw):
    hf_model = _hf_model(kind, **kw)
    hf_model.save_pretrained(tmp_path / "hf")
    vmodel, _ = velocis.load(tmp_path / "hf", device="cpu")
    cfg = vmodel.config
    assert cfg.num_experts == hf_model.config.num_local_experts
    if kw.get("mlp_only_layers"):
        assert cfg.feed_forwards() == ["mlp", "moe", "moe"]
    assert _logits_diff(hf_model, vmodel) < 1e-4

    # export back and let transformers load it
    arch = export_hf(vmodel, None, tmp_path / "out")
    assert arch == hf_model.config.architectures[0]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert _logits_diff(reloaded, vmodel) < 1e-4
    assert _logits_diff(reloaded, hf_model) < 1e-4


def test_velocis_moe_exports_as_qwen3_moe_or_mixtral(tmp_path):
    base = dict(vocab_size=VOCAB, hidden_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
                max_seq_len=64, num_experts=4, num_experts_per_token=2, moe_dim=32, tie_embeddings=False)
    torch.manual_seed(0)
    m = VelocisModel(ModelConfig(**base)).eval()
    assert export_hf(m, None, tmp_path / "mixtral") == "MixtralForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral", dtype=torch.float32).eval()
    assert _logits_diff(hf, m) < 1e-4

    m = VelocisModel(ModelConfig(**base, qk_norm=True, first_dense_layers=1)).eval()
    assert export_hf(m, None, tmp_path / "qwen") == "Qwen3MoeForCausalLM"
    assert json.loads((tmp_path / "qwen" / "config.json").read_text())["mlp_only_layers"] == [0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen", dtype=torch.float32).eval()
    assert _logits_diff(hf, m) < 1e-4


def test_aux_free_or_deepseek_routing_is_not_exported_as_mixtral(tmp_path):
    base = dict(vocab_size=VOCAB, hidden_dim=64, num_layers=1, num_heads=4, mlp_dim=96, max_seq_len=64,
                num_experts=4, num_experts_per_token=2, moe_dim=32)
    for extra in (dict(balance="aux_free"), dict(router_score="sigmoid"), dict(num_shared_experts=1)):
        m = VelocisModel(ModelConfig(**base, **extra))
        with pytest.raises(VelocisError):
            export_hf(m, None, tmp_path / "x")


def test_fused_expert_layout_is_read_too():
    from velocis.interop.hf_moe import experts_from_hf, experts_to_hf

    e, h, i = 3, 8, 5
    per_expert = {"p.gate.weight": torch.randn(e, h)}
    for j in range(e):
        for n, shape in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
            per_expert[f"p.experts.{j}.{n}.weight"] = torch.randn(shape)
    a = experts_from_hf(dict(per_expert), "p.", "mixtral", e)
    fused = {"p.gate.weight": per_expert["p.gate.weight"], "p.experts.gate_up_proj": a["experts.gate_up_proj"],
             "p.experts.down_proj": a["experts.down_proj"]}
    b = experts_from_hf(fused, "p.", "mixtral", e)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["experts.gate_up_proj"][1, :i], per_expert["p.experts.1.w1.weight"])
    assert torch.equal(a["experts.gate_up_proj"][1, i:], per_expert["p.experts.1.w3.weight"])
    back = experts_to_hf(a, "p.", "mixtral")
    assert set(back) == set(per_expert) and all(torch.equal(back[k], per_expert[k]) for k in back)
    a["gate.e_score_correction_bias"] = torch.ones(e)
    with pytest.raises(VelocisError):
        experts_to_hf(a, "p.", "mixtral")
