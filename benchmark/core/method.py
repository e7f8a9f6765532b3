"""The Method interface and the registry of methods (built-in and from other packages).

A method is a small class with a ``Params`` dataclass (its cell's serializable config, defaults
that are the paper's or marked as ours) and a ``run(ctx)`` that returns result records. It acts on
training only through ``benchmark.engine.train.TrainHooks``; the harness owns data, models, the
training loop and the metrics, reached through the context it passes in (``MethodContext`` of
``benchmark.core.context``; the harness's is ``benchmark.execution.cell.Context``). How its curves
are drawn (``Plotting``) and what its cells train and cost (``Workload``) are grouped apart.

Methods are found in two places, through one registry: the built-in ``methods`` package, and the
entry-point group ``dwf_bench.methods`` of any installed distribution (each entry point names a
module whose import registers its methods, or a ``Method`` subclass). ``get_method`` and
``all_methods`` load both the first time they are asked.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import types
import typing
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Mapping

from benchmark.core.context import MethodContext
from benchmark.core.validation import coerce

METHODS: dict[str, type["Method"]] = {}

#: The package whose import registers the built-in methods.
BUILTIN_PACKAGE = "methods"
#: The entry-point group through which other packages add methods.
ENTRY_POINT_GROUP = "dwf_bench.methods"
_LOADED: list[bool] = []


#: Parameters along which a method's curve is drawn: cells that differ only in these (and the seed)
#: are one curve (one label in tables and figures, one pick when tuned), and a cell's label always
#: shows them.
SWEEP_PARAMETERS = ("lam", "target_cr", "channel_ratio")


def _no_rank(values: Mapping[str, Any]) -> float:
    return 0.0


@dataclasses.dataclass(frozen=True)
class Plotting:
    """How a method's curves are drawn and ordered in figures and tables (none of it changes a
    record). The defaults put a method after the built-in ones, in a spare colour."""

    #: Where its curves come in legends and tables, lower first (docs/design.md, Families);
    #: methods that leave it unset follow, by name.
    order: float = math.inf
    #: Its look in figures: (slot 0-9 of the colour-blind palette, darkening 0-1, marker, line
    #: style); families share a line style. None: a spare colour with a circle marker.
    style: tuple | None = None
    #: Its curves share one colour ramp, darker as ``rank`` grows (DWF's depths).
    ramp: bool = False
    #: Order of the method's curves among themselves, from a record's or CSV row's columns (DWF: the depth).
    rank: Callable[[Mapping[str, Any]], float] = _no_rank


class Workload:
    """What a cell of a method trains, as the harness's estimates and packing see it (none of it
    changes a record). A method whose cells differ from these defaults subclasses it as its own
    nested ``Workload``, as it does ``Params``."""

    def __init__(self, method: "Method"):
        self.method = method
        self.params = method.params

    def trainings(self, layer_sizes: tuple[int, ...]) -> int:
        """Models a cell trains and measures (a lottery ticket: one per level)."""
        return 1

    def training_epochs(self, schedule, layer_sizes: tuple[int, ...]) -> float:
        """Epochs of training a cell costs, for estimates; a shared dense training counts for the
        reference method only."""
        method = self.method
        return schedule.epochs if method.is_reference or not method.needs_dense else 0

    def step_variant(self) -> str:
        """What one of its training steps costs like, for time estimates: ``dense``, ``masked``
        (a mask multiplies each weight) or a structure of ``methods.structures``."""
        return "masked" if self.method.family in ("at-init", "during-training", "lottery", "after-training") else "dense"

    def pack_family(self) -> tuple[str, tuple] | None:
        """(structure, what else must be equal) for cells that may train as one stacked model
        (``benchmark.execution.packing``): a structure of ``methods.structures``, whose stand-in the
        method module that trains it provides. None: never packs."""
        return None


#: Members the Method interface had before they were grouped, and where each went.
_MOVED = {"curve_order": "plotting = Plotting(order=...)", "plot_style": "plotting = Plotting(style=...)",
          "plot_ramp": "plotting = Plotting(ramp=...)", "curve_rank": "plotting = Plotting(rank=...)",
          **{name: "a method of the nested class Workload(Method.Workload)"
             for name in ("trainings", "training_epochs", "step_variant", "pack_family")},
          "training_schedule": "gone: run() picks its schedule itself"}


class Method:
    """One pruning or factorization method: what it is (``name``, ``family``, its ``Params``) and
    ``run(ctx)``. The roles and ``curve_label`` below tell the harness which curve a record is on;
    ``plotting`` how it is drawn, ``Workload`` what it trains and how long; so that no module
    outside ``methods/`` names a method (docs/extending.md)."""

    name: ClassVar[str]
    family: ClassVar[str]  # regularization / after-training / at-init / during-training / lottery / structured / reference
    #: Needs a trained dense model of its cell's arch x dataset x schedule x seed (shared via a cache).
    needs_dense: ClassVar[bool] = False
    #: Trains what the others reuse (the dense model): its cells run first in a grid, and its rows
    #: are the reference line of figures and tables, not a curve.
    is_reference: ClassVar[bool] = False
    #: The method the benchmark studies (DWF): the report's comparisons table tests each of its
    #: curves against every other curve of its arch x dataset (``benchmark.analysis.comparisons``).
    is_subject: ClassVar[bool] = False
    #: Result columns its records add besides its parameters and the shared metrics (``list``
    #: shows them; docs/grids.md explains them).
    columns: ClassVar[tuple[str, ...]] = ()
    #: How its curves are drawn and ordered in figures and tables.
    plotting: ClassVar[Plotting] = Plotting()
    #: What its cells train and cost (``method.workload``), for estimates and packing.
    Workload: ClassVar[type[Workload]] = Workload

    #: Parameters ``default_params`` may fill in, each with the text a grid or ``cell --set`` gives it
    #: to keep its dataclass default instead (a learning rate: "schedule", the schedule's).
    keep_default: ClassVar[Mapping[str, str]] = {}

    @dataclasses.dataclass(frozen=True)
    class Params:
        def validate(self) -> list[str]:
            return []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        moved = sorted(set(vars(cls)) & _MOVED.keys())
        if moved:  # an older plugin's attribute would otherwise be ignored without a word
            raise TypeError(f"method class {cls.__qualname__}: " + "; ".join(f"{name} is now {_MOVED[name]}" for name in moved)
                            + " (docs/extending.md)")

    def __init__(self, params: "Method.Params"):
        self.params = params

    @property
    def workload(self) -> Workload:
        """What this cell trains and costs, asked by estimates and packing."""
        return self.Workload(self)

    def run(self, ctx: MethodContext) -> list[dict]:
        """Train / prune / evaluate; one record per point on the curve (most methods: one)."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def default_params(cls, arch: str, params: "Method.Params") -> dict[str, Any]:
        """Values of parameters that depend on the cell, for those a grid or ``cell --set`` leaves out
        (a learning rate calibrated per architecture), or none where the dataclass defaults stand.
        The harness writes them into the cell's parameters (``fill_defaults``), so they are part of
        its id and record; changing a dataclass default instead would change what the ids of
        existing records mean (docs/design.md, Cells). ``params``: the cell's, as given. Each
        parameter it fills needs its text in ``keep_default``, so that a grid can ask for the
        dataclass default (``match`` writes it for curves at that default)."""
        return {}

    @classmethod
    def curve_label(cls, values: Mapping[str, Any]) -> str:
        """The curve (``variant`` column) of a record or CSV row with these columns (its
        parameters among them): the method's name unless a parameter makes another curve."""
        return cls.name


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def load_methods() -> dict[str, type[Method]]:
    """Register the built-in methods and every ``dwf_bench.methods`` entry point (once per process);
    returns the registry.

    Entry points that fail to load are one problem, reported once: the first call raises a
    PluginError naming each of them with its package; later calls return the methods that did load
    (a grid then reports the broken plugin once, not on each of its method lines, and a method the
    plugin would have added is an unknown method that names it)."""
    if not _LOADED:
        importlib.import_module(BUILTIN_PACKAGE)
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = point.load()
            except Exception as exc:  # noqa: BLE001 - name the plugin that broke, whatever broke it
                _BROKEN[point.name] = (f"the method plugin {point.name!r} of the package {_package_of(point)} "
                                       f"({point.value}, entry-point group {ENTRY_POINT_GROUP}) failed to load: "
                                       f"{type(exc).__name__}: {exc}")
                continue
            if isinstance(loaded, type) and issubclass(loaded, Method) and METHODS.get(loaded.name) is not loaded:
                register(loaded)
        _LOADED.append(True)
        if _BROKEN:
            packages = "that package" if len(_BROKEN) == 1 else "those packages"
            raise PluginError("; ".join(_BROKEN.values()) + f"; fix or uninstall {packages}")
    return METHODS


#: What went wrong with each plugin (by entry-point name) that failed to load: said once by load_methods,
#: recalled by get_method.
_BROKEN: dict[str, str] = {}


def _package_of(point) -> str:
    """The distribution that declares an entry point, as pip names it."""
    dist = getattr(point, "dist", None)
    return f"{dist.name!r} {dist.version}" if dist is not None else "(unknown)"


class PluginError(ValueError):
    """An installed package declares a method that cannot be loaded (bad input, not a crash)."""


def all_methods() -> dict[str, type[Method]]:
    """Every method by name, built-in and from installed packages."""
    return load_methods()


def get_method(name: str) -> type[Method]:
    try:
        return load_methods()[name]
    except KeyError:
        broken = f" (the method plugin(s) {', '.join(map(repr, _BROKEN))} failed to load)" if _BROKEN else ""
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}{broken}") from None


def param_fields(method: type[Method]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(method.Params)}


@functools.lru_cache(maxsize=None)
def _type_hints(params_cls: type) -> dict:
    """Resolved annotations of a Params class, once per class (resolving them per cell made a
    100,000-cell dry run take most of a minute)."""
    return typing.get_type_hints(params_cls)


def _field_type(method: type[Method], field: dataclasses.Field):
    return _type_hints(method.Params)[field.name]




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
    fields_ = param_fields(method)
    values = {name: _default(fields_[name]) if name in method.keep_default and value == method.keep_default[name]
              else value for name, value in (values or {}).items()}
    problems: list[tuple[str | None, str]] = []
    unknown = sorted(set(values) - set(fields_))
    if unknown:
        allowed = ", ".join(f"{n} ({_type_name(_field_type(method, f))}, default "
                            f"{f.metadata.get('shown_default', repr(_default(f)))})"
                            for n, f in fields_.items()) or "none"
        problems.append((unknown[0], f"unknown parameter(s) {unknown} for method {method.name!r}; allowed: {allowed}"))
    coerced, bad = {}, set()
    for name, value in values.items():
        if name in fields_:
            try:
                coerced[name] = coerce(value, _field_type(method, fields_[name]), f"{method.name}.{name}")
            except ValueError as exc:
                keep = method.keep_default.get(name)
                problems.append((name, str(exc) if keep is None else
                                 f"{method.name}.{name}={value!r} is not allowed: give "
                                 f"{_kind(_field_type(method, fields_[name]))} or \"{keep}\""))
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


def _kind(annotation) -> str:
    """What a value of ``annotation`` is, in words (``float | None``: "a number")."""
    union = typing.get_origin(annotation) in (typing.Union, getattr(types, "UnionType", None))
    kinds = [a for a in (typing.get_args(annotation) if union else (annotation,)) if a is not type(None)]
    words = {float: "a number", int: "an integer", bool: "true or false", str: "a text"}
    return " or ".join(words.get(kind, _type_name(kind)) for kind in kinds)


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + "/".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def non_default(params: Method.Params) -> dict:
    """The parameters that differ from their defaults (what a cell id hashes)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if getattr(params, f.name) != _default(f)}


def fill_defaults(method: type[Method], arch: str, params: Method.Params, given) -> dict:
    """What ``method.default_params`` fills in on ``arch`` for the parameters not in ``given`` (the
    names a grid entry or ``--set`` wrote, whatever their values)."""
    return {name: value for name, value in method.default_params(arch, params).items() if name not in given}


def with_defaults(method: type[Method] | str, arch: str, values: dict | None) -> dict:
    """``values`` (a cell's parameters as given) with what the method fills in on ``arch``
    (``fill_defaults``); as given when they are not valid (``make_params`` then says why)."""
    method = get_method(method) if isinstance(method, str) else method
    values = dict(values or {})
    try:
        params = make_params(method, values)
    except ValueError:
        return values
    return values | fill_defaults(method, arch, params, values)
