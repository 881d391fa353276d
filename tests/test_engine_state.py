"""The inference engine with recurrent ("state") layers: per-sequence state slots beside the paged KV
blocks. Hybrid models (state + attention layers) and pure state models give, under continuous
batching, chunked prefill, preemption and slot reuse, the same greedy tokens as each request alone
and as generation with full recomputation; prefix caching and speculative decoding are refused."""
import pytest
import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.infer import paged
from velocis.infer.engine import Engine
from velocis.infer.generate import generate_ids
from velocis.infer.sampling import SamplingParams
from velocis.models import MIXERS, VelocisModel

pytestmark = pytest.mark.usefixtures("one_thread")
V = 97
GREEDY = SamplingParams(temperature=0, max_tokens=10)
# every recurrent mixer the registry has (Gated DeltaNet when its module is there)
STATE_MIXERS = [m for m in ("mamba2", "gated_deltanet") if m in MIXERS]


def model_of(mixers, **kw):
    base = dict(vocab_size=V, hidden_dim=48, num_layers=len(mixers), num_heads=4, num_kv_heads=2, mlp_dim=96,
                max_seq_len=128, init_std=0.15, layer_mixers=list(mixers), ssm_state_size=8, ssm_head_dim=12,
                ssm_num_groups=2, ssm_chunk_size=8)
    torch.manual_seed(0)
    return VelocisModel(ModelConfig(**{**base, **kw})).eval()


def prompts(n=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def alone(model, ps, params=GREEDY):
    return [Engine(model, max_num_seqs=1).generate([p], params)[0]["token_ids"] for p in ps]


@pytest.mark.parametrize("mixer", STATE_MIXERS)
def test_hybrid_concurrent_requests_equal_each_alone(mixer):
    model = model_of([mixer, "attention", mixer])
    ps = prompts()
    engine = Engine(model, max_num_seqs=16)
    assert not engine.packed and not engine.prefix_caching  # padded forwards; no shared prefixes
    together = [r["token_ids"] for r in engine.generate(ps, GREEDY)]
    assert together == alone(model, ps)
    for p, got in list(zip(ps, together))[:3]:  # the state cache == recomputing the whole sequence
        assert torch.stack(list(generate_ids(model, [p], 10, recompute=True)), 1)[0].tolist() == got
    assert engine.stats()["kv_blocks_used"] == 0 and sorted(engine.free_slots) == list(range(16))  # every slot came back


def test_chunked_prefill_preemption_and_reused_slots_keep_the_outputs(monkeypatch):
    model = model_of(["mamba2", "attention", "mamba2"])
    ps = prompts(8)
    ref = alone(model, ps)
    gathered = []  # rows bound as a gathered copy (slots not 0..B-1 in order) as well as views
    bind = paged.StateSlots.bind
    monkeypatch.setattr(paged.StateSlots, "bind",
                        lambda self, slots: (gathered.append(slots != list(range(len(slots)))), bind(self, slots))[1])
    chunked = Engine(model, max_num_seqs=3, max_prefill_tokens=7)  # long prompts over several steps; slots reused
    assert [r["token_ids"] for r in chunked.generate(ps, GREEDY)] == ref
    assert any(gathered) and not all(gathered)
    per_token, per_seq = model.cache_bytes(4)
    tight = Engine(model, max_num_seqs=8, block_size=8, kv_cache_memory=per_seq * 8 + per_token * 8 * 12)
    assert [r["token_ids"] for r in tight.generate(ps, GREEDY)] == ref
    assert tight.stats()["preempted"] > 0  # out of blocks: recomputed from a zeroed state, nothing lost


def test_requests_join_and_leave_between_steps():
    model = model_of(["mamba2", "attention"])
    ps = prompts(6, seed=5)
    ref = alone(model, ps)
    engine = Engine(model, max_num_seqs=4)
    rid_of = {engine.add_request(p, GREEDY): i for i, p in enumerate(ps[:3])}
    got, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(rid_of[out.request_id], []).extend(out.token_ids)
        steps += 1
        if steps == 3:  # arrive while the others decode, into the slots they hold or left
            rid_of.update({engine.add_request(p, GREEDY): i for i, p in enumerate(ps[3:], 3)})
    assert [got[i] for i in range(6)] == ref


def test_pure_state_model_runs_without_kv_blocks():
    model = model_of(["mamba2", "mamba2"], layer_feed_forwards=["none", "none"])
    assert model.cache_bytes(4)[0] == 0
    ps = prompts(5, seed=7)
    engine = Engine(model, max_num_seqs=4, kv_cache_memory=10**7)
    assert [r["token_ids"] for r in engine.generate(ps, GREEDY)] == alone(model, ps)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=8)
    many = Engine(model, max_num_seqs=4).generate(ps, seeded)
    assert [r["token_ids"] for r in many] == [r["token_ids"] for r in (Engine(model, max_num_seqs=1).generate(
        [p], seeded)[0] for p in ps)]  # a seeded request samples the same tokens in any batch


def test_prefix_caching_speculation_and_small_budgets_are_refused():
    model = model_of(["mamba2", "attention"])
    draft = model_of(["attention"])
    with pytest.raises(VelocisError, match="prefix_caching: this model has recurrent state layers"):
        Engine(model, prefix_caching=True)
    with pytest.raises(VelocisError, match="speculative decoding"):
        Engine(model, draft_model=draft)
    with pytest.raises(VelocisError, match="speculative decoding"):
        Engine(model, draft_model="mtp")
    with pytest.raises(VelocisError, match="draft_model has recurrent state layers"):
        Engine(draft, draft_model=model)
    per_seq = model.cache_bytes(4)[1]
    with pytest.raises(VelocisError, match="recurrent state of max_num_seqs = 16"):
        Engine(model, max_num_seqs=16, kv_cache_memory=per_seq * 16)
    assert Engine(model, prefix_caching=False).prefix_caching is False
    dense = model_of(["attention", "attention"])
    engine = Engine(dense)
    assert engine.packed and engine.prefix_caching and engine.cache.states is None  # attention models unchanged
