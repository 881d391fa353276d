"""Multi-head latent attention: module parity with transformers' DeepseekV3Attention, the absorbed
latent-cache decode against the uncached forward, and the cache size per token."""
import pytest
import torch

from velocis.config import ModelConfig, get_preset
from velocis.interop.hf_deepseek import deinterleave_rope
from velocis.models import VelocisModel
from velocis.models.cache_size import kv_cache_bytes_per_token, measured_kv_cache_bytes_per_token
from velocis.models.mla import MLA, MLACache


pytestmark = pytest.mark.usefixtures("one_thread")


def _mla_config(**kw):
    base = dict(vocab_size=97, hidden_dim=64, num_layers=3, num_heads=4, mixer="mla", q_lora_rank=32,
                kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, mlp_dim=96,
                max_seq_len=64, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("q_lora,yarn,interleave", [(32, False, True), (None, True, False)])
def test_mla_matches_transformers_attention(q_lora, yarn, interleave):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hfm

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707} if yarn else None
    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora, kv_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
        rope_interleave=interleave, rope_parameters=rope)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = hfm.DeepseekV3Attention(hf_cfg, 0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.normal_(1, 0.1)
    scaling = None
    if yarn:
        scaling = {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16, "beta_fast": 32, "beta_slow": 1,
                   "mscale": 0.707, "mscale_all_dim": 0.707}
    cfg = _mla_config(q_lora_rank=q_lora, rope_scaling=scaling)
    mine = MLA(cfg, 0).eval()
    sd = dict(hf.state_dict())
    if interleave:
        for k in ("q_b_proj.weight", "q_proj.weight"):
            if k in sd:
                sd[k] = deinterleave_rope(sd[k], 4, 24, 8)
        sd["kv_a_proj_with_mqa.weight"] = deinterleave_rope(sd["kv_a_proj_with_mqa.weight"], 1, 32, 8)
    mine.load_state_dict(sd)
    assert mine.scaling == pytest.approx(hf.scaling)

    T = 40  # past the YaRN original context
    x = torch.randn(2, T, 64)
    pos = torch.arange(T)
    with torch.no_grad():
        cos, sin = hfm.DeepseekV3RotaryEmbedding(hf_cfg)(x, pos[None])
        ref = hf(x, (cos, sin), attention_mask=None)[0]
        out = mine(x, pos)
        assert (ref - out).abs().max().item() < 1e-5
        # the absorbed path over a latent cache gives the same output
        cache = mine.new_cache(2, T)
        out_c = torch.cat([mine(x[:, :7], pos[:7], cache)] + [mine(x[:, t:t + 1], pos[t:t + 1], cache)
                                                              for t in range(7, T)], dim=1)
        assert (ref - out_c).abs().max().item() < 1e-5


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None}, {"index_num_heads": 4, "index_head_dim": 16, "index_topk": 6}],
                         ids=["mla", "mla-full-rank-q", "mla+dsa"])
@pytest.mark.parametrize("expand_min_tokens", [128, 2], ids=["absorbed-prefill", "expanded-prefill"])
def test_latent_cache_decode_matches_uncached(kw, expand_min_tokens, monkeypatch):
    """Prefill 5 tokens into the cache (absorbed, or expanded from the cached latents), then decode
    20 tokens one at a time with the absorbed form."""
    monkeypatch.setattr(MLA, "expand_min_tokens", expand_min_tokens)
    torch.manual_seed(0)
    model = VelocisModel(_mla_config(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():  # larger weights: sharper attention, a stricter test
            if p.dim() > 1:
                p.mul_(4)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    steps = 20
    with torch.no_grad():
        # greedy, recomputing the whole sequence every step (no cache)
        seq = prompt
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        full_logits = model(seq)
        # greedy with the latent cache
        cache = model.new_cache(2, 32)
        logits = model(prompt, cache=cache)
        out, step_logits = prompt, [logits]
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            logits = model(nxt, cache=cache)
            step_logits.append(logits)
    assert torch.equal(out, seq)
    cached = torch.cat(step_logits, dim=1)
    assert (cached - full_logits).abs().max().item() < 1e-4
    # the cache holds only the latent + rotary key (+ indexer key): never per-head K/V
    layer = cache.layers[0]
    assert isinstance(layer, MLACache)
    assert tuple(layer.kv.shape) == (2, 32, 24 + 8)
    shapes = sorted(tuple(b.shape) for b in layer.buffers())
    assert shapes == sorted([(2, 32, 32)] + ([(2, 32, 16)] if kw.get("index_num_heads") else []))


def test_cache_bytes_per_token_table(capsys):
    """Measured (buffers new_cache allocates, meta device) == formula; the table is printed."""
    v3 = get_preset("deepseek-v3")
    same_width = dict(vocab_size=129280, hidden_dim=7168, num_layers=61, num_heads=128, mlp_dim=18432,
                      max_seq_len=4096, mixer="attention")
    rows = [
        ("small (GQA 8 heads / 4 kv x 64)", get_preset("small")),
        ("deepseek-v3 (MLA)", v3),
        ("deepseek-v3.2 (MLA + indexer key)", get_preset("deepseek-v3.2")),
        ("d7168 x 61, MHA 128 x 56", ModelConfig(**same_width, num_kv_heads=128)),
        ("d7168 x 61, GQA 8 kv x 56", ModelConfig(**same_width, num_kv_heads=8)),
        ("d7168 x 61, GQA 8 kv x 128", ModelConfig(**same_width, num_kv_heads=8, head_dim=128)),
    ]
    measured = {}
    with capsys.disabled():
        print("\nKV-cache bytes per token (bf16), all layers:")
        for name, cfg in rows:
            m = measured_kv_cache_bytes_per_token(cfg, torch.bfloat16)
            assert m == kv_cache_bytes_per_token(cfg, 2)
            measured[name] = m
            print(f"  {name:<36} {m:>9,} B  ({m / 61 if '7168' in name or 'deepseek' in name else m / 8:,.0f} B/layer)")
        mla = measured["deepseek-v3 (MLA)"]
        print(f"  MLA / MHA-same-width = 1/{measured['d7168 x 61, MHA 128 x 56'] / mla:.1f}; "
              f"MLA / GQA-8x56 = {mla / measured['d7168 x 61, GQA 8 kv x 56']:.2f}; "
              f"MLA / GQA-8x128 = 1/{measured['d7168 x 61, GQA 8 kv x 128'] / mla:.2f}")
    assert measured["small (GQA 8 heads / 4 kv x 64)"] == 8 * 2 * 4 * 64 * 2
    assert mla == 61 * (512 + 64) * 2 == 70272
    assert measured["deepseek-v3.2 (MLA + indexer key)"] == 61 * (512 + 64 + 128) * 2
    assert measured["d7168 x 61, MHA 128 x 56"] == 61 * 2 * 7168 * 2  # 24.9x MLA's
