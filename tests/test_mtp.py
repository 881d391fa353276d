"""Multi-token prediction: the loss (definition, weighting, stats), a micro run where the MTP loss
falls with the main loss, drafting, and that the modules survive save/load."""
import time

import pytest
import torch
import torch.nn.functional as F

from velocis.config import ModelConfig
from velocis.models import VelocisModel


pytestmark = pytest.mark.usefixtures("one_thread")


V = 64


def _cfg(**kw):
    base = dict(vocab_size=V, hidden_dim=64, num_layers=2, num_heads=4, mixer="mla", q_lora_rank=32,
                kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, mlp_dim=128,
                max_seq_len=64, mtp_depth=2, mtp_loss_weight=0.3, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


def _progressions(n, T, gen):
    """Sequences t_{i+1} = t_i + step (mod V), step in 1..4: the next tokens are predictable from the context."""
    start = torch.randint(0, V, (n, 1), generator=gen)
    step = torch.randint(1, 5, (n, 1), generator=gen)
    seq = (start + step * torch.arange(T + 1)) % V
    return seq[:, :-1], seq[:, 1:]


def test_mtp_loss_definition_and_weighting():
    torch.manual_seed(0)
    model = VelocisModel(_cfg())
    x, y = _progressions(3, 16, torch.Generator().manual_seed(0))
    model.train()
    out = model(x, y, return_hidden=True)
    loss, stats = out.loss, out.stats
    assert "mtp" in stats and "lm_loss" in stats
    per_depth = model.mtp.per_depth_logits(model.norm(out.hidden), x, model.embed_tokens, model.lm_head)
    assert [tuple(l.shape) for l in per_depth] == [(3, 15, V), (3, 14, V)]
    # depth k at position i predicts token i+k+1 = y[:, i+k]
    manual = torch.stack([F.cross_entropy(l.reshape(-1, V), y[:, k + 1:].reshape(-1))
                          for k, l in enumerate(per_depth)]).mean()
    assert torch.allclose(stats["mtp"], manual, atol=1e-5)
    assert torch.allclose(loss, stats["lm_loss"] + 0.3 * stats["mtp"], atol=1e-5)
    model.eval()
    assert "mtp" not in model(x, y).stats


def test_mtp_micro_run_losses_fall(capsys):
    """100 AdamW steps on progressions: both the main and the MTP loss fall; then the MTP drafts
    match the true continuation most of the time."""
    torch.manual_seed(0)
    model = VelocisModel(_cfg()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    log = []
    t0 = time.perf_counter()
    for step in range(100):
        x, y = _progressions(16, 24, gen)
        out = model(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        log.append((out.stats["lm_loss"].item(), out.stats["mtp"].item()))
    secs = time.perf_counter() - t0
    first = [sum(v) / 5 for v in zip(*log[:5])]
    last = [sum(v) / 5 for v in zip(*log[-5:])]
    # drafts: depth-k MTP guesses for t+1+k vs the true continuation
    model.eval()
    x, _ = _progressions(32, 25, torch.Generator().manual_seed(9))
    with torch.no_grad():
        h = model.norm(model(x[:, :20], return_hidden=True).hidden)
        drafts = model.mtp.draft(h, x[:, :21], model.embed_tokens, model.lm_head)  # ids incl. the next true token
    acc = (drafts == x[:, 21:23]).float().mean(0)
    with capsys.disabled():
        print(f"\nMTP micro run ({secs:.1f} s, 100 steps): lm_loss {first[0]:.3f} -> {last[0]:.3f}, "
              f"mtp_loss {first[1]:.3f} -> {last[1]:.3f}; draft accuracy depth1 {acc[0]:.2f} depth2 {acc[1]:.2f}")
    assert last[0] < 0.5 * first[0]
    assert last[1] < 0.5 * first[1]
    assert acc[0] > 0.5


def test_draft_matches_per_depth_logits():
    torch.manual_seed(0)
    model = VelocisModel(_cfg(mtp_depth=1)).eval()
    x = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        h = model.norm(model(x[:, :10], return_hidden=True).hidden)
        d = model.mtp.draft(h, x, model.embed_tokens, model.lm_head)
        hx = model.norm(model(x, return_hidden=True).hidden)
        ref = model.mtp.per_depth_logits(hx, x, model.embed_tokens, model.lm_head)[0][:, 9].argmax(-1)
    assert torch.equal(d[:, 0], ref)


def test_mtp_saved_and_loaded(tmp_path):
    import velocis
    from velocis.model_io import save_model

    torch.manual_seed(0)
    model = VelocisModel(_cfg()).eval()
    save_model(model, None, tmp_path / "m")
    back, _ = velocis.load(tmp_path / "m", device="cpu")
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        a = model.mtp.per_depth_logits(model.norm(model(x, return_hidden=True).hidden), x, model.embed_tokens,
                                       model.lm_head)
        b = back.mtp.per_depth_logits(back.norm(back(x, return_hidden=True).hidden), x, back.embed_tokens,
                                      back.lm_head)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a, b))
    assert any(k.startswith("mtp.layers.1.block.mixer.kv_b_proj") for k in back.state_dict())


def test_mtp_cached_step_matches_full_sequence():
    """The engine's drafting path: MTP depth 1 with its own latent cache, fed chunk by chunk (the
    prompt, then one position at a time), equals the full-sequence MTP logits."""
    torch.manual_seed(0)
    model = VelocisModel(_cfg(mtp_depth=1)).eval()
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = model.norm(model(x, return_hidden=True).hidden)
        emb, head = model.embed_tokens, model.lm_head
        ref = model.mtp.per_depth_logits(h, x, emb, head)[0]  # [2, 15, V]
        cache = model.mtp.new_cache(2, 16)[0]
        outs = [model.mtp.logits(h[:, :6], x[:, 1:7], emb, head, depth=1, positions=torch.arange(6), cache=cache)[0]]
        for i in range(6, 15):
            outs.append(model.mtp.logits(h[:, i:i + 1], x[:, i + 1:i + 2], emb, head, depth=1,
                                         positions=torch.tensor([i]), cache=cache)[0])
    assert (torch.cat(outs, dim=1) - ref).abs().max().item() < 1e-4


def test_mtp_moe_blocks_join_the_balance_loss():
    """The MTP block's MoE (DeepSeek-V3: same parts as the last layer) is balanced like the main ones."""
    torch.manual_seed(0)
    cfg = _cfg(num_experts=4, num_experts_per_token=2, moe_dim=32, balance="aux_loss", aux_loss_coef=0.01,
               mtp_depth=1)
    model = VelocisModel(cfg).train()
    x, y = _progressions(2, 16, torch.Generator().manual_seed(0))
    out = model(x, y, return_hidden=True)
    # recompute each MoE layer's balance loss from its input: every main layer and the MTP block's
    from velocis.models.positions import Positions

    h = model.embed_tokens(x)
    pos = Positions(torch.arange(x.shape[1]))
    per_layer = []
    for block in model.layers:
        h, aux = block(h, pos)
        per_layer.append(aux["moe_balance"])
    layer = model.mtp.layers[0]
    _, aux = layer(model.norm(h)[:, :-1], model.embed_tokens(x[:, 1:]), Positions(torch.arange(x.shape[1] - 1)))
    per_layer.append(aux["moe_balance"])
    assert len(per_layer) == cfg.num_layers + 1
    torch.testing.assert_close(out.stats["moe_balance"], torch.stack(per_layer).mean().detach())
