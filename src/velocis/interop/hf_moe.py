"""Hugging Face MoE checkpoints in and out: Mixtral and Qwen3-MoE.

The attention / embedding / norm weights have the same names as in the Llama family and are
converted by the dense converter in ``interop/hf_dense.py``; this module adds
  * the config mapping (HF config.json <-> ModelConfig) for ``MixtralForCausalLM`` and
    ``Qwen3MoeForCausalLM`` (Qwen3: explicit head_dim, per-head q/k RMSNorm, optional
    ``mlp_only_layers`` / ``decoder_sparse_step`` dense layers, ``norm_topk_prob``);
  * the expert weights: HF checkpoints store one matrix per expert
      Mixtral  block_sparse_moe.experts.{j}.w1 (gate) / w3 (up) / w2 (down), block_sparse_moe.gate
      Qwen3    mlp.experts.{j}.gate_proj / up_proj / down_proj, mlp.gate
    (transformers >= 5 also accepts its fused in-memory layout experts.gate_up_proj / down_proj;
    both are read, the per-expert layout — what ``save_pretrained`` writes — is written);
    Velocis stacks them: ``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj [E, H, I]``.
"""
from __future__ import annotations

from typing import Any

import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.interop.hf_dense import _hf_dense_common, dense_config_fields, dense_weights_from_hf, dense_weights_to_hf
from velocis.interop.hf_registry import HF_ARCHITECTURES, Converter, Tensors

# HF per-expert projection names: (gate, up, down)
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
# HF name of the feed-forward module inside a decoder layer
FFN_MODULE = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}


# ---------------------------------------------------------------------------
# configs


def aux_coef_from_hf(hf: dict[str, Any]) -> float:
    """transformers' balance loss is top-k times Velocis' (it normalises the expert shares by the N
    tokens, Velocis by the N*k assignments, models/moe.py): scale the coefficient so the loss added
    to training, and so the balancing pressure, is the same."""
    return float(hf.get("router_aux_loss_coef", 0.01)) * int(hf["num_experts_per_tok"])


def aux_coef_to_hf(cfg: ModelConfig) -> float:
    return cfg.aux_loss_coef / cfg.num_experts_per_token


def mixtral_config(hf: dict[str, Any]) -> ModelConfig:
    """HF Mixtral config -> ModelConfig (Mixtral always renormalises the top-k weights)."""
    if hf.get("sliding_window"):
        window, mpe = hf["sliding_window"], hf.get("max_position_embeddings", 0)
        if window < mpe:
            raise VelocisError(f"Mixtral sliding_window {window} < context {mpe} is not supported; "
                               f"set sliding_window to null in config.json (exact up to {window} tokens)")
    return ModelConfig(
        **dense_config_fields(hf),
        moe_dim=hf["intermediate_size"],
        num_experts=hf["num_local_experts"],
        num_experts_per_token=hf["num_experts_per_tok"],
        router_score="softmax",
        router_norm_topk=True,
        balance="aux_loss",
        aux_loss_coef=aux_coef_from_hf(hf),
    )


def _qwen3_num_experts(hf: dict[str, Any]) -> int:
    # transformers < 5 writes num_experts, >= 5 num_local_experts
    n = hf.get("num_local_experts", hf.get("num_experts"))
    if n is None:
        raise VelocisError("Qwen3-MoE config.json has neither num_experts nor num_local_experts")
    return int(n)


def qwen3_moe_layer_is_sparse(hf: dict[str, Any], i: int) -> bool:
    return (i not in (hf.get("mlp_only_layers") or []) and _qwen3_num_experts(hf) > 0
            and (i + 1) % hf.get("decoder_sparse_step", 1) == 0)


def qwen3_moe_config(hf: dict[str, Any]) -> ModelConfig:
    """HF Qwen3-MoE config -> ModelConfig: qk-norm, explicit head_dim, dense `mlp_only_layers`."""
    if hf.get("use_sliding_window"):
        raise VelocisError("Qwen3-MoE with use_sliding_window=true is not supported")
    if hf.get("attention_bias"):  # Qwen3's attention_bias also biases o_proj
        raise VelocisError("Qwen3-MoE with attention_bias=true is not supported (Velocis biases q/k/v only)")
    n = hf["num_hidden_layers"]
    ffs = ["moe" if qwen3_moe_layer_is_sparse(hf, i) else "mlp" for i in range(n)]
    if all(f == "mlp" for f in ffs):
        raise VelocisError("this Qwen3-MoE config has no sparse layer (num_experts 0 or every layer in mlp_only_layers)")
    return ModelConfig(
        **dense_config_fields(hf),
        qk_norm=True,
        moe_dim=hf["moe_intermediate_size"],
        num_experts=_qwen3_num_experts(hf),
        num_experts_per_token=hf["num_experts_per_tok"],
        router_score="softmax",
        router_norm_topk=bool(hf.get("norm_topk_prob", True)),
        balance="aux_loss",
        aux_loss_coef=aux_coef_from_hf(hf),
        layer_feed_forwards=None if all(f == "moe" for f in ffs) else ffs,
    )


def _plain_softmax_moe(cfg: ModelConfig) -> bool:
    """A Velocis model that Mixtral / Qwen3-MoE can express (attention + softmax top-k MoE)."""
    return (cfg.num_experts > 0 and all(m == "attention" for m in cfg.mixers())
            and "moe" in cfg.feed_forwards() and cfg.router_score == "softmax" and cfg.num_expert_groups == 1
            and cfg.routed_scaling_factor == 1.0 and cfg.num_shared_experts == 0 and cfg.capacity_factor is None
            and cfg.mtp_depth == 0 and cfg.index_num_heads == 0 and cfg.balance != "aux_free")


def can_export_mixtral(cfg: ModelConfig) -> bool:
    return (_plain_softmax_moe(cfg) and cfg.router_norm_topk and not cfg.qk_norm and not cfg.qkv_bias
            and all(f == "moe" for f in cfg.feed_forwards()))


def can_export_qwen3_moe(cfg: ModelConfig) -> bool:
    return _plain_softmax_moe(cfg) and cfg.qk_norm and not cfg.qkv_bias


def to_mixtral_config(cfg: ModelConfig) -> dict[str, Any]:
    hf = _hf_dense_common(cfg)
    hf.update(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=cfg.moe_dim,
              num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_token,
              router_aux_loss_coef=aux_coef_to_hf(cfg), router_jitter_noise=0.0, sliding_window=None,
              output_router_logits=False)
    return hf


def to_qwen3_moe_config(cfg: ModelConfig) -> dict[str, Any]:
    ffs = cfg.feed_forwards()
    hf = _hf_dense_common(cfg)
    hf.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", attention_bias=False,
              moe_intermediate_size=cfg.moe_dim, num_experts=cfg.num_experts, num_local_experts=cfg.num_experts,
              num_experts_per_tok=cfg.num_experts_per_token, norm_topk_prob=cfg.router_norm_topk,
              decoder_sparse_step=1, mlp_only_layers=[i for i, f in enumerate(ffs) if f != "moe"],
              router_aux_loss_coef=aux_coef_to_hf(cfg), use_sliding_window=False, sliding_window=None,
              max_window_layers=cfg.num_layers, output_router_logits=False)
    return hf


# ---------------------------------------------------------------------------
# expert weights


def pop_stacked_experts(sd: dict[str, torch.Tensor], prefix: str, num_experts: int,
                        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                        model: str = "MoE") -> dict[str, torch.Tensor]:
    """HF expert tensors under ``prefix`` -> {"experts.gate_up_proj" [E, 2I, H], "experts.down_proj" [E, H, I]}
    from transformers 5's fused layout or per-expert ``experts.{j}.<name>.weight`` tensors. Pops them."""
    if prefix + "experts.gate_up_proj" in sd:  # transformers 5 fused layout
        return {"experts.gate_up_proj": sd.pop(prefix + "experts.gate_up_proj"),
                "experts.down_proj": sd.pop(prefix + "experts.down_proj")}
    g, u, d = names
    try:
        gates = [sd.pop(f"{prefix}experts.{j}.{g}.weight") for j in range(num_experts)]
        ups = [sd.pop(f"{prefix}experts.{j}.{u}.weight") for j in range(num_experts)]
        downs = [sd.pop(f"{prefix}experts.{j}.{d}.weight") for j in range(num_experts)]
    except KeyError as e:
        raise VelocisError(f"checkpoint lacks expert weight {e.args[0]}; is it a complete {model} checkpoint?") from None
    return {"experts.gate_up_proj": torch.stack([torch.cat([a, b], 0) for a, b in zip(gates, ups)]),
            "experts.down_proj": torch.stack(downs)}


def experts_from_hf(sd: dict[str, torch.Tensor], prefix: str, kind: str, num_experts: int) -> dict[str, torch.Tensor]:
    """HF tensors under ``prefix`` (e.g. "model.layers.3.block_sparse_moe.") -> Velocis MoE tensors
    (relative names gate.weight, gate.e_score_correction_bias, experts.gate_up_proj, experts.down_proj).
    Pops what it uses from ``sd``."""
    out = {"gate.weight": sd.pop(prefix + "gate.weight")}
    out.update(pop_stacked_experts(sd, prefix, num_experts, EXPERT_NAMES[kind], kind))
    out["gate.e_score_correction_bias"] = sd.pop(
        prefix + "gate.e_score_correction_bias", torch.zeros(num_experts, dtype=out["gate.weight"].dtype))
    return out


def experts_to_hf(moe_sd: dict[str, torch.Tensor], prefix: str, kind: str) -> dict[str, torch.Tensor]:
    """Velocis MoE tensors (relative names) -> HF per-expert tensors under ``prefix``."""
    bias = moe_sd.get("gate.e_score_correction_bias")
    if bias is not None and bool(bias.any()):
        raise VelocisError(
            f"cannot export as {kind}: the router has a non-zero selection bias (aux_free balancing); "
            f"{kind} has no such bias, so its routing would differ")
    g, u, d = EXPERT_NAMES[kind]
    gate_up, down = moe_sd["experts.gate_up_proj"], moe_sd["experts.down_proj"]
    inner = down.shape[-1]
    out = {prefix + "gate.weight": moe_sd["gate.weight"].contiguous()}
    for j in range(gate_up.shape[0]):
        out[f"{prefix}experts.{j}.{g}.weight"] = gate_up[j, :inner].contiguous()
        out[f"{prefix}experts.{j}.{u}.weight"] = gate_up[j, inner:].contiguous()
        out[f"{prefix}experts.{j}.{d}.weight"] = down[j].contiguous()
    return out


# ---------------------------------------------------------------------------
# whole checkpoints


def _weights_from_hf(kind: str):
    def convert(hf: Tensors, cfg: ModelConfig) -> Tensors:
        hf = dict(hf)
        out: Tensors = {}
        for i, ff in enumerate(cfg.feed_forwards()):
            if ff != "moe":
                continue
            for k, v in experts_from_hf(hf, f"model.layers.{i}.{FFN_MODULE[kind]}.", kind, cfg.num_experts).items():
                out[f"layers.{i}.feed_forward.{k}"] = v
        out.update(dense_weights_from_hf(hf, cfg))  # attention, norms, embeddings, dense layers' MLPs
        return out

    return convert


def _weights_to_hf(kind: str):
    def convert(sd: Tensors, cfg: ModelConfig) -> Tensors:
        sd = dict(sd)
        out: Tensors = {}
        for i, ff in enumerate(cfg.feed_forwards()):
            if ff != "moe":
                continue
            pre = f"layers.{i}.feed_forward."
            moe = {k[len(pre):]: sd.pop(k) for k in list(sd) if k.startswith(pre)}
            out.update(experts_to_hf(moe, f"model.layers.{i}.{FFN_MODULE[kind]}.", kind))
        out.update(dense_weights_to_hf(sd, cfg))
        return out

    return convert


HF_ARCHITECTURES["MixtralForCausalLM"] = Converter(
    mixtral_config, _weights_from_hf("mixtral"), to_mixtral_config, _weights_to_hf("mixtral"),
    can_export=can_export_mixtral)
HF_ARCHITECTURES["Qwen3MoeForCausalLM"] = Converter(
    qwen3_moe_config, _weights_from_hf("qwen3_moe"), to_qwen3_moe_config, _weights_to_hf("qwen3_moe"),
    can_export=can_export_qwen3_moe)
