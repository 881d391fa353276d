"""The inference engine: concurrent requests equal each request alone (greedy, fp32, CPU) with
continuous batching, prefix caching, chunked prefill and preemption; per-request sampling and stops."""
import pytest
import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.infer.engine import Engine
from velocis.infer.generate import generate_ids
from velocis.infer.sampling import SamplingParams
from velocis.models import VelocisModel

pytestmark = pytest.mark.usefixtures("one_thread")
V = 97


def model_of(kind="dense", **kw):
    base = dict(vocab_size=V, hidden_dim=48, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96, max_seq_len=128,
                init_std=0.15)
    if kind == "moe":
        base.update(num_experts=4, num_experts_per_token=2, moe_dim=32)
    if kind == "mla":
        base.update(mixer="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
                    v_head_dim=12)
    torch.manual_seed(0)
    return VelocisModel(ModelConfig(**{**base, **kw})).eval()


def prompts(n=16, shared=0, seed=3):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, V, (shared,), generator=g).tolist()
    return [prefix + torch.randint(0, V, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=12)


def alone(model, ps, params=GREEDY, **kw):
    return [Engine(model, max_num_seqs=1, **kw).generate([p], params)[0]["token_ids"] for p in ps]


@pytest.mark.parametrize("kind", ["dense", "moe", "mla"])
def test_concurrent_requests_equal_each_alone(kind):
    model = model_of(kind)
    ps = prompts()
    engine = Engine(model, max_num_seqs=16)
    together = [r["token_ids"] for r in engine.generate(ps, GREEDY)]
    assert together == alone(model, ps)
    ref = [torch.stack(list(generate_ids(model, [p], 12)), 1)[0].tolist() for p in ps[:4]]
    assert together[:4] == ref  # and the plain batched generator agrees
    assert engine.stats()["kv_blocks_used"] == 0  # every block came back


def test_prefix_caching_chunked_prefill_and_preemption_keep_the_outputs():
    model = model_of()
    ps = prompts(shared=35)  # a long common prefix: full blocks shared between requests
    ref = alone(model, ps, prefix_caching=False)
    cached = Engine(model, max_num_seqs=16, block_size=8)
    assert [r["token_ids"] for r in cached.generate(ps, GREEDY)] == ref
    assert cached.stats()["prefix_cache_hit_rate"] > 0.5
    chunked = Engine(model, max_num_seqs=16, max_prefill_tokens=8)
    assert [r["token_ids"] for r in chunked.generate(ps, GREEDY)] == ref
    per_token = model.cache_bytes(4)[0]
    tight = Engine(model, max_num_seqs=16, block_size=8, kv_cache_memory=per_token * 8 * 24, prefix_caching=False)
    assert [r["token_ids"] for r in tight.generate(ps, GREEDY)] == ref
    assert tight.stats()["preempted"] > 0  # it ran out of blocks and recomputed, losing nothing


def test_requests_join_and_leave_between_steps():
    model = model_of()
    ps = prompts(6)
    ref = alone(model, ps)
    engine = Engine(model, max_num_seqs=4)
    got = {}
    rid_of = {}
    for i, p in enumerate(ps[:3]):
        rid_of[engine.add_request(p, GREEDY)] = i
    steps = 0
    while engine.has_unfinished():
        if steps == 3:  # more arrive while the first ones decode
            for i, p in enumerate(ps[3:], start=3):
                rid_of[engine.add_request(p, GREEDY)] = i
        for out in engine.step():
            got.setdefault(rid_of[out.request_id], []).extend(out.token_ids)
        steps += 1
    assert [got[i] for i in range(6)] == ref


def test_seeded_sampling_is_independent_of_the_batch():
    model = model_of()
    ps = prompts(5)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=10)
    together = Engine(model, max_num_seqs=8).generate(ps, params)
    assert [r["token_ids"] for r in together] == alone(model, ps, params)


def test_stops_lengths_n_and_logprobs():
    model = model_of()
    p = prompts(1)[0]
    free = Engine(model).generate([p], SamplingParams(temperature=0, max_tokens=10))[0]
    assert free["finish_reason"] == "length" and len(free["token_ids"]) == 10
    stop_tok = free["token_ids"][4]
    first = free["token_ids"].index(stop_tok)
    r = Engine(model).generate([p], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]))[0]
    assert r["finish_reason"] == "stop" and r["token_ids"] == free["token_ids"][:first]
    two = Engine(model).generate([p], SamplingParams(temperature=1.0, n=2, seed=5, max_tokens=8))[0]
    assert len(two) == 2 and two[0]["token_ids"] != two[1]["token_ids"]
    engine = Engine(model)
    engine.add_request(p, SamplingParams(temperature=0, max_tokens=3, logprobs=2))
    outs = [o for _ in range(6) for o in engine.step()]
    lp, top = outs[0].logprobs[0]
    assert len(top) == 2 and top[0][1] >= top[1][1] and top[0][0] == outs[0].token_ids[0] and lp == top[0][1]


def test_abort_frees_blocks_and_bad_requests_are_refused():
    model = model_of()
    engine = Engine(model, block_size=4)
    rid = engine.add_request(prompts(1)[0], SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    outs = engine.abort(rid)
    assert outs[0].finished and outs[0].finish_reason == "abort"
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished()
    with pytest.raises(VelocisError, match="context"):
        engine.add_request(list(range(90)) * 2)
    with pytest.raises(VelocisError, match="vocabulary"):
        engine.add_request([V + 5])
    with pytest.raises(VelocisError, match="kv_cache_memory"):
        Engine(model, kv_cache_memory=-1)


def test_structured_output_through_the_engine(tmp_path):
    """Every request of a batch with a response_format gives output that parses and fits (a random
    model: only the constraint makes it so); an invalid format is refused before any work."""
    import json
    import re

    from velocis.tokenizer import Tokenizer

    text = "".join(f'{{"a": "x", "n": {i}}} 2026-{i % 12 + 1:02d}-{i % 28 + 1:02d} [1, 2] "y" true\n' for i in range(300))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer.train([tmp_path / "t.txt"], vocab_size=300, min_frequency=2, progress=False)
    torch.manual_seed(0)
    model = VelocisModel(ModelConfig(vocab_size=tok.vocab_size, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                                     max_seq_len=512, eos_token_id=tok.eos_id)).eval()
    engine = Engine(model, tok, max_num_seqs=8)
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False}
    date = {"type": "regex", "regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    ids = {}
    for i in range(6):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=300)
        ids[engine.add_request("Answer: ", params, response_format=fmt if i % 2 else date)] = i
    texts = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                texts[ids[out.request_id]] = out.text
    for i, t in texts.items():
        if i % 2:
            obj = json.loads(t)
            assert obj["a"] in ("x", "y") and isinstance(obj["b"], bool) and set(obj) == {"a", "b"}, t
        else:
            assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", t), t
    with pytest.raises(VelocisError, match="invalid JSON schema"):
        engine.add_request("x", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}})
