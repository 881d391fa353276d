"""Gated DeltaNet (models/deltanet.py) and Qwen3-Next's gated attention (models/gated_attention.py):
the chunked and recurrent forms equal the sequential reference (values and gradients, fp32, 1e-5),
packed documents reset the convolution window and the state, the "state" cache decodes exactly,
greedy generation with the state equals full recomputation, and the hybrid presets."""
import pytest
import torch

from velocis.config import ModelConfig, get_preset
from velocis.errors import VelocisError
from velocis.infer.generate import generate_ids
from velocis.models import VelocisModel
from velocis.models.deltanet import (DELTA_RULES, DeltaNetCache, GatedDeltaNet, causal_conv, causal_conv_reference,
                                     l2norm)
from velocis.models.positions import Positions

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def _rule_inputs(B=2, T=75, H=2, dk=8, dv=6, seed=0):
    """Random delta-rule inputs (leaves with gradients): normalised keys, decays mild enough that
    the state (and so any leak across a document boundary) still matters many tokens later."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = (l2norm(r(B, T, H, dk)) * dk ** -0.5).requires_grad_()
    k = l2norm(r(B, T, H, dk)).requires_grad_()
    v = r(B, T, H, dv).requires_grad_()
    g = (-0.15 * torch.rand(B, T, H, generator=gen)).requires_grad_()  # log decay <= 0
    beta = torch.rand(B, T, H, generator=gen).requires_grad_()
    state = r(B, H, dk, dv).requires_grad_()
    return q, k, v, g, beta, state


def _packed_ids(T=75):
    """Row 0: documents of 20, 40 (crossing the 64-token chunk edge at 60) and 15 tokens; row 1: 63 then
    a 1-token document exactly on the chunk boundary, then 11."""
    return torch.stack([torch.cat([torch.arange(20), torch.arange(40), torch.arange(T - 60)]),
                        torch.cat([torch.arange(63), torch.arange(1), torch.arange(T - 64)])])


def _grads(out, leaves, seed=1):
    """d(sum(out * w)) / d leaves for fixed random weights w (all outputs weigh in)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in out)
    return torch.autograd.grad(loss, leaves)


def _close(a, b, tol=TOL):
    """Every tensor of a within tol of b's, relative to b's largest entry where that exceeds 1
    (a weight gradient sums over every token)."""
    return all((x - y).abs().max().item() < tol * max(1.0, y.abs().max().item()) for x, y in zip(a, b))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_and_recurrent_equal_the_reference(packed, with_state):
    q, k, v, g, beta, state = _rule_inputs()
    docs = Positions.documents(_packed_ids()) if packed else None
    s0 = state if with_state else None
    leaves = [q, k, v, g, beta] + ([state] if with_state else [])
    ref = DELTA_RULES["reference"](q, k, v, g, beta, s0, docs)
    ref_grads = _grads(ref, leaves)
    for name in ("recurrent", "chunk"):
        out = DELTA_RULES[name](q, k, v, g, beta, s0, docs)
        assert _close(out, ref), name
        assert _close(_grads(out, leaves), ref_grads), name
    # smaller chunks: several chunk edges, documents starting mid-chunk and on an edge
    small = DELTA_RULES["chunk"](q, k, v, g, beta, s0, docs, chunk_size=16)
    assert _close(small, ref) and _close(_grads(small, leaves), ref_grads)


def test_document_boundaries_reset_the_state():
    """Packed rows equal their documents run alone (each from a zero state): nothing leaks."""
    q, k, v, g, beta, _ = _rule_inputs(B=1)
    ids = _packed_ids()[:1]
    packed, _ = DELTA_RULES["chunk"](q, k, v, g, beta, None, Positions.documents(ids))
    starts = [0, 20, 60, 75]
    for a, b in zip(starts, starts[1:]):
        alone, _ = DELTA_RULES["reference"](*(x[:, a:b] for x in (q, k, v, g, beta)))
        assert (packed[:, a:b] - alone).abs().max() < TOL
    leaked, _ = DELTA_RULES["chunk"](q, k, v, g, beta)  # without the boundaries the state carries over
    assert (leaked[:, 20:60] - packed[:, 20:60]).abs().max() > 1e-2


@pytest.mark.parametrize("packed", [False, True])
def test_short_convolution_equals_the_reference(packed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 75, 5, generator=gen, requires_grad=True)
    w = torch.randn(5, 4, generator=gen, requires_grad=True)
    prev = torch.randn(2, 3, 5, generator=gen, requires_grad=True)
    docs = Positions.documents(_packed_ids()) if packed else None
    for p in (None, prev):
        fast, ref = causal_conv(x, w, p, docs), causal_conv_reference(x, w, p, docs)
        leaves = [x, w] + ([p] if p is not None else [])
        assert _close(fast, ref) and _close(_grads(fast, leaves), _grads(ref, leaves))
    # the window a cache keeps holds only the last document's inputs (here a 1-token document)
    window = causal_conv(x, w, prev, Positions.documents(torch.cat([torch.arange(74), torch.arange(1)]).expand(2, -1)))[1]
    assert torch.equal(window[:, :2], torch.zeros(2, 2, 5)) and torch.equal(window[:, 2], x[:, -1])


def _config(**kw):
    base = dict(vocab_size=97, hidden_dim=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                max_seq_len=128, mixer_pattern=["gated_deltanet"] * 3 + ["gated_attention"], qk_norm=True,
                partial_rotary_factor=0.5, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                linear_value_head_dim=6, init_std=0.1)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("packed", [False, True])
def test_the_layer_in_every_form_equals_the_reference(packed):
    """The whole mixer (projections, convolution, rule, gated norm): outputs and gradients of the input
    and of every parameter agree across impl = chunk / recurrent / reference."""
    torch.manual_seed(0)
    layer = GatedDeltaNet(_config(), 0)
    x = torch.randn(2, 75, 32, requires_grad=True)
    pos = Positions(_packed_ids(), Positions.documents(_packed_ids()), 75) if packed else Positions.of(torch.arange(75))
    leaves = [x, *layer.parameters()]
    results = {}
    for impl in ("reference", "recurrent", "chunk"):
        layer.impl = impl
        out = layer(x, pos)
        results[impl] = (out, _grads([out], leaves))
    layer.impl = "chunk"
    ref_out, ref_grads = results["reference"]
    for impl in ("recurrent", "chunk"):
        out, grads = results[impl]
        assert (out - ref_out).abs().max() < TOL, impl
        assert _close(grads, ref_grads), impl


def test_hybrid_model_packed_rows_equal_separate_documents():
    torch.manual_seed(0)
    model = VelocisModel(_config()).eval()
    x = torch.randint(0, 97, (1, 90))
    with torch.no_grad():
        packed = model(x, positions=torch.cat([torch.arange(30), torch.arange(60)])[None])
        alone = torch.cat([model(x[:, :30]), model(x[:, 30:])], 1)
    assert (packed - alone).abs().max() < 1e-4


def test_state_cache_decodes_exactly_and_cannot_roll_back():
    """Prefill (chunked form from a state) + single steps (recurrent form) + a chunk == the full forward."""
    torch.manual_seed(0)
    model = VelocisModel(_config()).eval()
    x = torch.randint(0, 97, (2, 90))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 128)
        layer_cache = cache.layers[0]
        assert isinstance(layer_cache, DeltaNetCache) and layer_cache.kind == "state"
        assert layer_cache.recurrent.dtype == torch.float32
        steps = [model(x[:, :70], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(70, 74)]
        steps.append(model(x[:, 74:], cache=cache))  # 16 tokens with a cache: the chunked form, from the state
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
        assert cache.lengths.tolist() == [90, 90]
        with pytest.raises(VelocisError, match="cannot roll back"):
            cache.rollback(80)
        cache.reset([1])  # row 1 starts over: its state is zero again, row 0 keeps its own
        assert not layer_cache.recurrent[1].any() and not layer_cache.conv[1].any() and layer_cache.recurrent[0].any()
        again = model(x[1:, :10], cache=model.new_cache(1, 128))
        assert (model(x[:, :10], cache=cache)[1:] - again).abs().max() < 1e-4


def test_cache_sizes_are_what_is_allocated():
    model = VelocisModel(_config())
    per_token, per_seq = model.cache_bytes(2)
    assert per_token == 1 * 2 * 2 * 8 * 2  # the one attention layer: K and V of 2 kv heads x 8, bf16
    cache = model.new_cache(1, 16, dtype=torch.bfloat16)
    state = sum(b.numel() * b.element_size() for layer in cache.layers if layer.kind == "state" for b in layer.buffers())
    assert per_seq == state == 3 * ((4 - 1) * (2 * 16 + 24) * 2 + 4 * 8 * 6 * 4)  # conv window (bf16) + fp32 state


def test_greedy_generation_with_the_state_equals_recomputation():
    torch.manual_seed(0)
    model = VelocisModel(_config()).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    cached = torch.stack(list(generate_ids(model, prompts, 12)), 1)
    recomputed = torch.stack(list(generate_ids(model, prompts, 12, recompute=True)), 1)
    assert torch.equal(cached, recomputed)
    with pytest.raises(VelocisError, match="different lengths"):  # the state would absorb right padding
        list(generate_ids(model, [[1, 2, 3], [4, 5, 6, 7]], 2))


def test_meta_build_and_init_weights():
    cfg = _config()
    with torch.device("meta"):
        model = VelocisModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    layer = model.layers[0].mixer
    assert layer.in_proj_qkvz.weight.shape == (2 * 16 + 2 * 24, 32) and layer.in_proj_ba.weight.shape == (8, 32)
    assert layer.conv1d.weight.shape == (56, 1, 4)
    A = layer.A_log.exp()
    assert bool(((A > 0.009) & (A < 16.1)).all()) and torch.equal(layer.dt_bias, torch.ones(4))
    assert model.layers[3].mixer.q_proj.weight.shape == (2 * 4 * 8, 32)  # q and the output gate
    out = model(torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 20)))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_shapes_are_named():
    with pytest.raises(VelocisError, match="linear_num_value_heads 3 must be a multiple"):
        VelocisModel(_config(linear_num_value_heads=3))
    with pytest.raises(VelocisError, match="partial_rotary_factor applies to 'gated_attention'"):
        ModelConfig(partial_rotary_factor=0.5)
    with pytest.raises(VelocisError, match="rotary dims"):
        VelocisModel(_config(partial_rotary_factor=0.1))
    with pytest.raises(VelocisError, match="mixer_pattern is empty"):
        _config(mixer_pattern=[])
    with pytest.raises(VelocisError, match="shared_expert_gate needs a shared expert"):
        _config(num_experts=4, shared_expert_gate=True)


def _train_hybrid_small(data_dir, out, **shape):
    """3 optimizer steps of hybrid-small (the tiny tokenizer's vocabulary) through the train API:
    -> (validation loss before, after)."""
    import json

    from velocis.tokenizer import Tokenizer
    from velocis.train import TrainConfig, train

    mc = get_preset("hybrid-small", vocab_size=Tokenizer.load(data_dir).vocab_size, max_seq_len=64, **shape)
    tc = TrainConfig(output_dir=str(out), data_dir=str(data_dir), max_steps=3, batch_size=2, seq_len=64, lr=1e-3,
                     warmup_steps=1, device="cpu", monitor="none", plot=False, eval_every=100, save_every=100,
                     eval_batches=2)
    train(tc, mc)
    evals = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "eval"]
    return evals[0], evals[-1]


def test_hybrid_small_preset_shape_trains(tiny_data_dir, tmp_path):
    """hybrid-small: 9 DeltaNet + 3 gated attention layers, 125.1M parameters. One period of its pattern
    (3 DeltaNet + 1 attention layer at the preset's widths) trains on a CPU: the validation loss falls."""
    from velocis.models.count import count_params

    cfg = get_preset("hybrid-small")
    assert cfg.mixers() == (["gated_deltanet"] * 3 + ["gated_attention"]) * 3
    assert count_params(cfg)["total"] == 125_087_640
    before, after = _train_hybrid_small(tiny_data_dir, tmp_path / "run", num_layers=4)
    assert after < before - 0.2, (before, after)


@pytest.mark.slow
def test_hybrid_small_preset_trains(tiny_data_dir, tmp_path):
    """The whole 12-layer preset (slow on a shared CPU: ~100M parameters with the tiny vocabulary)."""
    before, after = _train_hybrid_small(tiny_data_dir, tmp_path / "run")
    assert after < before - 0.2, (before, after)
