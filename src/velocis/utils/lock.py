"""An exclusive lock on an output directory, so that two Velocis processes never write into one.

    from velocis.utils.lock import dir_lock

    with dir_lock(run_dir, what="training run"):
        ...  # run_dir/.velocis.lock exists while the block runs; run_dir is created if needed

A second process asking for the same directory gets a VelocisError at once (it does not wait):
"runs/x is in use by training run (pid 1234, started 2026-01-01 12:00:00); wait for it to finish
or stop it" (the holder's `what`, pid and start time come from the lock file).

The lock itself is an fcntl.flock on the lock file, which the kernel drops when the holder exits,
however it exits: a lock file left by a SIGKILLed process is taken over silently. The file's
JSON (pid, host, start time, what) is only for that message. On release the file is removed,
and so is the directory when this lock created it and nothing else was put in it.

Re-entrant within one process: a nested dir_lock on a directory this process already holds
passes through (so a command holding its run dir may call code that locks the same dir).
The descriptor is close-on-exec; a child made by a bare fork() (no exec) keeps the lock alive
until it exits too.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from velocis.errors import VelocisError

LOCK_NAME = ".velocis.lock"
_held: dict[Path, int] = {}  # directories this process holds -> nesting depth


@contextlib.contextmanager
def dir_lock(path: str | os.PathLike, what: str = "another Velocis process") -> Iterator[Path]:
    """Hold an exclusive lock on directory `path` (created if missing) for the `with` block.

    what: names the holder in the message another process gets, e.g. "training run".
    Raises VelocisError when another live process holds the directory.
    """
    directory = Path(path)
    key = directory.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield directory
        finally:
            _held[key] -= 1
        return
    created = not directory.exists()
    fd = _acquire(directory, what)
    _held[key] = 1
    try:
        yield directory
    finally:
        del _held[key]
        _release(fd, directory, created)


def _acquire(directory: Path, what: str) -> int:
    lock_file = directory / LOCK_NAME
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise VelocisError(f"{directory} is a file; pass a directory") from None
        except OSError as e:
            raise VelocisError(f"{directory}: cannot create {LOCK_NAME} ({e.strerror}); use a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _read_owner(fd)
            unsupported = e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
            if not unsupported or _alive(owner):  # no flock here (some network filesystems): trust the pid
                os.close(fd)
                raise VelocisError(_busy(directory, what, owner)) from None
        # A holder releasing as we opened may have removed the file: then lock the new one instead.
        try:
            here, ours = os.stat(lock_file), os.fstat(fd)
            if (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": what}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    return fd


def _release(fd: int, directory: Path, created: bool) -> None:
    lock_file = directory / LOCK_NAME
    try:
        here, ours = os.stat(lock_file), os.fstat(fd)
        if (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino):  # still ours (the body may have removed it)
            lock_file.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)  # drops the flock
    if created:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only succeeds when empty


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # being written just now, or not ours


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return bool(owner)  # another machine's process: cannot tell, assume it runs
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _busy(directory: Path, what: str, owner: dict) -> str:
    who = owner.get("what") or what
    details = [f"pid {owner['pid']}" if "pid" in owner else "pid unknown"]
    if owner.get("host") and owner["host"] != socket.gethostname():
        details.append(f"on {owner['host']}")
    if owner.get("started"):
        details.append(f"started {owner['started']}")
    return f"{directory} is in use by {who} ({', '.join(details)}); wait for it to finish or stop it"
