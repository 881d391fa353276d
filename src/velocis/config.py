"""ModelConfig: one JSON-serialisable dataclass describes every Velocis model.

A block is a token *mixer* plus a *feed-forward*, chosen per layer from the registries
(velocis.models.registry; the names valid here are the registered ones):
  mixer:        "attention" (MHA/GQA/MQA by num_kv_heads) | "mla" | "mamba2" (state space, ssm_* fields)
  feed_forward: "mlp" (SwiGLU) | "moe" (sparse mixture of experts) | "none" (a mixer-only layer)
`layer_mixers` / `layer_feed_forwards` give the per-layer choice; when None, every layer uses
`mixer`, and the feed-forward is "moe" when num_experts > 0 (except the first
`first_dense_layers`), else "mlp".
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velocis.errors import VelocisError
from velocis.models.registry import FEED_FORWARDS, MIXERS
from velocis.utils.fields import check_field_types


@dataclass
class ModelConfig:
    # --- shape ---
    vocab_size: int = 8192
    hidden_dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None -> num_heads (MHA); 1 -> MQA
    head_dim: int | None = None  # None -> hidden_dim // num_heads
    mlp_dim: int = 688
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2-style bias on q/k/v projections
    qk_norm: bool = False  # Qwen3-style RMSNorm on each head's q and k (before RoPE)
    init_std: float = 0.02
    # the residual branches' output projections (o_proj / out_proj / down_proj) start at zero, so every
    # block starts as the identity (modded-nanogpt); a training-recipe choice, not part of the weights' shape
    zero_init_residual: bool = False

    # --- rotary position embedding ---
    rope_theta: float = 10000.0
    # None, or {"type": "linear"|"ntk"|"dynamic"|"yarn"|"llama3", "factor": float,
    #           "original_max_seq_len": int (dynamic/yarn/llama3), plus yarn's beta_fast/beta_slow/
    #           mscale/mscale_all_dim/attention_factor/truncate, llama3's low/high_freq_factor}
    rope_scaling: dict[str, Any] | None = None

    # --- per-layer choice of parts ---
    mixer: str = "attention"
    layer_mixers: list[str] | None = None
    # a repeating per-layer pattern (e.g. 3 x "gated_deltanet" then "gated_attention"): layer i uses
    # mixer_pattern[i % len]; layer_mixers, when given, wins
    mixer_pattern: list[str] | None = None
    layer_feed_forwards: list[str] | None = None
    dense_feed_forward: str = "mlp"  # what a dense layer uses when layer_feed_forwards is None: "mlp" | "relu2"

    # --- sparse mixture of experts (feed_forward == "moe") ---
    num_experts: int = 0  # routed experts; 0 = dense model
    num_experts_per_token: int = 2  # top-k
    num_shared_experts: int = 0
    moe_dim: int | None = None  # expert hidden size; None -> mlp_dim
    first_dense_layers: int = 0  # the first k layers use a dense MLP
    router_score: str = "softmax"  # "softmax" | "sigmoid"
    router_norm_topk: bool = True  # renormalise the top-k weights to sum to 1
    num_expert_groups: int = 1  # group-limited routing (DeepSeek-V3 n_group)
    topk_groups: int = 1  # groups kept per token (DeepSeek-V3 topk_group)
    routed_scaling_factor: float = 1.0
    balance: str = "aux_loss"  # "aux_loss" | "aux_free" | "none"
    aux_loss_coef: float = 0.01  # "aux_loss" balance (normalised to 1.0 when balanced, whatever top-k)
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3's sequence-wise balance loss (0 = off); combines with aux_free
    bias_update_rate: float = 1e-3  # aux-loss-free per-expert bias step
    capacity_factor: float | None = None  # None = dropless

    # --- multi-head latent attention (mixer == "mla") ---
    q_lora_rank: int | None = None  # None = full-rank query projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    # --- multi-token prediction ---
    mtp_depth: int = 0  # D sequential MTP modules
    mtp_loss_weight: float = 0.3

    # --- DeepSeek sparse attention (V3.2 lightning indexer) ---
    index_num_heads: int = 0  # 0 = dense attention
    index_head_dim: int = 128
    index_topk: int = 2048
    indexer_loss_coef: float = 1.0  # the indexer's KL objective (only while it trains; see models/dsa.py)

    # --- linear attention (mixer "gated_deltanet", Qwen3-Next's Gated DeltaNet; models/deltanet.py) ---
    linear_num_key_heads: int | None = None  # None -> num_heads
    linear_num_value_heads: int | None = None  # None -> linear_num_key_heads (a multiple of it)
    linear_key_head_dim: int | None = None  # None -> head_dim
    linear_value_head_dim: int | None = None  # None -> head_dim
    linear_conv_kernel: int = 4  # the short causal convolution over q, k, v

    # --- gated attention (mixer "gated_attention", Qwen3-Next's; models/gated_attention.py) ---
    partial_rotary_factor: float = 1.0  # RoPE on the first factor * head_dim dims of each head

    # --- shared expert of an MoE layer (Qwen3-Next) ---
    shared_expert_dim: int | None = None  # None -> moe_dim * num_shared_experts
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(a per-token Linear(hidden, 1))

    # --- Mamba-2 state-space mixer (mixer "mamba2", models/mamba2.py) ---
    ssm_state_size: int = 128  # N: state size of each head
    ssm_head_dim: int = 64  # P: channels per head; heads = ssm_expand * hidden_dim / ssm_head_dim
    ssm_num_groups: int = 1  # G: B and C are shared by the heads of a group (as kv heads in GQA)
    ssm_expand: int = 2  # inner width = ssm_expand * hidden_dim
    ssm_conv_kernel: int = 4  # the short causal depthwise convolution over x, B, C
    ssm_chunk_size: int = 256  # chunk length of the SSD scan (training, prefill)
    ssm_dt_min: float = 0.001  # initial time steps: log-uniform in [dt_min, dt_max], at least dt_floor
    ssm_dt_max: float = 0.1
    ssm_dt_floor: float = 1e-4
    ssm_dt_limit: list[float] | None = None  # [lo, hi]: clamp every time step (None: no clamp)
    ssm_conv_bias: bool = True
    ssm_proj_bias: bool = False  # bias on in_proj and out_proj

    # --- special tokens (filled from the tokenizer) ---
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # what generation puts before a prompt: the token that precedes a document in the training data.
    # Velocis packs documents each ending with EOS, so a document starts after an EOS (the trainer sets
    # this to the EOS id); Llama-family imports keep their BOS; None puts nothing before the prompt.
    prompt_start_token_id: int | None = None

    # --- weight-only quantization (written by `velocis quantize`; velocis/quant/formats.py) ---
    # None: float weights. Else {"method", "bits", "group_size", "symmetric", "modules", ...}: the
    # named modules are stored quantized, and loading builds them as velocis.quant modules.
    quantization: dict[str, Any] | None = None

    # ------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and self.num_heads > 0:
            self.head_dim = self.hidden_dim // self.num_heads
        if self.moe_dim is None:
            self.moe_dim = self.mlp_dim
        self.validate()

    def validate(self) -> None:
        check_field_types(self, "ModelConfig")

        def bad(msg: str) -> None:
            raise VelocisError(f"invalid model config: {msg}")

        for name in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "mlp_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        # An explicit head_dim (as in Qwen3) may make q/k/v narrower or wider than hidden_dim.
        if self.hidden_dim % self.num_heads != 0 and self.head_dim == self.hidden_dim // self.num_heads:
            bad(
                f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}; "
                f"choose a hidden_dim that is a multiple of num_heads (or set head_dim explicitly)"
            )
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads != 0:
            bad(
                f"num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads} "
                f"(use num_kv_heads = num_heads for MHA, 1 for MQA, or a divisor for GQA)"
            )
        for i, m in enumerate(self.mixers()):
            if m not in MIXERS:
                bad(f"layer {i} mixer {m!r} is unknown; choose one of {', '.join(sorted(MIXERS))}")
        for i, f in enumerate(self.feed_forwards()):
            if f not in FEED_FORWARDS:
                bad(f"layer {i} feed_forward {f!r} is unknown; choose one of {', '.join(sorted(FEED_FORWARDS))}")
        if self.num_experts > 0:
            if not 0 < self.num_experts_per_token <= self.num_experts:
                bad(f"num_experts_per_token {self.num_experts_per_token} must be in 1..num_experts ({self.num_experts})")
            if self.num_experts % self.num_expert_groups != 0:
                bad(f"num_experts {self.num_experts} must be divisible by num_expert_groups {self.num_expert_groups}")
            if not 0 < self.topk_groups <= self.num_expert_groups:
                bad(f"topk_groups {self.topk_groups} must be in 1..num_expert_groups ({self.num_expert_groups})")
            eligible = self.topk_groups * (self.num_experts // self.num_expert_groups)
            if self.num_experts_per_token > eligible:
                bad(f"num_experts_per_token {self.num_experts_per_token} exceeds the {eligible} experts that "
                    f"topk_groups {self.topk_groups} x {self.num_experts // self.num_expert_groups} experts per group "
                    f"leave eligible; raise topk_groups or lower num_experts_per_token")
            if self.router_score not in ("softmax", "sigmoid"):
                bad(f"router_score {self.router_score!r} must be 'softmax' or 'sigmoid'")
            if self.shared_expert_gate and self.num_shared_experts == 0:
                bad("shared_expert_gate needs a shared expert; set num_shared_experts >= 1 or shared_expert_gate=False")
            if self.balance not in ("aux_loss", "aux_free", "none"):
                bad(f"balance {self.balance!r} must be 'aux_loss', 'aux_free' or 'none'")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "indexer_loss_coef", "mtp_loss_weight"):
            if not getattr(self, name) >= 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mixer_pattern is not None and not self.mixer_pattern:
            bad("mixer_pattern is empty; give at least one mixer name, or null")
        if not 0 < self.partial_rotary_factor <= 1:
            bad(f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1]")
        if self.partial_rotary_factor != 1 and "attention" in self.mixers():
            bad("partial_rotary_factor applies to 'gated_attention' layers only; the 'attention' mixer rotates "
                "whole heads: use mixer 'gated_attention' or partial_rotary_factor=1")
        if "mamba2" in self.mixers():
            self._validate_mamba2(bad)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ("linear", "ntk", "dynamic", "yarn", "llama3"):
                bad(f"rope_scaling type {kind!r} must be one of linear, ntk, dynamic, yarn, llama3")
            if not isinstance(self.rope_scaling.get("factor"), (int, float)) or self.rope_scaling["factor"] <= 0:
                bad(f"rope_scaling needs a positive 'factor', got {self.rope_scaling.get('factor')!r}")
            if kind in ("dynamic", "yarn", "llama3") and not self.rope_scaling.get("original_max_seq_len"):
                bad(f"rope_scaling type {kind!r} needs 'original_max_seq_len' (the pretraining context)")
        if self.quantization is not None:
            from velocis.quant.formats import check_quantization_config

            try:
                check_quantization_config(self.quantization)
            except VelocisError as e:
                bad(str(e))

    def _validate_mamba2(self, bad) -> None:
        for name in ("ssm_state_size", "ssm_head_dim", "ssm_num_groups", "ssm_expand", "ssm_conv_kernel",
                     "ssm_chunk_size"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        inner = self.ssm_expand * self.hidden_dim
        if inner % self.ssm_head_dim:
            bad(f"ssm_expand * hidden_dim ({inner}) must be a multiple of ssm_head_dim ({self.ssm_head_dim})")
        if (inner // self.ssm_head_dim) % self.ssm_num_groups:
            bad(f"the {inner // self.ssm_head_dim} Mamba-2 heads (ssm_expand * hidden_dim / ssm_head_dim) must be "
                f"divisible by ssm_num_groups ({self.ssm_num_groups})")
        if not 0 < self.ssm_dt_min <= self.ssm_dt_max:
            bad(f"ssm_dt_min {self.ssm_dt_min} and ssm_dt_max {self.ssm_dt_max} must satisfy 0 < min <= max")
        lim = self.ssm_dt_limit
        if lim is not None and (len(lim) != 2 or not all(isinstance(v, (int, float)) for v in lim)
                                or not 0 <= lim[0] < lim[1]):
            bad(f"ssm_dt_limit {lim!r} must be [lo, hi] with 0 <= lo < hi (or null for no clamp)")

    # per-layer parts ----------------------------------------------------
    def mixers(self) -> list[str]:
        if self.layer_mixers is not None:
            if len(self.layer_mixers) != self.num_layers:
                raise VelocisError(
                    f"invalid model config: layer_mixers has {len(self.layer_mixers)} entries but num_layers is {self.num_layers}"
                )
            return list(self.layer_mixers)
        if self.mixer_pattern:
            return [self.mixer_pattern[i % len(self.mixer_pattern)] for i in range(self.num_layers)]
        return [self.mixer] * self.num_layers

    def feed_forwards(self) -> list[str]:
        if self.layer_feed_forwards is not None:
            if len(self.layer_feed_forwards) != self.num_layers:
                raise VelocisError(
                    f"invalid model config: layer_feed_forwards has {len(self.layer_feed_forwards)} entries "
                    f"but num_layers is {self.num_layers}"
                )
            return list(self.layer_feed_forwards)
        if self.num_experts > 0:
            return [self.dense_feed_forward if i < self.first_dense_layers else "moe" for i in range(self.num_layers)]
        return [self.dense_feed_forward] * self.num_layers

    # serialisation --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"architecture": "velocis", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d.pop("architecture", None)
        d.pop("velocis_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VelocisError(f"config has unknown fields {unknown}; is it a Velocis config.json?")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        from velocis.utils.atomic import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VelocisError(f"{path}: no config.json here; pass a Velocis model or checkpoint directory") from None
        except json.JSONDecodeError as e:
            raise VelocisError(f"{path}: not valid JSON ({e})") from None
        if d.get("architecture") != "velocis":
            kind = d.get("model_type") or d.get("architectures") or "unknown"
            raise VelocisError(
                f"{path}: this is not a Velocis config (model_type {kind}); "
                f"import it with `velocis convert --from-hf DIR --output OUT`"
            )
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# Named presets. Each is a function so that a preset never shares mutable state.
PRESETS: dict[str, dict[str, Any]] = {
    # 6.5M parameters (5.5M with the demo's smaller vocabulary): the train-micro model; learns on 2 CPU cores in minutes.
    "micro": dict(vocab_size=8192, hidden_dim=256, num_layers=6, num_heads=4, num_kv_heads=2,
                  mlp_dim=704, max_seq_len=512, tie_embeddings=True),
    # sparse MoE, ~125.0M total / ~48.3M activated per token (31.9M without the tied embedding):
    # 8 layers x (GQA attention 0.79M + 8 SwiGLU experts of width 1040, top-2), 2K context.
    # A dense model with the same activated parameters is this with num_experts=0, mlp_dim=2080.
    "small": dict(vocab_size=32000, hidden_dim=512, num_layers=8, num_heads=8, num_kv_heads=4,
                  mlp_dim=2080, max_seq_len=2048, tie_embeddings=True,
                  num_experts=8, num_experts_per_token=2, moe_dim=1040,
                  router_score="softmax", balance="aux_loss", aux_loss_coef=0.01),
    # DeepSeek-V3 (671B total / ~37B activated; + a 1-depth MTP module): MLA (q_lora 1536, kv_lora 512,
    # nope 128 + rope 64, v 128, 128 heads), 3 dense layers then MoE (256 routed experts top-8 of width
    # 2048 + 1 shared; sigmoid, 8 groups keep 4, routed scaling 2.5; aux-loss-free balancing),
    # YaRN x40 from 4096 to 163840 (mscale 1, mscale_all_dim 1), init std 0.006 and the sequence-wise
# balance loss with alpha 1e-4 beside the bias, as in the paper.
    "deepseek-v3": dict(vocab_size=129280, hidden_dim=7168, num_layers=61, num_heads=128, num_kv_heads=128,
                        head_dim=192, mlp_dim=18432, max_seq_len=163840, norm_eps=1e-6, tie_embeddings=False,
                        init_std=0.006, rope_theta=10000.0,
                        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_seq_len": 4096,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                        mixer="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128,
                        num_experts=256, num_experts_per_token=8, num_shared_experts=1, moe_dim=2048,
                        first_dense_layers=3, router_score="sigmoid", router_norm_topk=True,
                        num_expert_groups=8, topk_groups=4, routed_scaling_factor=2.5, balance="aux_free",
                        seq_aux_loss_coef=1e-4,
                        mtp_depth=1, mtp_loss_weight=0.3, bos_token_id=0, eos_token_id=1, prompt_start_token_id=0),
}
# DeepSeek-V3.2: V3 plus DeepSeek Sparse Attention (lightning indexer: 64 heads of 128, top-2048 tokens).
PRESETS["deepseek-v3.2"] = dict(PRESETS["deepseek-v3"], index_num_heads=64, index_head_dim=128, index_topk=2048)
# Dense shapes of well-known open models (for `velocis params`, or as a starting point; weights
# come from `velocis convert --from-hf`).
PRESETS["llama3-8b"] = dict(vocab_size=128256, hidden_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                            mlp_dim=14336, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False)
PRESETS["qwen2.5-0.5b"] = dict(vocab_size=151936, hidden_dim=896, num_layers=24, num_heads=14, num_kv_heads=2,
                               mlp_dim=4864, max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6,
                               tie_embeddings=True, qkv_bias=True)
# Hybrid linear-attention stacks (Qwen3-Next's layout: three Gated DeltaNet layers, then one gated
# attention layer; models/deltanet.py, models/gated_attention.py).
_QWEN3_NEXT_PATTERN = ["gated_deltanet"] * 3 + ["gated_attention"]
# ~125M (dense SwiGLU MLPs, the size of "small"): 12 layers = 9 DeltaNet (6 key / 12 value heads of 64)
# + 3 gated attention (12 heads of 64, 4 KV heads, RoPE on a quarter of each head); trains on a CPU.
PRESETS["hybrid-small"] = dict(vocab_size=32000, hidden_dim=768, num_layers=12, num_heads=12, num_kv_heads=4,
                               head_dim=64, mlp_dim=2624, max_seq_len=2048, tie_embeddings=True,
                               mixer_pattern=_QWEN3_NEXT_PATTERN, qk_norm=True, partial_rotary_factor=0.25,
                               linear_num_key_heads=6, linear_num_value_heads=12, linear_key_head_dim=64,
                               linear_value_head_dim=64, linear_conv_kernel=4)
# Qwen3-Next-80B-A3B (transformers' Qwen3NextForCausalLM with the published config): 48 layers in the
# 3:1 pattern; MoE everywhere: 512 experts of width 512, top-10, + one gated shared expert of 512;
# 262K context, RoPE theta 1e7 on a quarter of each 256-wide head. HF's balance coefficient 0.001 is
# 10x here (Velocis normalises the loss per routed assignment, models/moe.py). The MTP module of the
# released checkpoint is not part of this shape (transformers drops it too).
PRESETS["qwen3-next-80b-a3b"] = dict(
    vocab_size=151936, hidden_dim=2048, num_layers=48, num_heads=16, num_kv_heads=2, head_dim=256, mlp_dim=5120,
    max_seq_len=262144, norm_eps=1e-6, tie_embeddings=False, rope_theta=10000000.0,
    mixer_pattern=_QWEN3_NEXT_PATTERN, qk_norm=True, partial_rotary_factor=0.25,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel=4, num_experts=512, num_experts_per_token=10, moe_dim=512, num_shared_experts=1,
    shared_expert_dim=512, shared_expert_gate=True, router_score="softmax", router_norm_topk=True,
    balance="aux_loss", aux_loss_coef=0.01, bos_token_id=151643, eos_token_id=151645)

# Mamba-2 2.7B (state-spaces/mamba2-2.7b, Dao & Gu 2024): 64 mixer-only Mamba-2 layers of width 2560
# (80 heads of 64, state 128, one group, conv 4, chunk 256), GPT-NeoX vocabulary 50277 padded to 50288,
# tied embedding: 2,702,599,680 parameters, the published "2.7B" (tests/test_mamba2.py counts it
# against transformers' Mamba2ForCausalLM built on the meta device). A recurrent model has no
# positional limit; max_seq_len only sizes contexts (it was trained on 2K).
PRESETS["mamba2-2.7b"] = dict(vocab_size=50288, hidden_dim=2560, num_layers=64, num_heads=1, max_seq_len=131072,
                              tie_embeddings=True, mixer="mamba2", layer_feed_forwards=["none"] * 64,
                              ssm_state_size=128, ssm_head_dim=64, ssm_num_groups=1, ssm_expand=2,
                              ssm_conv_kernel=4, ssm_chunk_size=256, eos_token_id=0)


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise VelocisError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return ModelConfig(**{**PRESETS[name], **overrides})
