"""Checkpoints of a run on several processes, written with torch.distributed.checkpoint (DCP).

    RUN/checkpoints/step_N/
        shards/                 DCP: .metadata + one __R_0.distcp per rank (model + optimizer)
        config.json, tokenizer files, trainer_state.json/.safetensors   (rank 0; no optimizer)

Every rank writes only its own shards; DCP's metadata records each tensor's global shape and where
each piece lies, so a checkpoint loads at any world size and layout (2 FSDP ranks -> 1 process, DDP
-> FSDP, ...): the reader asks for the pieces it holds. The whole step dir is built as
`.step_N.partial` and renamed into place by rank 0 only after every rank has finished its shards,
so a rank dying mid-save leaves the previous checkpoints as they were and no step_N.

`consolidate` turns one into the single-safetensors model directory that `generate`, the engine and
export load, on one process.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velocis.errors import VelocisError
from velocis.train import distributed, state_io

SHARDS = "shards"


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDS / ".metadata").is_file()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def _trained(model: nn.Module, extras: dict[str, nn.Module]) -> nn.Module:
    """The optimizer's parameters under stable names: the model's own, the objective's under `objective.`."""
    return nn.ModuleDict({"model": model, **({"objective": nn.ModuleDict(extras)} if extras else {})})


def save(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer,
         trainer_state: dict[str, Any], extras: dict[str, nn.Module] | None = None) -> Path:
    """Every rank: its shards of the model and optimizer; rank 0: the rest, then the rename."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from velocis.utils.atomic import _fsync_dir

    target = Path(run_dir) / "checkpoints" / f"step_{step}"
    partial = target.parent / f".{target.name}.partial"

    def fresh_partial() -> None:
        shutil.rmtree(partial, ignore_errors=True)  # a killed save's leftovers
        partial.mkdir(parents=True)

    distributed.run_on_main(fresh_partial)
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(_trained(model, extras or {}), optimizer)}
    dcp.save(state, checkpoint_id=partial / SHARDS)  # collective: returns once every rank's shards are down

    def finish() -> None:
        model.config.save(partial / "config.json")
        if tokenizer is not None:
            tokenizer.save(partial)
        state_io.save_state({**trainer_state, "sharded": True}, partial)
        _fsync_dir(partial)
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(partial, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)

    distributed.run_on_main(finish)
    return target


def load_model(model: nn.Module, ckpt: Path) -> None:
    """This process's pieces of the checkpoint's weights, whatever layout wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    _read(dcp, state, ckpt)
    set_model_state_dict(model, state["model"])


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path,
                   extras: dict[str, nn.Module] | None = None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    trained = _trained(model, extras or {})
    state = {"optimizer": get_optimizer_state_dict(trained, optimizer)}  # allocates the state to read into
    _read(dcp, state, ckpt)
    set_optimizer_state_dict(trained, optimizer, state["optimizer"])


def _read(dcp, state: dict[str, Any], ckpt: Path) -> None:
    try:
        dcp.load(state, checkpoint_id=Path(ckpt) / SHARDS)
    except Exception as e:  # noqa: BLE001 - DCP wraps every reader failure in its own exception types
        if distributed.is_collective_failure(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise VelocisError(f"{ckpt}: cannot read the sharded checkpoint ({first}); is it complete and from "
                           f"this model? Resume from another checkpoint") from None


def full_copy(model: nn.Module) -> nn.Module:
    """A plain copy (no DDP/FSDP wrapping, every tensor whole) of a parallelized model, on every rank
    and on the model's device: e.g. a frozen reference for DPO, where deepcopy of a DDP or FSDP
    module is refused. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from velocis.model_io import build_model

    state = get_model_state_dict(model, options=_options(full_state_dict=True))
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    device = next(model.parameters()).device
    return build_model(model.config, {k: v.detach().clone() for k, v in state.items()}, where="the model",
                       device=device)


def gather_full_model(model: nn.Module):
    """The whole model on rank 0's CPU (a collective: every rank calls it); None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from velocis.model_io import build_model

    state = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    if not distributed.is_main():
        return None
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return build_model(model.config, dict(state), where="the trained model", device="cpu").train()


def consolidate(ckpt: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> Path:
    """A sharded checkpoint directory -> a model directory (model.safetensors + config.json +
    tokenizer), read on one process. Callers resolve a run dir to its newest checkpoint first
    (checkpoint.find_checkpoint), which keeps this module below checkpoint.py in the import graph."""
    import torch.distributed.checkpoint as dcp

    from velocis.config import ModelConfig
    from velocis.model_io import save_model
    from velocis.models import VelocisModel
    ckpt = Path(ckpt)
    if not is_sharded(ckpt):
        raise VelocisError(f"{ckpt}: not a sharded checkpoint (no {SHARDS}/.metadata); its model.safetensors "
                           f"already is the model: load the directory directly")
    config = ModelConfig.load(ckpt / "config.json")
    with torch.device("meta"):
        model = VelocisModel(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    weights = model.state_dict()
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        _read(dcp, {"model": weights}, ckpt)  # in place: the state dict's tensors are the model's
    tokenizer = None
    if (ckpt / "tokenizer.json").is_file():
        from velocis.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(ckpt)
    return save_model(model, tokenizer, out_dir, dtype=dtype, overwrite=overwrite)


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                        extras: dict[str, nn.Module] | None = None) -> None:
    """A one-process optimizer state (keyed by parameter index, the order of the param groups) into
    an optimizer over sharded parameters: the indices are named, then torch shards each tensor."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    trained = _trained(model, extras or {})
    names = {id(p): n for n, p in trained.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise VelocisError("the checkpoint's optimizer holds another set of parameters than this run's; resume "
                           "with the same model and objective")
    full = {"state": {order[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(trained, optimizer, full, options=_options(full_state_dict=True))
