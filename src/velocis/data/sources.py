"""Reading text corpora as a stream of documents, in pieces of bounded size.

Formats, chosen by file suffix:
  .txt / .md (and anything else named explicitly): documents separated by blank lines
  .jsonl: one JSON object per line with a "text" string
  .parquet: a "text" column of strings
A path may be a file, a directory (searched recursively for those suffixes) or a glob.

Memory never holds a whole corpus, nor a whole document: `iter_pieces` yields each document as
pieces of at most MAX_PIECE_BYTES (64 KB) of UTF-8, cut at a line end when there is one, else at
a sentence end (。！？；… or . ! ? before a space), else between two characters. A .txt file is
read a line, or 64 KB of a longer line, at a time; a .jsonl line or parquet value is read whole
(a JSON string cannot be cut before it is parsed) and then cut. Documents up to 64 KB are one
piece. (Encoding costs the tokenizer ~150 bytes of memory per byte of text at once, and it slows
down on longer texts: 64 KB pieces encode ~40% faster than 1 MB ones.)

Text files are decoded as `encoding` (default utf-8; any ASCII-compatible codec, e.g. gb18030,
big5, shift_jis, latin-1); parquet strings are UTF-8 by definition. Invalid input stops with an
error naming the file and byte offset, or with on_invalid_utf8="replace" becomes U+FFFD -- unless
most of the text around it is not UTF-8 (a GBK file, say): then the error suggests the encoding.
"""
from __future__ import annotations

import codecs
import glob
import json
from pathlib import Path
from typing import Iterator

from velocis.errors import VelocisError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
ON_INVALID_UTF8 = ("error", "replace")
MAX_PIECE_BYTES = 1 << 16  # UTF-8 bytes per piece: what the tokenizer sees at once
_CJK_ENDS = tuple(c.encode("utf-8") for c in "。！？；…")
_LATIN_ENDS = (b". ", b"! ", b"? ")
_GUESS = "gb18030"  # the non-UTF-8 encoding Chinese text most often comes in (a superset of GBK/GB2312)


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


def check_read_options(on_invalid_utf8: str, encoding: str) -> str:
    """Validate the two reading options; returns the codec's canonical name (e.g. "utf-8")."""
    if on_invalid_utf8 not in ON_INVALID_UTF8:
        raise VelocisError(f"on_invalid_utf8 / --on-invalid-utf8 {on_invalid_utf8!r} must be one of "
                           f"{', '.join(ON_INVALID_UTF8)}")
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        name = None
    # blank lines and line ends are found in the raw bytes, so "\n" and " " must be single bytes
    if name is None or b"\n\r \t<|ab|>".decode(name, errors="replace") != "\n\r \t<|ab|>":
        raise VelocisError(f"encoding / --encoding {encoding!r}: not a known ASCII-compatible text encoding; "
                           f"use e.g. utf-8, gb18030, big5, shift_jis or latin-1")
    return name


# --- cutting text into pieces ---------------------------------------------------------------------
def _cut_point(data: bytes | bytearray, limit: int) -> int:
    """Where to end a piece of UTF-8 `data` (longer than `limit`): 0 < cut <= limit."""
    cut = data.rfind(b"\n", 0, limit)
    if cut >= 0:
        return cut + 1
    best = 0
    for end in _CJK_ENDS:  # after the mark
        i = data.rfind(end, 0, limit)
        best = max(best, i + len(end) if i >= 0 else 0)
    for end in _LATIN_ENDS:  # after the mark, before the space (which the next word's token carries)
        i = data.rfind(end, 0, limit + 1)
        best = max(best, i + 1 if i >= 0 else 0)
    if best:
        return best
    cut = limit
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # never start the next piece on a continuation byte
        cut -= 1
    return cut or limit


def split_text(text: str, max_bytes: int = MAX_PIECE_BYTES) -> list[str]:
    """`text` as pieces of at most `max_bytes` UTF-8 bytes that join back to it exactly."""
    data = text.encode("utf-8")
    pieces = []
    while len(data) > max_bytes:
        cut = _cut_point(data, max_bytes)
        pieces.append(data[:cut].decode("utf-8"))
        data = data[cut:]
    return pieces + [data.decode("utf-8")]


def _trim(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    return data[:_cut_point(data, max_bytes)].decode("utf-8") if len(data) > max_bytes else text


# --- decoding -------------------------------------------------------------------------------------
class _Decoder:
    """Bytes of one file -> text, by `encoding` and the invalid-input policy; errors name file and offset."""

    def __init__(self, path: Path, encoding: str, on_invalid: str):
        self.path, self.encoding, self.on_invalid = path, encoding, on_invalid
        self.next_check = 0  # file offset before which replacing was already judged sensible

    def decode(self, data: bytes, offset: int, where: str = "") -> str:
        """One whole unit (a piece, a JSON line) starting at file offset `offset`."""
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError as e:
            self.invalid(offset + e.start, where)
            return data.decode(self.encoding, errors="replace")

    def invalid(self, at: int, where: str = "") -> None:
        """Invalid input at file offset `at`: raises, unless replacing it is what was asked and is sensible."""
        path = f"{self.path}{where}"
        if self.encoding == "utf-8" and (self.on_invalid == "error" or at >= self.next_check):
            self.next_check = at + (1 << 20)  # judge once per MB of file, not per piece
            mostly_bad, guess = _sample_verdict(self.path, at)
            if mostly_bad:
                reason = "replacing would turn most of it into U+FFFD; " if self.on_invalid == "replace" else ""
                hint = (f"it reads as {guess.upper()}: pass encoding='{guess}' / --encoding {guess}" if guess
                        else "pass its encoding: encoding='NAME' / --encoding NAME")
                raise VelocisError(f"{path}: not UTF-8 (invalid at byte offset {at}); {reason}{hint}")
        if self.on_invalid == "error":
            name = "UTF-8" if self.encoding == "utf-8" else self.encoding
            raise VelocisError(f"{path}: invalid {name} at byte offset {at}; fix the file or pass "
                               f"on_invalid_utf8='replace' / --on-invalid-utf8 replace to substitute U+FFFD")


def _sample_verdict(path: Path, at: int) -> tuple[bool, str | None]:
    """(is most non-ASCII text around `at` invalid UTF-8?, an encoding the sample decodes in)."""
    start = max(0, at - (1 << 15))
    with open(path, "rb") as f:
        f.seek(start)
        sample = f.read(1 << 16)
    if start and b"\n" in sample[:4096]:
        sample = sample[sample.index(b"\n") + 1 :]  # begin at a line, not inside a character
    text = sample.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad < 16 or bad <= 0.5 * sum(1 for c in text if ord(c) > 127):  # a few bad bytes: a damaged UTF-8 file
        return False, None
    try:
        codecs.getincrementaldecoder(_GUESS)().decode(sample)  # not final: the sample may end mid-character
        return True, _GUESS
    except UnicodeDecodeError:
        return True, None


# --- reading ---------------------------------------------------------------------------------------
def iter_pieces(path: str | Path, on_invalid_utf8: str = "error", encoding: str = "utf-8", *,
                max_bytes: int | None = None, max_piece_bytes: int = MAX_PIECE_BYTES) -> Iterator[tuple[str, bool]]:
    """Yield (piece, ends_document) for the documents of one file, in order; pieces are non-empty.

    max_bytes: stop after this many UTF-8 bytes of text (the last piece is cut short, and ends
    its document). Raises VelocisError on malformed input.
    """
    path = Path(path)
    encoding = check_read_options(on_invalid_utf8, encoding)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        pieces = _jsonl_pieces(path, _Decoder(path, encoding, on_invalid_utf8), max_piece_bytes)
    elif suffix == ".parquet":
        pieces = _parquet_pieces(path, max_piece_bytes)
    else:
        pieces = _txt_pieces(path, _Decoder(path, encoding, on_invalid_utf8), max_piece_bytes)
    count = 0
    left = max_bytes
    for piece, last in pieces:
        count += 1
        if left is not None:
            size = len(piece.encode("utf-8"))
            if size >= left:
                yield _trim(piece, left), True
                return
            left -= size
        yield piece, last
    if count == 0:
        raise VelocisError(f"{path}: the file holds no text (only blank lines or empty records); remove it")


def iter_documents(path: str | Path, on_invalid_utf8: str = "error", encoding: str = "utf-8") -> Iterator[str]:
    """Yield the non-empty documents of one file, whole (a document is held in memory at once)."""
    parts: list[str] = []
    for piece, last in iter_pieces(path, on_invalid_utf8, encoding):
        parts.append(piece)
        if last:
            yield "".join(parts)
            parts = []


def _txt_pieces(path: Path, dec: _Decoder, max_piece: int) -> Iterator[tuple[str, bool]]:
    utf8 = dec.encoding == "utf-8"
    # Other encodings are turned into UTF-8 line by line, so that pieces are cut in UTF-8 alike.
    errors = "replace" if dec.on_invalid == "replace" else "strict"
    inc = None if utf8 else codecs.getincrementaldecoder(dec.encoding)(errors)
    buf = bytearray()  # the current document's bytes not yet handed out (UTF-8 or raw UTF-8 input)
    start = offset = 0  # file offsets of buf[0] and of the next line

    def emit(n: int, last: bool) -> tuple[str, bool]:
        nonlocal start
        piece = dec.decode(bytes(buf[:n]), start) if utf8 else buf[:n].decode("utf-8")
        del buf[:n]
        start += n
        return piece, last

    with open(path, "rb") as f:
        while True:
            line = f.readline(max_piece)  # a longer line comes in parts of max_piece bytes
            if not line and inc is not None:
                _transcode(inc, b"", buf, dec, offset, final=True)  # a character cut off by the end of the file
            whole = len(line) < max_piece or line.endswith(b"\n")
            if not line or (whole and not line.strip()):  # end of file, or a blank line
                if buf:  # the line break before the separator belongs to the separator, not the document
                    del buf[len(buf) - (2 if buf.endswith(b"\r\n") else 1 if buf.endswith(b"\n") else 0) :]
                    while len(buf) > max_piece:
                        yield emit(_cut_point(buf, max_piece), False)
                    yield emit(len(buf), True)
                if not line:
                    return
                offset += len(line)
                continue
            if not buf:
                start = offset
            if utf8:
                buf += line
            else:
                _transcode(inc, line, buf, dec, offset)
            offset += len(line)
            while len(buf) > max_piece + 2:  # + 2: room for the line break that may end the document
                yield emit(_cut_point(buf, max_piece), False)


def _transcode(inc, data: bytes, buf: bytearray, dec: _Decoder, offset: int, final: bool = False) -> None:
    """Append `data` (at file offset `offset`), decoded by the incremental decoder `inc`, to `buf` as UTF-8."""
    pending = len(inc.getstate()[0])  # bytes of a character begun in the previous part
    try:
        buf += inc.decode(data, final).encode("utf-8")
    except UnicodeDecodeError as e:
        dec.invalid(offset + e.start - pending)  # raises: errors are replaced by the decoder otherwise


def _jsonl_pieces(path: Path, dec: _Decoder, max_piece: int) -> Iterator[tuple[str, bool]]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                where = f":{lineno}"
                text = dec.decode(line, offset, where)
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise VelocisError(f"{path}:{lineno}: malformed JSON line ({e.msg}); fix or remove that line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise VelocisError(f'{path}:{lineno}: expected an object with a "text" string field')
                yield from _split_record(_no_surrogates(record["text"], dec, where), max_piece)
            offset += len(line)


def _no_surrogates(text: str, dec: _Decoder, where: str) -> str:
    """JSON can spell a lone surrogate (\\ud800), which is not text: no tokenizer can take it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        if dec.on_invalid != "replace":
            raise VelocisError(f"{dec.path}{where}: the text holds a lone surrogate (\\u{ord(text[e.start]):04x}), "
                               f"which is not valid Unicode; fix that line or pass on_invalid_utf8='replace' / "
                               f"--on-invalid-utf8 replace") from None
        return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def _split_record(text: str, max_piece: int) -> Iterator[tuple[str, bool]]:
    if text:
        pieces = split_text(text, max_piece)
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def _parquet_pieces(path: Path, max_piece: int) -> Iterator[tuple[str, bool]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise VelocisError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise VelocisError(f'{path}: no "text" column (columns: {", ".join(schema.names)})')
    kind = schema.field("text").type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value) or pa.types.is_large_string(value)
            or getattr(pa.types, "is_string_view", lambda t: False)(value)):
        raise VelocisError(f'{path}: the "text" column holds {kind}, not strings; convert it to strings')
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text:
                yield from _split_record(text, max_piece)
