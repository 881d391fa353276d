"""Expert parallelism: each rank of an expert-parallel group holds E/P of a MoE layer's experts;
tokens travel to their experts' rank and back with two all-to-alls (dispatch, combine).

`ExpertParallelExperts` replaces a MoE layer's `experts` module (models/moe.py `Experts`) with the
same parameter names and global shapes: the stacked weights are DTensors sharded on the expert
dimension (Shard(0)), so checkpoints (torch.distributed.checkpoint) see the whole tensors and
reshard them at another world size. The router, the shared experts and the MoE's bookkeeping stay
as they are: the layer hands this module its tokens, routing weights and expert ids, exactly as it
hands them to `Experts`, and gets back (output, tokens routed to each expert).

Per layer and rank, with P ranks and L = E/P local experts:
  1. sort the (token, slot) pairs by expert id: rows for rank d are then contiguous;
  2. all-to-all of the row counts [P, L]: every rank learns how many rows it gets per expert;
  3. all-to-all of the rows (dispatch), regroup them by local expert, run the L SwiGLU experts
     as grouped matmuls (moe._segment_matmul);
  4. undo the regrouping, all-to-all the outputs back (combine), weight and sum them per token.
The all-to-alls are autograd functions, so the backward pass runs the same exchanges reversed.
Under expert parallelism smaller than the world (P < world size) each expert has world/P replicas;
their gradients are summed over the replica group as they are produced.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from velocis.errors import VelocisError
from velocis.models.moe import Experts, _grouped_mm_available, _segment_matmul


class ExpertParallelExperts(nn.Module):
    """Drop-in for `Experts` with its experts split over `mesh` (1-D, the expert-parallel group)."""

    def __init__(self, experts: Experts, mesh: DeviceMesh, replica_group: dist.ProcessGroup | None = None):
        super().__init__()
        num_experts = experts.gate_up_proj.shape[0]
        if num_experts % mesh.size():
            raise VelocisError(f"expert_parallel (--expert-parallel) {mesh.size()} must divide the number of "
                               f"experts ({num_experts}); choose a divisor")
        self.mesh = mesh
        # src_data_rank=None: every rank slices its own copy (meta, or identical weights): no communication
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(distribute_tensor(full.detach(), mesh, [Shard(0)], src_data_rank=None),
                                             requires_grad=full.requires_grad))
        if replica_group is not None and dist.get_world_size(replica_group) > 1:
            for p in (self.gate_up_proj, self.down_proj):
                p.register_hook(lambda g, group=replica_group: _sum_local(g, group))

    def forward(self, x, weights, indices, capacity=None, impl="auto"):
        return expert_parallel_dispatch(x, weights, indices, self.gate_up_proj.to_local(), self.down_proj.to_local(),
                                        self.mesh.get_group(), capacity=capacity, impl=impl)


def _sum_local(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """One micro-batch's gradient of a replicated expert, summed over its replicas."""
    dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=group)
    return grad


def expert_parallel_dispatch(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    capacity: int | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's tokens x [N, H] with their routing (weights/indices [N, k] over all E experts),
    and this rank's L experts (gate_up [L, 2I, H], down [L, H, I]). Returns (out [N, H], tokens routed
    to each of the E experts [E], before any capacity drop), as moe.dispatch does on one process."""
    ranks = dist.get_world_size(group)
    local = gate_up.shape[0]
    n, k = indices.shape
    # torch._grouped_mm is outside autocast's op list: cast here, as moe.dispatch does
    dev = x.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    out_dtype, x = x.dtype, x.to(compute_dtype)
    gate_up, down = gate_up.to(compute_dtype), down.to(compute_dtype)

    flat_e = indices.reshape(-1)
    order = torch.argsort(flat_e, stable=True)  # (token, slot) pairs by expert: by destination rank too
    counts = torch.bincount(flat_e, minlength=ranks * local)
    token_of = order // k
    flat_w = weights.reshape(-1)[order]
    sent = counts
    if capacity is not None:  # each rank drops its own overflow, as a data-parallel rank would
        seg_start = torch.cumsum(counts, 0) - counts
        keep = torch.arange(order.numel(), device=x.device) - seg_start[flat_e[order]] < capacity
        token_of, flat_w = token_of[keep], flat_w[keep]
        sent = counts.clamp(max=capacity)

    # dispatch: received[s * L + j] = rows rank s sends to this rank's expert j
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent.contiguous(), group=group)
    send_splits = sent.view(ranks, local).sum(1).tolist()
    recv_splits = received.view(ranks, local).sum(1).tolist()
    rows = all_to_all_single_autograd(x[token_of], recv_splits, send_splits, group)
    # rows arrive by source rank, then expert; the grouped matmul wants them by expert
    block = torch.repeat_interleave(torch.arange(ranks * local, device=x.device), received)
    by_expert = torch.argsort((block % local) * ranks + block // local, stable=True)
    y = _local_experts(rows[by_expert], gate_up, down, received.view(ranks, local).sum(0), impl)

    # combine: back into arrival order, then to the ranks the tokens came from
    y = y[torch.argsort(by_expert)]
    back = all_to_all_single_autograd(y, send_splits, recv_splits, group)
    weighted = back * flat_w.unsqueeze(-1).to(back.dtype)
    out = torch.zeros(n, x.shape[-1], dtype=out_dtype, device=x.device).index_add_(0, token_of, weighted.to(out_dtype))
    return out, counts.detach().float()


def _local_experts(rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor,
                   impl: str) -> torch.Tensor:
    """SwiGLU of each local expert over its contiguous rows (grouped matmul where available)."""
    aligned = all(d * rows.element_size() % 16 == 0 for d in (rows.shape[-1], down.shape[-1]))
    usable = aligned and _grouped_mm_available(rows.device, rows.dtype)
    use_grouped = impl == "grouped" or (impl == "auto" and usable)
    offs = torch.cumsum(counts, 0).to(torch.int32) if use_grouped else None
    sizes = None if use_grouped else counts.tolist()
    g, u = _segment_matmul(rows, gate_up, sizes, offs).chunk(2, dim=-1)
    return _segment_matmul(F.silu(g) * u, down, sizes, offs)
