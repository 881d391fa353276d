"""Text corpora -> token shards on disk, read later by `PackedLoader`.

    out/index.json            what is here: shards, token/byte counts, tokenizer hash, sources, mix
    out/tokenizer.json        a copy of the tokenizer (+ its two small config files)
    out/train/zh_00000.bin    raw tokens (uint16 when the vocabulary fits, else uint32), memmappable
    out/train/zh_00000.docs.npy   per document: [token offset, token count, utf-8 bytes] (int64)
    out/val/...               the held-out split, same layout
    out/done/zh_00000.json    a finished-shard marker: the shard's statistics and content hash

The input is read as a stream and cut into shards of about `shard_mb` MB of text; worker
processes tokenize shards in parallel, and at most `num_workers + 1` shards are in memory at
once, so memory is bounded by the shard size, not by the corpus. Each document gets an
end-of-text token (special-token names written in the text are encoded as plain text). A
document goes to the validation split when the hash of its text falls
below `val_fraction`, so the split is deterministic and duplicates never straddle it.

Every file is written to a temporary name and renamed; a shard's marker is written after its
files and index.json last. A re-run skips shards whose marker matches (same text, tokenizer and
settings), and a re-run of a finished preparation returns at once.

mix: the fraction of Chinese among the tokens of each split. When the data holds more of one
language than the mix asks for, that language is truncated (its later documents are left out
of the index; they stay tokenized on disk). None uses everything.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from velocis.data.sources import ON_INVALID_UTF8, expand_paths, iter_documents
from velocis.errors import VelocisError
from velocis.utils.atomic import atomic_path, atomic_write_text

INDEX_FORMAT = "velocis-tokens/1"
LANGUAGES = ("zh", "en")
SPLITS = ("train", "val")
ENCODE_BATCH = 256  # documents per tokenizer call inside a worker


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def is_validation(doc_bytes: bytes, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_bytes, digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


# --- the worker: one shard of documents -> token files + a marker ----------------------------
_worker_tokenizer = None


def _init_worker(tokenizer_file: str, threads: int | None) -> None:
    global _worker_tokenizer
    if threads:  # one tokenizer thread pool per process, sized so the processes share the cores
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    from velocis.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer.load(tokenizer_file)
    # Corpus text is only text: a literal "<|end_of_text|>" in a document must not become a control token.
    _worker_tokenizer.backend.encode_special_tokens = True


def _write_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if path.suffix == ".npy":
            np.save(f, array)
        else:
            array.tofile(f)


def tokenize_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one shard's documents, write train/val token files, then the done marker."""
    tok = _worker_tokenizer
    out, key = Path(job["out"]), job["key"]
    docs: list[str] = job["docs"]
    dtype = np.dtype(job["dtype"])
    parts: dict[str, list[tuple[np.ndarray, int]]] = {s: [] for s in SPLITS}
    for i in range(0, len(docs), ENCODE_BATCH):
        # small batches turned into arrays at once: Python lists of ints cost ~36 bytes a token
        batch = docs[i : i + ENCODE_BATCH]
        for text, doc_ids in zip(batch, tok.encode_batch(batch, add_eos=True)):
            raw = text.encode("utf-8")
            split = "val" if is_validation(raw, job["val_fraction"]) else "train"
            parts[split].append((np.array(doc_ids, dtype=dtype), len(raw)))

    marker: dict[str, Any] = {"key": key, "language": job["language"], "content_hash": job["content_hash"],
                              "tokenizer_hash": job["tokenizer_hash"], "val_fraction": job["val_fraction"],
                              "dtype": job["dtype"], "splits": {}}
    for split, items in parts.items():
        counts = np.array([len(d) for d, _ in items], dtype=np.int64)
        docs_table = np.zeros((len(items), 3), dtype=np.int64)
        docs_table[:, 0] = np.cumsum(counts) - counts  # token offset of each document
        docs_table[:, 1] = counts
        docs_table[:, 2] = [b for _, b in items]
        tokens = np.concatenate([d for d, _ in items]) if items else np.zeros(0, dtype=dtype)
        _write_array(out / split / f"{key}.bin", tokens)
        _write_array(out / split / f"{key}.docs.npy", docs_table)
        marker["splits"][split] = {"documents": len(items), "tokens": int(counts.sum()),
                                   "utf8_bytes": int(docs_table[:, 2].sum())}
    atomic_write_text(out / "done" / f"{key}.json", json.dumps(marker) + "\n")
    return marker


# --- the main process: stream the input, hand out shards, write the index ---------------------
def _shards(files: list[Path], language: str, shard_bytes: int, on_invalid_utf8: str) -> Iterator[tuple[str, list[str], int]]:
    """(key, documents, utf-8 bytes) for consecutive shards of one language's files."""
    docs: list[str] = []
    size = n = 0
    for f in files:
        for doc in iter_documents(f, on_invalid_utf8):
            docs.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= shard_bytes:
                yield f"{language}_{n:05d}", docs, size
                docs, size, n = [], 0, n + 1
    if docs:
        yield f"{language}_{n:05d}", docs, size


def _content_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _source_list(files: dict[str, list[Path]]) -> list[dict[str, Any]]:
    out = []
    for language, paths in files.items():
        for p in paths:
            st = p.stat()
            out.append({"language": language, "path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _check_same_tokenizer(out: Path, tokenizer_hash: str) -> None:
    """Refuse to mix another tokenizer's shards into this directory."""
    records = [_read_json(out / "index.json")] + [_read_json(m) for m in sorted((out / "done").glob("*.json"))]
    for r in records:
        if r and r.get("tokenizer_hash") not in (None, tokenizer_hash):
            raise VelocisError(
                f"--output {out} holds token shards made with another tokenizer (hash {r['tokenizer_hash'][:12]}, "
                f"now {tokenizer_hash[:12]}); choose another --output directory or delete that one"
            )


def _is_finished(out: Path, settings: dict, sources: list) -> bool:
    index = _read_json(out / "index.json")
    if not index or index.get("settings") != settings or index.get("sources") != sources:
        return False
    return all((out / s["path"]).is_file() for split in index["splits"].values() for s in split["shards"])


def _apply_mix(markers: list[dict], out: Path, mix: float | None) -> dict[str, Any]:
    """Per split: the shards with how much of each is used, so that Chinese is `mix` of the tokens."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        totals = {lang: sum(m["splits"][split]["tokens"] for m in markers if m["language"] == lang) for lang in LANGUAGES}
        budget = {lang: None for lang in LANGUAGES}  # None: use all
        if mix is not None and totals["zh"] and totals["en"]:
            if totals["zh"] / (totals["zh"] + totals["en"]) > mix:
                budget["zh"] = 0 if mix == 0 else int(totals["en"] * mix / (1 - mix))
            else:
                budget["en"] = 0 if mix == 1 else int(totals["zh"] * (1 - mix) / mix)
        shards, used = [], {lang: 0 for lang in LANGUAGES}
        for m in markers:
            lang, stats = m["language"], m["splits"][split]
            entry = {"path": f"{split}/{m['key']}.bin", "docs": f"{split}/{m['key']}.docs.npy", "language": lang,
                     **stats, "used_documents": stats["documents"], "used_tokens": stats["tokens"],
                     "used_utf8_bytes": stats["utf8_bytes"]}
            if budget[lang] is not None and used[lang] + stats["tokens"] > budget[lang]:
                # keep whole documents while they fit in what is left of the budget
                table = np.load(out / entry["docs"])
                fits = int(np.searchsorted(np.cumsum(table[:, 1]), budget[lang] - used[lang], side="right"))
                entry.update(used_documents=fits, used_tokens=int(table[:fits, 1].sum()),
                             used_utf8_bytes=int(table[:fits, 2].sum()))
            used[lang] += entry["used_tokens"]
            if entry["tokens"]:
                shards.append(entry)
        tokens = sum(s["used_tokens"] for s in shards)
        nbytes = sum(s["used_utf8_bytes"] for s in shards)
        splits[split] = {
            "documents": sum(s["used_documents"] for s in shards),
            "tokens": tokens,
            "utf8_bytes": nbytes,
            "bytes_per_token": nbytes / tokens if tokens else 0.0,
            "tokens_by_language": {lang: used[lang] for lang in LANGUAGES},
            "chinese_fraction": used["zh"] / tokens if tokens else 0.0,
            "shards": shards,
        }
    return splits


def _progress(enabled: bool, total: int | None):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)


def prepare_dataset(
    chinese_paths: list[str] | None,
    english_paths: list[str] | None,
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    mix: float | None = None,
    *,
    val_fraction: float = 0.01,
    num_workers: int | None = None,
    shard_mb: float = 8.0,
    on_invalid_utf8: str = "error",
    progress: bool | None = None,
) -> Path:
    """Tokenize Chinese and English corpora into `output_dir`; returns `output_dir`.

    progress: None shows a bar only when stderr is a terminal.
    """
    from velocis.tokenizer import Tokenizer

    files = {"zh": expand_paths(list(chinese_paths or []), "--chinese-path"),
             "en": expand_paths(list(english_paths or []), "--english-path")}
    if not files["zh"] and not files["en"]:
        raise VelocisError("no input text: pass --chinese-path and/or --english-path")
    if mix is not None and not 0.0 <= mix <= 1.0:
        raise VelocisError(f"--mix {mix} must be between 0 and 1 (the fraction of Chinese tokens)")
    if mix is not None and not (files["zh"] and files["en"]):
        raise VelocisError("--mix needs both --chinese-path and --english-path")
    if not 0.0 <= val_fraction < 1.0:
        raise VelocisError(f"--val-fraction {val_fraction} must be at least 0 and below 1")
    if on_invalid_utf8 not in ON_INVALID_UTF8:
        raise VelocisError(f"--on-invalid-utf8 {on_invalid_utf8!r} must be one of {', '.join(ON_INVALID_UTF8)}")
    if shard_mb <= 0:
        raise VelocisError(f"--shard-mb {shard_mb} must be positive")
    tok = Tokenizer.load(tokenizer_dir)
    if tok.eos_id is None:
        raise VelocisError(f"--tokenizer {tokenizer_dir}: the tokenizer has no end-of-text token to end documents with")
    tokenizer_hash = tok.hash()
    dtype = token_dtype(tok.vocab_size)

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise VelocisError(f"--output {out} is a file; pass a directory")
    _check_same_tokenizer(out, tokenizer_hash)
    settings = {"tokenizer_hash": tokenizer_hash, "mix": mix, "val_fraction": val_fraction, "shard_mb": shard_mb,
                "on_invalid_utf8": on_invalid_utf8, "dtype": dtype}
    sources = _source_list(files)
    if _is_finished(out, settings, sources):
        return out

    created = not out.exists() or not any(out.iterdir())  # then an error removes the directory too
    written: list[str] = []  # shard keys (re)written by this run, removed again if the input is bad
    try:
        markers = _tokenize_all(files, out, tok, tokenizer_hash, dtype, val_fraction, num_workers, shard_mb,
                                on_invalid_utf8, progress, written)
    except VelocisError:
        _remove_shards(out, written)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise

    # Shards left from an earlier, longer input are not part of this dataset.
    keep = {m["key"] for m in markers}
    for old in sorted((out / "done").glob("*.json")):
        if old.stem not in keep:
            _remove_shards(out, [old.stem])

    index = {
        "format": INDEX_FORMAT,
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype,
        "mix": mix,
        "settings": settings,
        "sources": sources,
        "splits": _apply_mix(markers, out, mix),
    }
    atomic_write_text(out / "index.json", json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    return out


def _remove_temporaries(out: Path) -> None:
    """Half-written files of a killed run (atomic_path's .NAME.*.tmp dirs)."""
    ours = [out / "train", out / "val", out / "done"]
    stale = [t for d in ours for t in d.glob(".*.tmp")]
    stale += [t for name in ("index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
              for t in out.glob(f".{name}.*.tmp")]
    for t in stale:
        shutil.rmtree(t, ignore_errors=True)


def _remove_shards(out: Path, keys: list[str]) -> None:
    for key in keys:
        for split in SPLITS:
            (out / split / f"{key}.bin").unlink(missing_ok=True)
            (out / split / f"{key}.docs.npy").unlink(missing_ok=True)
        (out / "done" / f"{key}.json").unlink(missing_ok=True)


def _tokenize_all(files, out, tok, tokenizer_hash, dtype, val_fraction, num_workers, shard_mb, on_invalid_utf8,
                  progress, written) -> list[dict]:
    from velocis.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # the old index no longer describes what is being written
    _remove_temporaries(out)
    tokenizer_file = out / "tokenizer.json"  # the copy that travels with the data; the workers load it too
    if not tokenizer_file.is_file() or Tokenizer.load(out).hash() != tok.hash():
        tok.save(out)

    num_workers = num_workers or os.cpu_count() or 1
    show = sys.stderr.isatty() if progress is None else progress
    text_files = [f for fs in files.values() for f in fs]
    total = None if any(f.suffix.lower() == ".parquet" for f in text_files) else sum(f.stat().st_size for f in text_files)
    results: dict[str, dict] = {}
    order: list[str] = []

    def jobs() -> Iterator[tuple[dict, int]]:
        for language in LANGUAGES:
            for key, docs, size in _shards(files[language], language, int(shard_mb * 2**20), on_invalid_utf8):
                order.append(key)
                job = {"out": str(out), "key": key, "language": language, "docs": docs, "dtype": dtype,
                       "content_hash": _content_hash(docs), "tokenizer_hash": tokenizer_hash,
                       "val_fraction": val_fraction}
                yield job, size

    def finished(job: dict) -> dict | None:
        marker = _read_json(out / "done" / f"{job['key']}.json")
        same = marker and all(marker.get(k) == job[k] for k in ("content_hash", "tokenizer_hash", "val_fraction", "dtype"))
        files_there = same and all((out / s / f"{job['key']}{ext}").is_file() for s in SPLITS for ext in (".bin", ".docs.npy"))
        return marker if files_there else None

    with _progress(show, total) as bar:
        task = bar.add_task("tokenizing", total=total)
        if num_workers <= 1:
            _init_worker(str(tokenizer_file), None)
            for job, size in jobs():
                results[job["key"]] = finished(job) or _run_here(job, written)
                bar.advance(task, size)
        else:
            pool = ProcessPoolExecutor(num_workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                       initargs=(str(tokenizer_file), max(1, (os.cpu_count() or 1) // num_workers)))
            pending: dict = {}
            try:
                for job, size in jobs():
                    done = finished(job)
                    if done:
                        results[job["key"]] = done
                        bar.advance(task, size)
                        continue
                    written.append(job["key"])
                    pending[pool.submit(tokenize_shard, job)] = size
                    while len(pending) > num_workers:  # bound the shards held in memory
                        _collect(pending, results, bar, task, wait(pending, return_when=FIRST_COMPLETED).done)
                _collect(pending, results, bar, task, wait(pending).done)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        if total:  # document bytes leave out the blank lines between them: end the bar at 100%
            bar.update(task, completed=total)
    return [results[k] for k in order]


def _run_here(job: dict, written: list[str]) -> dict:
    written.append(job["key"])
    return tokenize_shard(job)


def _collect(pending: dict, results: dict, bar, task, done) -> None:
    for fut in done:
        size = pending.pop(fut)
        marker = fut.result()
        results[marker["key"]] = marker
        bar.advance(task, size)
