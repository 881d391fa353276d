"""OpenAI batch files through one engine: every request line runs concurrently (one engine, so they
batch together), through the same handlers as the HTTP server.

Input, one request a line:  {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
Output, one result a line:  {"id": "batch_req_...", "custom_id": "a",
                             "response": {"status_code": 200, "body": {...}} | null, "error": null | {...}}
A result is appended and flushed as soon as its request finishes (in finishing order), so a killed run
keeps everything it finished, and a rerun skips the custom_ids already in the output. A bad line (not
JSON, no custom_id, a duplicate, a wrong url, bad parameters, a prompt too long) gets an error result
and the rest go on: lines without a usable custom_id are identified by their line number.
"""
from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

from velocis.errors import VelocisError
from velocis.serve.errors import ApiError
from velocis.serve.openai_api import OpenAIApi

URLS = ("/v1/chat/completions", "/v1/completions")


def _finished(output: Path) -> tuple[set[str], set[int]]:
    """custom_ids (and line numbers of id-less lines) already in the output. A partial last line (a
    run killed mid-write) is cut off, so the file stays one JSON object a line."""
    ids: set[str] = set()
    lines: set[int] = set()
    if not output.is_file():
        return ids, lines
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(output, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            if isinstance(rec.get("custom_id"), str):
                ids.add(rec["custom_id"])
            elif isinstance(rec.get("error"), dict) and isinstance(rec["error"].get("line"), int):
                lines.add(rec["error"]["line"])
    return ids, lines


def _result(custom_id, status: int | None = None, body: dict | None = None, error: dict | None = None) -> dict:
    response = None if status is None else {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


def _line_error(line_no: int, code: str, message: str, custom_id=None) -> dict:
    error = {"code": code, "message": f"line {line_no}: {message}"}
    if custom_id is None:
        error["line"] = line_no  # what a rerun recognises it by
    return _result(custom_id, error=error)


def parse_lines(text_lines, done_ids: set[str], done_lines: set[int]):
    """Yield ("run", line_no, custom_id, url, body) or ("error", line_no, result) for lines not done yet."""
    seen: set[str] = set()
    for line_no, raw in enumerate(text_lines, 1):
        if not raw.strip():
            continue
        try:
            req = json.loads(raw)
        except ValueError as e:
            if line_no not in done_lines:
                yield "error", line_no, _line_error(line_no, "invalid_json", f"not valid JSON ({e})")
            continue
        cid = req.get("custom_id") if isinstance(req, dict) else None
        if not isinstance(cid, str) or not cid:
            if line_no not in done_lines:
                yield "error", line_no, _line_error(line_no, "invalid_request", "custom_id (a non-empty string) "
                                                                                "is required")
            continue
        if cid in seen:
            if line_no not in done_lines:
                yield "error", line_no, _line_error(line_no, "duplicate_custom_id", f"custom_id {cid!r} is used by "
                                                                                   "an earlier line")
            continue
        seen.add(cid)
        if cid in done_ids:
            continue
        method, url, body = req.get("method", "POST"), req.get("url"), req.get("body")
        if method != "POST" or url not in URLS:
            yield "error", line_no, _line_error(line_no, "invalid_url", f"method must be POST and url one of "
                                                f"{', '.join(URLS)} (got {method} {url})", cid)
        elif not isinstance(body, dict):
            yield "error", line_no, _line_error(line_no, "invalid_request", "body must be an object", cid)
        elif body.get("stream"):
            yield "error", line_no, _line_error(line_no, "invalid_request", "stream is not supported in a batch", cid)
        else:
            yield "run", line_no, cid, url, body


async def run_batch(api: OpenAIApi, input_path: str | Path, output_path: str | Path, concurrency: int = 256,
                    progress=None) -> dict:
    """Run the file; returns {"total", "skipped", "succeeded", "failed"}. `progress(advance)` is
    called with the lines already done, then once per result written."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise VelocisError(f"{input_path}: no such file")
    if output_path.resolve() == input_path.resolve():
        raise VelocisError("--output must not be the --input file")
    done_ids, done_lines = _finished(output_path)
    text_lines = input_path.read_text(encoding="utf-8", errors="replace").splitlines()
    items = list(parse_lines(text_lines, done_ids, done_lines))
    counts = {"total": sum(1 for t in text_lines if t.strip()), "skipped": 0, "succeeded": 0, "failed": 0}
    counts["skipped"] = counts["total"] - len(items)
    if progress is not None and counts["skipped"]:
        progress(counts["skipped"])
    gate = asyncio.Semaphore(concurrency)  # tokenize and queue a bounded number at a time
    output_path.parent.mkdir(parents=True, exist_ok=True)

    with open(output_path, "a", encoding="utf-8") as out:
        def write(result: dict) -> None:
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            ok = result["error"] is None
            counts["succeeded" if ok else "failed"] += 1
            if progress is not None:
                progress(1)

        async def one(cid: str, url: str, body: dict) -> None:
            body = {k: v for k, v in body.items() if k != "model"}  # the model is the command line's
            async with gate:
                try:
                    handler = api.chat if url == URLS[0] else api.completions
                    write(_result(cid, 200, await handler(body)))
                except ApiError as e:
                    write(_result(cid, e.status, e.body(), {"code": e.code or e.type, "message": e.message}))
                except Exception as e:  # a bug or an engine failure: this line fails, the others go on
                    err = ApiError(500, f"{type(e).__name__}: {e}")
                    write(_result(cid, 500, err.body(), {"code": "internal_error", "message": err.message}))

        tasks = []
        for item in items:
            if item[0] == "error":
                write(item[2])
            else:
                tasks.append(asyncio.ensure_future(one(*item[2:])))
        await asyncio.gather(*tasks)
    return counts
