"""Sparse mixture-of-experts feed-forward (``FEED_FORWARDS["moe"]``).

A token's hidden state ``x`` goes to a router, which scores every routed expert and keeps the
top-k; the output is ``sum_k w_k * expert_k(x) + shared(x)``. Experts are SwiGLU MLPs
``down(silu(gate(x)) * up(x))`` whose weights are stored stacked, one tensor per projection,
so the dispatch runs a handful of grouped matmuls instead of a Python loop over tokens.

Routing (all choices come from ModelConfig):
  * ``router_score``: "softmax" (Mixtral, Qwen3-MoE) or "sigmoid" (DeepSeek-V3) scores, in fp32.
  * group-limited routing (``num_expert_groups`` > 1, DeepSeek-V3): experts form groups; a group
    scores the sum of its top-2 (bias-corrected) expert scores; only the ``topk_groups`` best
    groups are eligible for the top-k.
  * ``router_norm_topk``: renormalise the kept weights to sum to 1 (DeepSeek adds 1e-20).
  * ``routed_scaling_factor`` multiplies the kept weights.
  * ``num_shared_experts``: one always-on SwiGLU of width ``moe_dim * num_shared_experts`` (or
    ``shared_expert_dim``); with ``shared_expert_gate`` (Qwen3-Next) its output is scaled per token by
    ``sigmoid(shared_expert_gate(x))``, a Linear(hidden, 1).

Load balancing (``balance``):
  * "aux_loss": the Switch/Mixtral auxiliary loss ``E * sum_i f_i * P_i`` per MoE layer, where
    f_i is the fraction of the N*k routed assignments that went to expert i and P_i the mean
    (normalised) router probability of expert i; 1.0 when perfectly balanced, whatever k. The
    layer returns it as the "moe_balance" auxiliary family; the model adds ``aux_loss_coef``
    times its mean over MoE layers to the loss. transformers (Mixtral, Qwen3-MoE) normalises f by
    N instead of N*k, so its loss is k times ours: the HF importer multiplies
    ``router_aux_loss_coef`` by k (the exporter divides), so the balancing pressure is the same.
  * "aux_free": DeepSeek-V3's auxiliary-loss-free balancing. A per-expert bias
    (``gate.e_score_correction_bias``) is added to the scores for *selection only* (the weights
    use the unbiased scores). Training forwards accumulate each expert's load; after every
    optimizer step (``after_optimizer_step``, which the trainer hooks onto the optimizer) the
    layer does ``bias += bias_update_rate * sign(mean_load - load_i)`` and clears the counts.
  * "none": neither.
Independently, ``seq_aux_loss_coef > 0`` adds DeepSeek-V3's sequence-wise balance loss (the
"moe_seq_balance" family): the same ``E * sum_i f_i * P_i`` computed within each sequence (P from
scores normalised to sum to 1 per token) and averaged over sequences; V3 uses it with a tiny
coefficient beside the auxiliary-loss-free bias, to keep any single sequence from collapsing.

Dispatch is dropless by default: the T*k (token, expert) pairs are sorted by expert id (a
stable argsort), the tokens gathered into contiguous per-expert segments, the experts run as
grouped matmuls over those segments (``torch._grouped_mm`` when the device/dtype supports it,
else a loop over *experts* on contiguous slices), and the weighted results scatter-added back.
With ``capacity_factor`` set, each expert takes at most
``ceil(capacity_factor * T * k / E)`` tokens; the overflow (the latest tokens in the batch,
deterministically) is dropped, i.e. that expert contributes nothing for them.

Parameter names match Hugging Face's DeepseekV3MoE / Qwen3MoeSparseMoeBlock /
MixtralSparseMoeBlock (transformers >= 5) module-for-module, so a state dict copies across:
  gate.weight                      [E, H]        router
  gate.e_score_correction_bias     [E]           buffer (selection bias; DeepSeek-V3, aux_free)
  experts.gate_up_proj             [E, 2*I, H]   gate rows first, then up rows
  experts.down_proj                [E, H, I]
  shared_experts.gate_proj.weight  [S*I, H]      (only with num_shared_experts = S > 0)
  shared_experts.up_proj.weight    [S*I, H]
  shared_experts.down_proj.weight  [H, S*I]
  shared_expert_gate.weight        [1, H]        (only with shared_expert_gate; HF Qwen3-Next's name)
(Mixtral/Qwen3 have no bias buffer; a loader can ignore ``gate.e_score_correction_bias``
missing from their checkpoints, it is zeros.)

In training the layer returns ``(out, {family: loss})``; after a forward it keeps ``last_load``
(tokens per expert, detached) for ``moe_stats(model)``, the expert-load numbers of the logs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from velocis.kernels.gemm import Linear
from velocis.models.registry import register_aux_loss, register_feed_forward, register_stats

__all__ = [
    "MoE",
    "Router",
    "Experts",
    "SwiGLU",
    "route",
    "dispatch",
    "naive_moe_experts",
    "update_expert_bias",
    "moe_stats",
]

register_aux_loss("moe_balance", "aux_loss_coef")
register_aux_loss("moe_seq_balance", "seq_aux_loss_coef")


# ---------------------------------------------------------------------------
# routing


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    norm_topk: bool = True,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (scores [N, E] fp32, weights [N, k] fp32, indices [N, k]).

    ``bias`` (if given) is added to the scores for the choice of experts only.
    Matches transformers' DeepseekV3TopkRouter (sigmoid, groups, bias) and the Mixtral/Qwen3-MoE
    routers (softmax) exactly.
    """
    if logits.dtype != torch.float64:
        logits = logits.float()  # routing in fp32 (fp64 kept for gradient checks)
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores if bias is None else scores + bias.to(scores.dtype)
    n, e = choice.shape
    if num_groups > 1:
        group_scores = choice.view(n, num_groups, e // num_groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(n, num_groups, e // num_groups).reshape(n, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    if bias is None and num_groups == 1:
        weights, indices = torch.topk(scores, top_k, dim=-1)
    else:
        indices = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
    if norm_topk:
        denom = weights.sum(dim=-1, keepdim=True)
        if score == "sigmoid":
            denom = denom + 1e-20  # as DeepSeek-V3
        weights = weights / denom
    if scaling != 1.0:
        weights = weights * scaling
    return scores, weights, indices


class Router(nn.Module):
    """Linear router plus the (non-trainable) selection bias used by aux-loss-free balancing."""

    def __init__(self, hidden_dim: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            return F.linear(x, self.weight.to(x.dtype))
        with torch.autocast(x.device.type, enabled=False):  # routing scores in fp32, as DeepSeek-V3
            return F.linear(x.float(), self.weight.float())


# ---------------------------------------------------------------------------
# experts and dispatch


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden_dim: int, inner_dim: int):
        super().__init__()
        self.gate_proj = Linear(hidden_dim, inner_dim, bias=False)
        self.up_proj = Linear(hidden_dim, inner_dim, bias=False)
        self.down_proj = Linear(inner_dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward
    rejects expanded / zero-stride gradients)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D401
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = False
        if hasattr(torch, "_grouped_mm") and dtype in (torch.float32, torch.bfloat16, torch.float16):
            try:  # fixed inputs: a probe must not draw from the global RNG (it would shift training's)
                a = torch.linspace(-1, 1, 64, device=device, dtype=dtype).view(4, 16)
                b = torch.linspace(-1, 1, 512, device=device, dtype=dtype).view(2, 16, 16).flip(-1)
                offs = torch.tensor([1, 4], device=device, dtype=torch.int32)
                out = torch._grouped_mm(a, b, offs=offs)
                ref = torch.cat([a[:1] @ b[0], a[1:] @ b[1]])
                ok = bool(torch.allclose(out.float(), ref.float(), atol=1e-2, rtol=1e-2))
            except Exception:  # not built for this device / dtype
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def _segment_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int] | None, offs: torch.Tensor | None) -> torch.Tensor:
    """x [M, in] (rows sorted by expert, counts[e] rows each) times w[e].T ([E, out, in]) -> [M, out]."""
    if offs is not None:
        return torch._grouped_mm(_ContiguousGrad.apply(x), w.transpose(-2, -1), offs=offs)
    # a loop over experts on contiguous slices; split/unbind keep the backward O(size) (one cat /
    # one stack) where per-expert slicing would allocate a full-size zero gradient per expert
    outs = [xe @ we.t() for xe, we in zip(x.split(counts), w.unbind(0))]
    return torch.cat(outs, dim=0)


def dispatch(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    capacity: int | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the routed experts. x [N, H], weights/indices [N, k], gate_up [E, 2I, H], down [E, H, I].

    Returns (out [N, H], tokens per expert [E] as routed, before any capacity drop).
    ``impl``: "auto" (grouped matmul when available), "grouped" or "loop".
    """
    n, k = indices.shape
    num_experts = gate_up.shape[0]
    # torch._grouped_mm is outside autocast's op list: cast here (bf16 experts under autocast)
    dev = x.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    out_dtype, x = x.dtype, x.to(compute_dtype)
    gate_up, down = gate_up.to(compute_dtype), down.to(compute_dtype)
    flat_e = indices.reshape(-1)
    order = torch.argsort(flat_e, stable=True)  # (token, slot) pairs grouped by expert, token order kept
    counts_t = torch.bincount(flat_e, minlength=num_experts)
    token_of = order // k
    flat_w = weights.reshape(-1)[order]
    if capacity is not None:
        seg_start = torch.cumsum(counts_t, 0) - counts_t
        pos = torch.arange(order.numel(), device=x.device) - seg_start[flat_e[order]]
        keep = pos < capacity
        token_of, flat_w = token_of[keep], flat_w[keep]
        kept_counts_t = counts_t.clamp(max=capacity)
    else:
        kept_counts_t = counts_t
    # torch._grouped_mm needs 16-byte-aligned row strides: hidden and expert widths times the element size
    aligned = all(d * x.element_size() % 16 == 0 for d in (x.shape[-1], down.shape[-1]))
    if torch.compiler.is_compiling():
        # the fake-tensor kernel of _grouped_mm accepts only bf16; elsewhere trace the loop (a graph break)
        usable = aligned and x.dtype == torch.bfloat16 and x.device.type == "cuda"
    else:
        usable = aligned and _grouped_mm_available(x.device, x.dtype)
    use_grouped = impl == "grouped" or (impl == "auto" and usable)
    offs = torch.cumsum(kept_counts_t, 0).to(torch.int32) if use_grouped else None
    counts = None if use_grouped else kept_counts_t.tolist()  # the loop needs sizes on the host
    xs = x[token_of]
    h = _segment_matmul(xs, gate_up, counts, offs)
    g, u = h.chunk(2, dim=-1)
    a = F.silu(g) * u
    w_col = flat_w.unsqueeze(-1).to(a.dtype)
    if a.shape[-1] < x.shape[-1]:  # fine-grained experts: scale the narrower side, down(a) * w = down(a * w)
        y = _segment_matmul(a * w_col, down, counts, offs)
    else:
        y = _segment_matmul(a, down, counts, offs) * w_col
    out = torch.zeros_like(x, dtype=out_dtype).index_add_(0, token_of, y.to(out_dtype))
    return out, counts_t.detach().float()


def naive_moe_experts(x, weights, indices, gate_up, down) -> torch.Tensor:
    """Reference: for every expert, pick its tokens with a mask and run a plain SwiGLU."""
    out = torch.zeros_like(x)
    inner = down.shape[-1]
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(indices == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ gate_up[e].t()
        y = (F.silu(h[:, :inner]) * h[:, inner:]) @ down[e].t()
        out = out.index_add(0, tok, y * weights[tok, slot].unsqueeze(-1).to(y.dtype))
    return out


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_dim: int, inner_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner_dim, hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, inner_dim))

    def forward(self, x, weights, indices, capacity=None, impl="auto"):
        return dispatch(x, weights, indices, self.gate_up_proj, self.down_proj, capacity=capacity, impl=impl)


# ---------------------------------------------------------------------------
# the feed-forward part


@register_feed_forward("moe")
class MoE(nn.Module):
    """Sparse MoE feed-forward built as ``MoE(config, layer_idx)``; input/output [..., H]
    (in training (output, aux losses))."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_token
        self.hidden_dim = config.hidden_dim
        self.inner_dim = config.moe_dim or config.mlp_dim
        self.score = config.router_score
        self.norm_topk = config.router_norm_topk
        self.num_groups = config.num_expert_groups
        self.topk_groups = config.topk_groups
        self.scaling = config.routed_scaling_factor
        self.balance = config.balance
        self.bias_update_rate = config.bias_update_rate
        self.capacity_factor = config.capacity_factor
        self.seq_aux_loss_coef = config.seq_aux_loss_coef
        self.impl = "auto"  # "auto" | "grouped" | "loop"
        self.gate = Router(self.hidden_dim, self.num_experts)
        self.experts = Experts(self.num_experts, self.hidden_dim, self.inner_dim)
        shared_dim = config.shared_expert_dim or self.inner_dim * config.num_shared_experts
        self.shared_experts = SwiGLU(self.hidden_dim, shared_dim) if config.num_shared_experts > 0 else None
        self.shared_expert_gate = (Linear(self.hidden_dim, 1, bias=False)
                                   if config.shared_expert_gate and self.shared_experts is not None else None)
        # tokens per expert accumulated over training forwards since the last bias update
        self.register_buffer("load_accum", torch.zeros(self.num_experts), persistent=False)
        self.last_load: torch.Tensor | None = None
        self.init_std, self.num_layers = config.init_std, config.num_layers
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.init_std
        out_std = std / math.sqrt(2 * self.num_layers)  # residual-branch output projections (GPT-2 style)
        nn.init.normal_(self.gate.weight, std=std)
        self.gate.e_score_correction_bias.zero_()
        self.load_accum.zero_()
        nn.init.normal_(self.experts.gate_up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=out_std)
        if self.shared_experts is not None:
            nn.init.normal_(self.shared_experts.gate_proj.weight, std=std)
            nn.init.normal_(self.shared_experts.up_proj.weight, std=std)
            nn.init.normal_(self.shared_experts.down_proj.weight, std=out_std)
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, std=std)

    def active_params(self) -> int:
        """Parameters one token uses: everything but the experts it is not routed to."""
        experts = sum(p.numel() for p in self.experts.parameters())
        total = sum(p.numel() for p in self.parameters())
        return total - experts + experts * self.top_k // self.num_experts

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: torch.Tensor):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits = self.gate(h)
        scores, weights, indices = route(
            logits,
            self.top_k,
            score=self.score,
            bias=self.gate.e_score_correction_bias,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
            norm_topk=self.norm_topk,
            scaling=self.scaling,
        )
        out, load = self.experts(h, weights, indices, capacity=self.capacity(h.shape[0]), impl=self.impl)
        if self.shared_experts is not None:
            shared = self.shared_experts(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            out = out + shared
        self.last_load = load
        out = out.reshape(shape)
        if not self.training:
            return out
        aux = {}
        if self.balance == "aux_free":
            self.load_accum += load
        probs = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        if self.balance == "aux_loss":
            # f_i: share of the N*k assignments; P_i: mean normalised router probability
            f = load / load.sum().clamp(min=1)
            aux["moe_balance"] = self.num_experts * torch.sum(f * probs.mean(0))
        if self.seq_aux_loss_coef > 0:
            aux["moe_seq_balance"] = self._sequence_balance(probs, indices, shape)
        return out, aux

    def _sequence_balance(self, probs: torch.Tensor, indices: torch.Tensor, shape) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss: E * sum_i f_i P_i within each sequence, averaged."""
        T = shape[-2] if len(shape) > 2 else probs.shape[0]
        B = probs.shape[0] // T
        counts = torch.zeros(B, self.num_experts, device=probs.device, dtype=probs.dtype)
        counts.scatter_add_(1, indices.view(B, T * self.top_k), torch.ones_like(indices, dtype=probs.dtype).view(B, -1))
        f = counts / (T * self.top_k)
        return (self.num_experts * (f * probs.view(B, T, -1).mean(1)).sum(-1)).mean()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free step: bias += rate * sign(mean load - load); clears the load counts.
        Under torch.distributed the loads are summed over ranks first (call it on every rank)."""
        if self.balance != "aux_free":
            self.load_accum.zero_()
            return
        load = self.load_accum
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank takes the same step: biases stay identical
        self.gate.e_score_correction_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.load_accum.zero_()

    def after_optimizer_step(self) -> None:
        """Per-step work the trainer runs after every optimizer step (see train/optim.py)."""
        self.update_bias()


# ---------------------------------------------------------------------------
# model-level helpers


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_expert_bias(model: nn.Module) -> None:
    """Call after each optimizer.step(): aux-loss-free bias update for every MoE layer."""
    for m in _moe_layers(model):
        m.update_bias()


@register_stats
@torch.compiler.disable  # host-side numbers for the logs: never traced
def moe_stats(model: nn.Module) -> dict:
    """Expert load of the last forward: per-layer tokens per expert and imbalance (max / mean).

    Returns {} for a dense model, else {"expert_load": [[...], ...] (per MoE layer),
    "expert_imbalance": mean over layers of max/mean, "expert_imbalance_max": worst layer}.
    """
    loads = [m.last_load for m in _moe_layers(model) if m.last_load is not None]
    if not loads:
        return {}
    imb = [float(l.max() / l.mean().clamp(min=1e-9)) for l in loads]
    return {
        "expert_load": [[int(v) for v in l.tolist()] for l in loads],
        "expert_imbalance": sum(imb) / len(imb),
        "expert_imbalance_max": max(imb),
    }
