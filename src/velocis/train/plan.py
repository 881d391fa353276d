"""`velocis plan`: a training layout on paper: per-GPU memory, step time and MFU, and the best
layout among those Velocis runs (train/parallelize.py), from stated hardware figures.

Layouts: ddp (every GPU holds the dense parameters) or fsdp (sharded over all GPUs); expert parallel
EP (each GPU holds E/EP of every MoE layer's experts, replicated GPUS/EP times); activation
checkpointing on or off; a micro-batch of `micro_batch` sequences per GPU, accumulated to the global
batch. The model's shape comes from its config, on the meta device (no memory).

Memory per GPU, in bytes:
  parameter state   (4 master + grad_bytes + optimizer_bytes) x (dense / sharding + experts / EP)
  fsdp gather       2 blocks' dense parameters unsharded in bf16 (the running block and the prefetched one)
  activations       per token and layer, bf16: without checkpointing the block input, norms, q/k/v and
                    attention output, and the feed-forward's input, gate, up and product for each routed
                    expert (k of them) and the shared one; with checkpointing the block input per layer plus
                    one layer's full set; x tokens per micro-batch
  reserve           `reserve` of the GPU (CUDA context, allocator fragmentation) is not planned for
Time per step:
  compute           model FLOPs (6 x active matmul parameters + attention) x tokens, plus a recomputed
                    forward (2 x) under checkpointing, at `efficiency` x peak
  data parallel     DDP: ring all-reduce of fp32 gradients; FSDP: all-gather of bf16 parameters (forward
                    and backward) + reduce-scatter of fp32 gradients; overlapped with compute
  expert parallel   all-to-all dispatch + combine of k bf16 rows per token and MoE layer, forward and
                    backward (and the recomputed forward), not overlapped; the share that leaves a node
                    travels at the inter-node bandwidth
  optimizer         AdamW reads and writes ~32 bytes per local parameter at HBM bandwidth
  step = max(compute, data parallel) + expert parallel + optimizer; MFU = model FLOPs / (step x peak x GPUs).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from velocis.config import ModelConfig
from velocis.errors import VelocisError


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_memory: float  # bytes
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16 per GPU (H100/H800 SXM)
    efficiency: float = 0.5  # share of the peak the matmuls reach
    intra_node_gbps: float = 400.0  # GB/s per GPU, one direction (NVLink; H800: 400, H100: 450)
    inter_node_gbps: float = 50.0  # GB/s per GPU (one 400 Gb/s InfiniBand NIC per GPU)
    hbm_tbps: float = 3.35  # TB/s
    reserve: float = 0.1


@dataclass(frozen=True)
class Layout:
    parallel: str = "fsdp"  # "ddp" | "fsdp"
    expert_parallel: int = 1
    activation_checkpointing: bool = False
    micro_batch: int = 1


@dataclass(frozen=True)
class Workload:
    seq_len: int = 4096
    global_batch: int = 1024  # sequences per optimizer step
    grad_bytes: int = 4  # fp32 gradients (Velocis' trainer); 2 for bf16
    optimizer_bytes: int = 8  # AdamW's two fp32 moments; 4 for bf16 moments (DeepSeek-V3's recipe)


@dataclass
class Plan:
    layout: Layout
    grad_accum: int
    memory: dict[str, float] = field(default_factory=dict)  # bytes per GPU, by kind
    time: dict[str, float] = field(default_factory=dict)  # seconds per step, by kind
    step_s: float = 0.0
    mfu: float = 0.0
    tokens_per_s: float = 0.0
    fits: bool = False

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory_total": self.memory_total}


def parse_bytes(text: str) -> float:
    """"80GB" (10^9), "80GiB" (2^30), "80" (GB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|TB|TiB|MB|MiB)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise VelocisError(f"--gpu-memory {text!r}: give a size such as 80GB or 141GiB")
    units = {"gb": 1e9, "gib": 2**30, "tb": 1e12, "tib": 2**40, "mb": 1e6, "mib": 2**20}
    return float(m.group(1)) * units[(m.group(2) or "GB").lower()]


# --- the model's shape ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    dense: int  # parameters outside the routed experts
    experts: int  # routed experts' parameters (all layers, MTP included)
    block_dense: int  # the largest block's dense parameters (what FSDP gathers at once)
    active_matmul: int  # parameters a token multiplies through (routed: its k experts; the head counted)
    layers: int  # blocks a token runs (MTP included)
    moe_layers: int
    attention_flops_per_token: float  # forward, summed over layers, at the workload's sequence length
    activation_bytes: float  # per token and layer, without checkpointing (bf16)
    hidden: int
    top_k: int
    num_experts: int


def model_shape(config: ModelConfig, seq_len: int) -> Shape:
    from velocis.models import VelocisModel
    from velocis.models.moe import MoE

    with torch.device("meta"):
        model = VelocisModel(config)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    experts = sum(p.numel() for m in moes for p in m.experts.parameters())
    total = model.num_params()
    blocks = list(model.layers) + ([layer for layer in model.mtp.layers] if model.mtp is not None else [])
    block_dense = max(sum(p.numel() for p in b.parameters()) - sum(p.numel() for m in b.modules() if isinstance(m, MoE)
                                                                    for p in m.experts.parameters()) for b in blocks)
    routed_active = sum(m.active_params() - (sum(p.numel() for p in m.parameters())
                                             - sum(p.numel() for p in m.experts.parameters())) for m in moes)
    # a token's matmuls: everything but the embedding lookup and the experts it is not routed to (a tied
    # embedding is counted once in `total`, as the head's matmul)
    active = total - experts + routed_active - (0 if config.tie_embeddings else model.embed_tokens.weight.numel())
    h = config.hidden_dim
    if config.mixer == "mla":
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        q_dim, kv_dim = config.num_heads * qk, config.num_heads * (qk + config.v_head_dim) + config.kv_lora_rank
        v_dim = config.v_head_dim
    else:
        qk = v_dim = config.head_dim
        q_dim, kv_dim = config.num_heads * qk, 2 * config.num_kv_heads * qk
    attended = min(seq_len, config.index_topk) if config.index_num_heads else seq_len / 2  # causal: half on average
    per_layer_attn = 2 * config.num_heads * (qk + v_dim) * attended
    if config.index_num_heads:  # the lightning indexer scores every earlier token
        per_layer_attn += 2 * config.index_num_heads * config.index_head_dim * seq_len / 2
    ffn = config.num_experts_per_token * (h + 3 * config.moe_dim) if config.num_experts else h + 3 * config.mlp_dim
    if config.num_experts and config.num_shared_experts:
        ffn += h + 3 * (getattr(config, "shared_expert_dim", None) or config.moe_dim * config.num_shared_experts)
    act = 2 * (4 * h + 2 * q_dim + kv_dim + ffn)  # bf16
    return Shape(dense=total - experts, experts=experts, block_dense=block_dense, active_matmul=active,
                 layers=len(blocks), moe_layers=len(moes), attention_flops_per_token=per_layer_attn * len(blocks),
                 activation_bytes=act, hidden=h, top_k=config.num_experts_per_token if config.num_experts else 0,
                 num_experts=config.num_experts)


# --- one layout ----------------------------------------------------------------------------------
def evaluate(shape: Shape, layout: Layout, hw: Hardware, work: Workload) -> Plan:
    G, ep = hw.gpus, layout.expert_parallel
    check_layout(shape, layout, hw, work)
    grad_accum = work.global_batch // (G * layout.micro_batch)
    per_param = 4 + work.grad_bytes + work.optimizer_bytes
    dense_local = shape.dense / (G if layout.parallel == "fsdp" else 1)
    experts_local = shape.experts / ep
    tokens = layout.micro_batch * work.seq_len  # per GPU and micro-batch
    if layout.activation_checkpointing:
        activations = tokens * (2 * shape.hidden * shape.layers + shape.activation_bytes)
    else:
        activations = tokens * shape.activation_bytes * shape.layers
    plan = Plan(layout, grad_accum)
    plan.memory = {
        "parameters": 4 * (dense_local + experts_local),
        "gradients": work.grad_bytes * (dense_local + experts_local),
        "optimizer": work.optimizer_bytes * (dense_local + experts_local),
        "fsdp_gather": 2 * 2 * shape.block_dense if layout.parallel == "fsdp" else 0.0,
        "activations": activations,
    }
    assert per_param * (dense_local + experts_local) == sum(plan.memory[k] for k in ("parameters", "gradients", "optimizer"))
    plan.fits = plan.memory_total <= hw.gpu_memory * (1 - hw.reserve)

    step_tokens = work.global_batch * work.seq_len / G  # per GPU
    model_flops = (6 * shape.active_matmul + 3 * shape.attention_flops_per_token) * step_tokens
    recompute = (2 * shape.active_matmul + shape.attention_flops_per_token) * step_tokens \
        if layout.activation_checkpointing else 0.0
    peak = hw.peak_tflops * 1e12
    compute = (model_flops + recompute) / (peak * hw.efficiency)
    dp_bw = _bandwidth(G, hw)
    if layout.parallel == "ddp":
        dp = 2 * (G - 1) / G * shape.dense * work.grad_bytes / dp_bw
    else:
        dp = (G - 1) / G * shape.dense * (2 * 2 + work.grad_bytes) / dp_bw
    replicas = G // ep
    if replicas > 1:  # the experts' replicas all-reduce their gradients (across nodes: one rank per node-stride)
        dp += 2 * (replicas - 1) / replicas * experts_local * work.grad_bytes / _bandwidth(G, hw)
    a2a_count = 6 if layout.activation_checkpointing else 4
    a2a_bytes = step_tokens * shape.top_k * shape.hidden * 2 * shape.moe_layers * a2a_count
    if ep > 1:
        outside = max(0, ep - min(ep, hw.gpus_per_node)) / (ep - 1)
        a2a_bytes *= (ep - 1) / ep
        ep_time = a2a_bytes * ((1 - outside) / (hw.intra_node_gbps * 1e9) + outside / (hw.inter_node_gbps * 1e9))
    else:
        ep_time = 0.0
    optimizer = 32 * (dense_local + experts_local) / (hw.hbm_tbps * 1e12)
    plan.time = {"compute": compute, "data_parallel": dp, "expert_parallel": ep_time, "optimizer": optimizer}
    plan.step_s = max(compute, dp) + ep_time + optimizer
    plan.mfu = model_flops / (plan.step_s * peak)
    plan.tokens_per_s = work.global_batch * work.seq_len / plan.step_s
    return plan


def _bandwidth(group: int, hw: Hardware) -> float:
    """A ring over `group` consecutive GPUs runs at NVLink speed inside a node, else at the NIC's."""
    return (hw.intra_node_gbps if group <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9


def check_layout(shape: Shape, layout: Layout, hw: Hardware, work: Workload) -> None:
    G, ep = hw.gpus, layout.expert_parallel
    if layout.parallel not in ("ddp", "fsdp"):
        raise VelocisError(f"--parallel {layout.parallel!r}: choose ddp or fsdp")
    if ep < 1 or G % ep:
        raise VelocisError(f"--ep {ep} must divide --gpus {G}")
    if ep > 1 and (not shape.num_experts or shape.num_experts % ep):
        raise VelocisError(f"--ep {ep} must divide the model's {shape.num_experts} experts")
    if ep > 1 and layout.parallel != "fsdp":
        raise VelocisError("--ep needs --parallel fsdp (as in training: expert shards compose with FSDP)")
    if layout.micro_batch < 1 or work.global_batch % (G * layout.micro_batch):
        raise VelocisError(f"--global-batch {work.global_batch} must be a multiple of --gpus x --micro-batch "
                           f"({G} x {layout.micro_batch})")


def layouts(shape: Shape, hw: Hardware, work: Workload) -> list[Layout]:
    """Every layout Velocis can run here."""
    eps = [d for d in range(1, hw.gpus + 1) if hw.gpus % d == 0 and (d == 1 or (shape.num_experts and
                                                                               shape.num_experts % d == 0))]
    out = []
    for parallel in ("ddp", "fsdp"):
        for ep in eps if parallel == "fsdp" else [1]:
            for ac in (False, True):
                for mb in (1, 2, 4, 8, 16):
                    if work.global_batch % (hw.gpus * mb) == 0:
                        out.append(Layout(parallel, ep, ac, mb))
    return out


def best(shape: Shape, hw: Hardware, work: Workload) -> list[Plan]:
    """The layouts that fit, fastest first (by MFU; less memory breaks ties); [] when none fits."""
    plans = [evaluate(shape, layout, hw, work) for layout in layouts(shape, hw, work)]
    return sorted((p for p in plans if p.fits), key=lambda p: (-p.mfu, p.memory_total))


def smallest_fit(shape: Shape, hw: Hardware, work: Workload, limit: int = 4096) -> tuple[int, Plan] | None:
    """The fewest GPUs (multiples of a node) on which some layout fits, with its best plan."""
    gpus = hw.gpus_per_node
    while gpus <= limit:
        if work.global_batch % gpus == 0:
            found = best(shape, replace(hw, gpus=gpus), work)
            if found:
                return gpus, found[0]
        gpus += hw.gpus_per_node
    return None
