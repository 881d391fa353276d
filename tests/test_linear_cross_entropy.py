"""The chunked LM-head cross-entropy kernel against its plain-PyTorch reference."""
import pytest
import torch

from velocis.config import get_preset
from velocis.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from velocis.models import VelocisModel


def _loss_and_grads(fn, h0, w0, t, autocast=False, **kw):
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, t, **kw)
    (loss * 3.0).backward()  # a non-unit upstream gradient must scale the stored ones
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_matches_reference_fp32_with_ignored_rows(chunk_rows):
    torch.manual_seed(0)
    h, w = torch.randn(70, 16), torch.randn(50, 16)
    t = torch.randint(0, 50, (70,))
    t[::5] = -100
    ref = _loss_and_grads(linear_cross_entropy_reference, h, w, t)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=chunk_rows)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_matches_reference_under_bf16_autocast():
    torch.manual_seed(0)
    h, w, t = torch.randn(64, 32), torch.randn(100, 32) * 0.1, torch.randint(0, 100, (64,))
    ref = _loss_and_grads(linear_cross_entropy_reference, h, w, t, autocast=True)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, autocast=True, chunk_rows=16)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-3)


def test_all_rows_ignored_gives_zero_loss_and_grads():
    h, w, t = torch.randn(8, 4), torch.randn(10, 4), torch.full((8,), -100)
    loss, gh, gw = _loss_and_grads(linear_cross_entropy, h, w, t)
    assert loss.item() == 0.0 and gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_no_grad_gives_the_loss_only(monkeypatch):
    """Validation (no_grad) must not pay for the gradients the training path computes in forward."""
    from velocis.kernels import linear_cross_entropy as lce

    def no_autograd(*args):
        raise AssertionError("the autograd path ran under no_grad")

    monkeypatch.setattr(lce._LinearCrossEntropy, "apply", no_autograd)
    torch.manual_seed(0)
    h, w, t = torch.randn(20, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True), torch.randint(0, 30, (20,))
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, chunk_rows=6)
    torch.testing.assert_close(got, linear_cross_entropy_reference(h, w, t))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))


def test_model_loss_fused_equals_reference_path():
    torch.manual_seed(0)
    cfg = get_preset("micro").replace(num_layers=2, vocab_size=300)
    model = VelocisModel(cfg)
    x = torch.randint(0, 300, (2, 24))
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        model.fused_loss = fused
        loss = model(x, y).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_plain_pytorch_chunk_path_matches_reference(monkeypatch):
    """Where the C++ kernels are not built (or off CPU), each chunk takes the PyTorch ops."""
    from velocis.kernels import cpu_ops

    monkeypatch.setattr(cpu_ops, "usable", lambda *tensors: False)
    torch.manual_seed(0)
    h, w = torch.randn(50, 16), torch.randn(40, 16)
    t = torch.randint(0, 40, (50,))
    t[::7] = -100
    want = _loss_and_grads(linear_cross_entropy_reference, h, w, t)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=16)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_extreme_logits_keep_a_finite_exact_loss():
    """Targets whose exp underflows to 0 next to the row max: the loss must come from the logit itself."""
    torch.manual_seed(0)
    h, w = torch.randn(40, 16) * 30, torch.randn(60, 16)
    t = torch.randint(0, 60, (40,))
    want = _loss_and_grads(linear_cross_entropy_reference, h, w, t)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=32)
    assert torch.isfinite(got[0]) and want[0] > 50
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
