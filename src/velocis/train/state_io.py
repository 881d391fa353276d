"""Trainer state on disk without pickle: `trainer_state.json` (the structure and every plain value)
plus `trainer_state.safetensors` (every tensor and numpy array it refers to).

The state (optimizer, RNG states, data position, counters) is nested dicts, lists and tuples of
numbers, strings, tensors and numpy arrays. JSON cannot hold tuples, non-string keys, tensors or
inf/nan, so those are written as small tagged objects:

    {"__tensor__": "t3"}                 a tensor, stored under key t3 in the safetensors file
    {"__ndarray__": "t4", "dtype": ...}  a numpy array (e.g. numpy's RNG state), stored as a tensor
    {"__tuple__": [...]}                 a tuple (python's RNG state, AdamW's betas)
    {"__items__": [[k, v], ...]}         a dict with non-string keys (optimizer state by param id)
    {"__float__": "inf"}                 inf / -inf / nan

Reading never runs code from the file. Checkpoints written before this format (trainer_state.pt,
a pickle) are read with torch.load(weights_only=True) and only numpy's RNG types allowed; a file
that needs anything else is refused, not executed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocis.errors import VelocisError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"


def has_state(ckpt: Path) -> bool:
    return (ckpt / STATE_JSON).is_file() or (ckpt / LEGACY_STATE).is_file()


def _encode(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(v, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = v.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(v, np.ndarray):
        key = f"t{len(tensors)}"
        wide = v.astype(np.int64) if v.dtype.kind in "ui" else v.astype(np.float64)  # any int/float dtype fits
        tensors[key] = torch.from_numpy(np.ascontiguousarray(wide))
        return {"__ndarray__": key, "dtype": v.dtype.str}
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return {"__float__": repr(v)}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x, tensors) for x in v]}
    if isinstance(v, list):
        return [_encode(x, tensors) for x in v]
    if isinstance(v, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in v):
            return {k: _encode(x, tensors) for k, x in v.items()}
        return {"__items__": [[_encode(k, tensors), _encode(x, tensors)] for k, x in v.items()]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"trainer state value of type {type(v).__name__} cannot be saved")


def _decode(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tensor__" in v:
        return tensors[v["__tensor__"]]
    if "__ndarray__" in v:
        return tensors[v["__ndarray__"]].numpy().astype(np.dtype(v["dtype"]))
    if "__tuple__" in v:
        return tuple(_decode(x, tensors) for x in v["__tuple__"])
    if "__items__" in v:
        return {_decode(k, tensors): _decode(x, tensors) for k, x in v["__items__"]}
    if "__float__" in v:
        return float(v["__float__"])
    return {k: _decode(x, tensors) for k, x in v.items()}


def save_state(state: dict[str, Any], ckpt: Path) -> None:
    """Write the two files into `ckpt` (a directory being built aside, renamed into place after)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, tensors)
    save_file(tensors, str(ckpt / STATE_TENSORS), metadata={"format": "velocis-trainer-state/1"})
    (ckpt / STATE_JSON).write_text(json.dumps(doc) + "\n", encoding="utf-8")


def load_state(ckpt: Path) -> dict[str, Any]:
    if (ckpt / STATE_JSON).is_file():
        from safetensors.torch import load_file

        try:
            doc = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
            return _decode(doc, load_file(str(ckpt / STATE_TENSORS)))
        except Exception as e:  # truncated, corrupt or hand-edited
            raise VelocisError(f"{ckpt}: cannot read the trainer state ({type(e).__name__}: {e}); "
                               f"resume from another checkpoint") from None
    return _load_legacy(ckpt / LEGACY_STATE)


def _load_legacy(path: Path) -> dict[str, Any]:
    """A pickle from before this format: only tensors, plain containers and numpy's RNG types load."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VelocisError(f"{path}: cannot read this (pre-JSON) trainer state safely ({first[:200]}); "
                           f"it would need code from the file to run. Resume from a newer checkpoint, or "
                           f"start the run again from its weights") from None
