"""flash-linear-attention's Triton kernels (optional extra `fla`) for the gated delta rule (models/deltanet.py)
and Mamba-2's SSD (models/mamba2.py, fla's simple GLA):
the dispatch runs them only for CUDA inputs with fla importable, and they equal Velocis' sequential
reference (values and gradients, packed documents, an initial state). CI does not install fla: those
tests skip. On CPU they run under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the variable
must be set before triton is imported) at 1e-4; on CUDA (marked gpu) at a tolerance that allows for
Triton's TF32 dot products."""
import importlib.util
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from velocis.config import ModelConfig
from velocis.models import deltanet, mamba2
from velocis.models.deltanet import DELTA_RULES, DeltaNetCache, GatedDeltaNet, l2norm
from velocis.models.positions import Positions

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_FLA = importlib.util.find_spec("fla") is not None
needs_fla = pytest.mark.skipif(not HAS_FLA, reason="flash-linear-attention not installed (pip install -e .[fla])")


def _layer(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, hidden_dim=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64, max_seq_len=128, mixer_pattern=["gated_deltanet"], linear_num_key_heads=2,
                      linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
    return GatedDeltaNet(cfg)


def cuda_like(T):
    """A stand-in for a CUDA activation [1, T, 32]: the dispatch reads only these attributes."""
    return types.SimpleNamespace(is_cuda=True, dtype=torch.float32, shape=(1, T, 32))


def _refuse(*args, **kwargs):
    raise AssertionError("fla kernels called for CPU tensors")


# --------------------------------------------------------------------------- the dispatch (no fla needed)
def test_chunk_form_picks_fla_only_on_cuda_with_fla(monkeypatch):
    cpu, cuda = torch.zeros(1), cuda_like(1)
    monkeypatch.setattr(deltanet, "fla_available", lambda: False)
    assert deltanet.chunk_rule_for(cpu) == "chunk" and deltanet.chunk_rule_for(cuda) == "chunk"
    monkeypatch.setattr(deltanet, "fla_available", lambda: True)
    assert deltanet.chunk_rule_for(cpu) == "chunk"
    assert deltanet.chunk_rule_for(cuda) == "fla"
    assert deltanet.chunk_rule_for(types.SimpleNamespace(is_cuda=True, dtype=torch.float64)) == "chunk"

    layer = _layer()
    cache = DeltaNetCache(1, layer.conv_dim, layer.kernel, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim)
    assert layer._rule(cuda_like(4), None) == "fla"
    assert layer._rule(cuda_like(4), cache) == "recurrent"  # decode steps stay recurrent
    assert layer._rule(cuda_like(40), cache) == "fla"  # a prefill with a cache
    layer.impl = "reference"
    assert layer._rule(cuda_like(40), None) == "reference"  # an explicit form is kept


def test_cpu_forward_never_calls_fla(monkeypatch):
    """On CPU the layer runs the PyTorch chunked form even when fla claims to be importable."""
    monkeypatch.setattr(deltanet, "fla_available", lambda: True)
    monkeypatch.setitem(DELTA_RULES, "fla", _refuse)
    layer = _layer()
    x = torch.randn(2, 20, 32)
    ids = torch.stack([torch.cat([torch.arange(8), torch.arange(12)]), torch.arange(20)])
    pos = Positions(ids, Positions.documents(ids), 20)
    out = layer(x, pos)
    layer.impl = "reference"
    torch.testing.assert_close(out, layer(x, pos), rtol=1e-5, atol=1e-5)


def test_cpu_mamba2_never_calls_fla(monkeypatch):
    """Likewise Mamba-2's SSD."""
    monkeypatch.setattr(deltanet, "fla_available", lambda: True)
    monkeypatch.setattr(mamba2, "ssd_fla", _refuse)
    torch.manual_seed(0)
    m = mamba2.Mamba2(_mamba_config())
    x = torch.randn(2, 20, 32)
    out = m(x, torch.arange(20))
    m.use_reference = True
    torch.testing.assert_close(out, m(x, torch.arange(20)), rtol=1e-5, atol=1e-5)


def _mamba_config():
    return ModelConfig(vocab_size=61, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=256,
                       mixer="mamba2", layer_feed_forwards=["none"], ssm_state_size=16, ssm_head_dim=16,
                       ssm_num_groups=2, ssm_chunk_size=64)


def test_fla_available_is_false_without_fla(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # an import of fla now fails
    monkeypatch.setitem(sys.modules, "fla.ops", None)
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", None)
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", None)
    deltanet.fla_available.cache_clear()
    try:
        assert deltanet.fla_available() is False
        assert deltanet.chunk_rule_for(cuda_like(1)) == "chunk"
    finally:
        deltanet.fla_available.cache_clear()


# --------------------------------------------------------------------------- fla held to the reference
# Under the interpreter two things differ from a GPU, and the worker adapts them (in its own process):
# triton's autotuner benchmarks its configs through a GPU driver (keep the first config; the interpreter
# ignores launch sizes), and fla's kernels call `.to(tl.int64)` on `range` loop indices, which are Triton
# values when compiled but Python ints when interpreted (give those modules a `range` of ints with a no-op `.to`).
WORKER = textwrap.dedent("""
    import sys
    import torch
    from triton.runtime.autotuner import Autotuner

    run = Autotuner.run
    def first_config(self, *args, **kwargs):
        self.configs = self.configs[:1]
        return run(self, *args, **kwargs)
    Autotuner.run = first_config

    class Index(int):
        def to(self, *args, **kwargs):
            return self

    def int_range(*args):
        return map(Index, range(*args))

    import fla.ops.gated_delta_rule
    import fla.ops.simple_gla
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith("fla.ops") and path and ".to(tl.int64)" in open(path).read():
            module.range = int_range

    from velocis.models.deltanet import DELTA_RULES, l2norm
    from velocis.models.positions import Positions

    B, T, H, dk, dv = 2, 75, 2, 16, 16
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)
    ids = torch.stack([torch.cat([torch.arange(20), torch.arange(40), torch.arange(T - 60)]),
                       torch.cat([torch.arange(63), torch.arange(1), torch.arange(T - 64)])])
    worst = 0.0
    for docs, with_state in ((None, True), (Positions.documents(ids), False), (Positions.documents(ids), True)):
        leaves = [(l2norm(r(B, T, H, dk)) * dk ** -0.5), l2norm(r(B, T, H, dk)), r(B, T, H, dv),
                  -0.15 * torch.rand(B, T, H, generator=gen), torch.rand(B, T, H, generator=gen)]
        if with_state:
            leaves.append(r(B, H, dk, dv))
        leaves = [x.requires_grad_() for x in leaves]
        o_w, s_w = r(B, T, H, dv), r(B, H, dk, dv)  # a loss that reads every output and the final state
        results = []
        for name in ("reference", "fla"):
            state = leaves[5] if with_state else None
            o, s = DELTA_RULES[name](*leaves[:5], state, docs)
            grads = torch.autograd.grad((o * o_w).sum() + (s * s_w).sum(), leaves)
            results.append([o, s, *grads])
        for want, got in zip(*results):
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1)).item()
            worst = max(worst, err)
            assert err < 1e-4, (docs is not None, with_state, err)

    from velocis.models.mamba2 import ssd_fla, ssd_reference
    b, T, H, P, G, N = 2, 75, 4, 16, 2, 16
    resets = ids.new_zeros(b, T, dtype=torch.bool)
    resets[:, 1:] = ids[:, 1:] <= ids[:, :-1]
    resets[1, 0] = True  # a reset on the first token: row 1 drops its initial state
    for rs, with_state in ((None, True), (resets, False), (resets, True)):
        leaves = [r(b, T, H, P), torch.rand(b, T, H, generator=gen) * 0.2 + 0.01,
                  -(torch.rand(H, generator=gen) * 0.5 + 0.1), r(b, T, G, N) * 0.3, r(b, T, G, N) * 0.3]
        if with_state:
            leaves.append(r(b, H, P, N))
        leaves = [x.requires_grad_() for x in leaves]
        y_w, s_w = r(b, T, H, P), r(b, H, P, N)
        results = []
        for ssd in (ssd_reference, ssd_fla):
            y, s = ssd(*leaves[:5], leaves[5] if with_state else None, rs)
            grads = torch.autograd.grad((y * y_w).sum() + (s * s_w).sum(), leaves)
            results.append([y, s, *grads])
        for want, got in zip(*results):
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1)).item()
            worst = max(worst, err)
            assert err < 1e-4, ("ssd", rs is not None, with_state, err)

    # the layers' wiring: each with fla against itself running the reference (packed rows, a prefill cache)
    from velocis.config import ModelConfig
    from velocis.models import mamba2
    from velocis.models.deltanet import GatedDeltaNet
    mamba2.fla_runs_on = lambda x: True  # as on CUDA
    T = 40
    ids = torch.stack([torch.cat([torch.arange(15), torch.arange(T - 15)]), torch.arange(T)])
    pos = Positions(ids, Positions.documents(ids), T)
    common = dict(vocab_size=64, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64, max_seq_len=128)
    torch.manual_seed(0)
    layers = [(GatedDeltaNet(ModelConfig(**common, num_kv_heads=2, head_dim=16, mixer_pattern=["gated_deltanet"],
                                         linear_num_key_heads=2, linear_num_value_heads=4)), "impl", "fla", "reference"),
              (mamba2.Mamba2(ModelConfig(**common, mixer="mamba2", layer_feed_forwards=["none"], ssm_state_size=16,
                                         ssm_head_dim=16, ssm_num_groups=2)), "use_reference", False, True)]
    for layer, switch, fast, slow in layers:
        x = torch.randn(2, T, 32, requires_grad=True)
        results = []
        for value in (slow, fast):
            setattr(layer, switch, value)
            layer.zero_grad()
            out = layer(x, pos)
            out.square().sum().backward()
            with torch.no_grad():  # a prefill into a cache (a cache is not for training: it is written in place)
                cache = layer.new_cache(2, T)
                layer(x, pos, cache)
            results.append([out, x.grad.clone(), *cache.buffers(), *(p.grad for p in layer.parameters())])
            x.grad = None
        for want, got in zip(*results):
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1)).item()
            worst = max(worst, err)
            assert err < 1e-4, (type(layer).__name__, err)
    print("worst", worst)
""")


@needs_fla
def test_fla_equals_reference_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "worst" in done.stdout


@pytest.mark.gpu
@needs_fla
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packed", [False, True])
def test_fla_layer_equals_reference_on_cuda(packed):
    """The layer on CUDA (chunked form -> fla) against the same layer running the sequential reference:
    output, input and parameter gradients, and the state a prefill leaves in the cache. Tolerance: Triton's
    dot products use TF32 for fp32 inputs."""
    assert deltanet.fla_available()
    layer = _layer().cuda()
    B, T = 2, 150
    x = torch.randn(B, T, 32, device="cuda", requires_grad=True)
    ids = torch.stack([torch.cat([torch.arange(20), torch.arange(70), torch.arange(T - 90)]),
                       torch.cat([torch.arange(63), torch.arange(1), torch.arange(T - 64)])]).cuda()
    pos = Positions(ids, Positions.documents(ids), T) if packed else Positions.of(torch.arange(T, device="cuda"))
    results = []
    for impl in ("chunk", "reference"):
        layer.impl = impl
        layer.zero_grad()
        out = layer(x, pos)
        (dx,) = torch.autograd.grad(out.square().sum(), x, retain_graph=True)
        out.square().sum().backward()
        with torch.no_grad():  # a prefill into a cache (written in place: not for training)
            cache = layer.new_cache(B, T, device="cuda")
            layer(x, pos, cache)
        results.append([out, dx, *cache.buffers(), *(p.grad for p in layer.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.gpu
@needs_fla
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fla_rule_equals_reference_on_cuda():
    B, T, H, dk, dv = 2, 150, 4, 64, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    ids = torch.stack([torch.cat([torch.arange(20), torch.arange(70), torch.arange(T - 90)]),
                       torch.cat([torch.arange(63), torch.arange(1), torch.arange(T - 64)])]).cuda()
    u = lambda *s: torch.rand(*s, generator=gen, device="cuda")  # noqa: E731
    args = (l2norm(r(B, T, H, dk)) * dk ** -0.5, l2norm(r(B, T, H, dk)), r(B, T, H, dv), -0.15 * u(B, T, H),
            u(B, T, H), r(B, H, dk, dv), Positions.documents(ids))
    want, got = DELTA_RULES["reference"](*args), DELTA_RULES["fla"](*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * b.abs().max().item())


@pytest.mark.gpu
@needs_fla
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packed", [False, True])
def test_fla_mamba2_equals_reference_on_cuda(packed):
    assert deltanet.fla_available()
    torch.manual_seed(0)
    m = mamba2.Mamba2(_mamba_config()).cuda()
    B, T = 2, 150
    x = torch.randn(B, T, 32, device="cuda", requires_grad=True)
    ids = torch.stack([torch.cat([torch.arange(20), torch.arange(70), torch.arange(T - 90)]),
                       torch.cat([torch.arange(63), torch.arange(1), torch.arange(T - 64)])]).cuda()
    pos = Positions(ids, Positions.documents(ids), T) if packed else Positions.of(torch.arange(T, device="cuda"))
    results = []
    for use_reference in (False, True):
        m.use_reference = use_reference
        m.zero_grad()
        out = m(x, pos)
        (dx,) = torch.autograd.grad(out.square().sum(), x, retain_graph=True)
        out.square().sum().backward()
        with torch.no_grad():  # a prefill into a cache (written in place: not for training)
            cache = m.new_cache(B, T, device="cuda")
            m(x, pos, cache)
        results.append([out, dx, *cache.buffers(), *(p.grad for p in m.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
