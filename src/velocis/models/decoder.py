"""VelocisModel: one decoder-only class; each block is a token mixer + a feed-forward.

    x = embed_tokens(ids)
    for block: x = x + mixer(mixer_norm(x), positions, cache_layer)
               x = x + feed_forward(ff_norm(x))
    logits = lm_head(norm(x))          # lm_head.weight is embed_tokens.weight when tied

The parts come from the registries (see velocis/models/__init__.py for their contract).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from velocis.models.layers import RMSNorm
from velocis.models.registry import FEED_FORWARDS, MIXERS, STATS_HOOKS


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        mixer, ff = config.mixers()[layer_idx], config.feed_forwards()[layer_idx]
        for kind, name, reg in (("mixer", mixer, MIXERS), ("feed_forward", ff, FEED_FORWARDS)):
            if name not in reg:
                raise VelocisError(f"layer {layer_idx} {kind} {name!r} is not available in this install "
                                   f"(registered: {', '.join(sorted(reg))})")
        self.mixer_name, self.feed_forward_name = mixer, ff
        self.mixer_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.mixer = MIXERS[mixer](config, layer_idx)
        self.ff_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.feed_forward = FEED_FORWARDS[ff](config, layer_idx)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), positions, cache)
        return x + self.feed_forward(self.ff_norm(x))


@dataclass
class Cache:
    """Per-layer caches (each made by its mixer) plus how many positions are filled."""

    layers: list
    max_len: int
    batch_size: int
    pos: int = 0

    def reset(self) -> None:
        self.pos = 0  # stale entries are masked out (a query only sees slots <= its position)


class VelocisModel(nn.Module):
    # compute_loss's LM head + cross-entropy: the chunked kernel (False: the plain reference)
    fused_loss: bool = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = None
        if config.mtp_depth > 0:  # multi-token prediction modules (DeepSeek-V3), training-only
            from velocis.models.mtp import MTP

            self.mtp = MTP(config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embedding and head ~ N(0, init_std); parts initialise themselves in their constructors
        (residual-branch output projections at init_std / sqrt(2 * num_layers))."""
        std = self.config.init_std
        nn.init.normal_(self.embed_tokens.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    # ------------------------------------------------------------------ forward
    def _positions(self, T: int, cache: Cache | None, device) -> torch.Tensor:
        start = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if start + T > limit:
            what = f"the KV cache holds {limit} positions" if cache is not None else \
                f"the model's context is {limit} tokens (max_seq_len)"
            raise VelocisError(f"sequence of {start + T} tokens is too long: {what}; "
                               f"shorten the input or the number of new tokens")
        return torch.arange(start, start + T, device=device)

    def hidden_states(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """Last block's output (before the final norm), [B, T, hidden_dim]."""
        if input_ids.dim() != 2:
            raise VelocisError(f"input_ids must be [batch, seq] token ids, got shape {tuple(input_ids.shape)}")
        if cache is not None and input_ids.shape[0] != cache.batch_size:
            raise VelocisError(f"batch of {input_ids.shape[0]} sequences but the cache was made for "
                               f"{cache.batch_size}; make it with model.new_cache({input_ids.shape[0]}, ...)")
        positions = self._positions(input_ids.shape[1], cache, input_ids.device)
        x = self.embed_tokens(input_ids)
        for i, block in enumerate(self.layers):
            x = block(x, positions, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.pos += input_ids.shape[1]
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def head_loss(self, h_normed: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of lm_head(h_normed) [B, T, H] against targets [B, T]."""
        h2, t = h_normed.reshape(-1, h_normed.shape[-1]), targets.reshape(-1)
        if self.fused_loss:  # chunked: the [B*T, vocab] logits never exist at once
            return linear_cross_entropy(h2, self.lm_head.weight, t, ignore_index)
        return linear_cross_entropy_reference(h2, self.lm_head.weight, t, ignore_index)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. With a cache, input_ids continue the cached tokens."""
        return self.logits(self.hidden_states(input_ids, cache))

    def compute_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
        """(loss to back-propagate, stats). Adds aux_loss_coef * mean part aux loss (MoE balance)
        and mtp_loss_weight * MTP loss when the model has them."""
        h = self.hidden_states(input_ids)
        lm_loss = self.head_loss(self.norm(h), targets, ignore_index)
        loss, stats = lm_loss, {"lm_loss": lm_loss.detach()}
        blocks = list(self.layers)
        if self.mtp is not None and self.training:
            mtp_loss = self.mtp(h, input_ids, targets, self)
            loss = loss + self.config.mtp_loss_weight * mtp_loss
            stats["mtp_loss"] = mtp_loss.detach()
            # the MTP blocks' parts (e.g. their MoE) balance like the main model's; only depths that ran
            blocks += [layer.block for layer in self.mtp.layers[: max(input_ids.shape[1] - 1, 0)]]
        aux = [p.last_aux_loss for b in blocks for p in (b.mixer, b.feed_forward)
               if getattr(p, "last_aux_loss", None) is not None]
        if aux:
            aux_loss = torch.stack(aux).mean()
            loss = loss + self.config.aux_loss_coef * aux_loss
            stats["aux_loss"] = aux_loss.detach()
        for hook in STATS_HOOKS:
            stats.update(hook(self))
        return loss, stats

    # ------------------------------------------------------------------ helpers
    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> Cache:
        """One cache layer per block, made by that block's mixer (so MLA can cache a latent)."""
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise VelocisError(f"a KV cache of {max_len} positions exceeds the model's context "
                               f"({self.config.max_seq_len}); ask for fewer tokens")
        ref = self.embed_tokens.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        layers = [b.mixer.new_cache(batch_size, max_len, device, dtype) for b in self.layers]
        return Cache(layers, max_len, batch_size)

    def update_expert_bias(self) -> None:
        """After optimizer.step(): aux-loss-free MoE bias update (no-op for dense models)."""
        if "moe" in self.config.feed_forwards():
            from velocis.models.moe import update_expert_bias

            update_expert_bias(self)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
