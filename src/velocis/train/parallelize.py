"""Parallelism is applied to the built, unchanged model from outside (torchtitan's parallelize.py).

The trainer builds the model on the meta device, passes it through `parallelize`, then
`materialize`s it (memory on the device, initial weights), then builds the optimizer: the order
FSDP2 needs, since sharding happens before parameters get memory. Every piece is torch.distributed's
own, applied in place so module names (and checkpoint keys) stay those of the model:

  activation checkpointing  torch.distributed._composable checkpoint() per block (also on one process)
  expert parallel           each MoE layer's experts sharded over --expert-parallel ranks
                            (train/expert_parallel.py: all-to-all dispatch and combine)
  fsdp                      fully_shard per block, then the root; bf16 parameters for compute with
                            fp32 gradient reduction under bf16 precision; the experts left to EP
  ddp                       replicate() (DDP): every rank holds the whole model

Gradients are summed across ranks, not averaged: each rank divides its loss by the step's global
token count (loop.py), so the sum is the gradient of the whole global batch.
On one process `parallelize` applies only activation checkpointing.
"""
from __future__ import annotations

from itertools import chain

import torch
import torch.distributed as dist
from torch import nn

from velocis.errors import VelocisError
from velocis.train import distributed
from velocis.utils.device import resolve_precision


def parallelize(model: nn.Module, cfg) -> nn.Module:
    """Apply the run's parallelism to `model` (built on the meta device); in place, returns it."""
    env = distributed.current()
    if cfg.expert_parallel > 1 and cfg.expert_parallel > env.world_size:
        raise VelocisError(f"expert_parallel (--expert-parallel) {cfg.expert_parallel} needs at least that many "
                           f"processes; this run has {env.world_size} (launch with torchrun --nproc-per-node ...)")
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if not env.active:
        return model
    device = distributed.device_for(cfg.device, env)
    if cfg.expert_parallel > 1:
        apply_expert_parallel(model, cfg.expert_parallel, device.type)
    if cfg.parallel == "fsdp":
        apply_fsdp(model, device.type, resolve_precision(cfg.precision, device))
    else:
        apply_ddp(model, device)
    return model


# --- the pieces ---------------------------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module) -> None:
    """Keep only each block's input for the backward pass; recompute the rest (non-reentrant).
    A recomputed MoE forward counts its expert load again: the aux-loss-free bias step uses only the
    sign of (mean load - load), which doubling every count leaves as it is."""
    from torch.distributed._composable.checkpoint_activation import checkpoint

    for block in _blocks(model):
        checkpoint(block)


def apply_expert_parallel(model: nn.Module, ep: int, device_type: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from velocis.models.moe import MoE
    from velocis.train.expert_parallel import ExpertParallelExperts

    world = dist.get_world_size()
    if world % ep:
        raise VelocisError(f"expert_parallel (--expert-parallel) {ep} must divide the number of processes ({world})")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise VelocisError("expert_parallel (--expert-parallel) needs a MoE model (num_experts > 0); "
                           "drop the flag for a dense one")
    # rows: replicas of the expert shards (their gradients are summed); columns: one expert-parallel group
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("expert_replica", "expert"))
    for moe in layers:
        moe.experts = ExpertParallelExperts(moe.experts, mesh["expert"], mesh["expert_replica"].get_group())


def apply_fsdp(model: nn.Module, device_type: str, precision: str) -> None:
    """fully_shard each block (its parameters are gathered just before it runs and freed after),
    then the root (embedding, final norm, head). Expert-parallel shards are left to EP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
          else MixedPrecisionPolicy())
    experts = {p for p in model.parameters() if isinstance(p, DTensor)}  # EP's, already sharded

    def shard(module: nn.Module, **kw) -> None:
        ignored = experts & set(module.parameters())
        fully_shard(module, mesh=mesh, mp_policy=mp, ignored_params=ignored or None, **kw)

    for block in _blocks(model):
        shard(block)
    shard(model)
    for m in model.modules():  # sum, not average (see the module docstring), with a plain SUM op (gloo has no other)
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def apply_ddp(model: nn.Module, device: torch.device) -> None:
    """replicate() is DDP applied in place (the module keeps its class and names). Buffers are not
    broadcast each step: MoE load counts are per rank until the bias update all-reduces them."""
    from torch.distributed._composable.replicate import replicate

    kw = {"device_id": device} if device.type == "cuda" else {}
    replicate(model, forward_sync_buffers=False, **kw)
    model.register_comm_hook(None, _allreduce_sum)


def start_data_parallel(model: nn.Module) -> None:
    """Build replicate()'s DDP state now rather than at the first forward. That forward may be an
    objective's sampling under inference mode (GRPO's rollouts), which would make DDP's gradient
    buckets inference tensors that backward cannot write. Call it once the parameters are final
    (after LoRA adds its own)."""
    from torch.distributed._composable.replicate import replicate

    state = replicate.state(model) if distributed.current().active else None
    if state is not None and (state._init_args or state._init_kwargs):
        state.lazy_init()


def _allreduce_sum(process_group, bucket):
    """DDP's all-reduce hook without its division by the world size (gradients are summed)."""
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units sharded / checkpointed one at a time: the decoder blocks and the MTP modules."""
    blocks = list(model.layers)
    if getattr(model, "mtp", None) is not None:
        blocks += list(model.mtp.layers)
    return blocks


# --- memory and initial weights -------------------------------------------------------------------
def materialize(model: nn.Module, device: torch.device) -> None:
    """Give the (possibly sharded) meta model memory on `device` and its initial weights: the same
    weights a one-process run with the same seed starts from, except for sharded parameters on GPUs
    (initialised shard by shard through DTensor's RNG tracker, which scales to any model size)."""
    model.to_empty(device=device)
    if device.type == "cuda" or not has_sharded_params(model):
        model.init_weights()
        return
    # DTensor's random ops on CPU meshes draw the same numbers on every rank (no RNG tracker):
    # initialise the whole model on the CPU, as one process would, and keep this rank's shards
    from velocis.models import VelocisModel

    with torch.device("meta"):
        full = VelocisModel(model.config)
    full.to_empty(device="cpu")
    full.init_weights()
    load_full_state(model, dict(chain(full.named_parameters(), full.named_buffers())), "the initial weights")


def has_sharded_params(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def load_full_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy whole tensors (a safetensors file's, a one-process model's) into `model`, each rank
    keeping the slices of its sharded parameters. A tied head may be stored once."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    persistent = set(model.state_dict())
    targets = dict(chain(model.named_parameters(), model.named_buffers()))
    aliases = set(dict(model.named_parameters(remove_duplicate=False))) - set(targets)  # tied copies
    missing = [k for k in targets if k in persistent and k not in state]
    unexpected = [k for k in state if k not in targets and k not in aliases]
    if missing or unexpected:
        raise VelocisError(f"{where}: weights do not fit the model (missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]})")
    for name, tensor in targets.items():
        if name not in state:
            continue  # a non-persistent buffer: it keeps what materialize gave it
        full = state[name]
        if tuple(full.shape) != tuple(tensor.shape):
            raise VelocisError(f"{where}: tensor {name} has shape {tuple(full.shape)}, the model {tuple(tensor.shape)}")
        if isinstance(tensor, DTensor):
            piece = distribute_tensor(full.to(tensor.device, tensor.dtype), tensor.device_mesh, tensor.placements,
                                      src_data_rank=None).to_local()
            tensor.to_local().copy_(piece)
        else:
            tensor.copy_(full.to(tensor.dtype))
