"""The one coercer of every input: grid files, ``--set``, ``--only``, CLI flags, schedules and method parameters.

Values come as TOML, JSON or command-line text; ``coerce`` turns each into the type its field
declares or raises a ValueError that names where it is, the value and what is allowed. Callers
collect those errors so that a file's problems are reported all at once.
"""

from __future__ import annotations

import argparse
import math
import types
import typing

#: Largest integer a field takes (a seed, a count): beyond it values are typos, and torch and
#: numpy generators reject them anyway.
MAX_INT = 2**63 - 1


def coerce(value, annotation, where: str):
    """``value`` (from TOML, JSON or the command line) as ``annotation`` says, or ValueError naming
    ``where``, the value and what is allowed. The one coercer of method parameters and schedules:

    - int: integers, and floats or strings that are whole numbers (``3.0``, ``"1e3"``); not 2.7,
      not booleans;
    - float: finite numbers (nan and inf are refused everywhere: no parameter means anything
      with them), not booleans;
    - bool: true/false (or 1/0, yes/no, on/off as text);
    - Literal[...]: one of the listed values; ``X | None``: none/null too; ``X | Y``: the first of
      them that takes the value (``int | str``: ``2`` and ``"2"`` are the integer 2, ``"500it"``
      stays text), else X's error.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for alternative in (a for a in args if a is not type(None)):
            try:
                return coerce(value, alternative, where)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, (int, str)) and str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}={value!r} is not a boolean (true or false)")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where}={value!r} is not an integer")
        if isinstance(value, int):
            as_int = value
        else:
            try:
                as_float = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}={value!r} is not an integer") from None
            if not math.isfinite(as_float) or not as_float.is_integer():
                raise ValueError(f"{where}={value!r} is not an integer")
            as_int = int(as_float)
        if abs(as_int) > MAX_INT:
            raise ValueError(f"{where}={value!r} is too large for an integer setting (at most {MAX_INT})")
        return as_int
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where}={value!r} is not a number")
        try:
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}={value!r} is not a number") from None
        if not math.isfinite(as_float):
            raise ValueError(f"{where}={as_float} is not allowed: it must be a finite number")
        return as_float
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}={value!r} is not a text value")
        return str(value)
    return value




def positive_numbers(text: str, where: str) -> list[float]:
    """Comma-separated finite numbers > 0 (CRs, tolerances) through ``coerce``, or ValueError."""
    values = [coerce(item.strip(), float, where) for item in str(text).split(",") if item.strip()]
    if not values:
        raise ValueError(f"{where}={text!r}: give at least one number")
    bad = [v for v in values if not v > 0]
    if bad:
        raise ValueError(f"{where}={text!r}: {bad[0]:g} is not allowed; the numbers must be > 0")
    return values


def argparse_type(parse, where: str):
    """An argparse ``type=`` from a parser of ours that raises ValueError (so that argparse reports
    the flag, the value and what is allowed, and exits 2)."""
    def convert(text: str):
        try:
            return parse(text, where)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = where  # argparse names the type in some messages
    return convert
