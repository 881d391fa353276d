"""Dense Llama-family models (Llama, Mistral, Qwen2, Qwen3) and the helpers the other converters
share: RoPE scaling and tensor names.

Velocis parameter names mirror HF's inside a layer, so most tensors only change prefix:
    model.embed_tokens.weight                 embed_tokens.weight
    model.layers.{i}.input_layernorm          layers.{i}.mixer_norm
    model.layers.{i}.self_attn.*              layers.{i}.mixer.*
    model.layers.{i}.post_attention_layernorm layers.{i}.ff_norm
    model.layers.{i}.mlp.*                    layers.{i}.feed_forward.*
    model.norm.weight / lm_head.weight        norm.weight / lm_head.weight
Both sides use the rotate_half RoPE layout, so q/k weights need no permutation.
"""
from __future__ import annotations

import re
from typing import Any

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.interop.hf_registry import HF_ARCHITECTURES, Converter, Tensors

# --------------------------------------------------------------------------- RoPE
def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields rope_theta, rope_scaling, max_seq_len from an HF config (old `rope_scaling`
    + `rope_theta` or transformers-5 `rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or {})
    old = hf.get("rope_scaling") or {}
    params = {**old, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    mpe = int(hf.get("max_position_embeddings", 2048))
    out: dict[str, Any] = {"rope_theta": theta, "rope_scaling": None, "max_seq_len": mpe}
    if kind in (None, "default"):
        return out
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise VelocisError(f"rope type {kind!r} is not supported (supported: default, linear, dynamic, yarn, llama3)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise VelocisError("partial_rotary_factor != 1 is not supported")
    factor = params.get("factor")
    orig = params.get("original_max_position_embeddings")
    s: dict[str, Any] = {"type": kind}
    if kind == "dynamic":  # HF: the pretraining context is max_position_embeddings; it may run longer
        s.update(factor=float(factor), original_max_seq_len=mpe)
        out["max_seq_len"] = int(mpe * float(factor))
    elif kind == "linear":
        s.update(factor=float(factor))
    elif kind == "yarn":
        orig = orig or mpe
        if factor is None:  # DeepSeek style: implied by the two lengths
            factor = mpe / orig
        s.update(factor=float(factor), original_max_seq_len=int(orig))
        for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"):
            if params.get(k) is not None:
                s[k] = params[k]
    else:  # llama3
        s.update(factor=float(factor), original_max_seq_len=int(orig),
                 low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]))
    out["rope_scaling"] = s
    return out


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """HF fields rope_parameters (+ legacy rope_theta) and max_position_embeddings."""
    s = cfg.rope_scaling
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    mpe = cfg.max_seq_len
    if s:
        kind = s["type"]
        if kind == "ntk":
            raise VelocisError("rope_scaling type 'ntk' (static NTK) has no Hugging Face equivalent; "
                               "use 'dynamic' or 'yarn' to export")
        params.update(rope_type=kind, factor=s["factor"])
        if kind == "dynamic":
            mpe = s["original_max_seq_len"]
        elif kind in ("yarn", "llama3"):
            params["original_max_position_embeddings"] = s["original_max_seq_len"]
            for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
                      "low_freq_factor", "high_freq_factor"):
                if k in s:
                    params[k] = s[k]
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta, "max_position_embeddings": mpe}


# --------------------------------------------------------------------------- tensor names
_FROM_HF = [  # (HF pattern, Velocis replacement), applied in order after dropping "model."
    (r"^layers\.(\d+)\.input_layernorm\.", r"layers.\1.mixer_norm."),
    (r"^layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ff_norm."),
    (r"^layers\.(\d+)\.self_attn\.", r"layers.\1.mixer."),
    (r"^layers\.(\d+)\.(mlp|block_sparse_moe)\.", r"layers.\1.feed_forward."),
]
_TO_HF = [
    (r"^layers\.(\d+)\.mixer_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ff_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.mixer\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.feed_forward\.", r"model.layers.\1.mlp."),
    (r"^(embed_tokens|norm)\.", r"model.\1."),
]


def name_from_hf(name: str) -> str | None:
    """HF tensor name -> Velocis name (None: not a weight Velocis keeps, e.g. rotary inv_freq)."""
    if "rotary_emb" in name:
        return None
    if name.startswith("model."):
        name = name[len("model."):]
    for pat, rep in _FROM_HF:
        name = re.sub(pat, rep, name)
    return name


def name_to_hf(name: str) -> str:
    for pat, rep in _TO_HF:
        name = re.sub(pat, rep, name)
    return name


def dense_weights_from_hf(hf: Tensors, cfg: ModelConfig) -> Tensors:
    out = {}
    for k, v in hf.items():
        n = name_from_hf(k)
        if n is None or (n == "lm_head.weight" and cfg.tie_embeddings):
            continue
        out[n] = v
    return out


def dense_weights_to_hf(sd: Tensors, cfg: ModelConfig) -> Tensors:
    return {name_to_hf(k): v for k, v in sd.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}


# --------------------------------------------------------------------------- dense configs
def _eos(hf: dict[str, Any]) -> int | None:
    e = hf.get("eos_token_id")
    return e[0] if isinstance(e, list) and e else e


# Families whose tokenizers put BOS before every text: their models were trained that way, so a
# prompt starts with BOS (ModelConfig.prompt_start_token_id). Qwen's do not: nothing goes first.
ADDS_BOS = {"llama", "mistral", "mixtral", "deepseek_v3", "deepseek_v32"}


def prompt_start(hf: dict[str, Any]) -> int | None:
    return hf.get("bos_token_id") if hf.get("model_type") in ADDS_BOS else None


def dense_config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields shared by the Llama family (attention + SwiGLU, RMSNorm, RoPE)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise VelocisError(f"hidden_act {act!r} is not supported (Velocis MLPs are SwiGLU with silu)")
    if hf.get("attention_dropout", 0.0) not in (0, 0.0, None):
        pass  # dropout only matters in training; ignored
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf),
        pad_token_id=hf.get("pad_token_id"),
        prompt_start_token_id=prompt_start(hf),
        **rope_from_hf(hf),
    )


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("mlp_bias") or hf.get("attention_bias"):  # Llama's attention_bias also biases o_proj
        raise VelocisError("Llama with mlp_bias/attention_bias=true is not supported (Velocis biases q/k/v only)")
    return ModelConfig(**dense_config_fields(hf))


def _cap_to_window(fields: dict[str, Any], window: int | None) -> dict[str, Any]:
    """Sliding-window attention equals full causal attention up to `window` tokens: import such a
    model with its context capped there, so it is exact wherever it runs."""
    if window and window < fields["max_seq_len"]:
        fields["max_seq_len"] = int(window)
    return fields


def mistral_config(hf: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**_cap_to_window(dense_config_fields(hf), hf.get("sliding_window")))


def qwen2_config(hf: dict[str, Any]) -> ModelConfig:
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return ModelConfig(**_cap_to_window(dense_config_fields(hf), window), qkv_bias=True)


def qwen3_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("attention_bias"):  # Qwen3's attention_bias also biases o_proj
        raise VelocisError("Qwen3 with attention_bias=true is not supported (Velocis biases q/k/v only)")
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return ModelConfig(**_cap_to_window(dense_config_fields(hf), window), qk_norm=True)


def _is_dense_attention(cfg: ModelConfig) -> bool:
    return (all(m == "attention" for m in cfg.mixers()) and all(f == "mlp" for f in cfg.feed_forwards())
            and cfg.mtp_depth == 0)


def _hf_dense_common(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        attention_dropout=0.0,
        use_cache=True,
        **rope_to_hf(cfg),
    )


def to_llama_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_hf_dense_common(cfg), architectures=["LlamaForCausalLM"], model_type="llama",
                attention_bias=False, mlp_bias=False, pretraining_tp=1)


def to_qwen2_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_hf_dense_common(cfg), architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)


def to_qwen3_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_hf_dense_common(cfg), architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                attention_bias=False, use_sliding_window=False, sliding_window=None,
                max_window_layers=cfg.num_layers)


HF_ARCHITECTURES["LlamaForCausalLM"] = Converter(
    llama_config, dense_weights_from_hf, to_llama_config, dense_weights_to_hf,
    can_export=lambda c: _is_dense_attention(c) and not c.qkv_bias and not c.qk_norm)
HF_ARCHITECTURES["Qwen2ForCausalLM"] = Converter(
    qwen2_config, dense_weights_from_hf, to_qwen2_config, dense_weights_to_hf,
    can_export=lambda c: _is_dense_attention(c) and c.qkv_bias and not c.qk_norm)
HF_ARCHITECTURES["Qwen3ForCausalLM"] = Converter(
    qwen3_config, dense_weights_from_hf, to_qwen3_config, dense_weights_to_hf,
    can_export=lambda c: _is_dense_attention(c) and c.qk_norm and not c.qkv_bias)
HF_ARCHITECTURES["MistralForCausalLM"] = Converter(mistral_config, dense_weights_from_hf)
