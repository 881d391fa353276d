"""Multi-token prediction (DeepSeek-V3): D sequential modules after the main model.

With main-model output h_0 = norm(last block output) (the final-normed hidden state the head reads),
module k = 1..D, at position i (0 <= i < T-k):

    x     = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_{k-1}[i])])       (embedding first, as the checkpoints)
    h_k   = norm_k(Block_k(x))                                       (one transformer block; shared_head.norm)
    p_k   = softmax(lm_head(h_k))  predicts t_{i+k+1}

The embedding and the output head are the main model's (shared; the model passes them in, this
module never reaches into it); each module has its own enorm, hnorm, eh_proj, block and norm.
Training adds ``mtp_loss_weight * mean_k CE(p_k, t_{i+k+1})``: the "mtp" auxiliary family, logged
as the stat "mtp"; the blocks' own auxiliary losses (e.g. their MoE balance) join the model's.
This matches transformers' MtpModel / MtpLayer (use_post_norm) for DeepSeek-V3, and the HF checkpoint
layout ``model.layers.{num_layers + k - 1}.{enorm, hnorm, eh_proj, shared_head.norm, self_attn, mlp, ...}``
(see interop/hf_deepseek.py).

Velocis names: ``mtp.layers.{k-1}.{enorm, hnorm, eh_proj, block.*, norm}``. The modules stay in the
checkpoint so an inference engine can use them to draft tokens (self-speculative decoding) through
``MTP.logits`` / ``MTP.draft``. Every ``h`` argument here is the main model's *normed* last hidden
state, norm(last block output).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from velocis.kernels.gemm import Linear
from velocis.models.block import Block
from velocis.models.layers import RMSNorm
from velocis.models.positions import Positions


class MTPLayer(nn.Module):
    def __init__(self, config, depth: int):
        super().__init__()
        h = config.hidden_dim
        self.depth = depth  # 1-based
        self.init_std = config.init_std
        self.enorm = RMSNorm(h, config.norm_eps)
        self.hnorm = RMSNorm(h, config.norm_eps)
        self.eh_proj = Linear(2 * h, h, bias=False)
        # the block has the parts of the main model's last layer (DeepSeek-V3: MLA + MoE)
        self.block = Block(config, config.num_layers - 1)
        for part in (self.block.mixer, self.block.feed_forward):
            if hasattr(part, "layer_idx"):
                part.layer_idx = config.num_layers + depth - 1
        self.norm = RMSNorm(h, config.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.eh_proj.weight, std=self.init_std)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, pos: Positions, cache=None):
        """h_prev [B, T, H] (normed previous depth), emb [B, T, H] embeddings of the tokens k ahead
        -> (h_k (normed), the block's auxiliary losses)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        x, aux = self.block(x, pos, cache)
        return self.norm(x), aux


class MTP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(MTPLayer(config, k + 1) for k in range(config.mtp_depth))

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, embed: nn.Module,
                head_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        """(mean over depths of the MTP cross-entropy, {family: [per-block aux losses]}).
        h: normed last hidden state [B, T, H]; targets[:, i] is the token after input_ids[:, i];
        head_loss(h_k, targets_k) -> mean cross-entropy of the shared head."""
        T = input_ids.shape[1]
        losses, aux = [], {}
        for k, layer in enumerate(self.layers, start=1):
            if T - k <= 0:
                break
            pos = Positions(torch.arange(T - k, device=input_ids.device))  # i: see MTP.logits on positions
            h, block_aux = layer(h[:, : T - k], embed(input_ids[:, k:]), pos)
            losses.append(head_loss(h, targets[:, k:]))
            for family, value in block_aux.items():
                aux.setdefault(family, []).append(value)
        if not losses:
            return h.sum() * 0.0, aux
        return torch.stack(losses).mean(), aux

    def per_depth_logits(self, h: torch.Tensor, input_ids: torch.Tensor, embed: nn.Module, head: nn.Module):
        """Full-sequence (no cache) logits of every depth: element k-1 is [B, T-k, vocab] and its
        position i predicts token i+k+1. h: the normed last hidden state."""
        T = input_ids.shape[1]
        out = []
        for k, layer in enumerate(self.layers, start=1):
            if T - k <= 0:
                break
            h, _ = layer(h[:, : T - k], embed(input_ids[:, k:]), Positions(torch.arange(T - k, device=h.device)))
            out.append(head(h))
        return out

    # ------------------------------------------------------------------ drafting (inference)
    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> list:
        """One cache per depth (each MTP block attends over its own past)."""
        return [layer.block.mixer.new_cache(batch_size, max_len, device, dtype) for layer in self.layers]

    def logits(self, h_prev: torch.Tensor, tokens: torch.Tensor, embed: nn.Module, head: nn.Module, depth: int = 1,
               positions: torch.Tensor | None = None, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP depth on a chunk: h_prev [B, T, H] (the normed main hidden state, or the previous
        depth's output) at positions i, tokens [B, T] = t_{i+depth}; returns (logits [B, T, vocab] for
        t_{i+depth+1}, h_depth [B, T, H]). ``positions`` are i ([T] or [B, T], default 0..T-1), which
        index ``cache`` (this depth's, from new_cache). transformers rotates MTP depth k at i + k
        instead: RoPE scores depend only on position differences, so the outputs are the same, and
        slot i of a cache is filled from position 0 on."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        pos = Positions(positions, kv_len=int(positions.max()) + 1)
        h, _ = self.layers[depth - 1](h_prev, embed(tokens), pos, cache)
        return head(h), h

    @torch.no_grad()
    def draft(self, h: torch.Tensor, ids: torch.Tensor, embed: nn.Module, head: nn.Module) -> torch.Tensor:
        """Greedy draft of D tokens without caches (a reference for the engine's cached drafting).
        h: the normed main hidden state [B, T, H] for ids[:, :T]; ids [B, T+1]: those tokens plus
        the token the main model chose for position T. Returns [B, D]: drafts for positions T+1..T+D."""
        T, seq, out = h.shape[1], ids, []
        prev = h
        for k in range(1, len(self.layers) + 1):
            logits, prev = self.logits(prev, seq[:, k:k + T], embed, head, depth=k)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            seq = torch.cat([seq, nxt], dim=1)
        return torch.cat(out, dim=1)
