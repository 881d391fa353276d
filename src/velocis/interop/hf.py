"""Hugging Face directories in and out.

`HF_ARCHITECTURES` maps an HF `config.json` `architectures[0]` to a `Converter`: how its config
and tensors become Velocis's (and back, for export). Dense Llama-family models are here
(Llama, Mistral, Qwen2, Qwen3); other files register more (interop/hf_moe.py: Mixtral,
Qwen3-MoE; interop/hf_deepseek.py: DeepSeek-V3) by adding `HF_ARCHITECTURES[name] = Converter(...)`
and their module name to `_CONVERTER_MODULES` below.

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

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError

Tensors = dict[str, torch.Tensor]


@dataclass
class Converter:
    """One HF architecture. `config_from_hf(hf_config_dict) -> ModelConfig`;
    `weights_from_hf(hf_tensors, config) -> velocis state dict` (may pop from its input);
    for export: `config_to_hf(config) -> hf config dict` (with "architectures" and "model_type"),
    `weights_to_hf(velocis_state, config) -> hf tensors`, and `can_export(config) -> bool`
    (the first registered converter that accepts a config is used by `velocis export`)."""

    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    weights_from_hf: Callable[[Tensors, ModelConfig], Tensors]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]] | None = None
    weights_to_hf: Callable[[Tensors, ModelConfig], Tensors] | None = None
    can_export: Callable[[ModelConfig], bool] | None = None


HF_ARCHITECTURES: dict[str, Converter] = {}


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


# --------------------------------------------------------------------------- reading / writing dirs
def read_hf_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VelocisError(f"{path}: no config.json; pass a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise VelocisError(f"{f}: not valid JSON ({e})") from None


# a config.json without "architectures" (e.g. PretrainedConfig.save_pretrained) names its model_type only
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM"}


def converter_for(hf: dict[str, Any], where: str | Path = "") -> tuple[str, Converter]:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else MODEL_TYPES.get(hf.get("model_type"))
    if arch not in HF_ARCHITECTURES:
        raise VelocisError(
            f"{where}: architecture {arch or hf.get('model_type') or 'unknown'!s} is not supported; "
            f"Velocis imports {', '.join(sorted(HF_ARCHITECTURES))}")
    return arch, HF_ARCHITECTURES[arch]


def read_hf_tensors(path: str | Path) -> Tensors:
    """All tensors of an HF dir: model.safetensors, a sharded index, or pytorch_model.bin."""
    from velocis.model_io import read_safetensors
    from velocis.utils.output_dir import as_path

    path = as_path(path, "path")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise VelocisError(f"{index} is truncated or corrupt ({type(e).__name__}: {e}); "
                               f"re-download it") from None
        out: Tensors = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise VelocisError(f"{path}: shard {shard} listed in model.safetensors.index.json is missing")
            out.update(read_safetensors(path / shard))
        return out
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, or objects beyond tensors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VelocisError(f"{path / 'pytorch_model.bin'} is truncated or corrupt, or not a plain state dict "
                               f"({first}); re-save or re-download it") from None
    raise VelocisError(f"{path}: no model.safetensors (or sharded index / pytorch_model.bin) found")


def load_hf(path: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """HF directory -> (VelocisModel, tokenizer or None)."""
    from velocis.model_io import build_model, load_tokenizer

    hf = read_hf_config(path)
    arch, conv = converter_for(hf, path)
    cfg = conv.config_from_hf(hf)
    sd = conv.weights_from_hf(read_hf_tensors(path), cfg)
    model = build_model(cfg, sd, where=f"{path} ({arch})", device=device, dtype=dtype)
    return model, load_tokenizer(path)


# All that export_hf writes, so all it may replace in an existing output directory.
HF_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json")


def export_hf(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None,
              overwrite: bool = False) -> str:
    """Write `model` as an HF directory transformers loads; returns the architecture name.

    Only HF_FILES are written, each atomically; a directory holding anything else is refused
    unless `overwrite` (see velocis.utils.output_dir), and nothing else in it is ever deleted.
    """
    from safetensors.torch import save_file

    from velocis.model_io import require_dtype, require_model
    from velocis.utils.atomic import atomic_files
    from velocis.utils.output_dir import as_path, check_output_dir, config_kind

    out_dir = as_path(out_dir, "out_dir")
    require_model(model)
    require_dtype(dtype)
    cfg = model.config
    for arch, conv in HF_ARCHITECTURES.items():
        if conv.config_to_hf and conv.can_export and conv.can_export(cfg):
            break
    else:
        raise VelocisError("no Hugging Face architecture matches this model (its mixers/feed-forwards have no "
                           f"HF exporter; exportable: {', '.join(a for a, c in HF_ARCHITECTURES.items() if c.config_to_hf)})")
    previous = check_output_dir(out_dir, HF_FILES, "a Hugging Face model", overwrite, flag="out_dir",
                                is_own=lambda d: config_kind(d) == "hf")  # a previous export, not a Velocis dir
    hf_cfg = conv.config_to_hf(cfg)
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    tensors = conv.weights_to_hf(sd, cfg)
    store_dtype = next(iter(tensors.values())).dtype
    hf_cfg.setdefault("dtype", str(store_dtype).removeprefix("torch."))
    need = sum(v.numel() * v.element_size() for v in tensors.values())
    with atomic_files(out_dir, replace=previous, need_bytes=need) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                 ("pad_token_id", cfg.pad_token_id)) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return arch


# Converters defined in other files register themselves on import.
_CONVERTER_MODULES = ["velocis.interop.hf_moe", "velocis.interop.hf_deepseek"]
for _name in _CONVERTER_MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as e:
        if e.name != _name:
            raise
