"""dir_lock: one writer per output directory, across real processes; stale locks are taken over."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from velocis.errors import VelocisError

HOLDER = textwrap.dedent("""
    import sys, time
    from velocis.utils.lock import dir_lock
    with dir_lock(sys.argv[1], what=sys.argv[2]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[3]))
""")

# Says "ready", waits for "go" on stdin, then tries the lock: prints "won" (holding it a while) or "lost".
RACER = textwrap.dedent("""
    import sys, time
    from velocis.errors import VelocisError
    from velocis.utils.lock import dir_lock
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        with dir_lock(sys.argv[1], what="racer"):
            print("won", flush=True)
            time.sleep(1.5)
    except VelocisError:
        print("lost", flush=True)
""")


def hold(path: Path, what: str = "training run", seconds: float = 60) -> subprocess.Popen:
    """A separate process holding the lock on `path` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), what, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory) -> Path:
    from velocis.data.default_corpus import write_default_corpus
    from velocis.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("lockdata")
    zh, en = write_default_corpus(root, documents=100)
    Tokenizer.train([zh, en], vocab_size=300, progress=False).save(root / "tok")
    return root


def velocis(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velocis", *argv], capture_output=True, text=True)


def test_lock_file_names_its_owner_and_leaves_no_trace(tmp_path):
    from velocis.utils.lock import LOCK_NAME, dir_lock

    new = tmp_path / "run"
    with dir_lock(new, what="training run") as d:
        assert d == new
        info = json.loads((new / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["what"] == "training run" and info["host"] and info["started"]
    assert not new.exists()  # the lock made the directory and nothing was put in it: removed again
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "file").write_text("x")
    with dir_lock(kept):
        (kept / "more").write_text("y")
    assert sorted(p.name for p in kept.iterdir()) == ["file", "more"]


def test_reentrant_in_one_process(tmp_path):
    from velocis.utils.lock import LOCK_NAME, dir_lock

    with dir_lock(tmp_path, what="outer"):
        with dir_lock(tmp_path, what="inner"):
            pass
        assert (tmp_path / LOCK_NAME).is_file()  # still held by the outer block
    assert not (tmp_path / LOCK_NAME).exists()


def test_second_process_is_refused_while_the_first_holds_it(tmp_path, small_inputs):
    from velocis.utils.lock import dir_lock

    run = tmp_path / "run"
    holder = hold(run, "training run")
    try:
        with pytest.raises(VelocisError) as e:
            with dir_lock(run, what="data prepare"):
                pass
        msg = str(e.value)
        assert msg.startswith(f"{run} is in use by training run (pid {holder.pid}")
        assert "started" in msg and msg.endswith("wait for it to finish or stop it")
        # the commands that write an output directory take the lock too
        r = velocis("data", "prepare", "--english-path", str(small_inputs / "en.txt"), "--tokenizer",
                    str(small_inputs / "tok"), "--output", str(run), "--quiet")
        assert r.returncode == 2 and "in use by training run" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        r = velocis("tokenizer", "train", "--input", str(small_inputs / "en.txt"), "--vocab-size", "300",
                    "--output", str(run), "--quiet")
        assert r.returncode == 2 and "in use by training run" in r.stderr, r.stderr
        assert sorted(p.name for p in run.iterdir()) == [".velocis.lock"]  # neither wrote anything
    finally:
        holder.terminate()
        holder.wait()
    with dir_lock(run):  # free again once the holder is gone
        pass


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, small_inputs):
    from velocis.utils.lock import LOCK_NAME, dir_lock

    run = tmp_path / "run"
    holder = hold(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by the kill
    with dir_lock(run, what="next"):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (run / LOCK_NAME).exists()
    holder = hold(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    r = velocis("data", "prepare", "--english-path", str(small_inputs / "en.txt"), "--tokenizer",
                str(small_inputs / "tok"), "--output", str(run), "--quiet")
    assert r.returncode == 0, r.stderr
    assert (run / "index.json").is_file() and not (run / LOCK_NAME).exists()


def test_racing_processes_exactly_one_wins(tmp_path):
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "run")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    assert [p.stdout.readline().strip() for p in racers] == ["ready"] * 4
    for p in racers:  # all at once, once every racer has imported velocis
        p.stdin.write("go\n")
        p.stdin.flush()
    results = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert results == ["lost", "lost", "lost", "won"]
