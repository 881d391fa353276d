"""The per-request sampling layer (velocis/infer/sampling.py) against transformers' logits
processors, a plain OpenAI-formula loop, seeded reproducibility across batches, the sampled
distribution, raw logprobs, stop strings and parameter validation."""
import math
import re

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from velocis.errors import VelocisError
from velocis.infer.sampling import (PenaltyState, SamplingParams, apply_penalties, apply_warpers, check_stop,
                                    count_tensors, make_generator, safe_stream_len, sample_batch,
                                    stack_penalty_states)

V = 64


def hf_reference(logits: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """One row [V] through transformers' processors, in the order sampling.py documents, each
    added only when active (as transformers' generate does)."""
    scores = logits[None].clone()
    ids = torch.tensor([history], dtype=torch.long)
    if p.repetition_penalty != 1:
        scores = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(ids, scores)
    if p.greedy:
        return scores[0]
    chain = [TemperatureLogitsWarper(float(p.temperature))]
    if p.min_p > 0:
        chain.append(MinPLogitsWarper(p.min_p))
    if p.top_k and p.top_k > 0:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        chain.append(TopPLogitsWarper(p.top_p))
    for proc in chain:
        scores = proc(ids, scores)
    return scores[0]


def ours(logits: torch.Tensor, params: list[SamplingParams], prompts, outputs) -> torch.Tensor:
    history = count_tensors(prompts, outputs, logits.size(-1))
    return apply_warpers(apply_penalties(logits, params, history), params)


def random_logits(rows: int, seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g) * 3
    # rounded to 0.25, ties occur: several tokens share top-k's k-th value
    return logits.mul(4).round().div(4) if ties else logits


HF_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.9),
    SamplingParams(temperature=0.8, min_p=0.1),
    SamplingParams(temperature=1.0, top_k=10, top_p=0.5),
    SamplingParams(temperature=0.6, min_p=0.05, top_k=20, top_p=0.8),
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.5, repetition_penalty=0.8, top_p=0.95),
    SamplingParams(temperature=0, repetition_penalty=1.5, top_k=3),  # greedy: only the penalty applies
    SamplingParams(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("case", range(len(HF_CASES)))
def test_single_rows_equal_transformers(case):
    p = HF_CASES[case]
    logits = random_logits(1, case)
    prompt, output = [1, 2, 3, 40, 3], [7, 40, 9]
    got = ours(logits, [p], [prompt], [output])[0]
    want = hf_reference(logits[0], p, prompt + output)
    assert torch.equal(got, want), (got - want).abs().max()  # same values and the same -inf masks
    if not p.greedy:
        assert (got == float("-inf")).any() or (p.top_k is None and p.top_p == 1 and p.min_p == 0)


TIE_CASES = [SamplingParams(temperature=0.8, top_k=k, min_p=m) for k, m in [(3, 0), (7, 0), (12, 0.05), (5, 0.3)]]


def test_top_k_keeps_ties_as_transformers_does():
    """Rounded logits: the k-th value is often shared, and every token tied with it stays."""
    logits = random_logits(len(TIE_CASES), 5, ties=True)
    prompts, outputs = [[]] * len(TIE_CASES), [[]] * len(TIE_CASES)
    got = ours(logits, TIE_CASES, prompts, outputs)
    kept = (got > float("-inf")).sum(-1).tolist()
    assert kept[0] > 3 or kept[1] > 7  # the data does have ties at the k-th value
    for b, p in enumerate(TIE_CASES):
        assert torch.equal(got[b], hf_reference(logits[b], p, [])), b


def test_top_p_ties_at_the_boundary_drop_the_lower_id_first():
    """Which of equally likely tokens top-p keeps is a sort's choice (transformers' unstable sort
    scatters them at this size); ours is a stable sort: the lower ids go first, in any batch."""
    logits = torch.zeros(1, V)
    logits[0, 0] = 3.0  # ~0.24, then 63 tied tokens of ~0.012 each
    p = SamplingParams(top_p=0.5)
    probs = logits.double().softmax(-1)[0]
    n = math.ceil((0.5 - probs[0]) / probs[1])  # tied tokens needed to reach top_p
    kept = (apply_warpers(logits, [p])[0] > float("-inf")).nonzero().flatten().tolist()
    assert kept == [0] + list(range(V - n, V))
    batch = apply_warpers(torch.cat([random_logits(2, 1), logits]), [SamplingParams(top_p=0.3)] * 2 + [p])
    assert torch.equal(batch[2], apply_warpers(logits, [p])[0])


def test_top_p_threshold_rounds_like_transformers():
    """transformers compares with 1 - top_p rounded once from a Python float (0.1 -> 0.100000001
    for top_p 0.9); 1 - float32(0.9) is 0.100000024. A token whose cumulative mass falls between
    the two is kept by one and dropped by the other."""
    logits = torch.tensor([[math.log(0.1 / 0.9), 0.0]])
    for _ in range(100):  # nudge by one float32 step until its probability lands in the gap
        c = float(logits.softmax(-1)[0, 0])
        if float(torch.tensor(1 - 0.9)) < c <= float(1 - torch.tensor(0.9)):
            break
        logits[0, 0] = torch.nextafter(logits[0, 0], torch.tensor(1.0))
    else:
        pytest.fail("no probability in the gap")
    p = SamplingParams(top_p=0.9)
    got = apply_warpers(logits, [p])[0]
    assert torch.equal(got, hf_reference(logits[0], p, [])) and got[0] > float("-inf")


def test_extreme_values_equal_transformers():
    """top_p tiny: the most likely token still stays. top_p 1 beside an active top_k: a token
    whose probability underflows to 0 keeps its logit (transformers adds no top-p step then)."""
    logits = random_logits(2, 9)
    logits[:, :3] = torch.tensor([-150.0, -160.0, -170.0])  # exp underflows in float32
    params = [SamplingParams(top_p=1e-9), SamplingParams(top_k=V - 1, temperature=0.5)]
    got = apply_warpers(logits, params)
    for b, p in enumerate(params):
        assert torch.equal(got[b], hf_reference(logits[b], p, [])), b
    assert (got[0] > float("-inf")).sum() == 1 and got[1, 1] > float("-inf")


def test_a_batch_of_different_params_equals_transformers_per_row():
    """Every row uses its own values: a batch that broadcast one row's temperature or threshold, or
    mixed rows up in the sort, would differ from the per-row references."""
    B = len(HF_CASES)
    logits = random_logits(B, 100)
    prompts = [[b, b + 1, (3 * b) % V] for b in range(B)]
    outputs = [[(5 * b + 7) % V, b + 2] for b in range(B)]
    got = ours(logits, HF_CASES, prompts, outputs)
    assert len({float(r.max()) for r in logits}) == B  # rows differ
    for b, p in enumerate(HF_CASES):
        assert torch.equal(got[b], hf_reference(logits[b], p, prompts[b] + outputs[b])), b


def test_presence_and_frequency_equal_the_openai_formula():
    B = 4
    logits = random_logits(B, 7)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=0.0),
              SamplingParams(presence_penalty=0.0, frequency_penalty=1.7, repetition_penalty=1.2),
              SamplingParams()]
    prompts = [[1, 2, 2, 9], [3], [4, 4, 5], [1]]  # prompt tokens: only the repetition penalty sees them
    outputs = [[9, 9, 9, 2, 11], [3, 3, 20], [4, 6, 6, 6], [1, 1]]
    got = apply_penalties(logits, params, count_tensors(prompts, outputs, V))
    for b, p in enumerate(params):  # plain Python, float64
        want = logits[b].double().tolist()
        for t in set(prompts[b]) | set(outputs[b]):  # HF / CTRL repetition penalty
            want[t] = want[t] / p.repetition_penalty if want[t] > 0 else want[t] * p.repetition_penalty
        for t in set(outputs[b]):  # OpenAI: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
            want[t] = want[t] - outputs[b].count(t) * p.frequency_penalty - p.presence_penalty
        torch.testing.assert_close(got[b], torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-5)
    assert torch.equal(got[3], logits[3])  # neutral values: untouched
    assert not torch.equal(got[0], logits[0])


def test_incremental_penalty_state_equals_counts_from_lists():
    prompts = [[1, 2, 2], [], [5]]
    outputs = [[3, 3, 1], [0, 63], []]
    states = [PenaltyState(pr, V) for pr in prompts]
    for s, out in zip(states, outputs):
        for t in out:
            s.append(torch.tensor(t) if t % 2 else t)  # ints and 0-d tensors
    stacked = stack_penalty_states(states + [None], V)
    ref = count_tensors(prompts + [[]], outputs + [[]], V)
    assert torch.equal(stacked.prompt_mask, ref.prompt_mask)
    assert torch.equal(stacked.output_counts, ref.output_counts)
    assert ref.output_counts[0, 3] == 2 and ref.prompt_mask[0, 2] and not ref.prompt_mask[1].any()


def test_greedy_rows_take_the_argmax_after_penalties():
    logits = torch.zeros(2, V)
    logits[:, 10], logits[:, 11] = 5.0, 4.0
    params = [SamplingParams(temperature=0, repetition_penalty=2.0), SamplingParams(temperature=0)]
    out = sample_batch(logits, params, prompt_tokens=[[10], [10]], output_tokens=[[], []])
    assert out.token_ids.tolist() == [11, 10]  # 5 / 2 < 4 for the penalised row only
    assert out.logprobs is None and out.top_logprobs is None


def run_request(seed: int, position: int, neighbours: int, steps: int = 20) -> list[int]:
    """One request (fixed per-step logits, presence penalty on its own outputs) decoded inside a
    batch of random neighbours with other settings and seeds, at row `position`."""
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, presence_penalty=0.4, seed=seed)
    logit_stream = torch.Generator().manual_seed(1234)
    noise = torch.Generator().manual_seed(seed * 31 + position * 7 + neighbours)
    gen = make_generator(target)
    others = [SamplingParams(temperature=1.0 + 0.1 * i, seed=None if i % 2 else 1000 + i, min_p=0.02)
              for i in range(neighbours)]
    other_gens = [make_generator(p) for p in others]
    states = [PenaltyState([1, 2, 3], V) for _ in range(neighbours + 1)]
    tokens = []
    for _ in range(steps):
        mine = torch.randn(V, generator=logit_stream) * 2
        rows = [torch.randn(V, generator=noise) * 3 for _ in range(neighbours)]
        rows.insert(position, mine)
        params, gens = list(others), list(other_gens)
        params.insert(position, target)
        gens.insert(position, gen)
        out = sample_batch(torch.stack(rows), params, gens, history=stack_penalty_states(states, V))
        for s, t in zip(states, out.token_ids):
            s.append(t)
        tokens.append(int(out.token_ids[position]))
    return tokens


def test_a_seeded_request_does_not_depend_on_its_batch():
    torch.manual_seed(0)  # unseeded neighbours use the global RNG; the seeded row must not
    a = run_request(seed=7, position=0, neighbours=2)
    b = run_request(seed=7, position=3, neighbours=5)
    c = run_request(seed=7, position=0, neighbours=0)  # alone
    assert a == b == c
    assert run_request(seed=8, position=0, neighbours=2) != a
    assert len(set(a)) > 3  # it really sampled


def test_the_n_samples_of_a_seeded_request_differ():
    p = SamplingParams(seed=5, n=3)
    draws = [torch.rand(8, generator=make_generator(p, index=i)) for i in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[0], torch.rand(8, generator=make_generator(p)))
    assert make_generator(SamplingParams()) is None


def expected_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Written out by hand for a tiny vocabulary, not through the code under test."""
    probs = (logits.double() / p.temperature).softmax(-1)
    keep = probs >= p.min_p * probs.max()
    if p.top_k:
        keep &= probs >= probs.sort(descending=True).values[p.top_k - 1]
    probs = torch.where(keep, probs, 0) / torch.where(keep, probs, 0).sum()
    order = probs.argsort(descending=True)
    mass, kept = 0.0, torch.zeros_like(keep)
    for t in order.tolist():  # most likely first until the mass reaches top_p
        kept[t] = True
        mass += float(probs[t])
        if mass >= p.top_p:
            break
    probs = torch.where(kept, probs, 0)
    return probs / probs.sum()


DIST_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0])


@pytest.mark.parametrize("p", [SamplingParams(temperature=0.7, top_p=0.8),
                               SamplingParams(temperature=1.5, top_k=4, min_p=0.1),
                               SamplingParams(temperature=1.0)])
def test_sampled_frequencies_match_the_distribution(p):
    want = expected_probs(DIST_LOGITS, p)
    N = 40_000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = sample_batch(DIST_LOGITS.expand(N, -1), [p] * N)  # unseeded rows, one call
    freq = torch.bincount(out.token_ids, minlength=6).double() / N
    assert freq[want == 0].sum() == 0  # dropped tokens are never drawn
    assert (freq - want).abs().max() < 0.012, (freq, want)  # > 4.5 standard deviations


def test_a_seeded_row_over_many_steps_follows_the_distribution():
    p = SamplingParams(temperature=0.7, top_p=0.8, seed=3)
    g = make_generator(p)
    draws = torch.stack([sample_batch(DIST_LOGITS[None], [p], [g]).token_ids[0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    want = expected_probs(DIST_LOGITS, p)
    assert freq[want == 0].sum() == 0
    assert (freq - want).abs().max() < 0.04, (freq, want)


def test_logprobs_are_the_raw_distribution_sorted_with_the_chosen_token():
    logits = random_logits(4, 3)
    params = [SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.5, seed=1),
              SamplingParams(temperature=0, logprobs=1),
              SamplingParams(),  # no logprobs asked
              SamplingParams(temperature=1.2, top_k=3, logprobs=0)]
    gens = [make_generator(p) for p in params]
    out = sample_batch(logits, params, gens, prompt_tokens=[[0, 1]] * 4, output_tokens=[[2]] * 4)
    raw = logits.log_softmax(-1)  # before penalties and temperature (vLLM's raw_logprobs)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1), rtol=0, atol=0)
    assert [None if t is None else len(t) for t in out.top_logprobs] == [5, 1, None, 0]
    for b, top in enumerate(out.top_logprobs):
        if top:
            values = [v for _, v in top]
            assert values == sorted(values, reverse=True)
            assert values == raw[b].topk(len(top)).values.tolist()
            assert all(v == float(raw[b, i]) for i, v in top)
    assert out.top_logprobs[1][0][0] == int(out.token_ids[1])  # greedy, no penalty: the top-1 is chosen
    assert math.isclose(float(out.logprobs[1]), out.top_logprobs[1][0][1])


def test_check_stop_across_pieces():
    stop = ["STOP"]
    text, stopped = "", False
    for piece in ["Hel", "lo ST", "OP more"]:
        stopped, text = check_stop(text, piece, stop)
        if stopped:
            break
    assert stopped and text == "Hello "  # the stop string, split over two pieces, is left out
    assert check_stop("", "a\n\nb END c", ["END", "\n\n"]) == (True, "a")  # the earliest of several
    assert check_stop("abc", " ENDx", ["END", "x"]) == (True, "abc ")
    assert check_stop("", "STOP", ["STOP"]) == (True, "")


def test_check_stop_has_no_false_positives():
    stop = ["abc", "\n\n"]
    text = ""
    for piece in ["ab", "d a", "b", "x\n", "y\n", "ac"]:  # near misses only
        stopped, text = check_stop(text, piece, stop)
        assert not stopped, piece
    assert text == "abd abx\ny\nac"
    assert check_stop("abc is old", " new", stop) == (False, "abc is old new")  # only new matches count
    assert check_stop("", "anything", []) == (False, "anything")


def test_safe_stream_len_holds_back_a_possible_stop_start():
    assert safe_stream_len("Hello ST", ["STOP"]) == len("Hello ")
    assert safe_stream_len("Hello S", ["STOP", "Sx"]) == len("Hello ")
    assert safe_stream_len("Hello", ["STOP"]) == 5
    assert safe_stream_len("a\n", ["\n\n", "END"]) == 1
    assert safe_stream_len("xEN", ["\n\n", "END"]) == 1


def test_defaults_and_edge_values_are_valid():
    SamplingParams()
    p = SamplingParams(temperature=0, top_k=-1, top_p=1, min_p=1, repetition_penalty=0.01, seed=-5,
                       max_tokens=1, stop="###", stop_token_ids=(2,), logprobs=20, presence_penalty=-2.0)
    assert p.stop == ["###"] and p.stop_token_ids == [2] and p.greedy
    assert p.stop_ids(eos_token_id=0) == {0, 2}
    assert SamplingParams(ignore_eos=True, stop_token_ids=[5]).stop_ids(eos_token_id=0) == {5}
    SamplingParams(logprobs=0, top_k=0, min_p=0)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.1, "temperature must be >= 0"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("temperature", float("inf"), "temperature must be a finite number"),
    ("temperature", "hot", "temperature must be a number"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.01, "top_p must be in (0, 1]"),
    ("min_p", -0.01, "min_p must be in [0, 1]"),
    ("min_p", 1.5, "min_p must be in [0, 1]"),
    ("top_k", -2, "top_k must be >= 1, or 0 or -1"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("top_k", True, "top_k must be an integer"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("repetition_penalty", -1.0, "repetition_penalty must be > 0"),
    ("repetition_penalty", float("inf"), "repetition_penalty must be a finite number"),
    ("presence_penalty", float("nan"), "presence_penalty must be a finite number"),
    ("frequency_penalty", float("-inf"), "frequency_penalty must be a finite number"),
    ("seed", 1.5, "seed must be an integer"),
    ("max_tokens", 0, "max_tokens must be >= 1"),
    ("max_tokens", 3.0, "max_tokens must be an integer"),
    ("n", 0, "n must be >= 1"),
    ("logprobs", -1, "logprobs must be between 0 and 20"),
    ("logprobs", 21, "logprobs must be between 0 and 20"),
    ("stop", ["ok", ""], "stop must be a string or a list of non-empty strings"),
    ("stop", [3], "stop must be a string or a list of non-empty strings"),
    ("stop_token_ids", [-1], "stop_token_ids must be a list of token ids"),
    ("ignore_eos", "yes", "ignore_eos must be true or false"),
])
def test_validate_rejects_bad_values(field, value, message):
    with pytest.raises(VelocisError, match="^" + re.escape(message)):
        SamplingParams(**{field: value})
    p = SamplingParams()
    setattr(p, field, value)  # edited after construction: validate() catches it too
    with pytest.raises(VelocisError):
        p.validate()


def test_penalties_need_a_history():
    with pytest.raises(ValueError, match="history"):
        sample_batch(torch.zeros(1, V), [SamplingParams(presence_penalty=1.0)])
