"""argparse flags generated from a dataclass, so a config's fields, their help and their checks
live in one place (the dataclass) and the CLI follows it.

    add_dataclass_arguments(group, TrainConfig, skip={"output_dir"})
    TrainConfig(**dataclass_args(args, TrainConfig))   # only the flags the user gave

A field's metadata may give: help, flag (default --field-name), choices, metavar. A bool field
whose default is True becomes --no-<name>; one whose default is False becomes --<name>. Every
flag's parser default is None, so a caller can tell "not given" from a value and layer its own
defaults (e.g. per preset) under the user's.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _base_type(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X] -> X
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def flag_for(f: dataclasses.Field) -> str:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    if f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


def add_dataclass_arguments(parser, cls, skip=(), shown_defaults: dict[str, str] | None = None) -> None:
    """shown_defaults: field -> what the help gives as its default, where the caller layers its own."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        typ = _base_type(hints[f.name])
        meta = f.metadata
        help_ = meta.get("help", "")
        if typ is bool:
            parser.add_argument(flag_for(f), dest=f.name, default=None,
                                action="store_false" if f.default is True else "store_true", help=help_)
            continue
        default = (shown_defaults or {}).get(f.name, f.default)
        if default is not dataclasses.MISSING and default is not None and "%(default)" not in help_:
            help_ = f"{help_} (default {default})".strip() if help_ else f"default {default}"
        parser.add_argument(flag_for(f), dest=f.name, type=typ, default=None, choices=meta.get("choices"),
                            metavar=meta.get("metavar"), help=help_.replace("%", "%%"))


def dataclass_args(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.metadata.get("cli") is not False and getattr(args, f.name, None) is not None}
