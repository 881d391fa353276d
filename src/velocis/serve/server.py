"""Putting a server together: the engine over a served model, the app, and uvicorn, either in the
foreground (`velocis serve`: Ctrl-C / SIGTERM stop accepting, let streams finish for
`shutdown_timeout` seconds, abort the rest, exit 0) or in a background thread (tests, benchmarks)."""
from __future__ import annotations

import asyncio
import re
import signal
import socket
import threading
import time

from velocis.errors import VelocisError
from velocis.infer.engine import Engine
from velocis.serve.engine_loop import EngineLoop
from velocis.serve.model import ServedModel

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(text: str) -> int | float:
    """--kv-cache-memory: a fraction of free memory ("0.5") or bytes ("2000000000", "2GB", "512MiB")."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise VelocisError(f"--kv-cache-memory {text!r}: give a fraction of free memory such as 0.5, or bytes "
                           "such as 2000000000, 2GB or 512MiB")
    number, unit = m.group(1), m.group(2).lower()
    if not unit and "." in number:
        return float(number)
    return int(float(number) * _UNITS[unit])


def build_engine(served: ServedModel, max_num_seqs: int = 16, kv_cache_memory: int | float = 0.25,
                 **kwargs) -> Engine:
    return Engine(served.model, served.tokenizer, max_num_seqs=max_num_seqs, kv_cache_memory=kv_cache_memory,
                         **kwargs)


def build_app(served: ServedModel, *, api_key: str | None = None, max_num_seqs: int = 16,
              kv_cache_memory: int | float = 0.25, **engine_kwargs):
    from velocis.serve.app import create_app

    engine_loop = EngineLoop(build_engine(served, max_num_seqs, kv_cache_memory, **engine_kwargs))
    return create_app(served, engine_loop, api_key=api_key)


def check_bind(host: str, port: int) -> None:
    """Fail with a message, not a traceback from inside uvicorn, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise VelocisError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None


def _draining_server(config, engine_loop, drain_seconds: float):
    """A uvicorn Server whose shutdown lets running requests finish for `drain_seconds`, then aborts
    them in the engine: each stream still ends properly (finish_reason "abort", then [DONE]) and
    uvicorn never has to cancel a handler."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            timer = asyncio.get_running_loop().call_later(drain_seconds, engine_loop.abort_all)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return DrainingServer(config)


def run_foreground(app, host: str, port: int, shutdown_timeout: float = 10.0, log_level: str = "info") -> int:
    import uvicorn

    check_bind(host, port)
    # uvicorn's own limit is the backstop: it cancels handlers still running well after the abort
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + 10, access_log=log_level == "debug")
    server = _draining_server(config, app.state.engine_loop, shutdown_timeout)
    # uvicorn handles SIGINT/SIGTERM while it runs, then restores the previous handlers and raises the
    # signal again; ignoring them meanwhile makes that re-raise a no-op, so a clean stop exits 0.
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if server.started else 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a background thread on a free loopback port (tests, benchmarks):

        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.app, self.host, self.port = app, host, port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", timeout_graceful_shutdown=10)
        self.server = _draining_server(config, app.state.engine_loop, 2.0)
        self.thread = threading.Thread(target=self.server.run, name="velocis-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
