"""One Engine shared by every request: a single thread owns it and runs step() while anything is
pending, so concurrent requests batch together (continuous batching) and the engine, which is not
thread-safe, is only ever touched by that thread.

Other threads talk to it through a command queue (add, abort, stop), drained between steps; each
request's outputs go to the sink it registered, called on the engine thread once per step with that
step's outputs. `Submission` is the asyncio side: one API call's requests, their outputs on one
asyncio queue, aborted in the engine when the call goes away before they finish.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
import uuid
from collections import defaultdict
from typing import AsyncIterator, Callable

from velocis.infer.engine import Output
from velocis.infer.sampling import SamplingParams

Sink = Callable[[list[Output] | BaseException], None]


class EngineLoop:
    def __init__(self, engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._left: dict[str, int] = {}  # request id -> sequences not finished yet
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # why the thread died, if it did
        self.stats = self._snapshot()  # replaced whole (never mutated): safe to read from any thread

    # -- any thread ---------------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        """Warm the engine up (before the thread exists: nothing else touches it yet), then start it."""
        if self._thread is None:
            self.engine.warmup()
            self.stats = self._snapshot()
            self._thread = threading.Thread(target=self._run, name="velocis-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is pending (sinks get their final outputs) and end the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str, sink: Sink,
            response_format: dict | None = None) -> concurrent.futures.Future:
        """Queue a request; the future resolves once the engine took it (or raises its refusal:
        a VelocisError such as a prompt the KV cache cannot hold). Compile a response_format first
        (structured.compile_response_format caches it): the engine thread then only looks it up."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            future.set_exception(RuntimeError("the engine is not running"))
            return future
        self._commands.put(("add", prompt_ids, params, request_id, sink, response_format, future))
        return future

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def abort_all(self) -> None:
        """Finish every pending request now (finish_reason "abort"): a server that stops draining."""
        self._commands.put(("abort_all",))

    # -- the engine thread ----------------------------------------------------------------------
    def _snapshot(self, step_seconds: float = 0.0) -> dict:
        return {**self.engine.stats(), "last_step_seconds": step_seconds, "time": time.time()}

    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    t0 = time.perf_counter()
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # a failed step fails its requests, not the server
                        self._fail_all(e)
                        continue
                    self._deliver(outputs)
                    self.stats = self._snapshot(time.perf_counter() - t0)
        except BaseException as e:  # pragma: no cover - a bug in the loop itself
            self.error = e
            self._fail_all(e)
            raise

    def _drain(self, block: bool) -> bool:
        """Run the queued commands (waiting for one when idle); False once told to stop."""
        try:
            cmd = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd[0] == "stop":
                for rid in list(self._sinks):
                    self._abort(rid)
                self.stats = self._snapshot()
                return False
            if cmd[0] == "add":
                self._add(*cmd[1:])
            elif cmd[0] == "abort":
                self._abort(cmd[1])
            elif cmd[0] == "abort_all":
                for rid in list(self._sinks):
                    self._abort(rid)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                self.stats = self._snapshot()
                return True

    def _add(self, ids, params, rid, sink, response_format, future) -> None:
        if future.cancelled():
            return
        try:
            self.engine.add_request(ids, params, rid, response_format=response_format)
        except Exception as e:
            future.set_exception(e)
            return
        self._sinks[rid], self._left[rid] = sink, params.n
        future.set_result(rid)

    def _abort(self, rid: str) -> None:
        outputs = self.engine.abort(rid)
        sink = self._sinks.pop(rid, None)
        self._left.pop(rid, None)
        if sink is not None and outputs:
            sink(outputs)

    def _deliver(self, outputs: list[Output]) -> None:
        by_request: dict[str, list[Output]] = defaultdict(list)
        for out in outputs:
            by_request[out.request_id].append(out)
        for rid, outs in by_request.items():
            sink = self._sinks.get(rid)
            if rid in self._left:
                self._left[rid] -= sum(o.finished for o in outs)
                if self._left[rid] <= 0:
                    del self._left[rid], self._sinks[rid]
            if sink is not None:
                sink(outs)

    def _fail_all(self, error: BaseException) -> None:
        for rid, sink in list(self._sinks.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                pass
            sink(error)
        self._sinks.clear()
        self._left.clear()


class Submission:
    """The engine requests of one API call (a prompt list or n samples); outputs come back as
    (request number, Output) in the order the engine produced them. close() aborts whatever has
    not finished: call it in a finally, so a client that went away frees its KV blocks."""

    def __init__(self, engine_loop: EngineLoop, prefix: str = "req"):
        self._engine_loop = engine_loop
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._left: dict[str, int] = {}
        self._number: dict[str, int] = {}
        self.prefix = prefix

    def _sink(self, rid: str) -> Sink:
        def sink(item) -> None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (rid, item))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass
        return sink

    async def add(self, prompt_ids: list[int], params: SamplingParams, response_format: dict | None = None) -> str:
        rid = f"{self.prefix}-{uuid.uuid4().hex}"
        self._left[rid], self._number[rid] = params.n, len(self._number)
        future = self._engine_loop.add(prompt_ids, params, rid, self._sink(rid), response_format)
        try:
            await asyncio.wrap_future(future)
        except BaseException:
            self._left[rid] = 0
            refused = future.done() and not future.cancelled() and future.exception() is not None
            if not refused:  # cancelled while queued or just taken: make sure it goes
                self._engine_loop.abort(rid)
            raise
        return rid

    @property
    def finished(self) -> bool:
        return not any(self._left.values())

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        while not self.finished:
            rid, item = await self._queue.get()
            if isinstance(item, BaseException):
                self._left = {}
                raise item
            for out in item:
                if out.finished:
                    self._left[rid] -= 1
                yield self._number[rid], out

    def close(self) -> None:
        for rid, left in self._left.items():
            if left > 0:
                self._engine_loop.abort(rid)
        self._left = {}
