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


def _field_type(method: type[Method], field: dataclasses.Field):
    hints = typing.get_type_hints(method.Params)
    return hints[field.name]


def _coerce(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{where}={value!r} is not a boolean (true/false)")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}={value!r} is not an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r} is not an integer") from None
        if not as_float.is_integer():
            raise ValueError(f"{where}={value!r} is not an integer")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r} is not a number") from None
    if annotation is str:
        return str(value)
    return value


def make_params(method: type[Method] | str, values: dict | None = None) -> Method.Params:
    """Build a method's validated Params from a dict of (possibly string) values.

    Raises ValueError naming every unknown key, every value of the wrong type and every value out of
    range, with what is allowed.
    """
    method = get_method(method) if isinstance(method, str) else method
    values = dict(values or {})
    fields_ = param_fields(method)
    problems = []
    unknown = sorted(set(values) - set(fields_))
    if unknown:
        allowed = ", ".join(f"{n} ({_type_name(_field_type(method, f))}, default {_default(f)!r})"
                            for n, f in fields_.items()) or "none"
        problems.append(f"unknown parameter(s) {unknown} for method {method.name!r}; allowed: {allowed}")
    coerced, bad_type = {}, False
    for name, value in values.items():
        if name in fields_:
            try:
                coerced[name] = _coerce(value, _field_type(method, fields_[name]), f"{method.name}.{name}")
            except ValueError as exc:
                problems.append(str(exc))
                bad_type = True
    if not bad_type:
        params = method.Params(**coerced)
        problems += [f"{method.name}.{p}" for p in params.validate()]
        if not problems:
            return params
    raise ValueError("; ".join(problems))


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
