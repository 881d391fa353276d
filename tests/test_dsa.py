"""DeepSeek Sparse Attention: the lightning indexer against transformers' DeepseekV32Indexer, exact
dense attention up to index_topk tokens, top-k sparsity beyond it, and the indexer's KL objective."""
import pytest
import torch

from velocis.config import ModelConfig
from velocis.models.dsa import Indexer, indexer_kl_loss
from velocis.models.mla import MLA


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    base = dict(vocab_size=97, hidden_dim=64, num_layers=2, num_heads=4, mixer="mla", q_lora_rank=32,
                kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, mlp_dim=96,
                max_seq_len=128, index_num_heads=4, index_head_dim=16, index_topk=8)
    return ModelConfig(**{**base, **kw})


def test_indexer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hfm

    hf_cfg = transformers.DeepseekV32Config(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24,
                                            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                            index_n_heads=4, index_head_dim=16, index_topk=5,
                                            max_position_embeddings=128)
    torch.manual_seed(0)
    hf = hfm.DeepseekV32Indexer(hf_cfg, 0).eval()
    with torch.no_grad():
        hf.k_norm.weight.normal_(1, 0.1)
        hf.k_norm.bias.normal_(0, 0.1)
    mla = MLA(_cfg(index_topk=5), 0).eval()
    mine = mla.indexer
    mine.load_state_dict(hf.state_dict())
    B, T = 2, 24
    x, q_lat = torch.randn(B, T, 64), torch.randn(B, T, 32)
    pos = torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    with torch.no_grad():
        cos, sin = hfm.DeepseekV32RotaryEmbedding(hf_cfg)(x, pos[None])
        ref = hf(x, q_lat, (cos, sin), causal[None].expand(B, T, T), pos[None])  # [B, T, 5] indices
        rope = mla.rotary(pos, x.dtype)
        assert (rope[0] - cos[0]).abs().max() < 1e-6
        keys = mine.keys(x, *rope)
        keep = mine.select(x, q_lat, keys, causal, rope)
        scores = mine.scores(x, q_lat, keys, rope).masked_fill(~causal, float("-inf"))
    ref_keep = torch.zeros(B, T, T, dtype=torch.bool).scatter_(-1, ref.long(), True)
    # the same top-k scores per query; which of exactly tied tokens (ReLU zeros) is kept is a
    # tie-break, and Velocis keeps the earliest (dsa.py says why)
    top = lambda m: torch.sort(scores.masked_fill(~(m & causal), float("-inf")), -1, descending=True).values[..., :5]
    assert torch.equal(top(keep), top(ref_keep))
    ties = (scores == 0).sum(-1) > 0
    assert torch.equal((keep & causal)[~ties], (ref_keep & causal)[~ties])  # no tie: the very same tokens


def _pair(**kw):
    """The same MLA weights with and without the indexer."""
    torch.manual_seed(0)
    sparse = MLA(_cfg(**kw), 0).eval()
    dense = MLA(_cfg(index_num_heads=0, **kw), 0).eval()
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if not k.startswith("indexer.")})
    return sparse, dense


def test_dense_up_to_topk_sparse_beyond():
    sparse, dense = _pair(index_topk=8)
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        # T <= index_topk: every visible token is kept -> exactly the dense result
        assert torch.equal(sparse(x[:, :8], torch.arange(8)), dense(x[:, :8], torch.arange(8)))
        # beyond: queries past position 7 attend to 8 tokens only, so the outputs differ there
        ys, yd = sparse(x, torch.arange(20)), dense(x, torch.arange(20))
    assert (ys[:, :8] - yd[:, :8]).abs().max() < 1e-5  # early queries see <= 8 tokens anyway
    assert (ys[:, 8:] - yd[:, 8:]).abs().max() > 1e-4
    # the selection: k best visible tokens per query, never a future one
    T = 20
    pos = torch.arange(T)
    rope = sparse.rotary(pos, x.dtype)
    q_lat = sparse.q_a_layernorm(sparse.q_a_proj(x))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keep = sparse.indexer.select(x, q_lat, sparse.indexer.keys(x, *rope), causal, rope) & causal
    counts = keep.sum(-1)
    assert torch.equal(counts, torch.clamp(pos + 1, max=8).expand(2, T))


@pytest.mark.parametrize("expand_min_tokens", [128, 2])
def test_decode_with_index_cache_long_context(expand_min_tokens, monkeypatch):
    """Prefill past index_topk, then decode: cached (indexer keys cached) == uncached."""
    monkeypatch.setattr(MLA, "expand_min_tokens", expand_min_tokens)
    sparse, _ = _pair(index_topk=8)
    x = torch.randn(1, 40, 64)
    pos = torch.arange(40)
    with torch.no_grad():
        ref = sparse(x, pos)
        cache = sparse.new_cache(1, 40)
        out = torch.cat([sparse(x[:, :25], pos[:25], cache)] + [sparse(x[:, t:t + 1], pos[t:t + 1], cache)
                                                                 for t in range(25, 40)], dim=1)
    assert (ref - out).abs().max().item() < 1e-5


def test_indexer_kl_loss_trains_the_indexer():
    torch.manual_seed(0)
    idx = Indexer(_cfg())
    idx.reset_parameters()
    B, T = 2, 12
    x, q_lat = torch.randn(B, T, 64), torch.randn(B, T, 32)
    mla = MLA(_cfg(), 0)
    rope = mla.rotary(torch.arange(T), x.dtype)
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    target = torch.softmax(torch.randn(B, 4, T, T).masked_fill(~visible, float("-inf")), -1)
    opt = torch.optim.Adam(idx.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = indexer_kl_loss(idx.scores(x, q_lat, idx.keys(x, *rope), rope), target, visible)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] >= 0 and losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_indexer_training_through_the_forward(mode):
    """With set_indexer_training, the forward adds the indexer KL (family and stat "indexer_kl",
    weighted by indexer_loss_coef); its gradient reaches the indexers only, and a few steps on the
    indexer parameters lower it."""
    from velocis.models import VelocisModel
    from velocis.models.dsa import set_indexer_training

    torch.manual_seed(0)
    model = VelocisModel(_cfg(index_topk=6, indexer_loss_coef=1.0)).train()
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    assert "indexer_kl" not in model(x, x).stats
    assert set_indexer_training(model, mode) == 2
    idx_params = [p for n, p in model.named_parameters() if ".indexer." in n]
    opt = torch.optim.Adam(idx_params, lr=1e-2)
    kls = []
    for step in range(8):
        out = model(x, x)
        loss, stats = out.loss, out.stats
        opt.zero_grad()
        if step == 0:
            # the extra loss changes no gradient outside the indexers
            out.aux_losses["indexer_kl"].backward(retain_graph=True)
            assert all(p.grad is None or p.grad.abs().max() == 0
                       for n, p in model.named_parameters() if ".indexer." not in n)
            assert any(p.grad is not None and p.grad.abs().max() > 0 for p in idx_params)
            model.zero_grad()
        loss.backward()
        opt.step()
        kls.append(stats["indexer_kl"].item())
    assert kls[-1] < kls[0]
    if mode == "warmup":  # attention stays dense while warming up: the LM loss is the dense model's
        dense = VelocisModel(_cfg(index_num_heads=0)).train()
        dense.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
        assert torch.allclose(model(x, x).stats["lm_loss"], dense(x, x).stats["lm_loss"])
