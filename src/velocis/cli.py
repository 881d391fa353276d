"""`velocis` command line: thin argument parsing over the library.

Each command group lives in `velocis.commands.<name>` and exposes
`register(subparsers)`, which adds its sub-parser(s) and sets `func` to call with the
parsed arguments. User errors (VelocisError) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from velocis.errors import VelocisError

# Command modules, in the order they appear in `velocis --help`.
COMMAND_MODULES = [
    "demo",
    "tokenizer",
    "data",
    "train",
    "sft",
    "dpo",
    "rl",
    "generate",
    "serve",
    "chat",
    "batch",
    "params",
    "plan",
    "checkpoint",
    "convert",
    "export",
    "quantize",
    "plot",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velocis", description="Velocis: train, align and run LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"velocis.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    finished = False
    try:
        result = args.func(args)
        finished = True
    except VelocisError as e:
        print(f"velocis {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM turned into a clean stop (train/loop.py)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"velocis {args.command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:  # a command that joined other processes (torchrun) leaves the group before exiting
        joined = sys.modules.get("velocis.train.distributed")
        if joined is not None:
            joined.shutdown(wait=finished)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
