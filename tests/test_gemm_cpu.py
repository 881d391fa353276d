"""The C++ GEMM and the Linear built on it (kernels/gemm.py) against torch.addmm / F.linear."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from velocis.kernels import cpu_ops, gemm

needs_gemm = pytest.mark.skipif(not gemm._supported(), reason="C++ GEMM not built for this CPU (needs AVX2 + FMA)")


def _operand(rows, cols, transposed):
    """[rows, cols], row-major or as the transpose of a [cols, rows] tensor (a strided view)."""
    return torch.randn(cols, rows).t() if transposed else torch.randn(rows, cols)


@needs_gemm
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 5, 3), (6, 16, 64), (100, 33, 300), (13, 700, 513),
                                   (130, 20, 2500)])  # 2500: three depth passes
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_gemm_matches_addmm(m, n, k, ta, tb, beta):
    torch.manual_seed(0)
    a, b, c = _operand(m, k, ta), _operand(k, n, tb), torch.randn(m, n)
    want = torch.addmm(c, a, b, beta=beta, alpha=2.0)
    got = cpu_ops.ops().gemm_(c.clone(), a, b, beta, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_gemm
def test_gemm_beta_zero_ignores_garbage_and_writes_into_a_view():
    """beta = 0 never reads C (NaNs there stay out), and C may be a column slice of a wider tensor."""
    a, b = torch.randn(70, 40), torch.randn(40, 24)
    wide = torch.full((70, 30), float("nan"))
    cpu_ops.ops().gemm_(wide[:, 3:27], a, b, 0.0, 1.0)
    torch.testing.assert_close(wide[:, 3:27], a @ b, rtol=1e-5, atol=1e-5)
    assert wide[:, :3].isnan().all() and wide[:, 27:].isnan().all()


@needs_gemm
def test_gemm_same_result_for_any_thread_count():
    a, b = torch.randn(300, 200), torch.randn(200, 90)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.ops().gemm_(torch.empty(300, 90), a, b, 0.0, 1.0)
        torch.set_num_threads(2)
        two = cpu_ops.ops().gemm_(torch.empty(300, 90), a, b, 0.0, 1.0)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


@needs_gemm
def test_gemm_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError, match="do not match"):
        cpu_ops.ops().gemm_(torch.empty(4, 5), torch.randn(4, 3), torch.randn(2, 5), 0.0, 1.0)


@pytest.mark.parametrize("shape,out_features", [((4, 64, 256), 704), ((2, 100, 704), 256), ((200, 40), 1500),
                                                 ((1, 3, 32), 48)])  # 3 rows: F.linear
def test_linear_matches_f_linear(shape, out_features):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(out_features, shape[-1]) * 0.05
    grad = torch.randn(*shape[:-1], out_features)
    got, want = [], []
    for fn, res in ((gemm.linear, got), (F.linear, want)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi)
        y.backward(grad)
        res += [y.detach(), xi.grad, wi.grad]
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=2e-5)


@needs_gemm
def test_linear_takes_the_fast_path_only_where_it_should():
    x, w = torch.randn(128, 256, requires_grad=True), torch.randn(64, 256)
    assert type(gemm.linear(x, w).grad_fn).__name__ == "_LinearCPUBackward"
    assert type(gemm.linear(x[:8], w).grad_fn).__name__ != "_LinearCPUBackward"  # decode-sized
    assert type(gemm.linear(x, w, torch.zeros(64)).grad_fn).__name__ != "_LinearCPUBackward"  # bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm.linear(x, w).dtype == torch.bfloat16  # autocast: F.linear casts


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    ours, theirs = gemm.Linear(32, 16, bias=False), nn.Linear(32, 16, bias=False)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == ["weight"]
    x = torch.randn(5, 70, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@needs_gemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 63])  # the kernel's tiles of 4 tokens, then 2, then 1
def test_few_rows_inference_matches_f_linear(dtype, rows):
    """Decode-sized inference products take the decode kernels (fp32 accumulation); widths that are
    not a multiple of the vector (100) and out features not a multiple of 4 (37) take the tails."""
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 100).to(dtype), (torch.randn(37, 100) * 0.1).to(dtype), torch.randn(37).to(dtype)
    assert gemm.few_rows_ok(rows, x, w)
    with torch.no_grad():
        got = gemm.linear(x, w, b)
    want = F.linear(x.float(), w.float(), b.float()).to(dtype)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@needs_gemm
def test_few_rows_path_only_for_inference():
    x, w = torch.randn(4, 64), torch.randn(32, 64)
    assert gemm.few_rows_ok(4, x, w)
    assert not gemm.few_rows_ok(4, x.requires_grad_(), w)  # training keeps F.linear's autograd
    assert not gemm.few_rows_ok(64, x.detach(), w)  # the GEMM's rows
    assert not gemm.few_rows_ok(4, x.detach().double(), w.double())
    with torch.no_grad():
        assert gemm.few_rows_ok(4, x, w)


@needs_gemm
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_bf16_products_accumulate_exactly_in_fp32(rows):
    """bf16 weights x bf16 activations (the AVX512-BF16 dot path where the CPU has it, else the
    widening one): the products of bf16 values are exact in fp32, so the result is the fp32
    product of the same values up to summation order; widths 100 and 37 take both tails."""
    torch.manual_seed(1)
    x, w = torch.randn(rows, 100).bfloat16(), torch.randn(37, 100).bfloat16()
    got = cpu_ops.ops().matvec(x, gemm.BF16_ACTS, w, gemm._EMPTY, gemm._EMPTY, 37, 100, 0, False)
    want = x.float() @ w.float().t()
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
