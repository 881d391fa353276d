"""May a command write its files into an output directory?

A writer owns the files it writes (a model dir: model.safetensors, config.json, tokenizer files)
and nothing else. It may write into a new or empty directory, or one holding only its own kind of
output from an earlier run. A directory that holds anything else (a training run, another kind of
model, a user's files) is refused unless the user passes --overwrite, and even then only the owned
files are replaced: what the writer did not write is never deleted.

    previous = check_output_dir(out, {"model.safetensors", "config.json"}, "a Velocis model",
                                overwrite, is_own=lambda d: config_kind(d) == "velocis")
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from velocis.errors import VelocisError

# Our own bookkeeping inside an output dir (staging dirs, lock files): never counted as the user's.
PRIVATE_PREFIX = ".velocis"
# Pseudo-filesystems: root "may write" there, but no file would be kept.
_SYSTEM_DIRS = (Path("/proc"), Path("/sys"))
# What a training run leaves in its directory.
_RUN_MARKERS = ("checkpoints", "metrics.jsonl")


def as_path(value, param: str) -> Path:
    """`value` as a Path, or a VelocisError naming the parameter (not a TypeError deep inside)."""
    if isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str) and os.fspath(value):
        return Path(value)
    raise VelocisError(f"{param} must be a path (a str or pathlib.Path), got {value!r}")


def config_kind(path: str | Path) -> str | None:
    """"velocis" or "hf" by the directory's config.json, None if it has none (or an unreadable one)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if cfg.get("architecture") == "velocis":
        return "velocis"
    return "hf" if cfg.get("architectures") or cfg.get("model_type") else None


def check_writable(path: str | Path, flag: str = "--output") -> Path:
    """Fail before any work if `path` cannot become a directory we write into; returns it resolved."""
    path = Path(path)
    resolved = path.resolve()
    if any(resolved == d or d in resolved.parents for d in _SYSTEM_DIRS):
        raise VelocisError(f"{flag} {path}: not writable ({resolved} is a system pseudo-filesystem); "
                           f"choose a directory on disk")
    existing = resolved
    while not existing.exists():  # the nearest ancestor that exists is the one we create under
        existing = existing.parent
    if not existing.is_dir():
        raise VelocisError(f"{flag} {path}: {existing} is a file, not a directory; choose a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VelocisError(f"{flag} {path}: not writable ({existing}: permission denied or read-only "
                           f"filesystem); choose another directory")
    return resolved


def check_not_input(path: str | Path, inp: str | Path, in_flag: str, flag: str = "--output") -> None:
    """Refuse (even with --overwrite) to write the output over the very directory we read."""
    if Path(path).resolve() == Path(inp).resolve():
        raise VelocisError(f"{flag} {path} is the input directory ({in_flag} {inp}); its files would be "
                           f"replaced by the output's: choose another {flag}")


def check_output_dir(path: str | Path, owned_names: Iterable[str], what: str, overwrite: bool = False, *,
                     flag: str = "--output", is_own: Callable[[Path], bool] | None = None) -> list[Path]:
    """Check that `what` (e.g. "a Velocis model") may be written into directory `path`.

    owned_names: the top-level names the writer owns. is_own(path): whether owned names already
    there are the writer's own kind of output (e.g. config.json is a Velocis config) and not
    another's. Returns the owned files already there (a previous output of this kind), which the
    writer may replace or remove; raises VelocisError if `path` cannot be a directory we write
    into, or if it holds anything else and not `overwrite`.
    """
    path = Path(path)
    resolved = check_writable(path, flag)
    if not path.exists():
        return []
    owned = set(owned_names)
    entries = sorted(e for e in path.iterdir() if not e.name.startswith(PRIVATE_PREFIX))
    mine = [e for e in entries if e.name in owned]
    if mine and is_own is not None and not is_own(path):
        mine = []  # the names we own hold another kind of output: not ours to replace or remove
    foreign = [e for e in entries if e not in mine]
    if foreign and not overwrite:
        shown = path if path.is_absolute() else f"{path} ({resolved})"
        hint = "--overwrite" if flag.startswith("--") else "overwrite=True"
        raise VelocisError(f"{flag} {shown} holds {_describe(path, foreign)}; writing {what} there would mix "
                           f"them: choose a new or empty directory, or pass {hint} to write {what}'s files "
                           f"beside them (nothing else is deleted)")
    return [e for e in mine if e.is_file()]


def _describe(path: Path, foreign: list[Path]) -> str:
    names = {e.name for e in foreign}
    run = [n + ("/" if (path / n).is_dir() else "") for n in _RUN_MARKERS if n in names]
    if run:
        return f"a training run ({', '.join(run)})"
    kind = config_kind(path) if "config.json" in names else None
    if kind == "velocis":
        return "a Velocis model"
    if kind == "hf":
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return f"a Hugging Face model ({(cfg.get('architectures') or [cfg.get('model_type')])[0]})"
    shown = ", ".join(e.name + ("/" if e.is_dir() else "") for e in foreign[:3])
    return f"other files ({shown}{', ...' if len(foreign) > 3 else ''})"
