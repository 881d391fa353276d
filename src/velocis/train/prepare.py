"""Raw text -> a prepared data dir for a run: train a tokenizer (unless given one), then tokenize
into RUN/data. The result is cached: a re-run (or --resume) with the same inputs reuses it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from velocis.errors import VelocisError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".md")


def _expand(paths: list[str], flag: str) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise VelocisError(f"{flag} {p}: the directory holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        else:
            raise VelocisError(f"{flag} {p}: no such file or directory")
    return files


def _fingerprint(files: list[Path]) -> list[list]:
    # Content, not mtime: rewriting the same text (as the demo does) keeps the cache valid.
    out = []
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out.append([str(f.resolve()), h.hexdigest()])
    return out


def prepare_run_data(
    output_dir: str | Path,
    chinese_paths: list[str] | None,
    english_paths: list[str] | None,
    *,
    vocab_size: int,
    tokenizer_dir: str | Path | None = None,
    progress: bool = True,
    on_invalid_utf8: str = "error",
    encoding: str = "utf-8",
) -> Path:
    """Returns OUTPUT_DIR/data, (re)built only when the inputs changed.

    on_invalid_utf8 ("error" | "replace") and encoding (of .txt/.jsonl input, e.g. "gb18030") are
    passed to the tokenizer training and to `prepare_dataset`.
    """
    from velocis.data import prepare_dataset
    from velocis.tokenizer import Tokenizer

    zh = _expand(chinese_paths or [], "--chinese-path")
    en = _expand(english_paths or [], "--english-path")
    if not zh and not en:
        raise VelocisError("no training text: pass --chinese-path and/or --english-path, or --data DIR")
    out = Path(output_dir)
    data_dir = out / "data"
    stamp_path = out / "data_source.json"
    stamp = {"chinese": _fingerprint(zh), "english": _fingerprint(en), "vocab_size": vocab_size,
             "tokenizer": str(Path(tokenizer_dir).resolve()) if tokenizer_dir else None}
    # recorded only when not the defaults, so that run dirs made before these options keep their cache
    if on_invalid_utf8 != "error" or encoding != "utf-8":
        stamp.update(on_invalid_utf8=on_invalid_utf8, encoding=encoding)
    if (data_dir / "index.json").is_file() and stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return data_dir
        except json.JSONDecodeError:
            pass

    if tokenizer_dir is None:
        tok = Tokenizer.train([str(f) for f in zh + en], vocab_size=vocab_size, progress=progress,
                              on_invalid_utf8=on_invalid_utf8, encoding=encoding)
        tokenizer_dir = out / "tokenizer"
        tok.save(tokenizer_dir)
    # RUN/data is derived from the inputs above: when they changed (another tokenizer), replace it
    prepare_dataset([str(f) for f in zh], [str(f) for f in en], tokenizer_dir, data_dir,
                    on_invalid_utf8=on_invalid_utf8, encoding=encoding, overwrite=True)
    from velocis.utils.atomic import atomic_write_text

    atomic_write_text(stamp_path, json.dumps(stamp, indent=2) + "\n")
    return data_dir
