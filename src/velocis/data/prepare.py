"""Text corpora -> token shards on disk, read later by `PackedLoader`.

    out/index.json            what is here: shards, token/byte counts, tokenizer hash, sources, mix
    out/tokenizer.json        a copy of the tokenizer (+ its two small config files)
    out/train/zh_00000-<id>.bin   raw tokens (uint16 when the vocabulary fits, else uint32), memmappable
    out/train/zh_00000-<id>.docs.npy  per document: [token offset, token count, utf-8 bytes] (int64)
    out/val/...               the held-out split, same layout
    out/done/zh_00000-<id>.json   a finished-shard marker: the shard's statistics and content hash

The input is read as a stream of document pieces (at most 64 KB each, see sources.py) and cut
into shards of about `shard_mb` MB of text; worker processes tokenize shards in parallel, and at
most `num_workers + 1` shards are in memory at once, so memory is bounded by the shard and piece
sizes, not by the corpus or its longest document. A document longer than a piece is encoded
piece by piece and its tokens concatenated, and may run on into the next shard (its rows in the
two docs tables are its two parts). Each document ends with one end-of-text token
(special-token names written in the text are encoded as plain text). A document goes to the
validation split when the hash of its text (of its first piece, for one over 64 KB) falls below
`val_fraction`, so the split is deterministic and duplicates never straddle it.

A shard's <id> is a hash of its text, tokenizer and settings: a re-run never overwrites a file
that the current index.json points to. New shards are written beside the old ones, index.json
is replaced (atomically) only once all are done, and only then are the files it no longer
names deleted; a run that fails or is killed leaves the previous dataset as it was. A re-run
skips shards whose marker is there, and a re-run of a finished preparation returns at once.
The output directory is locked (utils/lock.py) while a run writes it.

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
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from velocis.data.sources import check_read_options, expand_paths, iter_pieces
from velocis.errors import VelocisError
from velocis.tokenizer import check_tokenizer_matches, tokenizer_file_hash as _file_hash  # noqa: F401
from velocis.utils.atomic import atomic_path, atomic_write_text

INDEX_FORMAT = "velocis-tokens/1"
LANGUAGES = ("zh", "en")
SPLITS = ("train", "val")
ENCODE_BATCH = 256  # pieces per tokenizer call inside a worker...
ENCODE_BATCH_BYTES = 1 << 18  # ...and at most this much text: ~40 MB of tokenizer memory
FIRST, LAST, VAL = 1, 2, 4  # a piece's flags: starts its document, ends it, is in the validation split


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def is_validation(doc_bytes: bytes, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_bytes, digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


# --- the worker: one shard of pieces -> token files + a marker ----------------------------------
_worker_tokenizer = None


def _init_worker(tokenizer_json: str, eos_token: str, threads: int | None, parent_pid: int | None) -> None:
    global _worker_tokenizer
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    if threads:  # one tokenizer thread pool per process, sized so the processes share the cores
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer as HFTokenizer

    from velocis.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer(HFTokenizer.from_str(tokenizer_json), {"eos_token": eos_token})
    # Corpus text is only text: a literal "<|end_of_text|>" in a document must not become a control token.
    _worker_tokenizer.backend.encode_special_tokens = True


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose `data prepare` was killed must not live on (holding CPU, memory and the
    multiprocessing resource tracker): Linux kills it with the parent (PR_SET_PDEATHSIG), and a
    watchdog thread checks for a new parent elsewhere."""
    import ctypes
    import signal
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _write_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if path.suffix == ".npy":
            np.save(f, array)
        else:
            array.tofile(f)


def _batches(meta: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of pieces to encode at once: bounded in count and in text."""
    lo = size = 0
    for i, (nbytes, _) in enumerate(meta):
        if i > lo and (i - lo >= ENCODE_BATCH or size + nbytes > ENCODE_BATCH_BYTES):
            yield lo, i
            lo, size = i, 0
        size += nbytes
    if lo < len(meta):
        yield lo, len(meta)


def tokenize_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one shard's pieces, write train/val token files, then the done marker."""
    tok = _worker_tokenizer
    out, key = Path(job["out"]), job["key"]
    texts: list[str] = job["texts"]
    meta: list[tuple[int, int]] = job["meta"]  # per piece: (utf-8 bytes, flags)
    dtype = np.dtype(job["dtype"])
    # per split, one row per document (part): [token arrays, utf-8 bytes, ended]
    rows: dict[str, list[list]] = {s: [] for s in SPLITS}
    for lo, hi in _batches(meta):
        # small batches turned into arrays at once: Python lists of ints cost ~36 bytes a token
        for (nbytes, flags), ids in zip(meta[lo:hi], tok.encode_batch(texts[lo:hi])):
            if flags & LAST:
                ids.append(tok.eos_id)
            split = rows["val" if flags & VAL else "train"]
            if not split or split[-1][2]:  # a new document (or the rest of one begun in the previous shard)
                split.append([[], 0, False])
            row = split[-1]
            row[0].append(np.array(ids, dtype=dtype))
            row[1] += nbytes
            row[2] = bool(flags & LAST)

    marker: dict[str, Any] = {"key": key, "language": job["language"], "content_hash": job["content_hash"],
                              "tokenizer_hash": job["tokenizer_hash"], "val_fraction": job["val_fraction"],
                              "dtype": job["dtype"], "splits": {}}
    for split, items in rows.items():
        arrays = [np.concatenate(r[0]) if len(r[0]) > 1 else r[0][0] for r in items]
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
        docs_table = np.zeros((len(items), 3), dtype=np.int64)
        docs_table[:, 0] = np.cumsum(counts) - counts  # token offset of each document
        docs_table[:, 1] = counts
        docs_table[:, 2] = [r[1] for r in items]
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        _write_array(out / split / f"{key}.bin", tokens)
        _write_array(out / split / f"{key}.docs.npy", docs_table)
        marker["splits"][split] = {"documents": sum(r[2] for r in items), "tokens": int(counts.sum()),
                                   "utf8_bytes": int(docs_table[:, 2].sum())}
    atomic_write_text(out / "done" / f"{key}.json", json.dumps(marker) + "\n")
    return marker


# --- the main process: stream the input, hand out shards, write the index ---------------------
def _shards(files: list[Path], language: str, shard_bytes: int, val_fraction: float, on_invalid_utf8: str,
            encoding: str) -> Iterator[tuple[int, list[str], list[tuple[int, int]], str, int]]:
    """(number, pieces, their (bytes, flags), content hash, utf-8 bytes) for consecutive shards of one language."""
    texts: list[str] = []
    meta: list[tuple[int, int]] = []
    h = hashlib.sha256()
    size = n = 0
    first, val = True, False
    for f in files:
        for text, last in iter_pieces(f, on_invalid_utf8, encoding):
            raw = text.encode("utf-8")
            if first:  # a document's split follows its (first piece's) text
                val = is_validation(raw, val_fraction)
            flags = (FIRST if first else 0) | (LAST if last else 0) | (VAL if val else 0)
            texts.append(text)
            meta.append((len(raw), flags))
            h.update(len(raw).to_bytes(8, "little") + bytes([flags]))
            h.update(raw)
            size += len(raw)
            first = last
            if size >= shard_bytes:
                yield n, texts, meta, h.hexdigest(), size
                texts, meta, h, size, n = [], [], hashlib.sha256(), 0, n + 1
    if texts:
        yield n, texts, meta, h.hexdigest(), size


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


def _check_output(out: Path, tokenizer_hash: str, overwrite: bool) -> None:
    """Refuse to mix another tokenizer's shards into `out`, or to replace another tokenizer there."""
    if overwrite:
        return
    fix = "choose another --output directory, or pass overwrite=True / --overwrite to replace it"
    records = [_read_json(out / "index.json")] + [_read_json(m) for m in sorted((out / "done").glob("*.json"))]
    for r in records:
        if r and r.get("tokenizer_hash") not in (None, tokenizer_hash):
            raise VelocisError(
                f"--output {out} holds token shards made with another tokenizer (hash {r['tokenizer_hash'][:12]}, "
                f"now {tokenizer_hash[:12]}); {fix}"
            )
    copy = out / "tokenizer.json"
    if copy.is_file():
        there = _file_hash(copy)
        if there != tokenizer_hash:
            raise VelocisError(
                f"--output {out} holds another tokenizer (tokenizer.json, hash {(there or 'invalid')[:12]}; "
                f"--tokenizer's is {tokenizer_hash[:12]}), so it belongs to another tokenizer or dataset; {fix}"
            )


def _is_finished(out: Path, settings: dict, sources: list) -> bool:
    index = _read_json(out / "index.json")
    if not index or index.get("settings") != settings or index.get("sources") != sources:
        return False
    return all((out / s["path"]).is_file() for split in index["splits"].values() for s in split["shards"])


def _index_keys(index: dict | None) -> set[str]:
    """Shard keys an index.json points to."""
    if not index:
        return set()
    return {Path(s["path"]).name[: -len(".bin")] for split in index.get("splits", {}).values()
            for s in split.get("shards", [])}


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
    encoding: str = "utf-8",
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Tokenize Chinese and English corpora into `output_dir`; returns `output_dir`.

    encoding: of the .txt/.jsonl input (parquet is UTF-8). overwrite: replace what `output_dir`
    holds when it was made with another tokenizer (a different dataset, or a tokenizer dir).
    progress: None shows a bar only when stderr is a terminal.
    """
    from velocis.tokenizer import Tokenizer

    files = {"zh": expand_paths(list(chinese_paths or []), "--chinese-path"),
             "en": expand_paths(list(english_paths or []), "--english-path")}
    if not files["zh"] and not files["en"]:
        raise VelocisError("no input text: pass --chinese-path and/or --english-path")
    if mix is not None and not 0.0 <= mix <= 1.0:
        raise VelocisError(f"mix / --mix {mix} must be between 0 and 1 (the fraction of Chinese tokens)")
    if mix is not None and not (files["zh"] and files["en"]):
        raise VelocisError("mix / --mix needs both Chinese and English text (--chinese-path and --english-path)")
    if not 0.0 <= val_fraction < 1.0:
        raise VelocisError(f"val_fraction / --val-fraction {val_fraction} must be at least 0 and below 1")
    encoding = check_read_options(on_invalid_utf8, encoding)
    if shard_mb <= 0:
        raise VelocisError(f"shard_mb / --shard-mb {shard_mb} must be positive")
    if num_workers is not None and num_workers < 1:
        raise VelocisError(f"num_workers / --num-workers {num_workers} must be at least 1 (default: one per CPU core)")
    tok = Tokenizer.load(tokenizer_dir)
    if tok.eos_id is None:
        raise VelocisError(f"--tokenizer {tokenizer_dir}: the tokenizer has no end-of-text token to end documents with")
    tokenizer_hash = tok.hash()
    dtype = token_dtype(tok.vocab_size)

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise VelocisError(f"--output {out} is a file; pass a directory")
    settings = {"tokenizer_hash": tokenizer_hash, "mix": mix, "val_fraction": val_fraction, "shard_mb": shard_mb,
                "on_invalid_utf8": on_invalid_utf8, "encoding": encoding, "dtype": dtype}
    created = not out.exists() or not any(out.iterdir())  # then an error removes the directory too
    from velocis.utils.lock import dir_lock

    with dir_lock(out, what="data prepare"):
        try:
            _check_output(out, tokenizer_hash, overwrite)
            sources = _source_list(files)
            if _is_finished(out, settings, sources):
                return out
            _prepare(files, out, tok, settings, sources, num_workers, progress)
        except VelocisError:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
    return out


def _prepare(files, out: Path, tok, settings: dict, sources: list, num_workers: int | None, progress) -> None:
    _remove_temporaries(out)  # safe: the lock says no other run is writing here
    previous = _index_keys(_read_json(out / "index.json"))  # left intact until the new index replaces it
    written: list[str] = []  # shard keys written by this run, removed again if the input is bad
    try:
        markers = _tokenize_all(files, out, tok, settings, num_workers, progress, written)
    except VelocisError:
        _remove_shards(out, [k for k in written if k not in previous])
        raise

    index = {
        "format": INDEX_FORMAT,
        "tokenizer_hash": settings["tokenizer_hash"],
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": settings["dtype"],
        "mix": settings["mix"],
        "settings": settings,
        "sources": sources,
        "splits": _apply_mix(markers, out, settings["mix"]),
    }
    # The tokenizer copy travels with the data; it changes only with --overwrite (checked above).
    if _file_hash(out / "tokenizer.json") != settings["tokenizer_hash"]:
        tok.save(out)
    atomic_write_text(out / "index.json", json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    # Only now may the files of the previous dataset (and of killed runs) go.
    keep = {m["key"] for m in markers}
    stale = {p.name.split(".")[0] for d in ("train", "val", "done") for p in (out / d).glob("[!.]*")} - keep
    _remove_shards(out, sorted(stale))


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


def _tokenize_all(files, out: Path, tok, settings: dict, num_workers: int | None, progress, written) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    num_workers = num_workers or os.cpu_count() or 1
    show = sys.stderr.isatty() if progress is None else progress
    text_files = [f for fs in files.values() for f in fs]
    total = None if any(f.suffix.lower() == ".parquet" for f in text_files) else sum(f.stat().st_size for f in text_files)
    results: dict[str, dict] = {}
    order: list[str] = []
    same = {k: settings[k] for k in ("tokenizer_hash", "val_fraction", "dtype")}
    worker_args = (tok.backend.to_str(), tok.id_to_token(tok.eos_id))

    def jobs() -> Iterator[tuple[dict, int]]:
        for language in LANGUAGES:
            for n, texts, meta, content_hash, size in _shards(files[language], language, int(settings["shard_mb"] * 2**20),
                                                              settings["val_fraction"], settings["on_invalid_utf8"],
                                                              settings["encoding"]):
                # the name says what is inside, so a file the current index points to is never rewritten
                shard_id = hashlib.sha256(json.dumps([content_hash, same], sort_keys=True).encode()).hexdigest()[:16]
                key = f"{language}_{n:05d}-{shard_id}"
                order.append(key)
                yield {"out": str(out), "key": key, "language": language, "texts": texts, "meta": meta,
                       "content_hash": content_hash, **same}, size

    def finished(job: dict) -> dict | None:
        marker = _read_json(out / "done" / f"{job['key']}.json")
        files_there = marker and all((out / s / f"{job['key']}{ext}").is_file() for s in SPLITS for ext in (".bin", ".docs.npy"))
        return marker if files_there else None

    with _progress(show, total) as bar:
        task = bar.add_task("tokenizing", total=total)
        if num_workers <= 1:
            _init_worker(*worker_args, None, None)
            for job, size in jobs():
                results[job["key"]] = finished(job) or _run_here(job, written)
                bar.advance(task, size)
        else:
            pool = ProcessPoolExecutor(num_workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                       initargs=(*worker_args, max(1, (os.cpu_count() or 1) // num_workers), os.getpid()))
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
