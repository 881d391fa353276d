"""The fast RMSNorm and RoPE paths (kernels/) against their plain-PyTorch references."""
import pytest
import torch

from velocis.kernels.rms_norm import rms_norm, rms_norm_reference
from velocis.kernels.rope import apply_rope_halves
from velocis.models.rope import RotaryEmbedding, apply_rope_reference


def _value_and_grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    torch.manual_seed(1)
    out.backward(torch.randn(out.shape))  # not randn_like: that follows the output's strides
    return [out.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 7, 4, 8), (9, 32)])
def test_rms_norm_matches_reference(shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    want = _value_and_grads(lambda a, b: rms_norm_reference(a, b, 1e-5), x, w)
    got = _value_and_grads(lambda a, b: rms_norm(a, b, 1e-5), x, w)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_rms_norm_other_dtypes_take_the_reference():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("scaling", [None, {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}])
def test_rope_matches_reference(scaling, cpu_kernels, monkeypatch):
    """Both the C++ pass and the PyTorch ops (no compiler, GPU) against the reference."""
    from velocis.kernels import cpu_ops

    if not cpu_kernels:
        monkeypatch.setattr(cpu_ops, "usable", lambda *tensors: False)
    torch.manual_seed(0)
    rot = RotaryEmbedding(16, 10000.0, scaling)
    cos, sin = rot(torch.arange(11), torch.float32)
    x = torch.randn(2, 11, 3, 16).transpose(1, 2)  # [B, heads, T, d], a strided view as in attention
    want = _value_and_grads(lambda a: apply_rope_reference(a, cos, sin), x)
    got = _value_and_grads(lambda a: apply_rope_halves(a, cos, sin), x)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    assert got[0].transpose(1, 2).is_contiguous()  # the input's layout is kept: no transposing copy
    with torch.no_grad():
        torch.testing.assert_close(apply_rope_halves(x, cos, sin), apply_rope_reference(x, cos, sin))


def test_kernels_trace_under_torch_compile():
    """Under torch.compile the kernels hand over to the plain forms (inductor fuses those); the
    compiled loss and gradients equal eager ones. aot_eager: no C++ compiler needed."""
    from velocis.config import ModelConfig
    from velocis.models import VelocisModel

    torch.manual_seed(0)
    model = VelocisModel(ModelConfig(vocab_size=64, hidden_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                     mlp_dim=64, max_seq_len=32))
    x = torch.randint(0, 64, (2, 16))
    y = torch.roll(x, -1, 1)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(x, y)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads(lambda a, b: model(a, b).loss)
    compiled = loss_and_grads(torch.compile(lambda a, b: model(a, b).loss, backend="aot_eager"))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 7, 40), (5, 16)])
def test_rms_norm_python_function_matches_reference(shape):
    """The autograd.Function used where the C++ kernels are not (GPU fp32, no compiler)."""
    from velocis.kernels.rms_norm import _RMSNorm

    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    want = _value_and_grads(lambda a, b: rms_norm_reference(a, b, 1e-5), x, w)
    got = _value_and_grads(lambda a, b: _RMSNorm.apply(a, b, 1e-5), x, w)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 24), (4097,)])
def test_swiglu_matches_reference(shape):
    from velocis.kernels.swiglu import swiglu, swiglu_reference

    torch.manual_seed(0)
    g, u = torch.randn(shape) * 4, torch.randn(shape)
    want = _value_and_grads(swiglu_reference, g, u)
    got = _value_and_grads(swiglu, g, u)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
