"""The Triton quantized matmul (velocis.quant.triton_matmul) against the reference
F.linear(x, dequantize(x.dtype), bias), run on the CPU by Triton's interpreter (TRITON_INTERPRET=1,
where a kernel takes CPU tensors), plus a CUDA check of QuantLinear's dispatch where a GPU exists.

Tolerance: max |kernel - reference| / max |reference| over the output, per dtype (the kernel and the
reference round differently: fp32 accumulation order, the output cast, per-channel scales applied
after the dot):  fp32 1e-5, fp16 3e-3, bf16 3e-2. bf16 is loose because the interpreter casts
fp32 -> bf16 by truncation (on a GPU it rounds to nearest) and multiplies bf16 dot operands as raw
bits (triton-lang/triton#11584; the kernel upcasts them to fp32 when interpreting).
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from velocis.quant import linear as qlinear  # noqa: E402
from velocis.quant.formats import QSpec, quantize_rtn  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}

SPECS = [QSpec(8, None, True), QSpec(8, 32, True), QSpec(8, 64, True), QSpec(8, 128, True)] + [
    QSpec(4, g, sym) for g in (32, 64, 128) for sym in (False, True)]


def _ids(spec):
    return spec.describe().replace(" ", "-")


@pytest.fixture
def tm(monkeypatch):
    """triton_matmul with its kernel decorated under TRITON_INTERPRET=1 (triton decides at
    decoration time), reloaded back as it was afterwards."""
    import velocis.quant.triton_matmul as mod

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("VELOCIS_TRITON", raising=False)
    mod = importlib.reload(mod)
    yield mod
    monkeypatch.undo()
    importlib.reload(mod)


def _case(spec, M, K, N, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.1
    qt = quantize_rtn(w, spec)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return qt, x, b


def _check(y, x, qt, b):
    ref = F.linear(x, qt.dequantize(x.dtype), b)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()
    assert err <= TOL[x.dtype], f"relative error {err:.2e} > {TOL[x.dtype]:.0e}"


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@pytest.mark.parametrize("M,K,N,bias", [(1, 100, 48, False), (5, 192, 70, True), (37, 130, 33, True)])
def test_matches_reference_fp16(tm, spec, M, K, N, bias):
    """Every format; K = 100 and 130 are multiples of no group size (padded codes), 192 of 32 and 64."""
    qt, x, b = _case(spec, M, K, N, torch.float16, bias)
    _check(tm.quant_matmul(x, qt.qweight, qt.scales, qt.zeros, spec, K, b), x, qt, b)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference_fp32_bf16(tm, spec, dtype):
    qt, x, b = _case(spec, 6, 160, 40, dtype, True, seed=1)
    _check(tm.quant_matmul(x, qt.qweight, qt.scales, qt.zeros, spec, 160, b), x, qt, b)


@pytest.mark.parametrize("spec", [QSpec(8, None, True), QSpec(4, 32, False), QSpec(4, 128, True)], ids=_ids)
def test_prefill_blocks(tm, spec):
    """M > 64 takes the large tiles (128 x 128): two tiles each way, with ragged edges."""
    qt, x, b = _case(spec, 130, 300, 140, torch.float16, True, seed=2)
    _check(tm.quant_matmul(x, qt.qweight, qt.scales, qt.zeros, spec, 300, b), x, qt, b)


@pytest.mark.parametrize("spec", [QSpec(8, None, True), QSpec(8, 64, True), QSpec(4, 32, False),
                                  QSpec(4, 64, True)], ids=_ids)
@pytest.mark.parametrize("split_k", [1, 3, 64])
def test_small_tiles_and_split_k(tm, spec, split_k):
    """Many tiles in M, N and K (blocks 16 x 16 x 32) and split-K (the GPU's decode path; 64 splits
    is more than there are K steps: empty splits are dropped), bias added after the split sum."""
    qt, x, b = _case(spec, 20, 200, 40, torch.float16, True, seed=3)
    y = tm.quant_matmul(x, qt.qweight, qt.scales, qt.zeros, spec, 200, b, split_k=split_k, blocks=(16, 16, 32))
    _check(y, x, qt, b)


def test_batched_and_strided_input(tm):
    """x [..., K] of any shape, non-contiguous too."""
    spec = QSpec(4, 32, False)
    qt, _, b = _case(spec, 1, 96, 24, torch.float16, True)
    x = torch.randn(3, 96, 4).to(torch.float16).transpose(1, 2)  # [3, 4, 96], stride 1 along dim 1
    y = tm.quant_matmul(x, qt.qweight, qt.scales, qt.zeros, spec, 96, b)
    assert y.shape == (3, 4, 24)
    _check(y, x, qt, b)
    empty = tm.quant_matmul(x[:0], qt.qweight, qt.scales, qt.zeros, spec, 96, b)
    assert empty.shape == (0, 4, 24)


def test_bad_input(tm):
    spec = QSpec(8, None, True)
    qt, x, _ = _case(spec, 2, 64, 16, torch.float16, False)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        tm.quant_matmul(x.double(), qt.qweight, qt.scales, None, spec, 64)
    with pytest.raises(ValueError, match="63 features"):
        tm.quant_matmul(x[:, :63], qt.qweight, qt.scales, None, spec, 64)


def test_switch_and_cpu_path(monkeypatch):
    """VELOCIS_TRITON=0 turns the kernel off; a CPU input never reaches it (the CPU reference runs)."""
    import velocis.quant.triton_matmul as mod

    monkeypatch.setenv("VELOCIS_TRITON", "0")
    assert not mod.enabled()
    monkeypatch.setenv("VELOCIS_TRITON", "1")
    assert mod.enabled()

    def boom(*a, **k):
        raise AssertionError("the Triton kernel ran on a CPU input")

    monkeypatch.setattr(mod, "quant_linear", boom)
    m = qlinear.QuantLinear.from_linear(torch.nn.Linear(64, 8, bias=True), QSpec(4, 32, False))
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.linear(x, m.dequantize(), m.bias))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_dispatch(monkeypatch, spec, dtype):
    """On CUDA, QuantLinear.forward runs the compiled kernel; VELOCIS_TRITON=0 gives the reference."""
    import velocis.quant.triton_matmul as mod

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    calls = []
    real = mod.quant_linear
    monkeypatch.setattr(mod, "quant_linear", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    m = qlinear.QuantLinear.from_linear(torch.nn.Linear(1000, 300, bias=True), spec).to("cuda", dtype)
    for M in (1, 16, 300):
        x = torch.randn(M, 1000, device="cuda", dtype=dtype)
        with torch.no_grad():
            y = m(x)
            monkeypatch.setenv("VELOCIS_TRITON", "0")
            ref = m(x)
            monkeypatch.delenv("VELOCIS_TRITON")
        err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err <= (1e-2 if dtype == torch.bfloat16 else 2e-3), (M, err)
    assert len(calls) == 3
