"""MoE feed-forward: routing parity with transformers' DeepseekV3MoE / Mixtral / Qwen3-MoE blocks,
dropless dispatch against a naive per-expert loop (values and gradients), capacity dropping,
load-balancing mechanics."""
from __future__ import annotations

import pytest
import torch

from velocis.config import ModelConfig
from velocis.models.moe import MoE, dispatch, moe_stats, naive_moe_experts, route, update_expert_bias


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_dim=32, num_layers=2, num_heads=4, mlp_dim=48, max_seq_len=64,
                num_experts=8, num_experts_per_token=2, moe_dim=16)
    base.update(kw)
    return ModelConfig(**base)


def _routing(n=40, e=8, k=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g, dtype=dtype)
    return route(logits, k)


# --------------------------------------------------------------------------- dispatch

@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispatch_matches_naive_loop_fp64(k):
    torch.manual_seed(0)
    n, h, i, e = 37, 8, 6, 5
    x = torch.randn(n, h, dtype=torch.float64)
    _, w, idx = route(torch.randn(n, e, dtype=torch.float64), k)
    gu = torch.randn(e, 2 * i, h, dtype=torch.float64)
    dn = torch.randn(e, h, i, dtype=torch.float64)
    out, load = dispatch(x, w, idx, gu, dn, impl="loop")
    ref = naive_moe_experts(x, w, idx, gu, dn)
    assert torch.allclose(out, ref, atol=1e-12)
    assert load.tolist() == torch.bincount(idx.flatten(), minlength=e).float().tolist()


def test_dispatch_gradcheck_fp64():
    torch.manual_seed(0)
    n, h, i, e, k = 9, 4, 3, 4, 2
    x = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    _, w, idx = route(torch.randn(n, e, dtype=torch.float64), k)
    w = w.detach().requires_grad_()
    gu = torch.randn(e, 2 * i, h, dtype=torch.float64, requires_grad=True)
    dn = torch.randn(e, h, i, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, gu, dn: dispatch(x, w, idx, gu, dn, impl="loop")[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, gu, dn))
    # and the gradients equal the naive loop's
    out = f(x, w, gu, dn)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, gu, dn), g)
    ref = naive_moe_experts(x, w, idx, gu, dn)
    ref_grads = torch.autograd.grad(ref, (x, w, gu, dn), g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_grouped_mm_path_matches_loop_fp32():
    torch.manual_seed(0)
    n, h, i, e, k = 64, 16, 24, 8, 2
    x = torch.randn(n, h, requires_grad=True)
    logits = torch.randn(n, e)
    logits[:, 3] = -1e4  # an expert that receives nothing
    _, w, idx = route(logits, k)
    gu = (torch.randn(e, 2 * i, h) * 0.3).requires_grad_()
    dn = (torch.randn(e, h, i) * 0.3).requires_grad_()
    results = []
    for impl in ("auto", "loop"):
        out, _ = dispatch(x, w, idx, gu, dn, impl=impl)
        grads = torch.autograd.grad(out.sum(), (x, gu, dn))  # sum(): an expanded gradient
        results.append((out, grads))
    (o1, g1), (o2, g2) = results
    assert torch.allclose(o1, o2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-4)


def test_capacity_drops_overflow_deterministically():
    n, h, e = 8, 4, 2
    x = torch.randn(n, h, dtype=torch.float64)
    idx = torch.zeros(n, 1, dtype=torch.long)  # every token wants expert 0
    idx[6:] = 1
    w = torch.ones(n, 1, dtype=torch.float64)
    gu = torch.randn(e, 6, h, dtype=torch.float64)
    dn = torch.randn(e, h, 3, dtype=torch.float64)
    out, load = dispatch(x, w, idx, gu, dn, capacity=4, impl="loop")
    ref = naive_moe_experts(x, w, idx, gu, dn)
    assert load.tolist() == [6.0, 2.0]  # load as routed, before dropping
    assert torch.allclose(out[:4], ref[:4]) and torch.allclose(out[6:], ref[6:])
    assert torch.all(out[4:6] == 0)  # tokens 4, 5 overflowed expert 0


def test_moe_capacity_factor_layer():
    cfg = tiny_cfg(capacity_factor=1.0, balance="none")
    m = MoE(cfg, 0).eval()
    x = torch.randn(2, 16, 32)
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert m.capacity(32) == 8  # ceil(1.0 * 32 * 2 / 8)


# --------------------------------------------------------------------------- HF module parity

def _deepseek_cfg():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )


def test_deepseek_v3_moe_block_parity():
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = _deepseek_cfg()
    torch.manual_seed(0)
    ref = DeepseekV3MoE(hf_cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        ref.gate.e_score_correction_bias.normal_(0, 0.1)
    cfg = tiny_cfg(num_experts=16, num_experts_per_token=3, num_shared_experts=2, moe_dim=16,
                   router_score="sigmoid", router_norm_topk=True, num_expert_groups=4, topk_groups=2,
                   routed_scaling_factor=2.5, balance="aux_free")
    mine = MoE(cfg, 0).eval()
    missing, unexpected = mine.load_state_dict(ref.state_dict(), strict=True), None
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        want = ref(x)
        got = mine(x)
    assert (got - want).abs().max() < 1e-5
    # routing decisions identical, bias included
    h = x.reshape(-1, 32)
    _, w_ref, i_ref = ref.gate(h)
    _, w, i = route(mine.gate(h), 3, score="sigmoid", bias=mine.gate.e_score_correction_bias,
                    num_groups=4, topk_groups=2, norm_topk=True, scaling=2.5)
    assert torch.equal(i.sort(-1)[0], i_ref.sort(-1)[0])


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_softmax_moe_block_parity(kind):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        hf_cfg = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
        norm = True
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        hf_cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=False)
        norm = False
    ref = Block(hf_cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    mine = MoE(tiny_cfg(router_norm_topk=norm), 0).eval()
    sd = dict(ref.state_dict())
    sd["gate.e_score_correction_bias"] = torch.zeros(8)
    mine.load_state_dict(sd, strict=True)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert (mine(x) - ref(x)).abs().max() < 1e-5


# --------------------------------------------------------------------------- balancing

def test_aux_loss_is_one_when_balanced_and_has_grad():
    m = MoE(tiny_cfg(balance="aux_loss"), 0).train()
    with torch.no_grad():
        m.gate.weight.zero_()  # uniform probabilities
    x = torch.randn(4, 8, 32)
    _, aux = m(x)
    # uniform P_i = 1/E, so E * sum f_i / E = 1 regardless of the (tie-broken) loads
    assert set(aux) == {"moe_balance"} and abs(aux["moe_balance"].item() - 1.0) < 1e-6
    m.gate.weight.data.normal_(0, 1.0)
    m(x)[1]["moe_balance"].backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0


def test_aux_free_bias_update_and_stats():
    cfg = tiny_cfg(balance="aux_free", bias_update_rate=0.01)
    model = torch.nn.Sequential(MoE(cfg, 0), MoE(cfg, 1)).train()
    with torch.no_grad():
        model[0].gate.weight.zero_()
        model[0].gate.weight[0] += 1.0  # push every token to expert 0
    x = torch.randn(4, 8, 32).abs()
    assert model[0](x)[1] == {} and model[1](x)[1] == {}  # aux_free adds no loss
    load = model[0].load_accum.clone()
    assert load.sum() == 4 * 8 * 2
    stats = moe_stats(model)
    assert len(stats["expert_load"]) == 2 and stats["expert_imbalance_max"] >= stats["expert_imbalance"] >= 1.0
    update_expert_bias(model)
    bias = model[0].gate.e_score_correction_bias
    expect = 0.01 * torch.sign(load.mean() - load)
    assert torch.allclose(bias, expect)
    assert model[0].load_accum.sum() == 0
    # eval forwards do not accumulate
    model.eval()
    model[0](x)
    assert model[0].load_accum.sum() == 0


def test_unaligned_expert_width_falls_back_to_loop():
    torch.manual_seed(0)
    n, h, i, e = 16, 8, 5, 4  # 5 * 4 bytes is not a multiple of 16: grouped_mm cannot take it
    x = torch.randn(n, h)
    _, w, idx = route(torch.randn(n, e), 2)
    gu, dn = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    out, _ = dispatch(x, w, idx, gu, dn)
    assert torch.allclose(out, naive_moe_experts(x, w, idx, gu, dn), atol=1e-5)


def test_moe_model_cached_decoding_matches_full_forward():
    from velocis.models import VelocisModel

    torch.manual_seed(0)
    cfg = tiny_cfg(num_layers=3, first_dense_layers=1, num_shared_experts=1, router_score="sigmoid",
                   num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.0, balance="aux_free")
    model = VelocisModel(cfg).eval()
    with torch.no_grad():
        for layer in model.layers[1:]:
            layer.feed_forward.gate.e_score_correction_bias.normal_(0, 0.05)
        ids = torch.randint(0, cfg.vocab_size, (2, 12))
        full = model(ids)
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    assert model.config.feed_forwards() == ["mlp", "moe", "moe"]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


@pytest.mark.slow
def test_moe_model_under_torch_compile_matches_eager():
    from velocis.models import VelocisModel

    torch.manual_seed(0)
    m = VelocisModel(tiny_cfg(balance="aux_loss")).train()
    x = torch.randint(0, 64, (2, 16))
    eager = m(x, x).loss
    compiled = torch.compile(lambda a, b: m(a, b))
    out = compiled(x, x)
    out.loss.backward()
    assert abs(out.loss.item() - eager.item()) < 1e-5 and out.stats["expert_imbalance"] >= 1.0


def test_moe_model_trains_under_bf16_autocast():
    """Experts run in bf16 under autocast (torch._grouped_mm is not an autocast op); routing stays fp32."""
    from velocis.config import get_preset
    from velocis.models import VelocisModel

    torch.manual_seed(0)
    cfg = get_preset("micro").replace(vocab_size=128, hidden_dim=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                      num_experts=4, num_experts_per_token=2, moe_dim=32, max_seq_len=32)
    model = VelocisModel(cfg)
    x = torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, torch.roll(x, -1, 1)).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    fp32 = model(x, torch.roll(x, -1, 1)).loss
    assert abs(loss.item() - fp32.item()) < 0.05
