"""The C++ CPU attention kernel (kernels/attention_cpu.py) against SDPA, its reference."""
import pytest
import torch
import torch.nn.functional as F

from velocis.kernels import attention_cpu, cpu_ops

pytestmark = pytest.mark.skipif(not cpu_ops.available(),
                                reason="the CPU attention kernel cannot be built here (no C++ compiler?)")


@pytest.mark.parametrize("B,H,KV,T,D", [(2, 4, 2, 100, 16), (3, 3, 1, 130, 8), (1, 2, 2, 64, 32), (2, 4, 4, 1, 8)])
def test_matches_sdpa_values_and_grads(B, H, KV, T, D):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D)
    dout = torch.randn(B, H, T, D)

    def run(fn):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        out.backward(dout)
        return [out.detach()] + [t.grad for t in ins]

    want = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=H != KV))
    assert attention_cpu.supports(q, k, v)
    got = run(attention_cpu.causal_attention)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_takes_strided_views_like_the_attention_layer():
    torch.manual_seed(0)
    v = torch.randn(2, 16, 2, 8).transpose(1, 2)  # [B, KV, T, D] view of a [B, T, KV, D] projection
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attention_cpu.causal_attention(q, k, v), want, rtol=1e-5, atol=1e-5)


def test_projection_layout_in_and_out_without_copies():
    """[B, T, heads, D] projections in; output and grads come back in that layout, values as SDPA's."""
    torch.manual_seed(0)
    B, T, H, KV, D = 2, 70, 4, 2, 16
    base = [torch.randn(B, T, n, D) for n in (H, KV, KV)]
    dout = torch.randn(B, T, H, D)

    def run(fn):
        ins = [t.clone().requires_grad_(True) for t in base]
        out = fn(*(t.transpose(1, 2) for t in ins))
        out.backward(dout.transpose(1, 2))
        return [out] + [t.grad for t in ins]

    want = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True))
    got = run(attention_cpu.causal_attention)
    assert got[0].transpose(1, 2).is_contiguous()  # the output projection reads it as is
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_declines_what_it_does_not_take():
    q = torch.randn(1, 2, 8, 16)
    assert not attention_cpu.supports(q.double(), q.double(), q.double())
    assert not attention_cpu.supports(q, q[..., :8], q[..., :8])  # MLA-style: v/k head dims differ from q
    assert not attention_cpu.supports(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))  # 3 kv heads for 2


@pytest.mark.parametrize("R,H,KV,S,D", [(5, 6, 2, 40, 16), (3, 4, 4, 17, 64), (1, 2, 1, 1, 8)])
def test_decode_attention_matches_masked_sdpa(R, H, KV, S, D):
    """The engine's batched decodes: one query per row over its first lens[r] slots of a padded
    working copy (read through a strided view; the slots past a row's length hold garbage)."""
    torch.manual_seed(0)
    q = torch.randn(R, H, D)
    work_k, work_v = torch.randn(R + 2, KV, S + 5, D), torch.randn(R + 2, KV, S + 5, D)
    k, v = work_k[:R, :, :S], work_v[:R, :, :S]
    lens = torch.randint(1, S + 1, (R,))
    lens[0] = S
    filled = torch.arange(S) < lens[:, None]
    mask = torch.zeros(R, S).masked_fill_(~filled, float("-inf"))[:, None, None]
    want = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=0.3, enable_gqa=H != KV)[:, :, 0]
    assert attention_cpu.decode_supported(q, k, v)
    torch.testing.assert_close(attention_cpu.decode_attention(q, k, v, lens, 0.3), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="lens"):
        attention_cpu.decode_attention(q, k, v, torch.zeros(R, dtype=torch.long), 0.3)
    for dtype in (torch.bfloat16, torch.float16):  # a 16-bit model's cache: read as stored, computed in fp32
        q16, k16, v16 = q.to(dtype), k.to(dtype), v.to(dtype)
        want16 = F.scaled_dot_product_attention(q16.float()[:, :, None], k16.float(), v16.float(), attn_mask=mask,
                                                scale=0.3, enable_gqa=H != KV)[:, :, 0]
        got16 = attention_cpu.decode_attention(q16, k16, v16, lens, 0.3)
        assert got16.dtype == dtype
        torch.testing.assert_close(got16.float(), want16.to(dtype).float(), rtol=1e-2, atol=1e-2)
