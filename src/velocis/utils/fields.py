"""Type checks for config dataclasses: a Python caller passing "16" or None where a number belongs
gets a VelocisError naming the field, not a TypeError deep inside training."""
from __future__ import annotations

import dataclasses
import math
import types
import typing

from velocis.errors import VelocisError


def _allowed(hint) -> tuple[tuple[type, ...], bool]:
    """(accepted types, None allowed) for a field annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        inner = [a for a in args if a is not type(None)]
        accepted = tuple(t for a in inner for t in _allowed(a)[0])
        return accepted, type(None) in args
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return (int, float), False  # an int is a fine float
    return ((origin,) if isinstance(origin, type) else (object,)), False


def check_field_types(obj, owner: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        accepted, optional = _allowed(hints[f.name])
        if value is None and optional:
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-")) if f.metadata.get("cli", True) else None
        where = f"{owner}.{f.name}" + (f" ({flag})" if flag and f.metadata else "")
        ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
        if not ok:
            names = {int: "an integer", float: "a number", bool: "True or False", str: "a string",
                     dict: "a dict", list: "a list"}
            kinds = "a number" if float in accepted else " or ".join(names.get(t, f"a {t.__name__}") for t in accepted)
            raise VelocisError(f"{where} must be {kinds}{' or None' if optional else ''}, "
                               f"got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise VelocisError(f"{where} must be a finite number, got {value}")
