"""Auxiliary losses: each family with its own coefficient, the balance loss against transformers'
normalisation, DeepSeek-V3's sequence-wise balance loss, and routing checks."""
import pytest
import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.models import VelocisModel
from velocis.models.dsa import set_indexer_training
from velocis.models.moe import MoE

pytestmark = pytest.mark.usefixtures("one_thread")


def dsa_moe(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_dim=64, num_layers=2, num_heads=4, mixer="mla", q_lora_rank=32, kv_lora_rank=24,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, mlp_dim=96, max_seq_len=64,
                index_num_heads=4, index_head_dim=16, index_topk=6, num_experts=4, num_experts_per_token=2,
                moe_dim=32, balance="aux_loss", aux_loss_coef=0.01)
    return ModelConfig(**{**base, **kw})


def test_each_family_has_its_own_coefficient():
    """Before: the indexer KL and the balance loss were averaged under one coefficient, so turning the
    indexer on halved the balance weight, and aux_loss_coef=0 silently stopped indexer training."""
    torch.manual_seed(0)
    x = torch.randint(0, 97, (2, 16))
    model = VelocisModel(dsa_moe()).train()
    plain = model(x, x)
    set_indexer_training(model, "sparse")
    out = model(x, x)
    assert set(out.aux_losses) == {"moe_balance", "indexer_kl"}
    torch.testing.assert_close(out.aux_losses["moe_balance"], plain.aux_losses["moe_balance"])
    c = model.config
    torch.testing.assert_close(out.aux_loss, c.aux_loss_coef * out.aux_losses["moe_balance"]
                               + c.indexer_loss_coef * out.aux_losses["indexer_kl"])
    # no balance coefficient: the indexer still trains
    model.config = c.replace(aux_loss_coef=0.0)
    model(x, x).loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if ".indexer." in n)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_balance_loss_matches_transformers_after_import(tmp_path, kind):
    """transformers normalises the expert shares by N tokens (k when balanced), Velocis by N*k (1 when
    balanced): the importer scales the coefficient by k, so the weighted loss is transformers'."""
    transformers = pytest.importorskip("transformers")
    import velocis

    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, router_aux_loss_coef=0.02, output_router_logits=True)
    if kind == "mixtral":
        hf_cfg = transformers.MixtralConfig(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                                            sliding_window=None, **common)
        hf = transformers.MixtralForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.Qwen3MoeConfig(intermediate_size=80, moe_intermediate_size=32, head_dim=16,
                                             num_experts=8, num_experts_per_tok=3, **common)
        hf = transformers.Qwen3MoeForCausalLM(hf_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "hf")
    vm, _ = velocis.load(tmp_path / "hf", device="cpu")
    k = hf_cfg.num_experts_per_tok
    assert vm.config.aux_loss_coef == pytest.approx(0.02 * k)
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    hf.train()
    vm.train()
    ref = hf(x, labels=x)  # one MoE layer: per-layer and all-layer normalisation agree
    out = vm(x, torch.roll(x, -1, 1))
    torch.testing.assert_close(out.aux_loss, 0.02 * ref.aux_loss, atol=1e-6, rtol=1e-5)
    from velocis.interop.hf import export_hf

    export_hf(vm, None, tmp_path / "out")
    back = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert back.router_aux_loss_coef == pytest.approx(0.02)


def _moe_cfg(**kw):
    base = dict(vocab_size=64, hidden_dim=32, num_layers=1, num_heads=4, mlp_dim=64, max_seq_len=64,
                num_experts=8, num_experts_per_token=2, moe_dim=16, router_score="sigmoid", balance="aux_free",
                seq_aux_loss_coef=1e-4)
    return ModelConfig(**{**base, **kw})


def test_sequence_wise_balance_loss():
    """DeepSeek-V3 (eq. 17-20): per sequence f_i = E/(kT) * tokens routed to i, P_i = mean over the
    sequence of the normalised scores, loss = sum_i f_i P_i, averaged over the sequences; it combines
    with the auxiliary-loss-free bias (which moves the routing, not the loss)."""
    torch.manual_seed(0)
    m = MoE(_moe_cfg(), 0).train()
    with torch.no_grad():
        m.gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(3, 10, 32)
    _, aux = m(x)
    assert set(aux) == {"moe_seq_balance"}  # aux_free: no global balance loss
    E, k = 8, 2
    scores = torch.sigmoid(x.reshape(-1, 32) @ m.gate.weight.t())
    idx = (scores + m.gate.e_score_correction_bias).topk(k, -1).indices.view(3, 10 * k)
    s = (scores / scores.sum(-1, keepdim=True)).view(3, 10, E)
    ref = []
    for b in range(3):
        f = torch.bincount(idx[b], minlength=E).float() * E / (k * 10)
        ref.append((f * s[b].mean(0)).sum())
    torch.testing.assert_close(aux["moe_seq_balance"], torch.stack(ref).mean())
    aux["moe_seq_balance"].backward()
    assert m.gate.weight.grad.abs().sum() > 0
    assert m.load_accum.sum() == 3 * 10 * k  # the bias still gets its load counts


def test_sequence_balance_reaches_the_model_loss():
    torch.manual_seed(0)
    model = VelocisModel(_moe_cfg(seq_aux_loss_coef=0.5)).train()
    x = torch.randint(0, 64, (2, 8))
    out = model(x, x)
    torch.testing.assert_close(out.aux_loss, 0.5 * out.aux_losses["moe_seq_balance"])
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


def test_first_moe_forward_leaves_the_global_rng_alone():
    from velocis.models import moe

    moe._GROUPED_MM_OK.clear()  # the grouped-mm probe runs on the first forward of a device/dtype
    m = MoE(_moe_cfg(balance="aux_loss"), 0).eval()
    x = torch.randn(2, 4, 32)
    torch.manual_seed(123)
    m(x)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_group_limited_routing_rejects_top_k_beyond_the_eligible_experts():
    with pytest.raises(VelocisError, match="exceeds the 4 experts"):
        _moe_cfg(num_experts=8, num_expert_groups=4, topk_groups=2, num_experts_per_token=5)
    _moe_cfg(num_experts=8, num_expert_groups=4, topk_groups=2, num_experts_per_token=4)  # exactly fits
