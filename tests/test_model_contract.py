"""The model contract (docs/INTERFACES.md): forward's outputs, per-token NLL, positions per row and
packed documents, caller-owned caches (reset, rollback), batched generation, meta-device init."""
import pytest
import torch
import torch.nn.functional as F

import velocis
from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.infer.generate import generate_ids
from velocis.models import VelocisModel

pytestmark = pytest.mark.usefixtures("one_thread")
V = 101


def cfg(kind="dense", **kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96, max_seq_len=64,
                init_std=0.1)
    if kind == "moe":
        base.update(num_experts=4, num_experts_per_token=2, moe_dim=32)
    if kind == "mla":
        base.update(mixer="mla", q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=16)
    return ModelConfig(**{**base, **kw})


KINDS = ["dense", "moe", "mla"]


@pytest.mark.parametrize("kind", KINDS)
def test_per_token_nll_and_grads_equal_log_softmax(kind):
    torch.manual_seed(0)
    model = VelocisModel(cfg(kind)).train()
    assert model.fused_loss  # the chunked kernel, not the reference
    x = torch.randint(0, V, (3, 17))
    y = torch.roll(x, -1, 1)
    y[0, 3] = y[2, -1] = -100
    w = torch.rand(3, 17)  # per-token weights, as DPO / GRPO apply them

    out = model(x, y, reduction="none")
    assert out.lm_loss.shape == (3, 17) and out.loss is None
    (out.lm_loss * w).sum().backward()
    mine = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logp = F.log_softmax(model(x).float(), -1)
    ref = -logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)
    torch.testing.assert_close(out.lm_loss.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    assert out.lm_loss[0, 3] == 0 and out.lm_loss[2, -1] == 0
    (ref * w).sum().backward()
    for a, b in zip(mine, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_sum_and_mean_agree_with_none(kind):
    torch.manual_seed(0)
    model = VelocisModel(cfg(kind)).eval()
    x = torch.randint(0, V, (2, 12))
    y = torch.roll(x, -1, 1)
    y[1, :4] = -100
    with torch.no_grad():
        none, s, m = (model(x, y, reduction=r) for r in ("none", "sum", "mean"))
    assert int(s.num_tokens) == 20
    torch.testing.assert_close(s.lm_loss, none.lm_loss.sum(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(m.lm_loss, none.lm_loss.sum() / 20, atol=1e-6, rtol=1e-6)
    with pytest.raises(VelocisError, match="reduction 'avg'"):
        model(x, y, reduction="avg")


@pytest.mark.parametrize("kind", KINDS)
def test_packed_documents_stay_apart(kind):
    """Positions that restart inside a row start a new document: its tokens see only their own."""
    torch.manual_seed(0)
    model = VelocisModel(cfg(kind)).eval()
    a, b = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 7))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        together = model(packed, positions=positions)
        alone = torch.cat([model(a), model(b)], 1)
        assert (together - alone).abs().max() < 1e-5
        assert (model(packed)[:, 5:] - alone[:, 5:]).abs().max() > 1e-3  # without positions they mix


def test_logits_to_keep_and_logits_at():
    torch.manual_seed(0)
    model = VelocisModel(cfg()).eval()
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x, logits_to_keep=2), full[:, -2:])
        at = model(x, logits_at=torch.tensor([3, 8]))
        torch.testing.assert_close(at[:, 0], full[[0, 1], [3, 8]])
        out = model(x, return_hidden=True)
        assert out.hidden.shape == (2, 9, 64) and torch.equal(out.logits, full)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_rollback_per_row_reproduces_the_same_tokens(kind):
    """Decode greedily, roll each row back by its own k tokens, decode again: the same tokens."""
    torch.manual_seed(0)
    model = VelocisModel(cfg(kind)).eval()
    prompt = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        logits = model(prompt, cache=cache)[:, -1]
        first = []
        for _ in range(10):
            nxt = logits.argmax(-1)
            first.append(nxt)
            logits = model(nxt[:, None], cache=cache)[:, -1]
        first = torch.stack(first, 1)  # [2, 10]: the cache holds prompt + all ten
        assert cache.lengths.tolist() == [16, 16]
        seq = torch.cat([prompt, first], 1)
        new_len = torch.tensor([12, 9])  # row 0 back by 4 tokens, row 1 by 7
        cache.rollback(new_len)
        assert cache.lengths.tolist() == [12, 9]
        # each row continues from its own length (per-row positions): feed its token at that length
        last = seq[[0, 1], new_len]
        again = []
        for _ in range(3):
            last = model(last[:, None], cache=cache)[:, -1].argmax(-1)
            again.append(last)
        again = torch.stack(again, 1)
    assert again[0].tolist() == seq[0, 13:16].tolist()
    assert again[1].tolist() == seq[1, 10:13].tolist()
    with pytest.raises(VelocisError, match="only shortens"):
        cache.rollback(torch.tensor([40, 1]))


def test_cache_reset_rows():
    torch.manual_seed(0)
    model = VelocisModel(cfg()).eval()
    x = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        model(x, cache=cache)
        cache.reset([1])
        assert cache.lengths.tolist() == [5, 0]
        y = torch.randint(0, V, (2, 1))
        fresh = model(y[1:], cache=None)
        step = model(y, cache=cache, positions=torch.tensor([[5], [0]]))
        torch.testing.assert_close(step[1:], fresh, atol=1e-5, rtol=1e-5)


def test_mixers_declare_their_cache():
    for kind, per_token in (("dense", 2 * 2 * 16 * 2), ("mla", (24 + 8) * 2)):
        with torch.device("meta"):
            model = VelocisModel(cfg(kind))
        assert model.cache_bytes(2) == (2 * per_token, 0)
        assert model.layers[0].mixer.cache_kind == ("kv" if kind == "dense" else "latent")
        cache = model.new_cache(1, 8, device="meta")
        assert cache.layers[0].kind == model.layers[0].mixer.cache_kind


@pytest.mark.parametrize("kind", KINDS)
def test_batched_greedy_equals_each_prompt_alone(kind):
    torch.manual_seed(1)
    model = VelocisModel(cfg(kind)).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 11, 6, 1)]
    batch = torch.stack(list(generate_ids(model, prompts, 16)), 1)
    for i, p in enumerate(prompts):
        alone = torch.stack(list(generate_ids(model, [p], 16)), 1)[0]
        assert batch[i].tolist() == alone.tolist(), i
        ref = torch.stack(list(generate_ids(model, [p], 16, recompute=True)), 1)[0]
        assert alone.tolist() == ref.tolist()
    assert len(set(batch.flatten().tolist())) > 4  # rows continue differently


def test_finished_rows_stop_and_pad():
    """A row that hits a stop id yields the pad id from then on and is not sampled again."""
    torch.manual_seed(1)
    model = VelocisModel(cfg()).eval()
    prompts = [[5, 6, 7], [8, 9]]
    free = torch.stack(list(generate_ids(model, prompts, 12)), 1)
    stop = int(free[0, 2])  # row 0's third token becomes a stop id
    out = torch.stack(list(generate_ids(model, prompts, 12, stop_ids={stop}, pad_id=-1)), 1)
    row0 = out[0].tolist()
    assert row0[:3] == free[0, :3].tolist() and row0[3:] == [-1] * (len(row0) - 3)
    if stop not in free[1].tolist():
        assert out[1].tolist() == free[1].tolist()


def test_api_generate_takes_a_list_of_prompts(tmp_path):
    from velocis.tokenizer import Tokenizer

    (tmp_path / "a.txt").write_text("hello world, the model writes text. 你好，世界！\n" * 5, encoding="utf-8")
    tok = Tokenizer.train([tmp_path / "a.txt"], vocab_size=300, min_frequency=1, progress=False)
    torch.manual_seed(0)
    model = VelocisModel(cfg(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)).eval()
    prompts = ["hello", "你好，世界", "the model writes"]
    texts = velocis.generate(model, tok, prompts, max_new_tokens=8, temperature=0)
    assert isinstance(texts, list) and len(texts) == 3
    assert texts == [velocis.generate(model, tok, p, max_new_tokens=8, temperature=0) for p in prompts]
    with pytest.raises(VelocisError, match="one prompt"):
        velocis.generate(model, tok, prompts, stream=True)


@pytest.mark.parametrize("kind", KINDS + ["mtp"])
def test_meta_build_then_init_weights_is_a_real_init(kind):
    """The trainer's path: meta device -> to_empty -> init_weights gives the constructor's statistics."""
    c = cfg("mla", mtp_depth=1) if kind == "mtp" else cfg(kind, tie_embeddings=kind != "moe")
    torch.manual_seed(0)
    eager = VelocisModel(c)
    with torch.device("meta"):
        model = VelocisModel(c)
    model.to_empty(device="cpu")
    model.init_weights()
    assert (model.lm_head.weight is model.embed_tokens.weight) == c.tie_embeddings
    for (name, a), (_, b) in zip(eager.state_dict().items(), model.state_dict().items()):
        assert torch.isfinite(b).all(), name
        if a.numel() > 64 and a.is_floating_point():
            assert abs(a.float().std() - b.float().std()) < 0.25 * a.float().std() + 1e-6, name
        else:
            assert torch.equal(a, b) or a.numel() <= 64, name
    for m in model.modules():  # non-persistent buffers (RoPE frequencies) were rebuilt too
        if hasattr(m, "inv_freq"):
            assert torch.equal(m.inv_freq, dict(eager.named_modules())[[n for n, x in model.named_modules()
                                                                         if x is m][0]].inv_freq)
    x = torch.randint(0, V, (1, 8))
    assert torch.isfinite(model(x)).all()


def test_positions_shape_is_checked():
    model = VelocisModel(cfg())
    with pytest.raises(VelocisError, match="positions must be"):
        model(torch.zeros(2, 5, dtype=torch.long), positions=torch.arange(4))
