"""Reading text corpora as a stream of documents.

Formats, chosen by file suffix:
  .txt / .md (and anything else named explicitly): documents separated by blank lines
  .jsonl: one JSON object per line with a "text" string
  .parquet: a "text" column
A path may be a file, a directory (searched recursively for those suffixes) or a glob.
Files are read line by line (or batch by batch), so memory never holds a whole corpus.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator

from velocis.errors import VelocisError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
ON_INVALID_UTF8 = ("error", "replace")


def expand_paths(paths: list[str | Path], flag: str) -> list[Path]:
    """Files named by `paths` (files, dirs, globs), in a stable order; errors name `flag`."""
    files: list[Path] = []
    for raw in map(str, paths):
        if any(c in raw for c in "*?[") and not Path(raw).exists():
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))
            if not matches:
                raise VelocisError(f"{flag} {raw}: the pattern matches no files")
            for m in matches:
                files.extend(_expand_one(m, flag, from_glob=True))
        else:
            files.extend(_expand_one(Path(raw), flag, from_glob=False))
    return files


def _expand_one(p: Path, flag: str, from_glob: bool) -> list[Path]:
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not found:
            if from_glob:
                return []
            raise VelocisError(f"{flag} {p}: the directory holds no text files ({', '.join(TEXT_SUFFIXES)})")
        for f in found:
            _check_not_empty(f, flag)
        return found
    if p.is_file():
        if from_glob and p.suffix.lower() not in TEXT_SUFFIXES:
            return []
        _check_not_empty(p, flag)
        return [p]
    raise VelocisError(f"{flag} {p}: no such file or directory")


def _check_not_empty(f: Path, flag: str) -> None:
    if f.stat().st_size == 0:
        raise VelocisError(f"{flag} {f}: the file is empty; remove it or pass a file with text")


def iter_documents(path: str | Path, on_invalid_utf8: str = "error") -> Iterator[str]:
    """Yield the non-empty documents of one file. Raises VelocisError on malformed input."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = _jsonl_documents(path, on_invalid_utf8)
    elif suffix == ".parquet":
        docs = _parquet_documents(path)
    else:
        docs = _txt_documents(path, on_invalid_utf8)
    count = 0
    for doc in docs:
        count += 1
        yield doc
    if count == 0:
        raise VelocisError(f"{path}: the file holds no text (only blank lines or empty records); remove it")


def _decode(data: bytes, path: Path, offset: int, on_invalid_utf8: str, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_invalid_utf8 == "replace":
            return data.decode("utf-8", errors="replace")
        raise VelocisError(
            f"{path}{where}: invalid UTF-8 at byte offset {offset + e.start}; fix the file or pass "
            f"--on-invalid-utf8 replace to substitute U+FFFD"
        ) from None


def _txt_documents(path: Path, on_invalid_utf8: str) -> Iterator[str]:
    lines: list[bytes] = []
    start = offset = 0
    with open(path, "rb") as f:
        for line in f:  # binary lines end at b"\n", so CRLF stays inside the text
            if line.strip():
                if not lines:
                    start = offset
                lines.append(line)
            elif lines:
                yield _decode(_strip_eol(b"".join(lines)), path, start, on_invalid_utf8)
                lines = []
            offset += len(line)
    if lines:
        yield _decode(_strip_eol(b"".join(lines)), path, start, on_invalid_utf8)


def _strip_eol(data: bytes) -> bytes:
    # the line break before the separating blank line belongs to the separator, not the document
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


def _jsonl_documents(path: Path, on_invalid_utf8: str) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                text = _decode(line, path, offset, on_invalid_utf8, where=f":{lineno}")
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise VelocisError(f"{path}:{lineno}: malformed JSON line ({e.msg}); fix or remove that line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise VelocisError(f'{path}:{lineno}: expected an object with a "text" string field')
                if record["text"]:
                    yield record["text"]
            offset += len(line)


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise VelocisError(f"{path}: not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise VelocisError(f'{path}: no "text" column (columns: {", ".join(pf.schema_arrow.names)})')
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text
