"""DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer and top-k token selection.

Each MLA layer of a V3.2 model owns an Indexer (built by velocis.models.mla.MLA when
config.index_num_heads > 0). For a query token t and a visible token s it scores

    I[t, s] = sum_j  w[t, j] * ReLU(q[t, j] . k[s] * index_head_dim^-0.5),   w = weights_proj(x_t) * n^-0.5

with n = index_num_heads small heads of width index_head_dim: q[t, j] = wq_b(query latent)
(the MLA's q_a_layernorm(q_a_proj(x))), one key per token k[s] = LayerNorm(wk(x_s)); the first
qk_rope_head_dim dims of q and k get RoPE (rotate-half layout, the MLA's frequencies). The main
attention then only attends to the index_topk best-scored visible tokens of each query. While a query
sees <= index_topk tokens all of them are kept, so attention is exactly dense there.

This follows transformers' DeepseekV32Indexer (fp32 scores; the reference implementation's
Hadamard rotation and FP8 scoring are precision optimisations that do not change the scores' order
in exact arithmetic). The indexer gets no gradient through the top-k (as in transformers);
DeepSeek trains it with a separate KL objective against the main attention (``indexer_kl_loss``).
To train it set ``train_mode`` on the indexers (``set_indexer_training(model, mode)``):
  "warmup"  DeepSeek's dense warm-up: attention stays dense; KL over all visible tokens
  "sparse"  sparse training: top-k attention; KL over the selected tokens
  None      (default) no indexer loss
The MLA layer returns the loss as the "indexer_kl" auxiliary family (weighted by
config.indexer_loss_coef, independent of the MoE balance coefficient); its gradient reaches only
the indexer, whose inputs are detached. The model's stats report it as ``indexer_kl``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from velocis.errors import VelocisError
from velocis.models.rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.head_dim = config.index_num_heads, config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.topk = config.index_topk
        if self.head_dim < self.rope_dim:
            raise VelocisError(f"invalid model config: index_head_dim {self.head_dim} must be >= "
                               f"qk_rope_head_dim {self.rope_dim}")
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_dim, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_dim, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim ** -0.5
        self.train_mode: str | None = None  # None | "warmup" | "sparse" (see the module docstring)
        self.init_std = config.init_std
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.wq_b, self.wk, self.weights_proj):
            nn.init.normal_(lin.weight, std=self.init_std)
        self.k_norm.reset_parameters()

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first rope_dim dims of x [B, heads, T, D]; cos/sin [T, rope] or [B, 1, T, rope]."""
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(rot, cos, sin), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> one index key per token [B, T, D]."""
        return self._rope(self.k_norm(self.wk(x)).unsqueeze(1), cos, sin).squeeze(1)

    def scores(self, x: torch.Tensor, q_lat: torch.Tensor, keys: torch.Tensor, rope) -> torch.Tensor:
        """Index scores [B, T, L] (fp32) of the T queries (x, q_lat) against keys [B, L, D]."""
        B, T, _ = x.shape
        cos, sin = rope
        q = self.wq_b(q_lat).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, n, T, D]
        q = self._rope(q, cos, sin)
        s = torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1)) * self.softmax_scale  # [B, n, T, L]
        s = F.relu(s)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5  # [B, T, n]
        return torch.einsum("btn,bntl->btl", w, s)

    @torch.no_grad()
    def select(self, x, q_lat, keys, visible: torch.Tensor, rope) -> torch.Tensor:
        """Bool [B, T, L]: True at the index_topk best-scored visible tokens of each query
        (all visible tokens when a query sees <= index_topk). visible: bool [T, L] (or [B, T, L])."""
        s = self.scores(x, q_lat, keys, rope).masked_fill(~visible, float("-inf"))
        k = min(self.topk, s.shape[-1])
        # a stable sort, not topk: ReLU makes exact ties (scores of 0) common, and topk breaks them
        # differently for different key counts, so a cached decode step (keys 0..p) would pick other
        # tokens than the full-sequence forward; the stable order keeps the earliest of tied tokens
        idx = s.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)


def indexer_kl_loss(index_scores: torch.Tensor, attn_probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3.2's indexer training objective: KL(p_attn || softmax(I)) per query, mean over queries.

    index_scores [B, T, L] (with grad), attn_probs [B, H, T, L] main-attention probabilities (detached),
    visible bool [T, L] or [B, T, L]. The target sums the main attention over heads and renormalises.
    """
    target = attn_probs.detach().float().sum(1)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-12)
    logp = torch.log_softmax(index_scores.float().masked_fill(~visible, float("-inf")), dim=-1)
    kl = target * (torch.log(target.clamp(min=1e-12)) - logp.masked_fill(~visible, 0.0))
    return kl.sum(-1).mean()


def set_indexer_training(model: nn.Module, mode: str | None) -> int:
    """Set every indexer's train_mode (None | "warmup" | "sparse"); returns how many indexers there are."""
    if mode not in (None, "warmup", "sparse"):
        raise VelocisError(f"indexer training mode {mode!r} must be None, 'warmup' or 'sparse'")
    indexers = [m for m in model.modules() if isinstance(m, Indexer)]
    for m in indexers:
        m.train_mode = mode
    return len(indexers)
