"""`velocis tokenizer train`: learn a byte-level BPE tokenizer from Chinese and English text."""
from __future__ import annotations

import sys
from pathlib import Path

from velocis.errors import VelocisError


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", description=__doc__)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True
    t = tsub.add_parser(
        "train", help="train a tokenizer on text files",
        description="Train a byte-level BPE tokenizer (any UTF-8 text round-trips exactly) and save "
                    "tokenizer.json, tokenizer_config.json and special_tokens_map.json to --output. "
                    "Documents over 64 KB are read in pieces, so memory stays bounded. --output is locked "
                    "while training; a different tokenizer there is replaced only with --overwrite, and a "
                    "prepared data directory never (its shards were made with its tokenizer).",
    )
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".txt (documents separated by blank lines), .jsonl (a text field), .parquet (a text column), "
                        "directories or globs of them")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, special tokens included")
    t.add_argument("--output", required=True, metavar="DIR")
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    t.add_argument("--sample-mb", type=float, metavar="MB",
                   help="read at most this much text from each file (inside a long document too)")
    t.add_argument("--on-invalid-utf8", choices=["error", "replace"], default="error",
                   help="stop at invalid UTF-8 (default) or replace it with U+FFFD")
    t.add_argument("--encoding", default="utf-8", metavar="NAME",
                   help="encoding of the .txt/.jsonl input, e.g. gb18030 (default utf-8)")
    t.add_argument("--overwrite", action="store_true", help="replace a different tokenizer already in --output")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=train)


def train(args) -> int:
    import warnings

    from velocis.tokenizer import Tokenizer
    from velocis.utils.lock import dir_lock

    out = Path(args.output)
    if args.sample_mb is not None and args.sample_mb <= 0:
        raise VelocisError(f"--sample-mb {args.sample_mb} must be positive")
    with dir_lock(out, what="tokenizer train"):
        if (out / "index.json").is_file():
            raise VelocisError(
                f"--output {out} is a prepared data directory (it holds index.json) whose token shards were made "
                f"with the tokenizer there; replacing it would break them: choose another --output directory"
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            tok = Tokenizer.train(
                args.input, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                progress=not args.quiet and sys.stderr.isatty(),
                max_bytes_per_file=int(args.sample_mb * 2**20) if args.sample_mb else None,
                on_invalid_utf8=args.on_invalid_utf8, encoding=args.encoding,
            )
        for w in caught:
            print(f"velocis tokenizer: warning: {w.message}", file=sys.stderr)
        existing = out / "tokenizer.json"
        if existing.is_file() and not args.overwrite:
            try:
                there = Tokenizer.load(existing).hash()
            except VelocisError:
                there = "invalid"
            if there != tok.hash():
                raise VelocisError(
                    f"--output {out} holds another tokenizer (hash {there[:12]}; the new one is {tok.hash()[:12]}); "
                    f"pass --overwrite to replace it, or choose another --output directory"
                )
        tok.save(out)
    print(f"tokenizer: {tok.vocab_size} tokens -> {out / 'tokenizer.json'}")
    return 0
