"""The processes of a run: joining them, and the few numbers they must agree on.

Launched by torchrun (`torchrun --nnodes N --nproc-per-node M -m velocis -- train-cluster ...`), every
process finds RANK / WORLD_SIZE / LOCAL_RANK in its environment; `setup` joins the process group (NCCL on
GPUs, gloo on CPUs) with a timeout, so a dead or stuck rank stops the others with an error instead
of a hang. Without a launcher (or with one process) nothing is initialised and every helper here is
the identity, so the single-process trainer runs the code it always ran.

Conventions: rank 0 alone prints, writes metrics and writes files that are not shards; the other
ranks send their output to RUN/logs/rank_N.log. Losses are sums over ranks of each rank's share
(each rank divides by the step's global token count), so gradients are summed, not averaged,
across ranks (see parallelize.py).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from velocis.errors import VelocisError
from velocis.utils.device import resolve_device

T = TypeVar("T")
LOG_DIR = "logs"  # RUN/logs/rank_N.log: what the ranks other than 0 print


class RankLost(VelocisError):
    """Another rank died or stopped answering: a collective failed or timed out."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launcher_env() -> DistEnv:
    """What torchrun (or any launcher setting its variables) says about this process."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise VelocisError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None

    return DistEnv(rank=read("RANK", 0), world_size=read("WORLD_SIZE", 1), local_rank=read("LOCAL_RANK", 0))


def current() -> DistEnv:
    """The live process group's view of this process (one process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    env = launcher_env()
    return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, dist.get_backend())


def check_world_size(asked: int | None, launched: DistEnv) -> None:
    """`--world-size` is a check on the launch, not a way to start processes."""
    if asked is None or asked == launched.world_size:
        return
    if launched.world_size == 1 and "WORLD_SIZE" not in os.environ:
        raise VelocisError(f"world_size (--world-size) {asked} needs a launcher to start the processes: run "
                           f"`torchrun --nproc-per-node {asked} -m velocis -- train-cluster ...` (one machine) or "
                           f"torchrun with --nnodes on each machine (README: Distributed training)")
    raise VelocisError(f"world_size (--world-size) is {asked} but the launcher started {launched.world_size} "
                       f"processes (WORLD_SIZE); match torchrun's --nnodes x --nproc-per-node, or drop --world-size")


def device_for(asked: str, env: DistEnv | None = None) -> torch.device:
    """This process's device: under a launcher each rank takes the GPU of its local rank."""
    env = env or current()
    device = resolve_device(asked)
    if env.active and device.type == "cuda":
        if device.index is not None and asked not in ("auto", "cuda"):
            raise VelocisError(f"device (--device) {asked}: under torchrun each rank takes the GPU of its local "
                               f"rank; pass --device cuda (or auto)")
        if env.local_rank >= torch.cuda.device_count():
            raise VelocisError(f"local rank {env.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                               f"use --nproc-per-node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    return device


def setup(world_size: int | None = None, device: str = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Join the launcher's process group (once per process; later calls return it) and check
    --world-size against it. One process: returns without initialising anything."""
    if dist.is_available() and dist.is_initialized():
        env = current()
        check_world_size(world_size, env)
        return env
    launched = launcher_env()
    check_world_size(world_size, launched)
    if launched.world_size == 1:
        return DistEnv()
    if not dist.is_available():
        raise VelocisError("this PyTorch build has no torch.distributed; install a build with it to run on "
                           "several processes")
    dev = device_for(device, launched)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    except (RuntimeError, ValueError) as e:
        raise VelocisError(f"rank {launched.rank}: cannot join the other {launched.world_size - 1} processes "
                           f"({_first_line(e)}); check torchrun's --rdzv-endpoint / MASTER_ADDR:MASTER_PORT") from None
    return current()


def shutdown(wait: bool = True) -> None:
    """Leave the process group. After a clean finish the ranks meet first: one tearing down its
    transport while a peer still talks to it can abort the process at exit (gloo's worker threads).
    wait=False after an error: a lost or stuck peer would hold the barrier until the timeout."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            with contextlib.suppress(Exception):
                dist.barrier()
        gc.collect()  # free what still holds the group (a DDP reducer in a reference cycle) while it is whole
        dist.destroy_process_group()


# --- who does what ------------------------------------------------------------------------------
def is_main() -> bool:
    return current().is_main


def barrier() -> None:
    if current().active:
        dist.barrier()


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only; the others wait, and if it raised a VelocisError they raise it too
    (so a bad run dir stops every rank, not just the one that checked it)."""
    env = current()
    if not env.active:
        return fn()
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except VelocisError as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise VelocisError(box[0])
    return result


def main_first(fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn` first (it writes, e.g. prepares data); then the others run it (it finds the
    result cached). A failure on rank 0 stops every rank."""
    env = current()
    if not env.active:
        return fn()
    first = run_on_main(fn)
    return first if env.is_main else fn()


def log_to_file(run_dir: str | Path) -> Path | None:
    """Ranks other than 0 write what they print (and the C++ side's warnings) to RUN/logs/rank_N.log."""
    env = current()
    if env.is_main:
        return None
    path = Path(run_dir) / LOG_DIR / f"rank_{env.rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # a stream without a file descriptor
            os.dup2(f.fileno(), stream.fileno())
    sys.stdout = sys.stderr = f
    return path


# --- numbers the ranks agree on -------------------------------------------------------------------
def sum_over_ranks(value: float | int | torch.Tensor) -> Any:
    """The sum over ranks of a number (returned as the same kind) or a tensor (in place)."""
    if not current().active:
        return value
    if isinstance(value, torch.Tensor):
        dist.all_reduce(value)
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return int(t.item()) if isinstance(value, int) else float(t.item())


def max_over_ranks(*values: float) -> tuple[float, ...]:
    if not current().active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())


def any_over_ranks(flag: bool) -> bool:
    """True on every rank when it is true on any (ranks that must take the same branch together)."""
    return bool(max_over_ranks(float(flag))[0])


def gather_objects(value: T) -> list[T]:
    """Every rank's `value` (picklable; tensors moved to the CPU first), in rank order, on every rank."""
    if not current().active:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def gather_tensors(t: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors (the same shape on each) concatenated along dim 0, in rank order."""
    if not current().active:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sum_gradients(module: torch.nn.Module) -> None:
    """Sum the gradients of a module outside the parallelized model (an objective's value head)
    over ranks, as DDP does for the model's own."""
    if not current().active:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def min_over_ranks(value: int) -> int:
    if not current().active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def mean_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Logged numbers (and lists of numbers, e.g. MoE expert loads) averaged over ranks in one
    all-reduce; other values are rank 0's. Every rank passes the same keys (one model, one objective)."""
    if not current().active:
        return stats
    flat: list[float] = []

    def collect(v):
        if isinstance(v, (list, tuple)):
            return all([collect(x) for x in v])
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            flat.append(float(v))
            return True
        return False

    numeric = [k for k in sorted(stats) if collect(stats[k])]
    flat.clear()
    for k in numeric:
        collect(stats[k])
    t = torch.tensor(flat, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    values = iter((t / dist.get_world_size()).tolist())

    def rebuild(v):
        if isinstance(v, (list, tuple)):
            return [rebuild(x) for x in v]
        return next(values)

    return {**stats, **{k: rebuild(stats[k]) for k in numeric}}


def collective_device() -> torch.device:
    """Where small tensors for collectives live: NCCL needs them on the GPU."""
    if current().backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- gradients ----------------------------------------------------------------------------------
@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip DDP's gradient all-reduce on a step's accumulation micro-batches (the last one syncs the
    sum). FSDP keeps its reduce-scatter on every micro-batch: full unsharded gradients would cost the
    memory it exists to save."""
    from torch.distributed.fsdp import FSDPModule

    replicated = hasattr(model, "set_requires_gradient_sync") and not isinstance(model, FSDPModule)
    if enabled or not replicated:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@torch.no_grad()
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """torch's clip_grad_norm_ on one process; across ranks the norm of the whole gradient, whatever
    each parameter's layout: replicated (DDP: counted once), sharded by FSDP or by expert parallelism
    (DTensor shards: squares summed over their mesh). Every rank gets the same norm."""
    if not current().active:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=collective_device())
    by_mesh: dict[Any, torch.Tensor] = {}
    for g in grads:
        if isinstance(g, DTensor):
            sq = g.to_local().detach().double().pow(2).sum().to(total.device)
            if any(pl.is_shard() for pl in g.placements):
                key = g.device_mesh
                by_mesh[key] = by_mesh.get(key, torch.zeros_like(total)) + sq
            else:
                total += sq
        else:
            total += g.detach().double().pow(2).sum().to(total.device)
    for mesh, sq in by_mesh.items():  # parallelize.py shards over 1-D meshes (FSDP's, expert parallel's)
        dist.all_reduce(sq, group=mesh.get_group())
        total += sq
    norm = math.sqrt(float(total))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0 and math.isfinite(norm):
        for g in grads:
            g.mul_(coef)
    return norm


def is_collective_failure(e: BaseException) -> bool:
    """A failed or timed-out collective (a peer died, hung, or its connection dropped)."""
    if isinstance(e, dist.DistError):
        return True
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: each failed rank's (exception, trace)
    if isinstance(failures, dict):
        return any(isinstance(f, tuple) and f and is_collective_failure(f[0]) for f in failures.values())
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe"))


def rank_lost(e: BaseException, where: str, timeout_s: float, hint: str) -> RankLost:
    env = current()
    return RankLost(f"rank {env.rank}: lost contact with the other ranks during {where} (one died, or did not "
                    f"answer within the {timeout_s:g}s --dist-timeout: {_first_line(e)[:160]}); see each rank's "
                    f"output (RUN/logs/rank_N.log); {hint}")


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


class NoMetrics:
    """What the ranks other than 0 write their metrics to: nothing (rank 0 writes RUN/metrics.jsonl)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def layout(cfg) -> str:
    """The run's parallelism in words, e.g. "fsdp + expert parallel 2 + activation checkpointing"."""
    parts = [cfg.parallel]
    if cfg.expert_parallel > 1:
        parts.append(f"expert parallel {cfg.expert_parallel}")
    if cfg.activation_checkpointing:
        parts.append("activation checkpointing")
    return " + ".join(parts)
