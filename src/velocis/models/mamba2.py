"""Mamba-2 (MIXERS["mamba2"]): the SSD state-space mixer, a fixed-size recurrent state per sequence.

Per layer (parameter names and shapes match transformers' Mamba2Mixer, so HF tensors copy as they are):
  in_proj   x -> [z (I) | x (I) | B (G*N) | C (G*N) | dt (H)]      I = expand * hidden = H * P
  conv1d    depthwise causal convolution (kernel K, bias) over the channels [x | B | C], then SiLU
  dt        softplus(dt + dt_bias), clamped to ssm_dt_limit       each head's time step (> 0)
  A         -exp(A_log)                                           each head's decay rate (< 0)
  state     h [P, N] per head; at every token, with B, C of the head's group:
              h = exp(dt A) h + dt x B^T;   y = h C + D x
  norm      gated RMSNorm: weight * rmsnorm(y * silu(z)), over groups of I / G channels
  out_proj  I -> hidden

Three forms of the recurrence compute the same thing (tests hold them to one another, values and
gradients, fp32):
  reference  `ssd_reference`: one token at a time, the plain recurrence above; the readable spec
             (with `conv_reference`, the convolution one token at a time).
  recurrent  `ssd_step`: one token for every row and head at once; decoding with a cache.
  chunked    `ssd_chunked` (Mamba-2's SSD, as ssd_minimal and transformers' torch fallback): within a
             chunk the outputs are a masked, decay-weighted attention (C B^T) x; the chunks pass
             states on, so only the chunks run in order. Training and prefill.
  fla        `ssd_fla`: flash-linear-attention's simple-GLA Triton kernels (optional extra `fla`), run
             instead of the chunked form on CUDA when they import; tests hold it to the reference too.
Packed rows (positions restarting inside a row, `Positions.doc_ids`): every document starts from a
zero state and a zero convolution window. The chunked form sets a document's first log-decay to
-inf, and every decay it builds is a sum of log-decays over a span (never a difference of cumulative
sums), so a span that crosses a boundary decays by exactly 0 and no term leaks across.

The cache is a "state" cache (models/cache.py): per row the last K-1 convolution inputs (model dtype)
and the SSM state (fp32: it accumulates over the whole sequence), updated in place; its size does not
depend on the length. A state cannot be rolled back (no checkpoints are kept): the base class refuses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from velocis.kernels.gemm import Linear
from velocis.models.cache import LayerCache
from velocis.models.deltanet import fla_runs_on, fla_varlen
from velocis.models.mixer import Mixer
from velocis.models.positions import Positions
from velocis.models.registry import register_mixer


# --------------------------------------------------------------------------- the short convolution
def _segments(resets: torch.Tensor, lead: int) -> torch.Tensor:
    """[B, lead + T]: a segment index for `lead` cached inputs (segment 0) then each token (a new
    segment at every reset)."""
    seg = resets.long().cumsum(1)
    return torch.cat([seg.new_zeros(seg.shape[0], lead), seg], 1)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prev: torch.Tensor | None = None,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution. x [B, T, C]; weight [C, K]; prev [B, C, K-1]: the inputs before x
    (a cache's window; zeros when None); resets [B, T] (bool): a token that starts a document, which
    sees no input before it. -> (y [B, T, C], the window after x [B, C, K-1], earlier documents zeroed)."""
    B, T, C = x.shape
    K = weight.shape[1]
    xt = x.transpose(1, 2)
    prev = xt.new_zeros(B, C, K - 1) if prev is None else prev.to(xt.dtype)
    xe = torch.cat([prev, xt], -1)  # [B, C, K-1+T]
    window = xe[:, :, xe.shape[-1] - (K - 1):]
    if resets is None:
        y = F.conv1d(xe, weight[:, None], bias, groups=C)
        return y.transpose(1, 2), window
    seg = _segments(resets, K - 1)
    y = bias[:, None].to(xt.dtype) if bias is not None else 0
    for j in range(K):  # tap j reads the input K-1-j tokens back, if it is in the same document
        same = (seg[:, j:j + T] == seg[:, K - 1:]).unsqueeze(1)
        y = y + weight[:, j, None] * xe[:, :, j:j + T] * same
    window = window * (seg[:, seg.shape[1] - (K - 1):] == seg[:, -1:]).unsqueeze(1)
    return y.transpose(1, 2), window


def conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prev: torch.Tensor | None = None,
                   resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_conv`, one token at a time: a sliding window of the last K inputs, emptied at a reset."""
    B, T, C = x.shape
    K = weight.shape[1]
    window = x.new_zeros(B, C, K - 1) if prev is None else prev.to(x.dtype)
    ys = []
    for t in range(T):
        if resets is not None:
            window = window * (~resets[:, t]).to(x.dtype)[:, None, None]
        full = torch.cat([window, x[:, t, :, None]], -1)  # [B, C, K]
        y = (full * weight).sum(-1)
        ys.append(y + bias if bias is not None else y)
        window = full[:, :, 1:]
    return torch.stack(ys, 1), window


# --------------------------------------------------------------------------- the SSD scan
def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 inputs are widened; fp64 stays fp64, for the tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _heads(m: torch.Tensor, heads: int) -> torch.Tensor:
    """B or C [..., G, N] -> [..., H, N]: each group serves H / G consecutive heads."""
    return m.repeat_interleave(heads // m.shape[-2], dim=-2)


def ssd_reference(x, dt, A, B, C, state=None, resets=None):
    """The plain recurrence. x [b, T, H, P], dt [b, T, H] (after softplus), A [H] (< 0), B, C [b, T, G, N],
    state [b, H, P, N] (zeros when None), resets [b, T] -> (y [b, T, H, P] without the D term, final state).
    fp32 throughout."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    h = _wide(x.new_zeros(b, H, P, N)) if state is None else _wide(state)
    ys = []
    for t in range(T):
        if resets is not None:
            h = h * (~resets[:, t]).to(h.dtype)[:, None, None, None]
        y, h = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h)
        ys.append(y)
    return torch.stack(ys, 1), h


def ssd_step(x, dt, A, B, C, state):
    """One token of every row and head: x [b, H, P], dt [b, H], B, C [b, G, N], state [b, H, P, N] (fp32)
    -> (y [b, H, P] without the D term, the new state)."""
    H = x.shape[1]
    x, dt, B, C = _wide(x), _wide(dt), _heads(_wide(B), H), _heads(_wide(C), H)
    decay = torch.exp(dt * _wide(A))  # [b, H]
    state = state * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, C), state


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> [..., L, L] with [i, j] = a[j+1] + ... + a[i] for j <= i (0 on the diagonal), -inf
    above it. Summed span by span, so a -inf (a reset) only makes the spans that cross it -inf."""
    L = a.shape[-1]
    spans = a[..., None].expand(*a.shape, L)  # [..., k, j] = a[k]
    below = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)
    sums = spans.masked_fill(~below, 0).cumsum(-2)
    return sums.masked_fill(~below.logical_or(torch.eye(L, dtype=torch.bool, device=a.device)), -torch.inf)


def ssd_chunked(x, dt, A, B, C, chunk_size: int, state=None, resets=None):
    """`ssd_reference` in chunks of `chunk_size` tokens (Mamba-2's state space duality). Same arguments
    and results. Letters: b row, c chunk, l / s positions in a chunk, h head, p head dim, n state."""
    b, T, H, P = x.shape
    x, dt = _wide(x), _wide(dt)
    B, C = _heads(_wide(B), H), _heads(_wide(C), H)
    a = dt * _wide(A)  # log-decay of each token [b, T, H]
    if resets is not None:
        a = a.masked_fill(resets[..., None], -torch.inf)  # a document's first token forgets the state
    pad = (-T) % chunk_size  # zero padding: no input, no decay; cut off at the end

    def chunks(t):
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, -1, chunk_size, *t.shape[2:])

    xdt = chunks(x * dt[..., None])  # [b, c, l, h, p]
    B, C = chunks(B), chunks(C)  # [b, c, l, h, n]
    a = chunks(a).permute(0, 3, 1, 2)  # [b, h, c, l]
    spans = segment_sum(a)  # [b, h, c, l, s]: log-decay from s (exclusive) to l

    # 1. within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1..l}) dt_s x_s
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B) * torch.exp(spans).permute(0, 2, 3, 4, 1)
    y = torch.einsum("bclsh,bcshp->bclhp", scores, xdt)
    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(spans[..., -1, :]).permute(0, 2, 3, 1)  # [b, c, l, h]: decay from after l to the end
    states = torch.einsum("bclhn,bclhp->bchpn", B * to_end[..., None], xdt)
    # 3. states passed from chunk to chunk: the state entering chunk c decays through the chunks after z
    start = x.new_zeros(b, 1, H, P, B.shape[-1]) if state is None else _wide(state)[:, None]
    states = torch.cat([start, states], 1)  # [b, c+1, h, p, n]
    through = segment_sum(F.pad(a.sum(-1), (1, 0)))  # [b, h, c+1, c+1]: from after chunk z to the end of c
    states = torch.einsum("bhcz,bzhpn->bchpn", torch.exp(through), states)
    entering, final = states[:, :-1], states[:, -1]
    # 4. the state entering each chunk, read by C and decayed to position l
    from_start = torch.exp(a.cumsum(-1)).permute(0, 2, 3, 1)  # [b, c, l, h]: decay from the chunk's start to l
    y = y + torch.einsum("bclhn,bchpn->bclhp", C, entering) * from_start[..., None]
    return y.reshape(b, -1, H, P)[:, :T], final


def ssd_fla(x, dt, A, B, C, state=None, resets=None):
    """`ssd_reference` by flash-linear-attention's simple-GLA Triton kernels (`pip install velocis[fla]`,
    CUDA): the SSD recurrence is a scalar-gated linear attention with q = C, k = B, v = dt x, log gate dt A,
    scale 1 and the state stored [P, N] (fla's `state_v_first`). Packed documents become fla's varlen form
    (deltanet.fla_varlen). Same arguments and results (fp32)."""
    from fla.ops.simple_gla import chunk_simple_gla

    b, T, H, P = x.shape
    N = B.shape[-1]
    x, dt = x.float(), dt.float()
    q, k, v, g = _heads(C.float(), H), _heads(B.float(), H), x * dt[..., None], dt * A.float()
    state = None if state is None else state.float()
    if resets is None:
        return chunk_simple_gla(q, k, v, g, scale=1.0, initial_state=state, output_final_state=True,
                                state_v_first=True)
    cu_seqlens, row_first, row_last = fla_varlen(resets)
    if state is not None:  # a row's state enters its first document (unless it resets), the others start at 0
        state = state * (~resets[:, 0]).to(state.dtype)[:, None, None, None]
        state = state.new_zeros(len(cu_seqlens) - 1, H, P, N).index_copy(0, row_first, state)
    flat = (t.reshape(1, b * T, *t.shape[2:]) for t in (q, k, v, g))
    y, final = chunk_simple_gla(*flat, scale=1.0, initial_state=state, output_final_state=True, state_v_first=True,
                                cu_seqlens=cu_seqlens)
    return y.reshape(b, T, H, P), final[row_last]


# --------------------------------------------------------------------------- the layer
class GatedRMSNorm(nn.Module):
    """weight * rmsnorm(y * silu(z)), the RMS over groups of `group` channels (HF MambaRMSNormGated with
    norm_before_gate=False), computed in fp32."""

    def __init__(self, dim: int, group: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group, self.eps = group, eps

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        g = (_wide(y) * F.silu(_wide(z))).unflatten(-1, (-1, self.group))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(dtype)


class Mamba2Cache(LayerCache):
    """Per row: conv [B, channels, K-1] (the last inputs of the convolution, model dtype) and
    ssm [B, heads, head_dim, state_size] (fp32). Fixed size; reset zeroes rows; rollback is refused."""

    kind = "state"

    def __init__(self, batch_size: int, conv_dim: int, kernel: int, heads: int, head_dim: int, state_size: int,
                 device=None, dtype=torch.float32):
        super().__init__(max_len=0)
        self.register_buffer("conv", torch.zeros(batch_size, conv_dim, kernel - 1, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("ssm", torch.zeros(batch_size, heads, head_dim, state_size, device=device,
                                                dtype=torch.float32), persistent=False)

    def reset(self, rows: torch.Tensor) -> None:
        self.conv[rows] = 0
        self.ssm[rows] = 0


def mamba2_dims(config) -> tuple[int, int, int, int, int]:
    """(inner width I, heads H, head dim P, groups G, state size N) of a config."""
    inner = config.ssm_expand * config.hidden_dim
    return inner, inner // config.ssm_head_dim, config.ssm_head_dim, config.ssm_num_groups, config.ssm_state_size


@register_mixer("mamba2")
class Mamba2(Mixer):
    cache_kind = "state"
    # the plain per-token loops instead of the chunked scan and the convolution (the tests' reference)
    use_reference = False

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        I, H, P, G, N = mamba2_dims(config)
        self.inner, self.num_heads, self.head_dim, self.num_groups, self.state_size = I, H, P, G, N
        self.conv_dim = I + 2 * G * N
        self.kernel, self.chunk_size = config.ssm_conv_kernel, config.ssm_chunk_size
        lo, hi = config.ssm_dt_limit or (0.0, math.inf)
        self.dt_limit = (float(lo), float(hi))
        self.dt_init = (config.ssm_dt_min, config.ssm_dt_max, config.ssm_dt_floor)
        self.init_std, self.num_layers = config.init_std, config.num_layers
        self.in_proj = Linear(config.hidden_dim, I + self.conv_dim + H, bias=config.ssm_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                bias=config.ssm_conv_bias, padding=self.kernel - 1)  # holds weights; never called
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedRMSNorm(I, I // G, config.norm_eps)
        self.out_proj = Linear(I, config.hidden_dim, bias=config.ssm_proj_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As Mamba-2 (mamba_ssm): A uniform in [1, 16], time steps log-uniform in [dt_min, dt_max]
        (dt_bias is their inverse softplus), D = 1; projections as the rest of Velocis."""
        if self.dt_bias.device.type == "meta":
            return
        nn.init.normal_(self.in_proj.weight, std=self.init_std)
        # residual-branch output: scaled so the residual stream's variance does not grow with depth
        nn.init.normal_(self.out_proj.weight, std=self.init_std / math.sqrt(2 * self.num_layers))
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        bound = 1 / math.sqrt(self.kernel)  # nn.Conv1d's default for a depthwise kernel (fan-in K)
        nn.init.uniform_(self.conv1d.weight, -bound, bound)
        if self.conv1d.bias is not None:
            nn.init.uniform_(self.conv1d.bias, -bound, bound)
        lo, hi, floor = self.dt_init
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(hi) - math.log(lo)) + math.log(lo)).clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(self.num_heads).uniform_(1, 16)))
        nn.init.ones_(self.D)
        self.norm.reset_parameters()

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> Mamba2Cache:
        return Mamba2Cache(batch_size, self.conv_dim, self.kernel, self.num_heads, self.head_dim, self.state_size,
                           device, dtype)

    def cache_bytes_per_sequence(self, dtype_bytes: int = 2) -> int:
        return self.conv_dim * (self.kernel - 1) * dtype_bytes + self.num_heads * self.head_dim * self.state_size * 4

    def forward(self, x: torch.Tensor, pos: Positions, cache: Mamba2Cache | None = None) -> torch.Tensor:
        Bsz, T, _ = x.shape
        pos = Positions.of(pos)
        I, H, P, G, N = self.inner, self.num_heads, self.head_dim, self.num_groups, self.state_size
        z, xbc, dt = self.in_proj(x).split([I, self.conv_dim, H], dim=-1)
        resets = None
        if pos.doc_ids is not None:  # packed documents: a document's first token starts afresh
            resets = F.pad(pos.doc_ids[:, 1:] != pos.doc_ids[:, :-1], (1, 0))
        conv = conv_reference if self.use_reference else causal_conv
        weight = self.conv1d.weight[:, 0]
        xbc, window = conv(xbc, weight, self.conv1d.bias, cache.conv if cache is not None else None, resets)
        xs, B, C = F.silu(xbc).split([I, G * N, G * N], dim=-1)
        xs, B, C = xs.unflatten(-1, (H, P)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))
        dt = F.softplus(_wide(dt) + self.dt_bias).clamp(*self.dt_limit)
        A = -torch.exp(_wide(self.A_log))
        state = cache.ssm if cache is not None else None
        if self.use_reference:
            y, state = ssd_reference(xs, dt, A, B, C, state, resets)
        elif cache is not None and T == 1:  # decoding: the recurrent form
            y, state = ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state)
            y = y[:, None]
        elif fla_runs_on(xs):  # CUDA with flash-linear-attention installed: its Triton kernels
            y, state = ssd_fla(xs, dt, A, B, C, state, resets)
        else:
            y, state = ssd_chunked(xs, dt, A, B, C, self.chunk_size, state, resets)
        if cache is not None:
            cache.conv.copy_(window)
            cache.ssm.copy_(state)
        y = y + self.D[:, None] * _wide(xs)
        return self.out_proj(self.norm(y.flatten(-2), z).to(x.dtype))
