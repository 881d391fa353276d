"""Speculative decoding: a draft model's proposals, verified by the target in one forward, keep the
target's output (greedy: token for token) and its distribution (sampling: a chi-square test)."""
import math

import pytest
import torch

from velocis.config import ModelConfig
from velocis.infer.engine import Engine
from velocis.infer.sampling import SamplingParams
from velocis.infer.speculative import accept
from velocis.models import VelocisModel

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed, vocab=97, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_dim=48, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
               max_seq_len=128, init_std=0.15)
    return VelocisModel(ModelConfig(**{**cfg, **kw})).eval()


def prompts(n=12, seed=3, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_greedy_with_a_draft_equals_plain_greedy():
    target = tiny(0)
    ps = prompts()
    params = SamplingParams(temperature=0, max_tokens=16)
    plain = [r["token_ids"] for r in Engine(target).generate(ps, params)]
    for draft in (tiny(0), tiny(7, num_layers=1)):  # a perfect draft, and a poor one
        engine = Engine(target, draft_model=draft, num_speculative_tokens=3)
        assert [r["token_ids"] for r in engine.generate(ps, params)] == plain
        stats = engine.stats()
        assert stats["draft_tokens"] > 0 and stats["kv_blocks_used"] == 0
    assert stats["draft_acceptance_rate"] < 1.0
    same = Engine(target, draft_model=tiny(0), num_speculative_tokens=3)
    same.generate(ps, params)
    assert same.stats()["draft_acceptance_rate"] > 0.95  # the target as its own draft: (almost) all accepted


def test_acceptance_rule_keeps_the_target_distribution():
    """accept() with fixed p and q: the first emitted token is distributed as p[0]."""
    g = torch.Generator().manual_seed(0)
    V = 6
    p = torch.softmax(torch.randn(2, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(1, V, generator=g) * 2, -1)
    counts = torch.zeros(V)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        counts[accept(p, q, [d], greedy=False, generator=g)[0]] += 1
    expected = p[0] * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # df = 5: the 0.1% tail starts at 20.5


def test_sampled_tokens_through_the_engine_follow_the_target():
    """Two sampled tokens after a fixed prompt, with a draft that disagrees with the target: the
    joint distribution over V^2 cells matches the target's exact one (chi-square)."""
    V = 8
    target, draft = tiny(0, vocab=V, init_std=0.5), tiny(5, vocab=V, init_std=0.5)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)
        seqs = torch.tensor([prompt + [a] for a in range(V)])
        p2 = torch.softmax(target(seqs)[:, -1], -1)  # [V, V]: p(t2 | t1)
    joint = (p1[:, None] * p2).flatten()
    n = 3000
    engine = Engine(target, draft_model=draft, num_speculative_tokens=2, max_num_seqs=256)
    out = engine.generate([prompt], SamplingParams(temperature=1.0, n=n, seed=123, max_tokens=2, ignore_eos=True))[0]
    counts = torch.zeros(V * V)
    for r in out:
        counts[r["token_ids"][0] * V + r["token_ids"][1]] += 1
    assert engine.stats()["draft_tokens"] > 0
    expected = joint * n
    big = expected >= 5  # pool the rare cells into one
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    df = len(obs) - 1
    assert chi2 < df + 3.3 * math.sqrt(2 * df), (chi2, df)  # ~ the 0.1% tail


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_mtp_self_speculation_equals_plain_greedy(kind):
    """DeepSeek-V3-style self-speculation: the model's own MTP module drafts one token per step."""
    extra = dict(mixer="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
                 v_head_dim=12) if kind == "mla" else {}
    target = tiny(0, mtp_depth=1, **extra)
    ps = prompts(8)
    params = SamplingParams(temperature=0, max_tokens=14)
    plain = [r["token_ids"] for r in Engine(target).generate(ps, params)]
    engine = Engine(target, draft_model="mtp", max_prefill_tokens=16)  # chunked prompts: hidden states in pieces
    assert [r["token_ids"] for r in engine.generate(ps, params)] == plain
    assert engine.stats()["draft_tokens"] > 0 and engine.stats()["kv_blocks_used"] == 0
    with pytest.raises(Exception, match="mtp"):
        Engine(tiny(0), draft_model="mtp")


def test_mtp_sampling_follows_the_target():
    V = 8
    target = tiny(0, vocab=V, init_std=0.5, mtp_depth=1)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)
        p2 = torch.softmax(target(torch.tensor([prompt + [a] for a in range(V)]))[:, -1], -1)
    joint = (p1[:, None] * p2).flatten()
    n = 3000
    engine = Engine(target, draft_model="mtp", max_num_seqs=256)
    out = engine.generate([prompt], SamplingParams(temperature=1.0, n=n, seed=9, max_tokens=2, ignore_eos=True))[0]
    counts = torch.zeros(V * V)
    for r in out:
        counts[r["token_ids"][0] * V + r["token_ids"][1]] += 1
    expected = joint * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    df = len(obs) - 1
    assert engine.stats()["draft_tokens"] > 0
    assert chi2 < df + 3.3 * math.sqrt(2 * df), (chi2, df)
