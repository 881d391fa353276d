"""`velocis tokenizer train`: learn a byte-level BPE tokenizer from Chinese and English text."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", description=__doc__)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True
    t = tsub.add_parser(
        "train", help="train a tokenizer on text files",
        description="Train a byte-level BPE tokenizer (any UTF-8 text round-trips exactly) and save "
                    "tokenizer.json, tokenizer_config.json and special_tokens_map.json to --output.",
    )
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".txt (documents separated by blank lines), .jsonl (a text field), .parquet (a text column), "
                        "directories or globs of them")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, special tokens included")
    t.add_argument("--output", required=True, metavar="DIR")
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    t.add_argument("--sample-mb", type=float, metavar="MB", help="read at most this much text from each file")
    t.add_argument("--on-invalid-utf8", choices=["error", "replace"], default="error",
                   help="stop at invalid UTF-8 (default) or replace it with U+FFFD")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=train)


def train(args) -> int:
    from velocis.tokenizer import Tokenizer

    tok = Tokenizer.train(
        args.input, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
        progress=not args.quiet and sys.stderr.isatty(),
        max_bytes_per_file=int(args.sample_mb * 2**20) if args.sample_mb else None,
        on_invalid_utf8=args.on_invalid_utf8,
    )
    out = tok.save(args.output)
    print(f"tokenizer: {tok.vocab_size} tokens -> {out / 'tokenizer.json'}")
    return 0
