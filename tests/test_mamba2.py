"""Mamba-2 (models/mamba2.py): the chunked SSD scan and the recurrent step equal the plain sequential
recurrence (values and gradients, fp32, 1e-5), packed documents never see each other, decoding with
the state cache equals full recomputation, transformers' Mamba2ForCausalLM matches both ways
(import, export, greedy generation), `velocis convert` / `velocis.load` / `train-custom --mixer
mamba2` / `velocis generate` run, and the mamba2-2.7b preset counts exactly what transformers does."""
import pytest
import torch
from torch.testing import assert_close

from velocis.config import ModelConfig, get_preset
from velocis.errors import VelocisError
from velocis.infer.generate import generate_ids
from velocis.models import VelocisModel
from velocis.models.mamba2 import Mamba2, causal_conv, conv_reference, ssd_chunked, ssd_reference, ssd_step
from velocis.models.positions import Positions

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(atol=1e-5, rtol=1e-5)


def _resets(b, T, at):
    r = torch.zeros(b, T, dtype=torch.bool)
    for row, t in at:
        r[row, t] = True
    return r


def _scan_inputs(b=2, T=13, H=4, P=3, G=2, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g)
    dt = torch.rand(b, T, H, generator=g) * 0.5 + 0.05
    A = -(torch.rand(H, generator=g) * 3 + 0.5)
    B, C = torch.randn(b, T, G, N, generator=g), torch.randn(b, T, G, N, generator=g)
    h0 = torch.randn(b, H, P, N, generator=g)
    return [t.requires_grad_() for t in (x, dt, A, B, C, h0)]


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
@pytest.mark.parametrize("with_resets", [False, True])
def test_chunked_scan_equals_the_reference_values_and_gradients(chunk, with_resets):
    x, dt, A, B, C, h0 = inputs = _scan_inputs()
    resets = _resets(2, 13, [(0, 5), (0, 6), (1, 0), (1, 8), (1, 12)]) if with_resets else None
    yr, hr = ssd_reference(x, dt, A, B, C, h0, resets)
    yc, hc = ssd_chunked(x, dt, A, B, C, chunk, h0, resets)
    assert_close(yc, yr, **TOL)
    assert_close(hc, hr, **TOL)
    wy, wh = torch.randn_like(yr), torch.randn_like(hr)
    gr = torch.autograd.grad((yr * wy).sum() + (hr * wh).sum(), inputs)
    gc = torch.autograd.grad((yc * wy).sum() + (hc * wh).sum(), inputs)
    for a, b in zip(gc, gr):
        assert torch.isfinite(a).all()
        assert_close(a, b, **TOL)


def test_recurrent_step_equals_the_reference():
    x, dt, A, B, C, h0 = (t.detach() for t in _scan_inputs(T=9))
    yr, hr = ssd_reference(x, dt, A, B, C, h0)
    h, ys = h0, []
    for t in range(9):
        y, h = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h)
        ys.append(y)
    assert_close(torch.stack(ys, 1), yr, **TOL)
    assert_close(h, hr, **TOL)


@pytest.mark.parametrize("with_prev", [False, True])
def test_convolution_equals_the_reference(with_prev):
    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(2, 9, 6, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    prev = torch.randn(2, 6, 3, generator=g) if with_prev else None
    for resets in (None, _resets(2, 9, [(0, 1), (0, 7), (1, 0), (1, 4), (1, 5)])):
        y, window = causal_conv(x, w, bias, prev, resets)
        yr, wr = conv_reference(x, w, bias, prev, resets)
        assert_close(y, yr, **TOL)
        assert_close(window, wr, **TOL)
    y, window = causal_conv(x[:, :2], w, bias, prev, None)  # shorter than the window: it keeps part of prev
    assert_close(window, conv_reference(x[:, :2], w, bias, prev)[1], **TOL)


def tiny(**kw):
    base = dict(vocab_size=61, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64, max_seq_len=64, init_std=0.2,
                mixer="mamba2", layer_feed_forwards=["none"] * 2, ssm_state_size=8, ssm_head_dim=8,
                ssm_num_groups=2, ssm_chunk_size=4)
    return ModelConfig(**{**base, **kw})


def _mixer(seed=0, **kw):
    torch.manual_seed(seed)
    m = Mamba2(tiny(**kw))
    with torch.no_grad():  # HF/mamba init leaves D = 1 and the norm at 1: make every parameter matter
        m.D.normal_(1, 0.5)
        m.norm.weight.normal_(1, 0.3)
        m.conv1d.bias.normal_(0, 0.3)
    return m


def test_mixer_chunked_recurrent_and_reference_agree_with_gradients():
    m = _mixer()
    x = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(19)
    out = m(x, pos)
    m.use_reference = True
    ref = m(x, pos)
    assert_close(out, ref, **TOL)
    gr = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
    m.use_reference = False
    gc = torch.autograd.grad(m(x, pos).square().sum(), list(m.parameters()))
    for (name, _), a, b in zip(m.named_parameters(), gc, gr):
        assert_close(a, b, **TOL, msg=name)
    with torch.no_grad():  # a prefill in two chunks, then one token at a time through the state cache
        cache = m.new_cache(2, 0)
        steps = [m(x[:, :6], torch.arange(6), cache), m(x[:, 6:11], torch.arange(6, 11), cache)]
        steps += [m(x[:, t:t + 1], torch.tensor([t]), cache) for t in range(11, 19)]
        assert_close(torch.cat(steps, 1), out, **TOL)


def test_packed_documents_never_see_each_other():
    m = _mixer(1)
    x = torch.randn(1, 14, 32, requires_grad=True)
    ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2]])
    pos = Positions(ids, Positions.documents(ids), 6)
    spans = [(0, 3), (3, 9), (9, 11), (11, 14)]
    alone = torch.cat([m(x[:, a:b], torch.arange(b - a)) for a, b in spans], 1)
    for reference in (False, True):
        m.use_reference = reference
        packed = m(x, pos)
        assert_close(packed, alone, **TOL)
        # the second document's output has no gradient from any other document's inputs
        grad, = torch.autograd.grad(packed[:, 3:9].sum(), x)
        assert grad[:, :3].abs().max() == 0 and grad[:, 9:].abs().max() == 0 and grad[:, 3:9].abs().max() > 0
    model = VelocisModel(tiny(layer_feed_forwards=None, layer_mixers=["mamba2", "attention"]))
    tok = torch.randint(0, 61, (1, 14))
    with torch.no_grad():
        packed = model(tok, positions=ids)
        assert_close(packed, torch.cat([model(tok[:, a:b]) for a, b in spans], 1), **TOL)


def test_decoding_with_the_state_cache_equals_recomputation():
    torch.manual_seed(0)
    model = VelocisModel(tiny(layer_feed_forwards=None, layer_mixers=["mamba2", "attention"])).eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]
    cached = torch.stack(list(generate_ids(model, prompts, 10)), 1)
    assert torch.equal(cached, torch.stack(list(generate_ids(model, prompts, 10, recompute=True)), 1))
    with pytest.raises(VelocisError, match="different lengths"):  # right padding would enter the state
        list(generate_ids(model, [[1, 2], [1, 2, 3]], 2))
    cache = model.new_cache(1, 16)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(VelocisError, match="cannot roll back"):
        cache.rollback(2)
    cache.reset()
    assert model.layers[0].mixer.new_cache(1, 0).ssm.dtype == torch.float32  # the state accumulates in fp32


def test_meta_build_counts_and_cache_sizes():
    from velocis.models.cache_size import (kv_cache_bytes_per_token, measured_kv_cache_bytes_per_token,
                                           measured_state_bytes_per_sequence, report_lines)
    from velocis.models.count import count_params

    cfg = tiny(num_layers=3, layer_feed_forwards=["none", "mlp", "none"], layer_mixers=["mamba2", "attention", "mamba2"])
    with torch.device("meta"):
        model = VelocisModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 61, (1, 9)))).all()
    I, H, P, G, N, K = 64, 8, 8, 2, 8, 4
    conv = I + 2 * G * N
    mixer = 32 * (I + conv + H) + conv * K + conv + 3 * H + I + I * 32  # in_proj, conv1d (+bias), dt/A/D, norm, out_proj
    attention = 4 * 32 * 32
    c = count_params(cfg)
    assert c["parts"]["mamba2"] == 2 * mixer and c["parts"]["attention"] == attention
    assert c["parts"]["mlp"] == 3 * 32 * 64 and "none" not in c["parts"]
    assert c["parts"]["norms"] == 32 * (1 + 3 + 1)  # final + one per layer + the one MLP layer's
    assert c["total"] == model.num_params()
    state = conv * (K - 1) * 2 + H * P * N * 4  # conv window at 2 bytes, the SSM state in fp32
    assert c["cache_bytes_per_sequence"] == 2 * state == measured_state_bytes_per_sequence(cfg)
    assert kv_cache_bytes_per_token(cfg) == measured_kv_cache_bytes_per_token(cfg) == 2 * 2 * 16 * 2  # k, v x 2 heads x 16
    assert any("recurrent state (mamba2 layers)" in line for line in report_lines(cfg))
    with pytest.raises(VelocisError, match="ssm_head_dim"):
        tiny(ssm_head_dim=5)
    with pytest.raises(VelocisError, match="ssm_num_groups"):
        tiny(ssm_num_groups=3)
    with pytest.raises(VelocisError, match="ssm_dt_limit"):
        tiny(ssm_dt_limit=[0.1, 0.01])


# --------------------------------------------------------------------------- transformers
transformers = pytest.importorskip("transformers")

HF_TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, num_heads=8,
               n_groups=2, expand=2, chunk_size=8, conv_kernel=4)


def _hf(**kw):
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**{**HF_TINY, **kw})).eval()
    with torch.no_grad():  # HF inits these to constants: perturb them so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".D", "dt_bias", "conv1d.bias")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("variant", [{}, {"tie_word_embeddings": True, "time_step_limit": (0.02, 0.3),
                                          "use_bias": True, "n_groups": 1}])
def test_transformers_parity_import_and_export(tmp_path, variant):
    from velocis.interop.hf import export_hf, load_hf

    hf = _hf(**variant)
    hf.save_pretrained(tmp_path / "hf")
    vm, _ = load_hf(tmp_path / "hf")
    assert vm.config.mixers() == ["mamba2"] * 2 and vm.config.feed_forwards() == ["none"] * 2
    x = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        assert (ref - vm(x)).abs().max().item() < 1e-4
    assert export_hf(vm, None, tmp_path / "out") == "Mamba2ForCausalLM"
    back = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert list(back.config.time_step_limit) == list(hf.config.time_step_limit)
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max().item() < 1e-4


def test_greedy_generation_equals_transformers(tmp_path):
    from velocis.interop.hf import load_hf

    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    vm, _ = load_hf(tmp_path / "hf")
    prompt = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 9:]
    ours = torch.stack(list(generate_ids(vm, prompt, 12)), 1)[0]
    assert ours.tolist() == theirs.tolist()


def test_convert_cli_and_load(tmp_path):
    import velocis
    from velocis.cli import main

    hf = _hf(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "v")]) == 0
    vm, _ = velocis.load(tmp_path / "v", device="cpu")
    x = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        assert (hf(x).logits - vm(x)).abs().max().item() < 1e-4
    direct, _ = velocis.load(tmp_path / "hf", device="cpu")  # an HF dir loads directly too
    assert direct.config == vm.config


def test_mamba2_2_7b_preset_counts_what_transformers_counts(capsys):
    from velocis.cli import main
    from velocis.models.count import count_params

    cfg = get_preset("mamba2-2.7b")
    hf_cfg = transformers.Mamba2Config(vocab_size=50288, hidden_size=2560, num_hidden_layers=64, state_size=128,
                                       head_dim=64, num_heads=80, n_groups=1, expand=2, conv_kernel=4,
                                       tie_word_embeddings=True)
    with torch.device("meta"):
        hf = transformers.Mamba2ForCausalLM(hf_cfg)
    c = count_params(cfg)
    assert c["total"] == hf.num_parameters() == 2_702_599_680  # the published "2.7B"
    assert c["kv_cache_bytes_per_token"] == 0
    assert c["cache_bytes_per_sequence"] == 64 * ((5120 + 256) * 3 * 2 + 80 * 64 * 128 * 4)
    from velocis.interop.hf_mamba2 import mamba2_config, to_mamba2_config

    back = mamba2_config(to_mamba2_config(cfg))  # the preset is an exportable Mamba-2 shape
    assert count_params(back)["total"] == c["total"]
    assert main(["params", "--preset", "mamba2-2.7b"]) == 0
    assert "2,702,599,680" in capsys.readouterr().out


def test_train_custom_and_generate_cli(tiny_data_dir, tmp_path, capsys):
    from velocis.cli import main

    run = tmp_path / "run"
    argv = ["train-custom", "--data", str(tiny_data_dir), "--output-dir", str(run), "--hidden-dim", "64",
            "--num-layers", "2", "--num-heads", "2", "--mlp-dim", "128", "--max-seq-len", "64", "--mixer", "mamba2",
            "--batch-size", "4", "--seq-len", "32", "--device", "cpu", "--monitor", "plain", "--eval-batches", "1",
            "--max-steps", "3", "--eval-every", "3", "--no-plot"]
    assert main(argv) == 0
    assert main(["generate", "--model", str(run), "--prompt", "hello", "--max-new-tokens", "5", "--temperature",
                 "0"]) == 0
    import velocis

    model, _ = velocis.load(run)
    assert model.config.mixers() == ["mamba2", "mamba2"]
