"""Gated DeltaNet (MIXERS["gated_deltanet"]): Qwen3-Next's linear attention, a fixed-size recurrent state.

Per layer (parameter names and layouts match transformers' Qwen3NextGatedDeltaNet, so HF tensors copy as they are):
  in_proj_qkvz  x -> per key head i: [q_i (dk) | k_i (dk) | v (r*dv) | z (r*dv)], r = value heads per key head
  in_proj_ba    x -> per key head i: [b (r) | a (r)]
  conv1d        depthwise causal convolution (kernel K, no bias) over the channels [q | k | v], then SiLU
  q, k          L2-normalised per head (eps 1e-6); q scaled by dk^-0.5; each key head serves r value heads
  beta          sigmoid(b)                                the delta rule's write strength, in (0, 1)
  g             -exp(A_log) * softplus(a + dt_bias)       log decay (<= 0) of the state at this token
  state         S [dk, dv] per value head; at every token
                  S = exp(g) S;  u = beta (v - S^T k);  S = S + k u^T;  o = S^T q
  norm          gated RMSNorm per value head: weight * rmsnorm(o) * silu(z)
  out_proj      [heads * dv] -> hidden

Three forms of the recurrence compute the same thing (tests hold them to one another, values and
gradients, fp32):
  reference   `delta_rule_reference`: one row, one head, one token at a time, a [dk, dv] matrix;
              the readable spec.
  recurrent   `recurrent_gated_delta_rule`: the same steps batched over rows and heads; decoding.
  chunked     `chunk_gated_delta_rule` (chunks of 64 tokens, like transformers' torch fallback and
              flash-linear-attention): within a chunk the sequential updates fold into one triangular
              solve (the UT transform), so a chunk costs a few matmuls and only the chunks run in order.
  fla         `fla_gated_delta_rule`: flash-linear-attention's Triton kernels (optional extra `fla`); the
              chunked form runs it instead on CUDA when it imports (`chunk_rule_for`); tests hold it to the
              reference too.
Packed rows (positions restarting inside a row, `Positions.doc_ids`): every document starts from a
zero state and a zero convolution window. The chunked form does it with masks: decays between two
tokens of different documents are 0, so no term crosses a boundary.

The cache is a "state" cache (models/cache.py): per row the last K-1 convolution inputs and the
recurrent state, updated in place; its size does not grow with the sequence. The recurrent state is
kept in fp32 whatever the model's dtype (it accumulates over the whole sequence).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from velocis.errors import VelocisError
from velocis.kernels.gemm import Linear
from velocis.models.cache import LayerCache
from velocis.models.mixer import Mixer
from velocis.models.positions import Positions
from velocis.models.registry import register_mixer

CHUNK_SIZE = 64
L2_EPS = 1e-6  # as flash-linear-attention and transformers' l2norm


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# --------------------------------------------------------------------------- the short convolution
def causal_conv(x: torch.Tensor, weight: torch.Tensor, prev: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution. x [B, T, C]; weight [C, K]; prev [B, K-1, C]: the inputs before x
    (a cache's window; zeros when None); doc_ids [B, T]: a token never sees inputs of an earlier document.
    -> (y [B, T, C], the window after x [B, K-1, C]: the last K-1 inputs, earlier documents zeroed)."""
    B, T, C = x.shape
    K = weight.shape[1]
    if prev is None:
        prev = x.new_zeros(B, K - 1, C)
    xs = torch.cat([prev.to(x.dtype), x], dim=1)  # [B, K-1+T, C]
    if doc_ids is None:
        y = F.conv1d(xs.transpose(1, 2), weight.unsqueeze(1).to(x.dtype), groups=C).transpose(1, 2)
        return y, xs[:, T:]
    # packed documents: out[t] = sum_j w[K-1-j] x[t-j], only over t-j in t's document; the window
    # before the row belongs to its first document
    docs = torch.cat([doc_ids[:, :1].expand(B, K - 1), doc_ids], dim=1)  # [B, K-1+T]
    y = torch.zeros_like(x)
    for j in range(K):
        seen = xs[:, K - 1 - j: K - 1 - j + T]
        same = (docs[:, K - 1 - j: K - 1 - j + T] == doc_ids).unsqueeze(-1)
        y = y + torch.where(same, seen, torch.zeros_like(seen)) * weight[:, K - 1 - j].to(x.dtype)
    window = xs[:, T:] * (docs[:, T:] == doc_ids[:, -1:]).unsqueeze(-1).to(x.dtype)
    return y, window


def causal_conv_reference(x: torch.Tensor, weight: torch.Tensor, prev: torch.Tensor | None = None,
                          doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same convolution written per token: the window of the last K inputs of its document."""
    B, T, C = x.shape
    K = weight.shape[1]
    zero = torch.zeros(C, dtype=x.dtype, device=x.device)
    rows, windows = [], []
    for b in range(B):
        history = [zero] * (K - 1) if prev is None else list(prev[b].to(x.dtype))  # the K-1 inputs before t
        out = []
        for t in range(T):
            if doc_ids is not None and t > 0 and doc_ids[b, t] != doc_ids[b, t - 1]:
                history = [zero] * (K - 1)  # a new document: nothing before it is seen
            window = history + [x[b, t]]
            out.append(sum(weight[:, j] * window[j] for j in range(K)))
            history = window[1:]
        rows.append(torch.stack(out))
        windows.append(torch.stack(history) if history else x.new_zeros(0, C))
    return torch.stack(rows), torch.stack(windows)


# --------------------------------------------------------------------------- the gated delta rule
# All three take q, k [B, T, H, dk] (normalised, q scaled, already one per value head), v [B, T, H, dv],
# g, beta [B, T, H], an optional initial state [B, H, dk, dv] and doc_ids [B, T]; they return
# (o [B, T, H, dv], final state [B, H, dk, dv]), all fp32.

def delta_rule_reference(q, k, v, g, beta, state=None, doc_ids=None):
    """One row, one head, one token at a time: the readable spec of the recurrence."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    outs, finals = [], []
    for b in range(B):
        row_out, row_state = [], []
        for h in range(H):
            S = torch.zeros(dk, dv, dtype=torch.float32, device=v.device) if state is None else state[b, h].float()
            o = []
            for t in range(T):
                if doc_ids is not None and t > 0 and doc_ids[b, t] != doc_ids[b, t - 1]:
                    S = torch.zeros_like(S)  # a new document forgets everything
                S = torch.exp(g[b, t, h]) * S
                u = beta[b, t, h] * (v[b, t, h] - k[b, t, h] @ S)  # the delta: what S mispredicts for k
                S = S + torch.outer(k[b, t, h], u)
                o.append(q[b, t, h] @ S)
            row_out.append(torch.stack(o))
            row_state.append(S)
        outs.append(torch.stack(row_out, 1))
        finals.append(torch.stack(row_state))
    return torch.stack(outs), torch.stack(finals)


def recurrent_gated_delta_rule(q, k, v, g, beta, state=None, doc_ids=None):
    """Token by token, batched over rows and heads (the decoding form)."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    S = torch.zeros(B, H, dk, dv, dtype=torch.float32, device=v.device) if state is None else state.float()
    decay = g.float().exp()
    out = []
    for t in range(T):
        if doc_ids is not None and t > 0:
            S = S * (doc_ids[:, t] == doc_ids[:, t - 1]).to(S.dtype)[:, None, None, None]
        S = S * decay[:, t, :, None, None]
        kt = k[:, t].float()
        u = beta[:, t, :, None].float() * (v[:, t].float() - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt[..., :, None] * u[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
    return torch.stack(out, 1), S


def segment_sums(g: torch.Tensor) -> torch.Tensor:
    """g [..., C] -> [..., C, C]: entry (i, j) = sum of g over j < m <= i (0 on the diagonal), each summed
    from scratch rather than as cumsum_i - cumsum_j: with strong decays the cumulative sums reach
    -1000 and their differences would keep only ~4 significant digits (as in Mamba's ssd_minimal)."""
    C = g.shape[-1]
    below = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    terms = g[..., :, None].expand(*g.shape, C).masked_fill(~below, 0)  # (m, j) -> g_m where m > j
    return terms.cumsum(-2)


def chunk_gated_delta_rule(q, k, v, g, beta, state=None, doc_ids=None, chunk_size: int = CHUNK_SIZE):
    """Chunks of `chunk_size` tokens. Within a chunk (start state S0, tokens i, decay D_ij = prod_{j<m<=i} a_m
    with a_m = exp(g_m), D_i the decay since the chunk's start), the updates u_i satisfy
        u_i + sum_{j<i} beta_i (k_i . k_j) D_ij u_j = beta_i v_i - beta_i D_i S0^T k_i,
    a unit lower-triangular system (I + A) U = V_beta - (D K_beta) S0, solved once per chunk; then
        o_i = D_i S0^T q_i + sum_{j<=i} D_ij (q_i . k_j) u_j,   S_end = D_end S0 + sum_j D_end,j k_j u_j^T.
    Packed documents: D is 0 between tokens of different documents (and from the chunk's start / to
    its end for tokens of another document than the state's)."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    C = chunk_size
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, d]
    g, beta = g.float().transpose(1, 2), beta.float().transpose(1, 2)  # [B, H, T]
    pad = (C - T % C) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
        if doc_ids is not None:  # padding continues the last document (it comes after every real token)
            doc_ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(B, pad)], dim=1)
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, -1) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, C), beta.reshape(B, H, n, C)
    kb, vb = k * beta[..., None], v * beta[..., None]
    c = g.cumsum(-1)  # log decay from the chunk's start to token i (inclusive)
    seg = segment_sums(g)  # log D_ij, summed afresh for every j: no cancellation where c is large
    causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
    if doc_ids is None:
        pair_ok = causal
        from_start = to_end = carry = None
    else:
        d = doc_ids.reshape(B, 1, n, C)
        before = torch.cat([d[:, :, :1, 0], d[:, :, :-1, -1]], dim=2)  # the document of the state entering a chunk
        pair_ok = causal & (d[..., :, None] == d[..., None, :])
        from_start, to_end, carry = d == before[..., None], d == d[..., -1:], d[..., -1] == before
    decay_ij = seg.masked_fill(~pair_ok, float("-inf")).exp()  # D_ij, 0 off-limits
    decay_i = c.exp()  # D_i
    decay_to_end = seg[..., -1, :].exp()  # D_end,j
    decay_chunk = c[..., -1].exp()  # D_end
    if doc_ids is not None:
        zero = torch.zeros((), dtype=c.dtype, device=c.device)
        decay_i = torch.where(from_start, decay_i, zero)
        decay_to_end = torch.where(to_end, decay_to_end, zero)
        decay_chunk = torch.where(carry, decay_chunk, zero)
    A = (kb @ k.transpose(-1, -2)) * decay_ij  # only its strictly lower part is read (unit diagonal)
    eye_solve = lambda rhs: torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # noqa: E731
    U0, W = eye_solve(vb), eye_solve(kb * decay_i[..., None])  # U = U0 - W S0
    intra = (q @ k.transpose(-1, -2)) * decay_ij
    q_in, k_out = q * decay_i[..., None], k * decay_to_end[..., None]
    S = torch.zeros(B, H, dk, dv, dtype=torch.float32, device=v.device) if state is None else state.float()
    out = []
    for i in range(n):
        u = U0[:, :, i] - W[:, :, i] @ S
        out.append(q_in[:, :, i] @ S + intra[:, :, i] @ u)
        S = S * decay_chunk[:, :, i, None, None] + k_out[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(out, 2).reshape(B, H, n * C, dv)[:, :, :T]
    return o.transpose(1, 2), S


def fla_varlen(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flash-linear-attention's varlen form of packed rows: starts [B, T] (True at each document's first
    token) -> (cu_seqlens of the rows flattened into one sequence, cut at every row and document start;
    each row's first document; each row's last document), as indices into fla's per-document states."""
    B, T = starts.shape
    starts = starts.clone()
    starts[:, 0] = True
    first = starts.reshape(-1).nonzero().squeeze(1)  # flat index of each document's first token
    cu_seqlens = torch.cat([first, first.new_tensor([B * T])])
    row_starts = torch.arange(B, device=first.device) * T
    return cu_seqlens, torch.searchsorted(first, row_starts), torch.searchsorted(first, row_starts + T) - 1


def fla_gated_delta_rule(q, k, v, g, beta, state=None, doc_ids=None):
    """flash-linear-attention's chunked Triton kernels (`pip install velocis[fla]`, CUDA), mapped onto the
    conventions above: q and k arrive normalised and q scaled (so scale 1, no in-kernel L2 norm), one key
    head per value head, g in log space, beta after the sigmoid, states [dk, dv]. Packed documents become
    fla's varlen form (`fla_varlen`): a row's state enters its first document (later ones start from zero,
    as in the reference) and its final state is its last document's."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    B, T, H, dk = k.shape
    dv = v.shape[-1]
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    state = None if state is None else state.float()
    if doc_ids is None:
        return fla_chunk(q, k, v, g, beta, scale=1.0, initial_state=state, output_final_state=True)
    starts = F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0))
    cu_seqlens, row_first, row_last = fla_varlen(starts)
    if state is not None:
        state = state.new_zeros(len(cu_seqlens) - 1, H, dk, dv).index_copy(0, row_first, state)
    flat = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta))
    o, final = fla_chunk(*flat, scale=1.0, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
    return o.reshape(B, T, H, dv), final[row_last]


@functools.cache
def fla_available() -> bool:
    """Whether flash-linear-attention's kernels import (asked only for CUDA inputs)."""
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        import fla.ops.simple_gla  # noqa: F401  (Mamba-2's SSD, models/mamba2.py)
    except Exception:  # not installed, or installed against another torch / triton
        return False
    return True


def fla_runs_on(x: torch.Tensor) -> bool:
    """fla's kernels replace a chunked PyTorch form for CUDA tensors (not fp64: Triton's dots are fp32 at most)."""
    return x.is_cuda and x.dtype != torch.float64 and fla_available()


def chunk_rule_for(x: torch.Tensor) -> str:
    """The chunked form to run for tensors like x: fla's kernels on CUDA when installed, else the PyTorch one
    (the reference for fla, and the CPU path)."""
    return "fla" if fla_runs_on(x) else "chunk"


DELTA_RULES = {"reference": delta_rule_reference, "recurrent": recurrent_gated_delta_rule,
               "chunk": chunk_gated_delta_rule, "fla": fla_gated_delta_rule}


# --------------------------------------------------------------------------- the layer
class GatedRMSNorm(nn.Module):
    """weight * rmsnorm(x) * silu(z) over the last dim, in fp32 (transformers' Qwen3NextRMSNormGated)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x.to(dtype) * F.silu(z.float())).to(dtype)


class DeltaNetCache(LayerCache):
    """Per row: conv [B, K-1, conv channels] (the last inputs of the convolution, model dtype) and
    recurrent [B, value heads, dk, dv] (fp32). Fixed size; reset zeroes rows; rollback is refused."""

    kind = "state"

    def __init__(self, batch_size: int, conv_dim: int, kernel: int, heads: int, dk: int, dv: int,
                 device=None, dtype=torch.float32):
        super().__init__(max_len=0)
        self.register_buffer("conv", torch.zeros(batch_size, kernel - 1, conv_dim, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("recurrent", torch.zeros(batch_size, heads, dk, dv, device=device, dtype=torch.float32),
                             persistent=False)

    def reset(self, rows: torch.Tensor) -> None:
        self.conv[rows] = 0
        self.recurrent[rows] = 0


def deltanet_dims(config) -> tuple[int, int, int, int, int]:
    """(key heads, value heads, key head dim, value head dim, conv kernel) of a config (None follows the attention shape)."""
    hk = config.linear_num_key_heads or config.num_heads
    hv = config.linear_num_value_heads or hk
    dk = config.linear_key_head_dim or config.head_dim
    dv = config.linear_value_head_dim or config.head_dim
    return hk, hv, dk, dv, config.linear_conv_kernel


@register_mixer("gated_deltanet")
class GatedDeltaNet(Mixer):
    cache_kind = "state"
    # which recurrence runs ("chunk" | "recurrent" | "reference" | "fla"; "chunk" runs fla on CUDA when it
    # imports, see chunk_rule_for); with a cache, chunks of fewer than
    # `recurrent_below` tokens (decode steps) run the recurrent form: the chunked one would pad them to 64
    impl = "chunk"
    recurrent_below = 16

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim, self.kernel = deltanet_dims(config)
        if self.num_v_heads % self.num_k_heads:
            raise VelocisError(f"invalid model config: linear_num_value_heads {self.num_v_heads} must be a multiple "
                               f"of linear_num_key_heads {self.num_k_heads}")
        if self.kernel < 1:
            raise VelocisError(f"invalid model config: linear_conv_kernel {self.kernel} must be >= 1")
        self.init_std, self.num_layers = config.init_std, config.num_layers
        h = config.hidden_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = Linear(h, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(h, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False,
                                padding=self.kernel - 1)  # HF's module (weight [C, 1, K]); run by causal_conv
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, config.norm_eps)
        self.out_proj = Linear(self.value_dim, h, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.in_proj_qkvz.weight, std=self.init_std)
        nn.init.normal_(self.in_proj_ba.weight, std=self.init_std)
        bound = 1 / math.sqrt(self.kernel)  # nn.Conv1d's default for a depthwise filter
        nn.init.uniform_(self.conv1d.weight, -bound, bound)
        nn.init.ones_(self.dt_bias)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())  # as transformers: A in (0.01, 16)
        # residual-branch output: scaled so the residual stream's variance does not grow with depth
        nn.init.normal_(self.out_proj.weight, std=self.init_std / math.sqrt(2 * self.num_layers))

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> DeltaNetCache:
        return DeltaNetCache(batch_size, self.conv_dim, self.kernel, self.num_v_heads, self.head_k_dim,
                             self.head_v_dim, device=device, dtype=dtype)

    def cache_bytes_per_sequence(self, dtype_bytes: int = 2) -> int:
        conv = (self.kernel - 1) * self.conv_dim * dtype_bytes
        return conv + self.num_v_heads * self.head_k_dim * self.head_v_dim * 4  # the recurrent state is fp32

    # ------------------------------------------------------------------
    def _project(self, x: torch.Tensor):
        """x -> (conv input [B, T, conv_dim] = [q | k | v], z [B, T, Hv, dv], b, a [B, T, Hv]), HF's grouped layout."""
        B, T, _ = x.shape
        hk, r, dk, dv = self.num_k_heads, self.num_v_heads // self.num_k_heads, self.head_k_dim, self.head_v_dim
        qkvz = self.in_proj_qkvz(x).view(B, T, hk, 2 * dk + 2 * r * dv)
        q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, hk, 2 * r).split([r, r], dim=-1)
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
        return mixed, z.reshape(B, T, -1, dv), b.reshape(B, T, -1), a.reshape(B, T, -1)

    def _rule(self, x: torch.Tensor, cache) -> str:
        if self.impl != "chunk":
            return self.impl
        if cache is not None and x.shape[1] < self.recurrent_below:
            return "recurrent"
        return chunk_rule_for(x)

    def forward(self, x: torch.Tensor, pos: Positions, cache: DeltaNetCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        pos = Positions.of(pos)
        docs = pos.doc_ids
        mixed, z, b, a = self._project(x)
        weight = self.conv1d.weight.squeeze(1)  # [C, K]
        conv = causal_conv_reference if self.impl == "reference" else causal_conv
        mixed, window = conv(mixed, weight, cache.conv if cache is not None else None, docs)
        q, k, v = F.silu(mixed).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        r = self.num_v_heads // self.num_k_heads
        q = l2norm(q.float().view(B, T, -1, self.head_k_dim)) * self.head_k_dim ** -0.5
        k = l2norm(k.float().view(B, T, -1, self.head_k_dim))
        if r > 1:  # each key head serves r consecutive value heads
            q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
        v = v.float().view(B, T, -1, self.head_v_dim)
        beta = b.float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        o, state = DELTA_RULES[self._rule(x, cache)](q, k, v, g, beta, cache.recurrent if cache is not None else None,
                                                     docs)
        if cache is not None:
            cache.conv.copy_(window)
            cache.recurrent.copy_(state)
        y = self.norm(o.to(x.dtype), z)
        return self.out_proj(y.reshape(B, T, self.value_dim))
