"""Qwen3-Next against transformers' Qwen3NextForCausalLM (random weights, fp32): a small model with the
3:1 Gated DeltaNet / gated attention pattern, MoE feed-forwards (softmax top-k, gated shared expert) and
one dense MLP layer loads through `velocis.load` with equal logits (1e-4), exports back to a directory
transformers loads with equal logits, generates the same greedy tokens (also through the serving
engine), converts through the `velocis convert` CLI, and the qwen3-next-80b-a3b preset counts exactly
what transformers counts."""
import pytest
import torch

from velocis.config import get_preset
from velocis.infer.generate import generate_ids

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread", "transformers_torch_path")


@pytest.fixture(scope="module")
def transformers_torch_path():
    """transformers binds fla's Triton gated-delta-rule kernels at import whenever fla is installed
    (`pip install velocis[fla]`), even for a CPU model, where they cannot run: hold its Qwen3-Next
    to its own PyTorch functions (the wrapped originals), which is what this test compares with."""
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    mp = pytest.MonkeyPatch()
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        mp.setattr(m, name, getattr(getattr(m, name), "__wrapped__", getattr(m, name)))
    yield
    mp.undo()

# 8 layers: layer_types default to three linear_attention then one full_attention, twice;
# layer 2 is a dense MLP (mlp_only_layers), the rest MoE
HF_TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=8, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4, num_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
               mlp_only_layers=[2], max_position_embeddings=128, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})


def _hf(**kw):
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**{**HF_TINY, **kw})).eval()
    with torch.no_grad():  # HF inits norms, A_log and dt_bias to constants: perturb them so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _ids(b, T, seed):
    return torch.randint(0, 97, (b, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", [{}, {"tie_word_embeddings": True, "norm_topk_prob": False},
                                     {"num_experts": 0, "mlp_only_layers": []}])  # dense: every layer an MLP
def test_transformers_parity_import_and_export(tmp_path, variant):
    import velocis
    from velocis.interop.hf import export_hf

    hf = _hf(**variant)
    assert hf.config.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"]
    hf.save_pretrained(tmp_path / "hf")
    vm, _ = velocis.load(tmp_path / "hf", device="cpu")
    cfg = vm.config
    assert cfg.mixers() == (["gated_deltanet"] * 3 + ["gated_attention"]) * 2
    moe = hf.config.num_experts > 0
    assert cfg.feed_forwards() == (["moe", "moe", "mlp", "moe", "moe", "moe", "moe", "moe"] if moe else ["mlp"] * 8)
    assert vm.num_params() == hf.num_parameters()
    x = _ids(2, 70, 1)  # longer than one 64-token DeltaNet chunk
    with torch.no_grad():
        ref = hf(x).logits
        assert (ref - vm(x)).abs().max().item() < 1e-4
    assert export_hf(vm, None, tmp_path / "out") == "Qwen3NextForCausalLM"
    back = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.layer_types == hf.config.layer_types
    assert back.config.mlp_only_layers == ([2] if moe else []) and back.config.num_experts == hf.config.num_experts
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert back.config.norm_topk_prob == hf.config.norm_topk_prob
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max().item() < 1e-4


def test_greedy_generation_equals_transformers(tmp_path):
    from velocis.interop.hf import load_hf

    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    vm, _ = load_hf(tmp_path / "hf")
    prompt = _ids(1, 9, 4)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 9:]
    ours = torch.stack(list(generate_ids(vm, prompt, 12)), 1)[0]
    assert ours.tolist() == theirs.tolist()
    # the serving engine (state slots beside paged KV, continuous batching): the same tokens per prompt
    from velocis.infer.engine import Engine
    from velocis.infer.sampling import SamplingParams

    prompts = [prompt[0].tolist(), _ids(1, 5, 5)[0].tolist(), _ids(1, 23, 6)[0].tolist()]
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    got = Engine(vm, max_num_seqs=4).generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    assert [r["token_ids"] for r in got] == expected


def test_convert_cli_and_load(tmp_path):
    import velocis
    from velocis.cli import main

    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "v")]) == 0
    vm, _ = velocis.load(tmp_path / "v", device="cpu")
    x = _ids(1, 16, 2)
    with torch.no_grad():
        assert (hf(x).logits - vm(x)).abs().max().item() < 1e-4
    assert main(["export", "--model", str(tmp_path / "v"), "--output", str(tmp_path / "hf2"), "--format", "hf"]) == 0
    back = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max().item() < 1e-4


def test_qwen3_next_80b_a3b_preset_counts_what_transformers_counts(capsys):
    from velocis.cli import main
    from velocis.interop.hf_qwen3_next import qwen3_next_config, to_qwen3_next_config
    from velocis.models.count import count_params

    cfg = get_preset("qwen3-next-80b-a3b")
    hf_cfg = transformers.Qwen3NextConfig(  # Qwen/Qwen3-Next-80B-A3B-Instruct's config.json (the shape fields)
        vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512,
        num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        full_attention_interval=4, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
    with torch.device("meta"):
        hf = transformers.Qwen3NextForCausalLM(hf_cfg)
    c = count_params(cfg)
    assert c["total"] == hf.num_parameters() == 79_674_391_296  # the published "80B" (without the MTP module)
    assert c["kv_cache_bytes_per_token"] == 12 * 2 * 2 * 256 * 2  # only the 12 attention layers grow
    back = qwen3_next_config(to_qwen3_next_config(cfg))  # the preset is an exportable Qwen3-Next shape
    assert back.mixers() == cfg.mixers() and count_params(back)["total"] == c["total"]
    assert main(["params", "--preset", "qwen3-next-80b-a3b"]) == 0
    assert f"{c['total']:,}" in capsys.readouterr().out
