"""The HTTP face: a FastAPI app over OpenAIApi. Bodies are read by hand (size limit before parsing,
OpenAI-style 400s rather than FastAPI's 422s); every error, including unknown routes and crashes, has
the OpenAI error body; a client that goes away has its engine requests aborted.

Routes: GET /health, GET /metrics, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /tokenize, POST /detokenize. With an API key, all but /health and /metrics need
`Authorization: Bearer KEY`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import Request  # module level: FastAPI resolves the handlers' string annotations here

from velocis.serve.engine_loop import EngineLoop
from velocis.serve.errors import ApiError, bad_request, error_body
from velocis.serve.metrics import Metrics
from velocis.serve.model import ServedModel
from velocis.serve.openai_api import EventStream, OpenAIApi

MAX_BODY_BYTES = 10 * 1024 * 1024
log = logging.getLogger("velocis.serve")


async def read_json(request, limit: int) -> dict:
    """The body as a JSON object; 413 as soon as it is known to be over `limit` (from Content-Length,
    or while reading), before any parsing."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


async def _until_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(served: ServedModel, engine_loop: EngineLoop, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    metrics = Metrics(engine_loop, served.name)
    api = OpenAIApi(served, engine_loop, metrics)

    class SSEResponse(StreamingResponse):
        """Server-sent events whose close() always runs: aborts the engine requests of a stream the
        client left (starlette cancels the body iterator when it sees http.disconnect)."""

        def __init__(self, stream: EventStream):
            super().__init__(stream.events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self._stream = stream

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._stream.close()
                metrics.in_flight.labels(served.name).dec()

    @asynccontextmanager
    async def lifespan(app):
        engine_loop.start()  # warms the engine up first: the server answers only once it is ready
        try:
            yield
        finally:  # shutdown: abort what is left, stop the thread
            await asyncio.to_thread(engine_loop.stop)

    app = FastAPI(title="Velocis", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api, app.state.metrics, app.state.engine_loop = api, metrics, engine_loop

    def error_response(e: ApiError) -> JSONResponse:
        metrics.error(e.status)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = "no such route: " + request.url.path if exc.status_code == 404 else str(exc.detail)
        return error_response(ApiError(exc.status_code, message))

    def check_key(request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.", None,
                           "invalid_api_key")

    async def answer(request: Request, handler, timed: bool = False):
        """Auth, body, handler; a client that disconnects before the answer cancels the handler
        (which aborts its engine requests)."""
        arrival = time.perf_counter()
        in_flight = metrics.in_flight.labels(served.name)
        in_flight.inc()
        try:
            check_key(request)
            body = await read_json(request, max_body_bytes)
            work = asyncio.ensure_future(handler(body, arrival) if timed else handler(body))
            gone = asyncio.ensure_future(_until_disconnect(request))
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                in_flight.dec()
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            result = work.result()
        except ApiError as e:
            in_flight.dec()
            return error_response(e)
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            in_flight.dec()
            return Response(status_code=499)
        except Exception as e:  # a bug: answer it, log it, keep serving
            in_flight.dec()
            log.exception("error answering %s", request.url.path)
            return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
        if isinstance(result, EventStream):
            return SSEResponse(result)  # it counts itself out when the stream ends
        in_flight.dec()
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, api.completions, timed=True)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, api.chat, timed=True)

    def sync(fn):
        async def run(body):
            return fn(body)
        return run

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await answer(request, sync(api.tokenize))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await answer(request, sync(api.detokenize))

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse(api.models())

    @app.get("/health")
    async def health():
        if not engine_loop.alive:
            return error_response(ApiError(503, "the engine is not running"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app
