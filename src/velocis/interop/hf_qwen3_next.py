"""Hugging Face Qwen3-Next (``Qwen3NextForCausalLM``) in and out.

Velocis builds it as one model whose layers pick a mixer per HF ``layer_types``:
  linear_attention -> "gated_deltanet"   (models/deltanet.py; HF ``linear_attn.*``, same names and layouts)
  full_attention   -> "gated_attention"  (models/gated_attention.py; HF ``self_attn.*``: doubled q_proj
                                          with the output gate, q/k RMSNorm, partial RoPE)
and per layer a feed-forward: MoE (softmax top-k, ``norm_topk_prob``, one shared expert of width
``shared_expert_intermediate_size`` scaled by ``sigmoid(shared_expert_gate(x))``) or, for
``mlp_only_layers`` / ``decoder_sparse_step``, a dense SwiGLU of ``intermediate_size``.

Tensor names beyond the prefixes of interop/hf_dense.py:
  model.layers.{i}.linear_attn.*            layers.{i}.mixer.*
  mlp.shared_expert.{gate,up,down}_proj     feed_forward.shared_experts.{gate,up,down}_proj
  mlp.shared_expert_gate.weight             feed_forward.shared_expert_gate.weight
  mlp.experts.{j}.{gate,up,down}_proj       stacked experts.gate_up_proj / down_proj (interop/hf_moe.py)
  mtp.*                                     dropped (transformers drops them too)
Norms: Qwen3-Next's RMSNorms (input / post-attention / final, q_norm, k_norm) compute x * (1 + w),
with w stored zero-centred; Velocis' compute x * w: the importer adds 1, the exporter subtracts it.
(The gated RMSNorm inside the DeltaNet layer is a plain x * w on both sides.)
"""
from __future__ import annotations

from typing import Any

import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.interop.hf_dense import _eos, _hf_dense_common, name_from_hf, name_to_hf, prompt_start, rope_from_hf
from velocis.interop.hf_moe import aux_coef_from_hf, aux_coef_to_hf, pop_stacked_experts, qwen3_moe_layer_is_sparse
from velocis.interop.hf_registry import HF_ARCHITECTURES, Converter, Tensors

MIXER_OF = {"linear_attention": "gated_deltanet", "full_attention": "gated_attention"}
LAYER_TYPE_OF = {v: k for k, v in MIXER_OF.items()}
ZERO_CENTRED = ("mixer_norm.weight", "ff_norm.weight", "mixer.q_norm.weight", "mixer.k_norm.weight")


# --------------------------------------------------------------------------- configs
def _layer_types(hf: dict[str, Any]) -> list[str]:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:  # older configs: every full_attention_interval-th layer is attention
        every = int(hf.get("full_attention_interval", 4))
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    if len(types) != n or any(t not in MIXER_OF for t in types):
        raise VelocisError(f"Qwen3-Next layer_types {types} must name linear_attention or full_attention for each of "
                           f"the {n} layers")
    return list(types)


def qwen3_next_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise VelocisError(f"Qwen3-Next hidden_act {hf.get('hidden_act')!r}: only silu is supported")
    if hf.get("attention_bias"):  # HF's attention_bias also biases o_proj
        raise VelocisError("Qwen3-Next with attention_bias=true is not supported (Velocis biases q/k/v only)")
    rope = dict(hf.get("rope_parameters") or {})
    partial = float(rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)))
    n = hf["num_hidden_layers"]
    experts = int(hf.get("num_experts", 0) or 0)
    ffs = ["moe" if experts and qwen3_moe_layer_is_sparse(hf, i) else "mlp" for i in range(n)]
    shared = int(hf.get("shared_expert_intermediate_size", 0) or 0)
    if "moe" in ffs and shared <= 0:
        raise VelocisError(f"Qwen3-Next shared_expert_intermediate_size {shared}: a positive width is needed")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_dim=hf["hidden_size"],
        num_layers=n,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or 256,  # HF's default
        mlp_dim=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        qk_norm=True,
        mixer="gated_attention",
        layer_mixers=[MIXER_OF[t] for t in _layer_types(hf)],
        layer_feed_forwards=None if "moe" not in ffs else ffs,
        partial_rotary_factor=partial,
        linear_num_key_heads=int(hf.get("linear_num_key_heads", 16)),
        linear_num_value_heads=int(hf.get("linear_num_value_heads", 32)),
        linear_key_head_dim=int(hf.get("linear_key_head_dim", 128)),
        linear_value_head_dim=int(hf.get("linear_value_head_dim", 128)),
        linear_conv_kernel=int(hf.get("linear_conv_kernel_dim", 4)),
        num_experts=experts if "moe" in ffs else 0,
        num_experts_per_token=int(hf.get("num_experts_per_tok", 1)) if "moe" in ffs else 2,
        moe_dim=hf.get("moe_intermediate_size"),
        num_shared_experts=1 if "moe" in ffs else 0,
        shared_expert_dim=shared if "moe" in ffs else None,
        shared_expert_gate="moe" in ffs,
        router_score="softmax",
        router_norm_topk=bool(hf.get("norm_topk_prob", True)),
        balance="aux_loss",
        aux_loss_coef=aux_coef_from_hf(hf) if "moe" in ffs else 0.01,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf),
        pad_token_id=hf.get("pad_token_id"),
        prompt_start_token_id=prompt_start(hf),
        **rope_from_hf({**hf, "rope_parameters": rope}),
    )


def can_export_qwen3_next(cfg: ModelConfig) -> bool:
    mixers, ffs = cfg.mixers(), cfg.feed_forwards()
    if any(m not in LAYER_TYPE_OF for m in mixers) or any(f not in ("mlp", "moe") for f in ffs):
        return False
    if "gated_attention" in mixers and (not cfg.qk_norm or cfg.qkv_bias):
        return False
    if "moe" in ffs and not (cfg.router_score == "softmax" and cfg.num_expert_groups == 1
                             and cfg.routed_scaling_factor == 1.0 and cfg.num_shared_experts == 1
                             and cfg.shared_expert_gate and cfg.capacity_factor is None and cfg.balance != "aux_free"):
        return False
    return cfg.mtp_depth == 0 and cfg.index_num_heads == 0 and cfg.quantization is None


def to_qwen3_next_config(cfg: ModelConfig) -> dict[str, Any]:
    from velocis.models.deltanet import deltanet_dims

    ffs = cfg.feed_forwards()
    hk, hv, dk, dv, kernel = deltanet_dims(cfg)
    hf = _hf_dense_common(cfg)
    hf["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    moe = "moe" in ffs
    hf.update(
        architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", attention_bias=False,
        layer_types=[LAYER_TYPE_OF[m] for m in cfg.mixers()],
        linear_num_key_heads=hk, linear_num_value_heads=hv, linear_key_head_dim=dk, linear_value_head_dim=dv,
        linear_conv_kernel_dim=kernel,
        num_experts=cfg.num_experts if moe else 0, num_experts_per_tok=cfg.num_experts_per_token,
        moe_intermediate_size=cfg.moe_dim,
        shared_expert_intermediate_size=(cfg.shared_expert_dim or cfg.moe_dim * cfg.num_shared_experts) if moe else 0,
        norm_topk_prob=cfg.router_norm_topk, decoder_sparse_step=1,
        mlp_only_layers=[i for i, f in enumerate(ffs) if f != "moe"] if moe else [],
        router_aux_loss_coef=aux_coef_to_hf(cfg) if moe else 0.001, output_router_logits=False,
    )
    return hf


# --------------------------------------------------------------------------- tensors
def qwen3_next_weights_from_hf(hf_sd: Tensors, cfg: ModelConfig) -> Tensors:
    sd = {k: v for k, v in hf_sd.items() if not k.startswith("mtp.")}  # the MTP module: not kept (as transformers)
    out: Tensors = {}
    for i, ff in enumerate(cfg.feed_forwards()):
        pre, opre = f"model.layers.{i}.", f"layers.{i}."
        if ff == "moe":
            mlp = pre + "mlp."
            out[opre + "feed_forward.gate.weight"] = sd.pop(mlp + "gate.weight")
            out[opre + "feed_forward.gate.e_score_correction_bias"] = torch.zeros(cfg.num_experts, dtype=torch.float32)
            for k, v in pop_stacked_experts(sd, mlp, cfg.num_experts, model="Qwen3-Next").items():
                out[opre + "feed_forward." + k] = v
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{opre}feed_forward.shared_experts.{proj}.weight"] = sd.pop(f"{mlp}shared_expert.{proj}.weight")
            out[opre + "feed_forward.shared_expert_gate.weight"] = sd.pop(mlp + "shared_expert_gate.weight")
        for k in [k for k in sd if k.startswith(pre + "linear_attn.")]:
            out[opre + "mixer." + k[len(pre + "linear_attn."):]] = sd.pop(k)
    for k, v in sd.items():
        name = name_from_hf(k)
        if name is None or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        out[name] = v
    for k, v in out.items():
        if k == "norm.weight" or k.endswith(ZERO_CENTRED):
            out[k] = v.float().add(1.0).to(v.dtype)
    return out


def qwen3_next_weights_to_hf(sd: Tensors, cfg: ModelConfig) -> Tensors:
    sd = {k: (v.float().sub(1.0).to(v.dtype) if k == "norm.weight" or k.endswith(ZERO_CENTRED) else v)
          for k, v in sd.items()}
    out: Tensors = {}
    mixers = cfg.mixers()
    for i, ff in enumerate(cfg.feed_forwards()):
        pre, hpre = f"layers.{i}.", f"model.layers.{i}."
        if mixers[i] == "gated_deltanet":
            for k in [k for k in sd if k.startswith(pre + "mixer.")]:
                out[hpre + "linear_attn." + k[len(pre + "mixer."):]] = sd.pop(k)
        if ff == "moe":
            f = pre + "feed_forward."
            bias = sd.pop(f + "gate.e_score_correction_bias", None)
            if bias is not None and bool(bias.any()):
                raise VelocisError("cannot export as Qwen3-Next: the router has a non-zero selection bias "
                                   "(aux_free balancing), which Qwen3-Next does not have")
            gate_up, down = sd.pop(f + "experts.gate_up_proj"), sd.pop(f + "experts.down_proj")
            inner = down.shape[-1]
            for j in range(gate_up.shape[0]):
                out[f"{hpre}mlp.experts.{j}.gate_proj.weight"] = gate_up[j, :inner].contiguous()
                out[f"{hpre}mlp.experts.{j}.up_proj.weight"] = gate_up[j, inner:].contiguous()
                out[f"{hpre}mlp.experts.{j}.down_proj.weight"] = down[j].contiguous()
            for k in [k for k in sd if k.startswith(f + "shared_experts.")]:
                out[hpre + "mlp.shared_expert." + k[len(f + "shared_experts."):]] = sd.pop(k)
            out[hpre + "mlp.shared_expert_gate.weight"] = sd.pop(f + "shared_expert_gate.weight")
    for k, v in sd.items():
        if k == "lm_head.weight" and cfg.tie_embeddings:
            continue
        out[name_to_hf(k)] = v
    return {k: v.contiguous() for k, v in out.items()}


HF_ARCHITECTURES["Qwen3NextForCausalLM"] = Converter(
    qwen3_next_config, qwen3_next_weights_from_hf, to_qwen3_next_config, qwen3_next_weights_to_hf,
    can_export=can_export_qwen3_next)
