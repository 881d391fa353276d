"""Hugging Face DeepSeek-V3 (``DeepseekV3ForCausalLM``) and DeepSeek-V3.2 (``DeepseekV32ForCausalLM``) in and out.

Velocis builds these as MLA mixers (models/mla.py; V3.2 adds the DSA indexer, models/dsa.py), MoE
feed-forwards with sigmoid, group-limited, bias-corrected routing and shared experts (models/moe.py),
the first ``first_k_dense_replace`` layers dense, and optional MTP modules (models/mtp.py).

Tensor names (beyond hf_dense.py's prefix renames):
  * MLA projections keep HF's names (q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj, o_proj, indexer.{wq_b, wk, k_norm, weights_proj}).
  * RoPE layout: DeepSeek checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ... of the rope
    slice (HF ``rope_interleave=True``; always for V3.2's MLA); Velocis rotates halves. Rotating the
    pairs of x equals rotating halves of [x0, x2, ..., x1, x3, ...], and q.k is unchanged when q and k
    are permuted alike, so the importer reorders the rope rows of q_b_proj / q_proj (per head) and
    of kv_a_proj_with_mqa (evens, then odds); the exporter undoes it. (The V3.2 indexer already uses
    rotate-half: no permutation.)
  * MoE experts: HF files hold experts.{j}.{gate,up,down}_proj (transformers' in-memory layout
    experts.gate_up_proj / down_proj is read too); Velocis stacks experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I].
  * MTP: HF/DeepSeek files keep MTP module k (1-based) as decoder layer ``num_hidden_layers + k - 1``:
      model.layers.{N+k-1}.enorm / hnorm / eh_proj / shared_head.norm   -> mtp.layers.{k-1}.enorm / hnorm / eh_proj / norm
      model.layers.{N+k-1}.{input_layernorm, self_attn, post_attention_layernorm, mlp}
                                                                       -> mtp.layers.{k-1}.block.{mixer_norm, mixer, ff_norm, feed_forward}
      model.layers.{N+k-1}.embed_tokens / shared_head.head             (copies of the shared embedding / head:
                                                                        dropped on import, written on export)
    HF's config says num_nextn_predict_layers=1 by default even for files saved without the module
    (transformers' DeepseekV3ForCausalLM does not hold it), so the importer keeps MTP only when the
    tensors are there.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError
from velocis.interop.hf_dense import _eos, name_from_hf, name_to_hf, prompt_start, rope_from_hf, rope_to_hf
from velocis.interop.hf_moe import pop_stacked_experts
from velocis.interop.hf_registry import HF_ARCHITECTURES, Converter, Tensors


# --------------------------------------------------------------------------- RoPE row permutation
def _rope_rows(head_dim: int, rope: int) -> torch.Tensor:
    """Row order within one head [nope/latent rows | rope rows]: interleaved -> halves."""
    lead = head_dim - rope
    return torch.cat([torch.arange(lead), lead + torch.arange(0, rope, 2), lead + torch.arange(1, rope, 2)])


def deinterleave_rope(w: torch.Tensor, heads: int, head_dim: int, rope: int) -> torch.Tensor:
    """w [heads * head_dim, in] whose last `rope` rows per head are interleaved pairs -> rotate-half order."""
    idx = _rope_rows(head_dim, rope)
    return w.reshape(heads, head_dim, -1)[:, idx].reshape(heads * head_dim, -1).contiguous()


def interleave_rope(w: torch.Tensor, heads: int, head_dim: int, rope: int) -> torch.Tensor:
    inv = torch.argsort(_rope_rows(head_dim, rope))
    return w.reshape(heads, head_dim, -1)[:, inv].reshape(heads * head_dim, -1).contiguous()


# --------------------------------------------------------------------------- configs
def _common_from_hf(hf: dict[str, Any], kind: str) -> dict[str, Any]:
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise VelocisError(f"{kind} with scoring_func={hf.get('scoring_func')!r} / topk_method="
                           f"{hf.get('topk_method')!r}: only sigmoid + noaux_tc (DeepSeek-V3's) is supported")
    if hf.get("moe_layer_freq", 1) != 1:
        raise VelocisError(f"{kind} with moe_layer_freq != 1 is not supported")
    q = hf.get("quantization_config") or {}
    if q and q.get("quant_method") != "fp8":
        raise VelocisError(f"{kind}: quantization {q.get('quant_method')!r} is not supported (FP8 block-scaled is)")
    if hf.get("hidden_act", "silu") != "silu":
        raise VelocisError(f"{kind} hidden_act {hf.get('hidden_act')!r}: only silu is supported")
    if hf.get("attention_bias"):
        raise VelocisError(f"{kind} with attention_bias=true is not supported")
    if hf.get("num_key_value_heads") not in (None, hf["num_attention_heads"]):
        raise VelocisError(f"{kind}: num_key_value_heads must equal num_attention_heads for MLA")
    n = hf["num_hidden_layers"]
    n_dense = min(int(hf.get("first_k_dense_replace", 0) or 0), n)
    types = hf.get("mlp_layer_types")
    ffs = (["mlp" if t == "dense" else "moe" for t in types] if types
           else ["mlp"] * n_dense + ["moe"] * (n - n_dense))
    standard = ffs == ["mlp"] * n_dense + ["moe"] * (n - n_dense)
    experts = int(hf.get("n_routed_experts") or hf.get("num_local_experts") or 0)
    q_lora = hf.get("q_lora_rank")
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_dim=hf["hidden_size"],
        num_layers=n,
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_attention_heads"],
        head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
        mlp_dim=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        mixer="mla",
        layer_feed_forwards=None if standard else ffs,
        num_experts=experts if "moe" in ffs else 0,
        num_experts_per_token=int(hf.get("num_experts_per_tok") or 1),
        num_shared_experts=int(hf.get("n_shared_experts") or 0),
        moe_dim=hf.get("moe_intermediate_size"),
        first_dense_layers=n_dense,
        router_score="sigmoid",
        router_norm_topk=bool(hf.get("norm_topk_prob", True)),
        num_expert_groups=int(hf.get("n_group") or 1),
        topk_groups=int(hf.get("topk_group") or 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        balance="aux_free",
        # the sequence-wise balance loss (V3 trains with it beside the bias): its alpha as the file says
        seq_aux_loss_coef=float(hf.get("aux_loss_alpha", 1e-4)) if hf.get("seq_aux") else 0.0,
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        mtp_depth=int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf),
        prompt_start_token_id=prompt_start(hf),
        pad_token_id=hf.get("pad_token_id"),
        **rope_from_hf(hf),
    )


def deepseek_v3_config(hf: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**_common_from_hf(hf, "DeepSeek-V3"))


def deepseek_v32_config(hf: dict[str, Any]) -> ModelConfig:
    if not hf.get("q_lora_rank"):
        raise VelocisError("DeepSeek-V3.2 needs q_lora_rank (its indexer reads the query latent)")
    return ModelConfig(**_common_from_hf(hf, "DeepSeek-V3.2"), index_num_heads=int(hf.get("index_n_heads", 64)),
                       index_head_dim=int(hf.get("index_head_dim", 128)), index_topk=int(hf.get("index_topk", 2048)))


def _hf_common(cfg: ModelConfig) -> dict[str, Any]:
    ffs = cfg.feed_forwards()
    n_dense = 0
    while n_dense < len(ffs) and ffs[n_dense] == "mlp":
        n_dense += 1
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_dim,
        intermediate_size=cfg.mlp_dim,
        moe_intermediate_size=cfg.moe_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        n_shared_experts=cfg.num_shared_experts,
        n_routed_experts=max(cfg.num_experts, 1),
        routed_scaling_factor=cfg.routed_scaling_factor,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.num_expert_groups,
        topk_group=cfg.topk_groups,
        num_experts_per_tok=cfg.num_experts_per_token,
        first_k_dense_replace=n_dense,
        norm_topk_prob=cfg.router_norm_topk,
        hidden_act="silu",
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        attention_dropout=0.0,
        num_nextn_predict_layers=cfg.mtp_depth,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        use_cache=True,
        **rope_to_hf(cfg),
    )


def to_deepseek_v3_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_hf_common(cfg), architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                rope_interleave=True)


def to_deepseek_v32_config(cfg: ModelConfig) -> dict[str, Any]:
    ffs = cfg.feed_forwards()
    return dict(_hf_common(cfg), architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32",
                mlp_layer_types=["dense" if f == "mlp" else "sparse" for f in ffs],
                index_n_heads=cfg.index_num_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk)


def _exportable(cfg: ModelConfig, sparse: bool) -> bool:
    if any(m != "mla" for m in cfg.mixers()) or bool(cfg.index_num_heads) != sparse:
        return False
    if sparse and not cfg.q_lora_rank:
        return False
    ffs = cfg.feed_forwards()
    if "moe" in ffs:
        if cfg.router_score != "sigmoid" or cfg.capacity_factor is not None:
            return False
        if not sparse and ffs != sorted(ffs, key=lambda f: f == "moe"):  # V3: dense layers first
            return False
    return not cfg.qkv_bias and not getattr(cfg, "qk_norm", False)


# --------------------------------------------------------------------------- tensors
_MTP_OWN = {"enorm.": "enorm.", "hnorm.": "hnorm.", "eh_proj.": "eh_proj.", "shared_head.norm.": "norm."}


def _mla_from_hf(t: dict[str, torch.Tensor], cfg: ModelConfig, interleaved: bool) -> None:
    """Permute the rope rows of one layer's MLA tensors (names relative to the mixer) in place."""
    if not interleaved:
        return
    H, qk, r, rope = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    for name in ("q_b_proj.weight", "q_proj.weight"):
        if name in t:
            t[name] = deinterleave_rope(t[name], H, qk, rope)
    t["kv_a_proj_with_mqa.weight"] = deinterleave_rope(t["kv_a_proj_with_mqa.weight"], 1, r + rope, rope)


def _mla_to_hf(t: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    H, qk, r, rope = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    for name in ("q_b_proj.weight", "q_proj.weight"):
        if name in t:
            t[name] = interleave_rope(t[name], H, qk, rope)
    t["kv_a_proj_with_mqa.weight"] = interleave_rope(t["kv_a_proj_with_mqa.weight"], 1, r + rope, rope)


def _layer_from_hf(sd: Tensors, hf_prefix: str, out_prefix: str, cfg: ModelConfig, ff: str, out: Tensors,
                   interleaved: bool) -> None:
    """One HF decoder layer (tensors under hf_prefix, e.g. 'model.layers.3.') -> Velocis block tensors."""
    if ff == "moe":
        for k, v in pop_stacked_experts(sd, hf_prefix + "mlp.", cfg.num_experts, model="DeepSeek").items():
            out[out_prefix + "feed_forward." + k] = v
        bias_key = hf_prefix + "mlp.gate.e_score_correction_bias"
        out[out_prefix + "feed_forward.gate.e_score_correction_bias"] = sd.pop(
            bias_key, torch.zeros(cfg.num_experts, dtype=torch.float32)).float()
    mixer: Tensors = {}
    for k in [k for k in sd if k.startswith(hf_prefix)]:
        rest = k[len(hf_prefix):]
        v = sd.pop(k)
        if rest.startswith("self_attn."):
            mixer[rest[len("self_attn."):]] = v
            continue
        name = name_from_hf("model.layers.0." + rest)  # reuse hf_dense.py's in-layer renames
        if name is None:
            continue
        out[out_prefix + name[len("layers.0."):]] = v
    _mla_from_hf(mixer, cfg, interleaved)
    for k, v in mixer.items():
        if "rotary_emb" not in k:
            out[out_prefix + "mixer." + k] = v


def dequantize_fp8(sd: Tensors, block: tuple[int, int] = (128, 128), dtype=torch.bfloat16) -> Tensors:
    """DeepSeek's FP8 checkpoints: `W.weight` (float8_e4m3fn) with `W.weight_scale_inv` (fp32, one per
    block x block tile) -> W.weight = fp8 * scale in `dtype`. Other tensors pass through."""
    out = dict(sd)
    for k in [k for k in sd if k.endswith(".weight_scale_inv")]:
        w_name = k[: -len("_scale_inv")]
        scale = out.pop(k).float()
        w = out[w_name].float()
        full = scale.repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
        out[w_name] = (w * full).to(dtype)
    return out


def _weights_from_hf(hf_sd: Tensors, cfg: ModelConfig, interleaved: bool) -> Tensors:
    sd = dict(hf_sd)
    if any(k.endswith(".weight_scale_inv") for k in sd):
        sd = dequantize_fp8(sd)
    N = cfg.num_layers
    ffs = cfg.feed_forwards()
    out: Tensors = {}
    for i in range(N):
        _layer_from_hf(sd, f"model.layers.{i}.", f"layers.{i}.", cfg, ffs[i], out, interleaved)
    # MTP modules, kept only when the file has them
    depth = 0
    while any(k.startswith(f"model.layers.{N + depth}.") for k in sd):
        depth += 1
    if cfg.mtp_depth and depth < cfg.mtp_depth:
        cfg.mtp_depth = depth  # the config promised MTP modules the file does not hold (HF's default of 1)
    for k in range(cfg.mtp_depth):
        pre, opre = f"model.layers.{N + k}.", f"mtp.layers.{k}."
        for key in [key for key in sd if key.startswith(pre)]:
            rest = key[len(pre):]
            if rest.startswith(("embed_tokens.", "shared_head.head.")):
                sd.pop(key)  # copies of the shared embedding / head
                continue
            for src, dst in _MTP_OWN.items():
                if rest.startswith(src):
                    out[opre + dst + rest[len(src):]] = sd.pop(key)
                    break
        _layer_from_hf(sd, pre, opre + "block.", cfg, ffs[-1], out, interleaved)
    for k in [k for k in sd if k.startswith(f"model.layers.{N}.")]:  # MTP layers beyond mtp_depth
        sd.pop(k)
    for k, v in sd.items():
        name = name_from_hf(k)
        if name is None or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        if name.startswith("layers."):
            raise VelocisError(f"unexpected tensor {k} in a DeepSeek checkpoint of {N} layers")
        out[name] = v
    return out


def _block_to_hf(sd: Tensors, prefix: str, hf_prefix: str, cfg: ModelConfig, out: Tensors) -> None:
    mixer = {k[len(prefix + "mixer."):]: v for k, v in sd.items() if k.startswith(prefix + "mixer.")}
    _mla_to_hf(mixer, cfg)
    for k, v in mixer.items():
        out[hf_prefix + "self_attn." + k] = v
    for k, v in sd.items():
        if not k.startswith(prefix) or k.startswith(prefix + "mixer."):
            continue
        rest = k[len(prefix):]
        if rest == "feed_forward.experts.gate_up_proj":
            inner = v.shape[1] // 2
            for j in range(v.shape[0]):
                out[f"{hf_prefix}mlp.experts.{j}.gate_proj.weight"] = v[j, :inner].contiguous()
                out[f"{hf_prefix}mlp.experts.{j}.up_proj.weight"] = v[j, inner:].contiguous()
        elif rest == "feed_forward.experts.down_proj":
            for j in range(v.shape[0]):
                out[f"{hf_prefix}mlp.experts.{j}.down_proj.weight"] = v[j].contiguous()
        else:
            name = name_to_hf("layers.0." + rest)
            out[hf_prefix + name[len("model.layers.0."):]] = v


def deepseek_weights_to_hf(sd: Tensors, cfg: ModelConfig) -> Tensors:
    out: Tensors = {}
    N = cfg.num_layers
    for i in range(N):
        _block_to_hf(sd, f"layers.{i}.", f"model.layers.{i}.", cfg, out)
    for k in range(cfg.mtp_depth):
        pre, hpre = f"mtp.layers.{k}.", f"model.layers.{N + k}."
        _block_to_hf(sd, pre + "block.", hpre, cfg, out)
        for dst, src in _MTP_OWN.items():
            for key, v in sd.items():
                if key.startswith(pre + src):
                    out[hpre + dst + key[len(pre + src):]] = v
        out[hpre + "embed_tokens.weight"] = sd["embed_tokens.weight"]
        out[hpre + "shared_head.head.weight"] = sd.get("lm_head.weight", sd["embed_tokens.weight"])
    for k, v in sd.items():
        if re.match(r"^(layers|mtp)\.", k) or (k == "lm_head.weight" and cfg.tie_embeddings):
            continue
        out[name_to_hf(k)] = v
    # tensors may be shared (tied head, MTP copies): safetensors needs distinct storage
    seen: set[int] = set()
    for k, v in out.items():
        if v.data_ptr() in seen:
            out[k] = v.clone()
        seen.add(out[k].data_ptr())
    return {k: v.contiguous() for k, v in out.items()}


class _FromHF:
    """weights_from_hf that reads rope_interleave from the HF config remembered by config_from_hf."""

    def __init__(self, make_config, sparse: bool):
        self.make_config, self.sparse = make_config, sparse
        self.interleaved = True

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        # V3.2's MLA always rotates interleaved pairs; V3 follows rope_interleave (default True)
        self.interleaved = True if self.sparse else bool(hf.get("rope_interleave", True))
        return self.make_config(hf)

    def weights(self, hf_sd: Tensors, cfg: ModelConfig) -> Tensors:
        return _weights_from_hf(hf_sd, cfg, self.interleaved)


_V3 = _FromHF(deepseek_v3_config, sparse=False)
_V32 = _FromHF(deepseek_v32_config, sparse=True)

HF_ARCHITECTURES["DeepseekV3ForCausalLM"] = Converter(
    _V3.config, _V3.weights, to_deepseek_v3_config, deepseek_weights_to_hf,
    can_export=lambda c: _exportable(c, sparse=False))
HF_ARCHITECTURES["DeepseekV32ForCausalLM"] = Converter(
    _V32.config, _V32.weights, to_deepseek_v32_config, deepseek_weights_to_hf,
    can_export=lambda c: _exportable(c, sparse=True))
