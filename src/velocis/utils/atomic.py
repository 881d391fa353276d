"""Atomic writes: a reader sees the old file or the new one, never half of one.

Write to a temporary sibling, fsync, then rename over the target (rename is atomic on
POSIX within one filesystem). Directories are built in a temporary sibling and swapped in.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it to `target`.

    Works for files and directories. On error the temporary is removed and `target`
    is left exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp_item = tmp / target.name
    try:
        yield tmp_item
        if tmp_item.is_dir():
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(tmp_item, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            with open(tmp_item, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_item, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))
