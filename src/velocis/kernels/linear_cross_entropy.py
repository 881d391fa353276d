"""Fused output projection + cross-entropy, in row chunks (the fast path of the LM loss).

Reference (what the tests hold this to):

    F.cross_entropy((h @ weight.T).float(), targets, ignore_index=ignore_index)

The reference materialises [N, vocab] logits, their log-softmax, and in backward a zero-filled
gradient of the same size plus the log-softmax gradient: for a 4096-token batch and an 8K vocab that
is ~0.5 GB of memory traffic per step, a third of a small model's CPU step. Here each chunk of rows
computes its logits, the loss and the logits' gradient (softmax - one-hot) in place while the chunk
is still in cache, and folds it straight into grad_h and grad_weight; backward only scales the
stored gradients. This is the approach of Liger-Kernel's fused linear cross-entropy.

On CPU in fp32 each chunk's logits are vocab-major and their softmax, loss and gradient are one C++
pass (csrc/fused_cpu.cpp).

Matmuls run in the autocast dtype when autocast is on (bf16 on CPU/GPU), the softmax in fp32, and
grad_weight accumulates in fp32.

reduction "mean" and "sum" precompute the gradients in the forward (the upstream gradient is one
scalar). "none" returns the per-row loss [N]: its upstream gradient differs per row, so the
forward keeps only each row's log-sum-exp and the backward recomputes the logits chunk by chunk
(one extra matmul; still no [N, vocab] tensor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from velocis.kernels import cpu_ops, gemm

# Rows per chunk: ~8M logits (32 MB fp32), 1024 rows at an 8K vocab: the logits and W h^T matmuls get
# wider (W is packed once per chunk) and the per-chunk overhead halves (benchmarks/RESULTS.md), the
# memory small next to the [tokens, vocab] logits it replaces.
CHUNK_LOGITS = 1 << 23


def default_chunk_rows(vocab_size: int) -> int:
    return max(128, min(1024, CHUNK_LOGITS // vocab_size))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _chunk_loss_and_grad(logits, t, v, n_valid, loss, want_grad):
    """Add the chunk's summed loss to `loss` (in place); return d loss/d logits, built in `logits`."""
    target_logit = logits.gather(1, t).squeeze(1)
    # one exp pass: softmax in place, lse = max + log(sum exp(logits - max))
    row_max = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(row_max).exp_()
    row_sum = probs.sum(dim=-1, keepdim=True)
    lse = row_max.squeeze(1) + row_sum.log().squeeze(1)
    loss += ((lse - target_logit) * v).sum()
    if not want_grad:
        return None
    # d loss / d logits = (softmax - one_hot) * valid / n_valid, built in place
    probs.mul_(v.to(probs.dtype)[:, None] / (row_sum * n_valid))
    probs.scatter_add_(1, t, -(v.to(probs.dtype) / n_valid)[:, None])
    return probs


def _chunked_loss_and_grads(h, weight, targets, ignore_index, chunk_rows, compute_dtype, want_grad_h, want_grad_w,
                            mean=True):
    """(mean (or summed) loss, d loss/d h or None, d loss/d weight (fp32) or None), one chunk of rows at a time."""
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))  # ignored rows gather column 0, masked out
    n_valid = valid.sum().clamp(min=1).to(torch.float32) if mean else torch.ones((), device=h.device)
    w = weight.to(compute_dtype)
    grad_h = torch.empty_like(h) if want_grad_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_w else None
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    # one logits buffer for every chunk: a fresh 16 MB block per chunk is fresh pages from the OS on
    # CPU (glibc mmaps blocks that size), and the page faults halved the logits matmul's speed
    buf = torch.empty(min(chunk_rows, h.shape[0]), weight.shape[0], dtype=compute_dtype, device=h.device)
    if (want_grad_h or want_grad_w) and compute_dtype == torch.float32 and cpu_ops.usable(h, weight):
        return _chunked_vocab_major_cpu(h, w, targets, ignore_index, chunk_rows, n_valid, buf, grad_h, grad_w)
    for s in range(0, h.shape[0], chunk_rows):
        hc = h[s:s + chunk_rows].to(compute_dtype)
        logits = torch.mm(hc, w.t(), out=buf[:hc.shape[0]]).float()
        g = _chunk_loss_and_grad(logits, safe_t[s:s + chunk_rows, None], valid[s:s + chunk_rows], n_valid,
                                 loss, want_grad_h or want_grad_w)
        if g is None:
            continue
        g = g.to(compute_dtype)
        if grad_h is not None:
            if grad_h.dtype == compute_dtype:
                torch.mm(g, w, out=grad_h[s:s + chunk_rows])
            else:
                grad_h[s:s + chunk_rows] = (g @ w).to(h.dtype)
        if grad_w is not None:
            if compute_dtype == torch.float32:
                grad_w.addmm_(g.t(), hc)
            else:
                grad_w += (g.t() @ hc).float()
    return loss / n_valid, grad_h, grad_w


def _chunked_vocab_major_cpu(h, w, targets, ignore_index, chunk_rows, n_valid, buf, grad_h, grad_w):
    """CPU fp32: each chunk's logits as [vocab, rows] (= W h^T), loss and gradient in one C++ pass
    (csrc/fused_cpu.cpp). At a small hidden size these three matmuls (W h^T, g^T W, g h) ran faster
    than the row-major ones (benchmarks/RESULTS.md); they go through Velocis' GEMM (kernels/gemm.py),
    torch.mm where it is not built."""
    loss = 0.0
    flat = buf.view(-1)
    for s in range(0, h.shape[0], chunk_rows):
        hc = h[s:s + chunk_rows]
        zt = gemm.mm(w, hc.t(), out=flat[:w.shape[0] * hc.shape[0]].view(w.shape[0], hc.shape[0]))
        loss += cpu_ops.ops().xent_grad_cols_(zt, targets[s:s + chunk_rows].contiguous(), ignore_index,
                                              1.0 / float(n_valid))
        if grad_h is not None:
            gemm.mm(zt.t(), w, out=grad_h[s:s + chunk_rows])
        if grad_w is not None:
            gemm.mm(zt, hc, out=grad_w, beta=1.0)
    return torch.tensor(loss, dtype=torch.float32) / n_valid, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_rows, compute_dtype, mean):
        loss, grad_h, grad_w = _chunked_loss_and_grads(h, weight, targets, ignore_index, chunk_rows, compute_dtype,
                                                       ctx.needs_input_grad[0], ctx.needs_input_grad[1], mean)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def _per_row_lse_and_target(h, w, t, chunk_rows, compute_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-sum-exp and target logit [N] (fp32), a chunk of rows at a time."""
    lse, target = [], []
    for s in range(0, h.shape[0], chunk_rows):
        z = torch.mm(h[s:s + chunk_rows].to(compute_dtype), w.t()).float()
        lse.append(torch.logsumexp(z, dim=-1))
        target.append(z.gather(1, t[s:s + chunk_rows, None]).squeeze(1))
    return torch.cat(lse), torch.cat(target)


class _LinearCrossEntropyPerRow(torch.autograd.Function):
    """reduction="none": loss [N]; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_rows, compute_dtype):
        w = weight.to(compute_dtype)
        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        lse, target_logit = _per_row_lse_and_target(h, w, safe_t, chunk_rows, compute_dtype)
        ctx.save_for_backward(h, weight, safe_t, valid, lse)
        ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
        return (lse - target_logit) * valid

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, safe_t, valid, lse = ctx.saved_tensors
        cd, rows = ctx.compute_dtype, ctx.chunk_rows
        w = weight.to(cd)
        scale = (grad_out.float() * valid)  # d loss_i = scale_i * (softmax_i - onehot_i)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], rows):
            hc = h[s:s + rows].to(cd)
            g = torch.mm(hc, w.t()).float().sub_(lse[s:s + rows, None]).exp_().mul_(scale[s:s + rows, None])
            g.scatter_add_(1, safe_t[s:s + rows, None], -scale[s:s + rows, None])
            g = g.to(cd)
            if grad_h is not None:
                grad_h[s:s + rows] = (g @ w).to(h.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ hc).float()
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``h @ weight.T`` against ``targets``: "mean" / "sum" over non-ignored rows, or
    "none" -> [N] (0 at ignored rows).

    h [N, H] (already normed), weight [vocab, H], targets [N] (long). Same value and gradients as
    the reference above; the [N, vocab] logits never exist at once.
    """
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"h must be [N, H] and targets [N]; got {tuple(h.shape)} and {tuple(targets.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    compute_dtype = _compute_dtype(h)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        if reduction == "none":
            return _LinearCrossEntropyPerRow.apply(h, weight, targets, ignore_index, chunk_rows, compute_dtype)
        mean = reduction == "mean"
        if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
            return _chunked_loss_and_grads(h, weight, targets, ignore_index, chunk_rows, compute_dtype, False, False,
                                           mean)[0]
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_rows, compute_dtype, mean)


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index, reduction=reduction)
