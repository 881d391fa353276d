"""Atomic writes: a reader sees the old file or the new one, never half of one.

Write to a temporary sibling, fsync, then rename over the target (rename is atomic on
POSIX within one filesystem). Directories we own whole (a checkpoint's step_N/) are built in a
temporary sibling and swapped in; a directory the user names (`--output`) may hold other files,
so `atomic_files` stages files inside it and renames each one into place, touching nothing else.
A full disk is reported as a VelocisError (where, how much) with the previous files left as they were.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from velocis.errors import VelocisError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def no_space_error(e: BaseException, where: Path, need_bytes: int = 0) -> VelocisError | None:
    """A full disk (or quota) as a one-line VelocisError saying where and how much; None for other errors."""
    if not (isinstance(e, OSError) and e.errno in _NO_SPACE):
        return None
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f"needs about {_size(need_bytes)}, " if need_bytes else "needs more than the "
    return VelocisError(f"{where}: no space left on the device (the write {need}{free}); the previous files "
                        f"are untouched: free some space or choose another directory")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it to `target`.

    Works for files and directories (a directory target is replaced whole: use it only for
    directories this code owns). On error the temporary is removed and `target` is left exactly
    as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp_item = tmp / target.name
    try:
        try:
            yield tmp_item
            if not tmp_item.is_dir():
                _fsync_file(tmp_item)
        except OSError as e:
            err = no_space_error(e, target.parent)
            if err:
                raise err from None
            raise
        if tmp_item.is_dir():
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(tmp_item, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_item, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(out_dir: str | os.PathLike, replace: Iterable[Path] = (), need_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty staging directory inside `out_dir`; on success rename every file written
    there into `out_dir` (over its old copy: atomic per file), then delete the files in `replace`
    (the previous output's, see output_dir.check_output_dir) that were not written again.

    Nothing else in `out_dir` is touched. The renames come only after every file is written and
    synced, so on error (a full disk: VelocisError saying how much) `out_dir` is as it was.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # ".velocis" prefix: output_dir.check_output_dir ignores a staging dir left by a killed process
    stage = Path(tempfile.mkdtemp(prefix=".velocis-staging.", dir=out_dir))
    try:
        try:
            yield stage
            files = sorted(f for f in stage.iterdir() if f.is_file())
            for f in files:
                _fsync_file(f)
        except BaseException as e:
            err = no_space_error(e, out_dir, need_bytes)  # measured before we clean up
            shutil.rmtree(stage, ignore_errors=True)
            if created:  # leave no empty directory behind a failed first write
                with contextlib.suppress(OSError):
                    out_dir.rmdir()
            if err:
                raise err from None
            raise
        written = {f.name for f in files}
        for f in files:
            os.replace(f, out_dir / f.name)
        for old in replace:
            if old.name not in written:
                old.unlink(missing_ok=True)
        _fsync_dir(out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))
