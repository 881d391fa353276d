"""DeepSeek-V3 / V3.2 parity with transformers on random tiny configs: import (same logits, fp32),
export (transformers loads it with the same logits), and the MTP module against transformers' MtpModel."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from velocis.config import ModelConfig  # noqa: E402
from velocis.interop.hf import export_hf, load_hf, read_hf_tensors  # noqa: E402
from velocis.models import VelocisModel  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32,
            q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
            routed_scaling_factor=2.5)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _randomise(model):
    """HF inits norms to 1 and the router bias to 0: perturb them so they matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    return model


def _hf(kind, **kw):
    cfg_cls, model_cls = {"v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
                          "v32": (transformers.DeepseekV32Config, transformers.DeepseekV32ForCausalLM)}[kind]
    torch.manual_seed(0)
    return _randomise(model_cls(cfg_cls(**{**TINY, **kw})).eval()), model_cls


def _roundtrip(tmp_path, hf_model, model_cls, T=24):
    hf_model.save_pretrained(tmp_path / "hf")
    vm, _ = load_hf(tmp_path / "hf")
    x = torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(x).logits
        d_import = (ref - vm(x)).abs().max().item()
    export_hf(vm, None, tmp_path / "out")
    back = model_cls.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        d_export = (ref - back(x).logits).abs().max().item()
    return vm, d_import, d_export


@pytest.mark.parametrize("variant", [
    {},                                                                      # rope_interleave, low-rank q
    {"rope_interleave": False, "q_lora_rank": None, "rope_parameters": YARN},  # full-rank q, YaRN + mscale
])
def test_deepseek_v3_parity(tmp_path, variant):
    hf_model, cls = _hf("v3", **variant)
    vm, d_import, d_export = _roundtrip(tmp_path, hf_model, cls)
    cfg = vm.config
    assert cfg.mixers() == ["mla"] * 3 and cfg.feed_forwards() == ["mlp", "moe", "moe"]
    assert cfg.router_score == "sigmoid" and cfg.num_expert_groups == 4 and cfg.num_shared_experts == 1
    assert cfg.mtp_depth == 0  # HF's config says 1, but save_pretrained wrote no MTP tensors
    assert d_import < 1e-4, d_import
    assert d_export < 1e-4, d_export


def test_deepseek_v32_parity(tmp_path):
    """V3.2 runs on CPU in transformers 5.23 (eager/SDPA attention with the indexer's top-k mask).
    index_topk=6 < T=24, so the sparse selection is exercised, not only the dense regime. 16 index
    heads: with 4, a score is exactly 0 (every head's ReLU off) for 1 pair in 16, and which of
    tied tokens top-k keeps is an implementation's choice (Velocis keeps the earliest, see dsa.py)."""
    hf_model, cls = _hf("v32", index_topk=6, index_head_dim=16, index_n_heads=16)
    vm, d_import, d_export = _roundtrip(tmp_path, hf_model, cls)
    assert vm.config.index_num_heads == 16 and vm.config.index_topk == 6
    assert d_import < 1e-4, d_import
    assert d_export < 1e-4, d_export


def _velocis_deepseek(mtp_depth=1, **kw):
    cfg = ModelConfig(vocab_size=100, hidden_dim=64, num_layers=2, num_heads=4, mixer="mla", q_lora_rank=32,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, mlp_dim=96,
                      num_experts=4, num_experts_per_token=2, num_shared_experts=1, moe_dim=32, first_dense_layers=1,
                      router_score="sigmoid", num_expert_groups=2, topk_groups=1, routed_scaling_factor=2.5,
                      balance="aux_free", tie_embeddings=False, norm_eps=1e-6, mtp_depth=mtp_depth, **kw)
    torch.manual_seed(0)
    return VelocisModel(cfg).eval()


def test_mtp_matches_transformers_mtp_model(tmp_path):
    """Export a Velocis model with an MTP module: the file holds it as layer N (DeepSeek layout),
    transformers' MtpModel built on the exported model gives the same depth-1 logits, and the
    import keeps it."""
    from transformers.modeling_layers import MtpModel

    vm = _velocis_deepseek()
    with torch.no_grad():
        for m in vm.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    assert export_hf(vm, None, tmp_path / "out") == "DeepseekV3ForCausalLM"
    sd = read_hf_tensors(tmp_path / "out")
    N = vm.config.num_layers
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.{N}.{name}.weight" in sd
    hf_main = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    mtp = MtpModel(hf_main, 1).eval()
    msd, pre = {}, f"model.layers.{N}."
    for k, v in sd.items():
        if not k.startswith(pre):
            continue
        r = k[len(pre):]
        if r.startswith(("embed_tokens", "shared_head.head")):
            continue
        if r.startswith(("enorm", "hnorm", "eh_proj")):
            msd["layers.0." + r] = v
        elif r.startswith("shared_head.norm"):
            msd["layers.0.post_norm" + r[len("shared_head.norm"):]] = v
        else:
            msd["layers.0.mtp_block." + r] = v
    E, ep = vm.config.num_experts, "layers.0.mtp_block.mlp.experts."
    g = [msd.pop(f"{ep}{j}.gate_proj.weight") for j in range(E)]
    u = [msd.pop(f"{ep}{j}.up_proj.weight") for j in range(E)]
    msd[ep + "down_proj"] = torch.stack([msd.pop(f"{ep}{j}.down_proj.weight") for j in range(E)])
    msd[ep + "gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(g, u)])
    missing, unexpected = mtp.load_state_dict(msd, strict=False)
    assert not unexpected and set(missing) <= {"embed_tokens.weight", "shared_head.weight"}

    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h_hf = hf_main.model(x).last_hidden_state
        ref = mtp._project_to_logits(mtp.forward_layer(0, h_hf[:, :-1], torch.arange(1, 12)[None], None,
                                                        input_ids=x[:, 1:]))
        mine = vm.mtp.per_depth_logits(vm.norm(vm(x, return_hidden=True).hidden), x, vm.embed_tokens, vm.lm_head)[0]
        assert (ref - mine).abs().max().item() < 1e-4
        assert (hf_main(x).logits - vm(x)).abs().max().item() < 1e-4
        back, _ = load_hf(tmp_path / "out")
        assert back.config.mtp_depth == 1
        again = back.mtp.per_depth_logits(back.norm(back(x, return_hidden=True).hidden), x, back.embed_tokens,
                                          back.lm_head)[0]
        assert (again - mine).abs().max().item() < 1e-5


def test_convert_and_export_cli(tmp_path):
    """`velocis convert --from-hf` and `velocis export` on a DeepSeek-V3.2 directory."""
    import velocis
    from velocis.cli import main

    hf_model, cls = _hf("v32", index_topk=6, index_head_dim=16, index_n_heads=16, num_hidden_layers=2)
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "v")]) == 0
    vm, _ = velocis.load(tmp_path / "v", device="cpu")
    x = torch.randint(0, TINY["vocab_size"], (1, 16))
    with torch.no_grad():
        ref = hf_model(x).logits
        assert (ref - vm(x)).abs().max().item() < 1e-4
    assert main(["export", "--model", str(tmp_path / "v"), "--output", str(tmp_path / "back")]) == 0
    back = cls.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (ref - back(x).logits).abs().max().item() < 1e-4


# deepseek-ai/DeepSeek-V3 config.json as published (auto_map dropped)
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_published_v3_config_is_the_preset():
    from velocis.config import get_preset
    from velocis.interop.hf import HF_ARCHITECTURES

    cfg = HF_ARCHITECTURES["DeepseekV3ForCausalLM"].config_from_hf(V3_CONFIG)
    preset = get_preset("deepseek-v3")
    # the file's aux_loss_alpha (0.001) is the sequence-wise balance weight; the paper (and the preset) says 1e-4
    assert cfg.seq_aux_loss_coef == 0.001
    assert cfg.replace(init_std=preset.init_std, seq_aux_loss_coef=preset.seq_aux_loss_coef) == preset
    v32 = dict(V3_CONFIG, architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32",
               index_n_heads=64, index_head_dim=128, index_topk=2048)
    cfg32 = HF_ARCHITECTURES["DeepseekV32ForCausalLM"].config_from_hf(v32)
    assert cfg32.replace(init_std=preset.init_std, seq_aux_loss_coef=preset.seq_aux_loss_coef) == get_preset("deepseek-v3.2")


def test_fp8_block_scaled_weights_are_dequantized():
    from velocis.interop.hf_deepseek import dequantize_fp8

    w = torch.randn(300, 200)
    scale = torch.rand(3, 2) + 0.5  # ceil(300/128) x ceil(200/128) tiles
    full = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    fp8 = (w / full).to(torch.float8_e4m3fn)
    out = dequantize_fp8({"a.weight": fp8, "a.weight_scale_inv": scale, "n.weight": torch.ones(3)},
                         dtype=torch.float32)
    assert set(out) == {"a.weight", "n.weight"}
    assert torch.allclose(out["a.weight"], fp8.float() * full)
    assert (out["a.weight"] - w).abs().max() < 0.07 * w.abs().max()  # e4m3 has a 3-bit mantissa
