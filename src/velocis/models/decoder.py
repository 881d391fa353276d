"""VelocisModel: one decoder-only class; each block is a token mixer + a feed-forward.

    x = embed_tokens(ids)
    for block: x, aux = block(x, positions, cache_layer)     (models/block.py)
    logits = lm_head(norm(x))          # lm_head.weight is embed_tokens.weight when tied

`forward` is the one entry point, for training and inference (so DDP/FSDP hooks always fire):

    logits = model(ids)                                       [B, T, vocab]
    out = model(ids, targets)                                 ModelOutput: loss, lm_loss, aux_losses, stats
    out = model(ids, targets, reduction="none")               out.lm_loss: per-token NLL [B, T], with grads
    logits = model(ids, cache=cache)                          decode: the cache (caller-owned) grows per row
    logits = model(ids, cache=cache, positions=pos)           pos [B, T]: every row its own offset

The parts come from the registries (docs/INTERFACES.md states their contract).
"""
from __future__ import annotations

import torch
from torch import nn

from velocis.errors import VelocisError
from velocis.kernels.gemm import Linear
from velocis.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from velocis.models.block import Block
from velocis.models.cache import Cache
from velocis.models.layers import RMSNorm
from velocis.models.mtp import MTP
from velocis.models.output import ModelOutput
from velocis.models.positions import Positions
from velocis.models.registry import AUX_LOSSES, STATS_HOOKS, register_aux_loss

register_aux_loss("mtp", "mtp_loss_weight")
REDUCTIONS = ("mean", "sum", "none")


class VelocisModel(nn.Module):
    # the LM head + cross-entropy: the chunked kernel (False: the plain reference)
    fused_loss: bool = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.lm_head = Linear(config.hidden_dim, config.vocab_size, bias=False)
        # multi-token prediction modules (DeepSeek-V3): a training objective, and drafts for decoding
        self.mtp = MTP(config) if config.mtp_depth > 0 else None
        self.tie_weights()
        self._init_embedding()
        self._zero_residual_outputs()

    def tie_weights(self) -> None:
        """Share the head with the embedding when the config ties them (again after `to_empty`)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def _init_embedding(self) -> None:
        nn.init.normal_(self.embed_tokens.weight, std=self.config.init_std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.config.init_std)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place: what the constructor does, for a model
        built on the meta device and materialised with `to_empty` (the trainer's path). Children
        first, so a part's own `reset_parameters` overrides its sub-modules' defaults."""
        self.tie_weights()
        for m in reversed(list(self.modules())):
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "init_buffers"):
                m.init_buffers()
        self._init_embedding()
        self._zero_residual_outputs()

    @torch.no_grad()
    def _zero_residual_outputs(self) -> None:
        if not self.config.zero_init_residual:
            return
        for name, p in self.named_parameters():
            if set(name.split(".")[-2:]) & {"o_proj", "out_proj", "down_proj"}:
                p.zero_()

    # ------------------------------------------------------------------ forward
    def _positions(self, input_ids: torch.Tensor, cache: Cache | None, positions: torch.Tensor | None) -> Positions:
        B, T = input_ids.shape
        if positions is None:
            ids = cache.next_positions(T) if cache is not None else torch.arange(T, device=input_ids.device)
        else:
            ids = torch.as_tensor(positions, dtype=torch.long, device=input_ids.device)
            if ids.shape not in ((T,), (B, T)):
                raise VelocisError(f"positions must be [seq] or [batch, seq] = {[B, T]}, got {list(ids.shape)}")
        if cache is None:
            limit, what = self.config.max_seq_len, "the model's context"
            last = int(ids.max()) + 1 if positions is not None else T
            pos = Positions(ids, Positions.documents(ids) if ids.dim() == 2 else None, last)
        else:
            limit, what = cache.max_len, "the cache"
            last = int(ids.max()) + 1
            pos = Positions(ids, None, last)
        if last > limit:
            raise VelocisError(f"position {last - 1} is past the end of {what} ({limit} tokens); "
                               f"shorten the input or the number of new tokens")
        return pos

    def _trunk(self, input_ids: torch.Tensor, pos: Positions, cache: Cache | None):
        """Last block's output (before the final norm) [B, T, H] and {family: [per-layer losses]}."""
        x = self.embed_tokens(input_ids)
        aux: dict[str, list[torch.Tensor]] = {}
        for i, block in enumerate(self.layers):
            x, block_aux = block(x, pos, cache.layers[i] if cache is not None else None)
            for family, value in block_aux.items():
                aux.setdefault(family, []).append(value)
        if cache is not None:
            cache.advance(pos.ids)
        return x, aux

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *, cache: Cache | None = None,
                positions: torch.Tensor | None = None, reduction: str = "mean", ignore_index: int = -100,
                logits_to_keep: int = 0, logits_at: torch.Tensor | None = None, return_hidden: bool = False):
        """input_ids [B, T] -> logits [B, T, vocab], or a ModelOutput with targets / return_hidden.

        targets [B, T]: the next token of each position (ignore_index = not scored); the output's
        loss is the next-token NLL reduced by `reduction` plus each auxiliary family times its
        coefficient. cache: continue the cached rows (positions default to each row's length).
        positions [T] or [B, T]: explicit positions; without a cache, positions that restart inside
        a row start a new document there (packed sequences: attention stays within a document).
        logits_to_keep: only the last n positions' logits (0 = all), as in transformers; logits_at
        (LongTensor [B] or [B, K]): only those positions of each row (e.g. each prompt's last token)."""
        if input_ids.dim() != 2:
            raise VelocisError(f"input_ids must be [batch, seq] token ids, got shape {tuple(input_ids.shape)}")
        if cache is not None and input_ids.shape[0] != cache.batch_size:
            raise VelocisError(f"batch of {input_ids.shape[0]} sequences but the cache was made for "
                               f"{cache.batch_size}; make it with model.new_cache({input_ids.shape[0]}, ...)")
        if reduction not in REDUCTIONS:
            raise VelocisError(f"reduction {reduction!r} must be one of {', '.join(REDUCTIONS)}")
        pos = self._positions(input_ids, cache, positions)
        h, aux = self._trunk(input_ids, pos, cache)
        if targets is None:
            if logits_at is not None:
                at = logits_at if logits_at.dim() == 2 else logits_at[:, None]
                kept = h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))
            else:
                kept = h[:, -logits_to_keep:] if logits_to_keep else h
            logits = self.lm_head(self.norm(kept))
            return ModelOutput(logits=logits, hidden=h) if return_hidden else logits
        out = self._loss(h, aux, input_ids, targets, reduction, ignore_index)
        if return_hidden:
            out.hidden = h
        return out

    def head_loss(self, h_normed: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy of lm_head(h_normed) [B, T, H] against targets [B, T]:
        "mean" / "sum" over valid targets, or "none" -> [B, T] (0 at ignored targets)."""
        h2, t = h_normed.reshape(-1, h_normed.shape[-1]), targets.reshape(-1)
        if self.fused_loss:  # chunked: the [B*T, vocab] logits never exist at once
            loss = linear_cross_entropy(h2, self.lm_head.weight, t, ignore_index, reduction=reduction)
        else:
            loss = linear_cross_entropy_reference(h2, self.lm_head.weight, t, ignore_index, reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    def _loss(self, h, aux, input_ids, targets, reduction, ignore_index) -> ModelOutput:
        if targets.shape != input_ids.shape:
            raise VelocisError(f"targets {tuple(targets.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        hn = self.norm(h)
        lm = self.head_loss(hn, targets, ignore_index, reduction)
        num_tokens = (targets != ignore_index).sum()
        if self.mtp is not None and self.training:
            mtp_loss, mtp_aux = self.mtp(hn, input_ids, targets, self.embed_tokens,
                                         lambda hk, tk: self.head_loss(hk, tk, ignore_index))
            aux = {**aux, "mtp": [mtp_loss]}
            for family, values in mtp_aux.items():  # the MTP blocks' parts balance like the main ones
                aux.setdefault(family, []).extend(values)
        aux_losses = {family: torch.stack(v).mean() if len(v) > 1 else v[0] for family, v in aux.items()}
        aux_loss = torch.zeros((), device=h.device)
        for family, value in aux_losses.items():
            aux_loss = aux_loss + getattr(self.config, AUX_LOSSES[family]) * value
        if reduction == "none":
            lm_mean = lm.detach().sum() / num_tokens.clamp(min=1)
            loss = None
        else:
            lm_mean = lm.detach() if reduction == "mean" else lm.detach() / num_tokens.clamp(min=1)
            loss = lm + aux_loss
        stats = {"lm_loss": lm_mean, **{k: v.detach() for k, v in aux_losses.items()}}
        for hook in STATS_HOOKS:
            stats.update(hook(self))
        return ModelOutput(loss=loss, lm_loss=lm, aux_loss=aux_loss, aux_losses=aux_losses, num_tokens=num_tokens,
                           stats=stats)

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
        return Cache(layers, max_len, batch_size, device)

    def draft_cache(self, batch_size: int, max_len: int, device=None, dtype=None):
        """The layer cache of the model's own drafter (MTP depth 1), or None when it has none: an
        engine drafts through this and `draft_logits` without knowing what the drafter is."""
        if self.mtp is None:
            return None
        ref = self.embed_tokens.weight
        return self.mtp.layers[0].block.mixer.new_cache(batch_size, max_len, device or ref.device, dtype or ref.dtype)

    def draft_logits(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits of the token after `tokens` [B, T] from the pre-norm hidden states [B, T, H] of the
        positions before them (MTP depth 1), with the drafter's own cache."""
        return self.mtp.logits(self.norm(hidden), tokens, self.embed_tokens, self.lm_head, depth=1,
                               positions=positions, cache=cache)[0]

    def cache_bytes(self, dtype_bytes: int = 2) -> tuple[int, int]:
        """(bytes per cached token, bytes per sequence) over all layers, as each mixer declares them."""
        per_token = sum(b.mixer.cache_bytes_per_token(dtype_bytes) for b in self.layers)
        per_seq = sum(b.mixer.cache_bytes_per_sequence(dtype_bytes) for b in self.layers)
        return per_token, per_seq

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
