"""The Method interface and registry.

A method is a small class with a ``Params`` dataclass (its cell's serializable config, defaults
that are the paper's or marked as ours) and a ``run(ctx)`` that returns result records. It acts on
training only through ``benchmark.train.TrainHooks``; the harness owns data, models, the training
loop and the metrics (reached through the ``Context`` it passes in).

Adding a method: one module with a ``@register``-ed class, and one import line in
``methods/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from benchmark.cell import Context

METHODS: dict[str, type["Method"]] = {}


class Method:
    name: ClassVar[str]
    family: ClassVar[str]  # regularization / after-training / at-init / lottery / structured / reference
    #: Needs a trained dense model of its cell's arch x dataset x schedule x seed (shared via a cache).
    needs_dense: ClassVar[bool] = False

    @dataclasses.dataclass(frozen=True)
    class Params:
        def validate(self) -> list[str]:
            return []

    def __init__(self, params: "Method.Params"):
        self.params = params

    def run(self, ctx: "Context") -> list[dict]:
        """Train / prune / evaluate; one record per point on the curve (most methods: one)."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None


def param_fields(method: type[Method]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(method.Params)}


@functools.lru_cache(maxsize=None)
def _type_hints(params_cls: type) -> dict:
    """Resolved annotations of a Params class, once per class (resolving them per cell made a
    100,000-cell dry run take most of a minute)."""
    return typing.get_type_hints(params_cls)


def _field_type(method: type[Method], field: dataclasses.Field):
    return _type_hints(method.Params)[field.name]


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


_coerce = coerce  # the name the rest of the code base used


class ParamsError(ValueError):
    """Every problem with a method's parameters; ``problems`` pairs each message with the parameter
    it is about (None when it is about no single one), so a grid can point at each one's line."""

    def __init__(self, problems: list[tuple[str | None, str]]):
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def make_params(method: type[Method] | str, values: dict | None = None) -> Method.Params:
    """Build a method's validated Params from a dict of (possibly string) values.

    Raises ParamsError (a ValueError) naming every unknown key, every value of the wrong type and
    every value out of range, with what is allowed.
    """
    method = get_method(method) if isinstance(method, str) else method
    values = dict(values or {})
    fields_ = param_fields(method)
    problems: list[tuple[str | None, str]] = []
    unknown = sorted(set(values) - set(fields_))
    if unknown:
        allowed = ", ".join(f"{n} ({_type_name(_field_type(method, f))}, default {_default(f)!r})"
                            for n, f in fields_.items()) or "none"
        problems.append((unknown[0], f"unknown parameter(s) {unknown} for method {method.name!r}; allowed: {allowed}"))
    coerced, bad = {}, set()
    for name, value in values.items():
        if name in fields_:
            try:
                coerced[name] = coerce(value, _field_type(method, fields_[name]), f"{method.name}.{name}")
            except ValueError as exc:
                problems.append((name, str(exc)))
                bad.add(name)
    # The values that coerced are range-checked even when others did not (their defaults stand in),
    # so one message lists every problem.
    params = method.Params(**coerced)
    for problem in params.validate():
        name = problem.split("=", 1)[0].strip()
        if name not in bad:
            problems.append((name if name in fields_ else None, f"{method.name}.{problem}"))
    if not problems:
        return params
    raise ParamsError(problems)


def _default(field: dataclasses.Field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + "/".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def non_default(params: Method.Params) -> dict:
    """The parameters that differ from their defaults (what a cell id hashes)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if getattr(params, f.name) != _default(f)}
