"""`velocis data prepare` (text -> token shards) and `velocis data default-corpus`."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PREPARE_HELP = """\
Tokenize Chinese and English text into memory-mappable token shards plus index.json,
with a held-out validation split, for `velocis train --data DIR`.

Inputs: .txt (documents separated by blank lines), .jsonl (a "text" field per line),
.parquet (a "text" column), or directories / globs of them. Either language may be left out.
Each document ends with an end-of-text token; documents over 64 KB are tokenized in pieces,
so memory stays bounded. Re-running resumes: finished shards are kept, and a finished
preparation returns at once. A run that fails leaves a previous dataset in --output as it was;
--output is locked while a run writes it. An --output made with another tokenizer (another
dataset, or a tokenizer dir) is refused unless --overwrite.

--mix is the fraction of Chinese among the tokens of each split. Without it every document
is used, whatever the proportion. With it, the language that exceeds its share is truncated
(its later documents are left out) until Chinese tokens / all tokens = MIX.
"""


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare token shards; write the built-in corpus", description=__doc__)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    prep = dsub.add_parser("prepare", help="tokenize text into token shards", description=PREPARE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_argument("--chinese-path", nargs="+", metavar="PATH", help="Chinese text: files, directories or globs")
    prep.add_argument("--english-path", nargs="+", metavar="PATH", help="English text: files, directories or globs")
    prep.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer dir (velocis tokenizer train)")
    prep.add_argument("--output", required=True, metavar="DIR")
    prep.add_argument("--mix", type=float, metavar="FRACTION",
                      help="fraction of Chinese tokens, e.g. 0.5 (default: use all the text as it is)")
    prep.add_argument("--val-fraction", type=float, default=0.01,
                      help="share of documents held out for validation, chosen by a hash of the text (default 0.01)")
    prep.add_argument("--num-workers", type=int, metavar="N", help="tokenizer processes (default: one per CPU core)")
    prep.add_argument("--shard-mb", type=float, default=8.0, help="text per shard in MB; bounds memory (default 8)")
    prep.add_argument("--on-invalid-utf8", choices=["error", "replace"], default="error",
                      help="stop at invalid UTF-8 (default) or replace it with U+FFFD")
    prep.add_argument("--encoding", default="utf-8", metavar="NAME",
                      help="encoding of the .txt/.jsonl input, e.g. gb18030 (default utf-8)")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace what --output holds even when it was made with another tokenizer")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=prepare)

    corpus = dsub.add_parser("default-corpus", help="write the built-in bilingual corpus (zh.txt, en.txt)",
                             description="Write the built-in Chinese + English corpus: template stories, facts, "
                                         "arithmetic and dialogues. Deterministic for a seed; no download.")
    corpus.add_argument("--output", required=True, metavar="DIR")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--documents", type=int, default=6000, help="documents per language (default 6000)")
    corpus.set_defaults(func=default_corpus)


def prepare(args) -> int:
    from velocis.data.prepare import prepare_dataset

    t0 = time.perf_counter()
    out = prepare_dataset(
        args.chinese_path, args.english_path, args.tokenizer, args.output, mix=args.mix,
        val_fraction=args.val_fraction, num_workers=args.num_workers, shard_mb=args.shard_mb,
        on_invalid_utf8=args.on_invalid_utf8, encoding=args.encoding, overwrite=args.overwrite,
        progress=False if args.quiet else None,
    )
    index = json.loads((Path(out) / "index.json").read_text(encoding="utf-8"))
    for split, info in index["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens "
              f"({info['bytes_per_token']:.2f} bytes/token, {info['chinese_fraction']:.1%} Chinese)")
    print(f"-> {out} ({time.perf_counter() - t0:.1f}s)")
    return 0


def default_corpus(args) -> int:
    from velocis.data.default_corpus import write_default_corpus

    zh, en = write_default_corpus(args.output, seed=args.seed, documents=args.documents)
    print(f"wrote {zh} ({zh.stat().st_size:,} bytes) and {en} ({en.stat().st_size:,} bytes)")
    return 0
