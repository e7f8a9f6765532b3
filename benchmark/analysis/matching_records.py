"""What matching works on and fills in: the grid's swept curves (``Family``: cells that differ only in
the swept λ or target_cr and the seed), what the grid holds of each, and the ``Match`` that the λ-curve
and baseline proposers fill and ``matching_output`` prints.

Kept apart from the proposers so both can fill one record without importing each other or the
module that runs them (``matching``); the rules themselves are in that module's docstring.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: A point within this many accuracy points of 1/classes is at chance.
CHANCE_POINTS = 2.0
#: The swept parameter of a λ curve and of a baseline curve.
LAM, TARGET = "lam", "target_cr"
_REL = 1e-6  # λs / targets closer than this (relative) are the same value


def same_value(a: float, b: float) -> bool:
    """Whether two λs (or targets) are one grid value, read back from floats in a CSV."""
    return abs(a - b) <= _REL * max(abs(a), abs(b))


def has_value(values, value: float) -> bool:
    """Whether ``values`` holds ``value`` (``same_value``): a λ the grid has already is never proposed."""
    return any(same_value(v, value) for v in values)


@dataclass(frozen=True)
class Family:
    """One curve: the grid's cells that differ only in the swept parameter and the seed."""

    method: str
    arch: str
    dataset: str
    params: tuple  # sorted (name, value) of the non-default parameters other than the swept one
    schedule: object  # benchmark.engine.schedule.Schedule
    subset: int | None
    swept: str

    def cell(self, value: float, seed: int):
        from benchmark.execution.cell import Cell

        return Cell.make(self.method, self.arch, self.dataset, seed, dict(self.params) | {self.swept: value},
                         self.schedule, self.subset)

    def settings(self) -> str:
        """The schedule, for a label: ``30 ep, lr 0.15``."""
        subset = f", subset {self.subset}" if self.subset else ""
        return f"{self.schedule.epochs} ep, lr {self.schedule.lr:g}{subset}"


@dataclass
class FamilyCells:
    """What the grid holds of one family: its values per seed, and its label."""

    family: Family
    label: str
    values: set = field(default_factory=set)
    seeds: set = field(default_factory=set)
    ids: dict = field(default_factory=dict)  # cell id -> (value, seed)


@dataclass
class Match:
    """What ``matching.match_grid`` found for one grid: the gaps and extensions, and the values to add."""

    grid: str  # the grid's name
    grid_arg: str  # how to name it again: a preset's name, or the absolute path of its file
    folder: Path
    crs: tuple
    ratio: float
    reach_points: float
    rows: int
    gaps: list = field(default_factory=list)
    complete: list = field(default_factory=list)  # (label, seeds matched, seeds) of λ curves that need nothing
    jumps: list = field(default_factory=list)  # (label, seeds with gaps, seeds measured): only jumps left
    proposals: dict = field(default_factory=dict)  # Family -> sorted λs
    extensions: list = field(default_factory=list)
    seeds: dict = field(default_factory=dict)  # Family -> sorted seeds of the grid
    labels: dict = field(default_factory=dict)  # Family -> label
    notes: list = field(default_factory=list)

    def added(self) -> dict:
        """Family -> sorted values to add (λ curves and baselines)."""
        out = {f: list(v) for f, v in self.proposals.items() if v}
        for ext in self.extensions:
            if ext.values:
                out[ext.family] = list(ext.values)
        return out

    def cells(self) -> list:
        return [family.cell(value, seed) for family, values in self.added().items()
                for value in values for seed in self.seeds[family]]


def families(cells) -> dict[Family, FamilyCells]:
    """The grid's λ and baseline curves, each with its values, seeds and cell ids."""
    from benchmark.core.method import get_method

    out: dict[Family, FamilyCells] = {}
    for cell in cells:
        method = get_method(cell.method)
        fields = {f for f in asdict(cell.method_params)}
        if method.is_reference or not (LAM in fields or TARGET in fields):
            continue
        swept = LAM if LAM in fields else TARGET
        value = float(getattr(cell.method_params, swept))
        params = tuple(sorted((k, v) for k, v in cell.params.items() if k != swept))
        family = Family(cell.method, cell.arch, cell.dataset, params, cell.schedule, cell.subset, swept)
        if family not in out:
            name = method.curve_label(asdict(cell.method_params))
            extra = ",".join(f"{k}={v}" for k, v in params if str(v) not in name)
            out[family] = FamilyCells(family, f"{cell.arch}/{cell.dataset} {name}" + (f" [{extra}]" if extra else ""))
        entry = out[family]
        entry.values.add(value)
        entry.seeds.add(cell.seed)
        entry.ids[cell.id] = (value, cell.seed)
    labels = defaultdict(list)
    for entry in out.values():
        labels[entry.label].append(entry)
    for same in labels.values():  # one label, several schedules: name the schedule
        if len(same) > 1:
            for entry in same:
                entry.label += f" ({entry.family.settings()})"
    return out


def chance_level(dataset: str) -> float:
    """1/classes: past a point this close to it, a curve has nothing left to measure."""
    from benchmark.engine.data import get_spec

    return 1.0 / get_spec(dataset).num_classes
