"""KV-cache size per token, and how MLA compares with MHA / GQA caches of the same width.

Each mixer declares its cache bytes (models/mixer.py); per layer and token:
  attention (MHA/GQA/MQA):  2 * num_kv_heads * head_dim                 numbers (K and V)
  MLA:                      kv_lora_rank + qk_rope_head_dim              (latent c + shared rotary key)
  MLA + DSA (V3.2):         kv_lora_rank + qk_rope_head_dim + index_head_dim   (+ the indexer's key)
times dtype_bytes (2 for bf16). Recurrent layers ("state" caches: Mamba-2, Gated DeltaNet) cost
nothing per token and a fixed state per sequence (`cache_bytes_per_sequence`; Mamba-2: the conv window
(I + 2 G N) (K-1) at dtype_bytes plus the fp32 SSM state H P N). `measured_kv_cache_bytes_per_token` and
`measured_state_bytes_per_sequence` build the model and its cache on the meta device and sum the
cache buffers, so the declarations are checked against what is allocated. The MTP modules' own
caches (only used when drafting) are not counted.
"""
from __future__ import annotations

import torch

from velocis.config import ModelConfig
from velocis.models.count import _active, _n, human, human_bytes
from velocis.models.decoder import VelocisModel
from velocis.models.registry import MIXERS


def _meta_model(config: ModelConfig):
    with torch.device("meta"):
        return VelocisModel(config)


def kv_cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """Cache bytes one token costs across all layers, as the mixers declare (model on the meta device)."""
    return _meta_model(config).cache_bytes(dtype_bytes)[0]


def measured_kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16, max_len: int = 16) -> int:
    """Bytes of the buffers `model.new_cache` allocates, per token (model and cache on the meta device)."""
    model = _meta_model(config)
    with torch.device("meta"):
        cache = model.new_cache(1, min(max_len, config.max_seq_len), device="meta", dtype=dtype)
    total = sum(b.numel() * b.element_size() for layer in cache.layers if layer.kind != "state"
                for b in layer.buffers())
    return total // cache.max_len


def measured_state_bytes_per_sequence(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the fixed-size ("state") layer caches `model.new_cache` allocates for one sequence."""
    model = _meta_model(config)
    with torch.device("meta"):
        cache = model.new_cache(1, min(16, config.max_seq_len), device="meta", dtype=dtype)
    return sum(b.numel() * b.element_size() for layer in cache.layers if layer.kind == "state"
               for b in layer.buffers())


def cache_bytes_at(config: ModelConfig, lengths=(1024, 4096, 16384, 32768), dtype_bytes: int = 2) -> list[tuple[int, int]]:
    """[(context length, cache bytes of one sequence that long)]: per-token caches grow, states stay flat."""
    per_token, per_seq = _meta_model(config).cache_bytes(dtype_bytes)
    return [(n, per_token * n + per_seq) for n in lengths]


def kv_cache_comparison(config: ModelConfig, dtype_bytes: int = 2) -> list[tuple[str, int]]:
    """[(label, bytes per token)]: this model, then caches of the same width (hidden_dim, num_heads)."""
    L, H, d = config.num_layers, config.num_heads, config.hidden_dim
    hd = d // H
    rows = [("this model", kv_cache_bytes_per_token(config, dtype_bytes))]
    rows.append((f"MHA, {H} heads x {hd} (hidden/heads)", 2 * H * hd * L * dtype_bytes))
    kv = 8 if H % 8 == 0 and H > 8 else max(1, H // 2)
    rows.append((f"GQA, {kv} kv heads x {hd}", 2 * kv * hd * L * dtype_bytes))
    if "mla" in config.mixers():
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        rows.append((f"MHA with MLA's per-head dims ({H} x (k {qk} + v {config.v_head_dim}))",
                     H * (qk + config.v_head_dim) * L * dtype_bytes))
        rows.append((f"GQA, 8 kv heads x 128 (Llama-3-70B style)", 2 * 8 * 128 * L * dtype_bytes))
    return rows


def mtp_split(config: ModelConfig) -> dict:
    """Parameters with and without the MTP modules (meta device).

    main_total / main_active: the model without MTP (active = per token, embedding lookup excluded,
    head included, as velocis.models.count); mtp: the modules' own parameters (embedding and head are
    shared); mtp_active: what one token uses in them; hf_checkpoint_total: main + MTP + the copies of
    the embedding and head that DeepSeek/HF files store inside each MTP layer."""
    model = _meta_model(config)
    total = model.num_params()
    mtp = _n(model.mtp)
    mtp_active = 0
    if model.mtp is not None:
        for layer in model.mtp.layers:
            b = layer.block
            mtp_active += _n(layer) - _n(b.mixer) - _n(b.feed_forward) + _active(b.mixer) + _active(b.feed_forward)
    copies = config.mtp_depth * (_n(model.embed_tokens) + model.lm_head.weight.numel())
    return {"total": total, "main_total": total - mtp, "mtp": mtp, "mtp_active": mtp_active,
            "hf_checkpoint_total": total + copies, "mtp_with_embedding_and_head_copies": mtp + copies}


def report_lines(config: ModelConfig, dtype_bytes: int = 2) -> list[str]:
    """Lines for `velocis params`: cache per token vs same-width MHA/GQA, and the MTP split."""
    rows = kv_cache_comparison(config, dtype_bytes)
    own = rows[0][1]
    out = [f"KV cache per token ({8 * dtype_bytes}-bit), vs caches of the same width:"]
    for label, b in rows:
        ratio = "" if label == "this model" or not own else f"  this model = {own / b:.3f}x (1/{b / own:.1f})"
        out.append(f"  {label:<58} {human_bytes(b):>11}{ratio}")
    per_seq = _meta_model(config).cache_bytes(dtype_bytes)[1]
    if per_seq:
        kinds = sorted({m for m in config.mixers() if MIXERS[m].cache_kind == "state"})
        out.append(f"recurrent state ({', '.join(kinds)} layers): {human_bytes(per_seq)} per sequence, whatever its "
                   f"length; one sequence's whole cache at " + ", ".join(
                       f"{n // 1024}K: {human_bytes(b)}" for n, b in cache_bytes_at(config, dtype_bytes=dtype_bytes)))
    if config.mtp_depth:
        s = mtp_split(config)
        out.append(f"without MTP: {s['main_total']:,} ({human(s['main_total'])}); MTP modules: {s['mtp']:,} "
                   f"({human(s['mtp'])}), {human(s['mtp_with_embedding_and_head_copies'])} with the embedding/head "
                   f"copies HF files store -> checkpoint {human(s['hf_checkpoint_total'])}; MTP activated per token "
                   f"{human(s['mtp_active'])}")
    return out
