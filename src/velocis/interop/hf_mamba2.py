"""Hugging Face Mamba-2 (``Mamba2ForCausalLM``, model_type "mamba2") in and out.

A transformers Mamba-2 block is RMSNorm + mixer with a residual and no feed-forward, so Velocis builds
every layer as mixer "mamba2" (models/mamba2.py) with feed-forward "none" (models/block.py). The
mixer's parameters keep HF's names and shapes (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj);
only the prefixes change:
    backbone.embeddings.weight (older files: embedding)   embed_tokens.weight
    backbone.layers.{i}.norm.weight                       layers.{i}.mixer_norm.weight
    backbone.layers.{i}.mixer.*                           layers.{i}.mixer.*
    backbone.norm_f.weight                                norm.weight
    lm_head.weight                                        lm_head.weight (absent when tied)
Config: hidden_size, num_hidden_layers, state_size, head_dim, n_groups, expand, conv_kernel,
chunk_size, time_step_{min,max,floor,limit}, use_bias, use_conv_bias and layer_norm_epsilon (both
norms) map to ModelConfig fields; num_heads must equal expand * hidden_size / head_dim. A recurrent
model has no positional limit, but Velocis sizes contexts by max_seq_len: an import gets
MAMBA2_CONTEXT (raise it in the config.json of the converted model for longer runs).
"""
from __future__ import annotations

import math
import re
from typing import Any

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.interop.hf_dense import _eos
from velocis.interop.hf_registry import HF_ARCHITECTURES, Converter, Tensors

MAMBA2_CONTEXT = 131072

_FROM_HF = [
    (r"^backbone\.embeddings?\.", "embed_tokens."),
    (r"^backbone\.norm_f\.", "norm."),
    (r"^backbone\.layers\.(\d+)\.norm\.", r"layers.\1.mixer_norm."),
    (r"^backbone\.layers\.(\d+)\.mixer\.", r"layers.\1.mixer."),
]
_TO_HF = [
    (r"^embed_tokens\.", "backbone.embeddings."),
    (r"^norm\.", "backbone.norm_f."),
    (r"^layers\.(\d+)\.mixer_norm\.", r"backbone.layers.\1.norm."),
    (r"^layers\.(\d+)\.mixer\.", r"backbone.layers.\1.mixer."),
]


def _rename(name: str, rules) -> str:
    for pat, rep in rules:
        name, n = re.subn(pat, rep, name)
        if n:
            break
    return name


def _number(v) -> float:
    """A float of an HF config; transformers 5 writes non-finite ones as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def _hf_number(v: float):
    return {"__float__": "Infinity"} if v == math.inf else v


def mamba2_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise VelocisError(f"Mamba-2 with hidden_act {hf.get('hidden_act')!r} is not supported (Velocis uses silu)")
    hidden, expand = int(hf["hidden_size"]), int(hf.get("expand", 2))
    head_dim = int(hf.get("head_dim", 64))
    heads = int(hf.get("num_heads") or expand * hidden // head_dim)
    if heads * head_dim != expand * hidden:
        raise VelocisError(f"Mamba-2 config: num_heads {heads} x head_dim {head_dim} must equal expand {expand} x "
                           f"hidden_size {hidden}; the checkpoint's config is inconsistent")
    lo, hi = (_number(v) for v in hf.get("time_step_limit") or (0.0, math.inf))
    n = int(hf["num_hidden_layers"])
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_dim=hidden,
        num_layers=n,
        num_heads=1,  # no attention layers: the attention shape is unused
        max_seq_len=int(hf.get("max_position_embeddings") or MAMBA2_CONTEXT),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        mixer="mamba2",
        layer_feed_forwards=["none"] * n,
        ssm_state_size=int(hf.get("state_size", 128)),
        ssm_head_dim=head_dim,
        ssm_num_groups=int(hf.get("n_groups", 1)),
        ssm_expand=expand,
        ssm_conv_kernel=int(hf.get("conv_kernel", 4)),
        ssm_chunk_size=int(hf.get("chunk_size", 256)),
        ssm_dt_min=float(hf.get("time_step_min", 0.001)),
        ssm_dt_max=float(hf.get("time_step_max", 0.1)),
        ssm_dt_floor=float(hf.get("time_step_floor", 1e-4)),
        ssm_dt_limit=None if (lo, hi) == (0.0, math.inf) else [lo, hi],
        ssm_conv_bias=bool(hf.get("use_conv_bias", True)),
        ssm_proj_bias=bool(hf.get("use_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def mamba2_weights_from_hf(hf: Tensors, cfg: ModelConfig) -> Tensors:
    out = {}
    for k, v in hf.items():
        name = _rename(k, _FROM_HF)
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        out[name] = v
    return out


def is_mamba2(cfg: ModelConfig) -> bool:
    return (all(m == "mamba2" for m in cfg.mixers()) and all(f == "none" for f in cfg.feed_forwards())
            and cfg.mtp_depth == 0)


def to_mamba2_config(cfg: ModelConfig) -> dict[str, Any]:
    inner = cfg.ssm_expand * cfg.hidden_dim
    lo, hi = cfg.ssm_dt_limit or (0.0, math.inf)
    return dict(
        architectures=["Mamba2ForCausalLM"], model_type="mamba2",
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_dim, num_hidden_layers=cfg.num_layers,
        num_heads=inner // cfg.ssm_head_dim, head_dim=cfg.ssm_head_dim, state_size=cfg.ssm_state_size,
        n_groups=cfg.ssm_num_groups, expand=cfg.ssm_expand, conv_kernel=cfg.ssm_conv_kernel,
        chunk_size=cfg.ssm_chunk_size, time_step_min=cfg.ssm_dt_min, time_step_max=cfg.ssm_dt_max,
        time_step_floor=cfg.ssm_dt_floor, time_step_limit=[lo, _hf_number(hi)], use_bias=cfg.ssm_proj_bias,
        use_conv_bias=cfg.ssm_conv_bias, hidden_act="silu", layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings, residual_in_fp32=True,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, use_cache=True,
    )


def mamba2_weights_to_hf(sd: Tensors, cfg: ModelConfig) -> Tensors:
    return {_rename(k, _TO_HF): v for k, v in sd.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}


HF_ARCHITECTURES["Mamba2ForCausalLM"] = Converter(mamba2_config, mamba2_weights_from_hf, to_mamba2_config,
                                                  mamba2_weights_to_hf, can_export=is_mamba2)
