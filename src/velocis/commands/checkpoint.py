"""`velocis checkpoint consolidate`: a sharded checkpoint (written by a run on several processes,
train/sharded_checkpoint.py) -> one model directory that generate, serve, export and the engine load.

    velocis checkpoint consolidate --checkpoint runs/big --output models/big [--dtype bfloat16]

--checkpoint takes a run directory (its newest checkpoint), a checkpoints/ directory or a step_N
directory. Read on one process, whatever world size wrote it.
"""
from __future__ import annotations

from pathlib import Path

from velocis.errors import VelocisError

DTYPES = ("float32", "bfloat16", "float16")


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="work with training checkpoints (consolidate sharded ones)",
                       description="work with training checkpoints")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    c = actions.add_parser("consolidate", help="a sharded checkpoint -> one model directory",
                           description=__doc__.split("\n\n")[0])
    c.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT",
                   help="a run directory (its newest checkpoint), checkpoints/ or a step_N directory")
    c.add_argument("--output", required=True, metavar="DIR", help="the model directory to write")
    c.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default: as trained, fp32)")
    c.add_argument("--overwrite", action="store_true", help="replace the model files in an existing --output")
    c.set_defaults(func=consolidate)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step_N dir as given, or a run / checkpoints/ dir's newest checkpoint."""
    from velocis.train.checkpoint import find_checkpoint
    from velocis.train.sharded_checkpoint import is_sharded

    path = Path(path)
    if not path.exists():
        raise VelocisError(f"--checkpoint {path}: no such directory")
    if is_sharded(path):
        return path
    try:
        return find_checkpoint(path)
    except VelocisError:
        raise VelocisError(f"--checkpoint {path}: no checkpoint here (give a run directory, its checkpoints/ "
                           f"or a checkpoints/step_N directory)") from None


def consolidate(args) -> int:
    import torch

    from velocis.train.sharded_checkpoint import consolidate as write_model

    ckpt = resolve_checkpoint(args.checkpoint)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = write_model(ckpt, args.output, dtype=dtype, overwrite=args.overwrite)
    print(f"consolidated {ckpt} -> {out}")
    return 0
