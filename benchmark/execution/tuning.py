"""Choosing a setting on the validation split, by one rule for every curve a grid tunes (docs/tuning.md).

An experiment's ``tune`` table names a parameter, its candidates and where they are scored::

    [experiment.tune]
    parameter = "lr"            # a method parameter or a schedule key; "lr": the method's own lr if it
                                # has one (DWF, L1), else the schedule's
    candidates = [0.025, 0.05, 0.1, 0.2, 0.4, 0.8]
    validation = 5000           # training examples held out (Schedule.validation)
    crs = [10, 100, 1000]       # where validation accuracy is scored
    seeds = [0]                 # seeds of the tuning cells
    methods = ["dwf", "snip"]   # optional: the experiment's methods it tunes (default: all of them)
    at = { lam = [1e-4, 1e-3], target_cr = [10, 100, 1000] }   # optional: sweep values of tuning cells

Every curve of a tuned method (its cells that differ only in seed and in a sweep parameter,
``SWEEP_PARAMETERS``) becomes a ``TuneGroup``. For each candidate it trains tuning cells: the
curve's settings with the candidate, the validation split held out, at the tuning seeds, and at
``at``'s values of each parameter the curve sweeps (its own values when ``at`` has none). They live
in their own results folder (``<grid>-tuning``). Once all of a group's tuning cells have a record,
``pick`` scores each candidate by ``score`` (test data never enters: only ``val_acc`` and ``cr``) and
the group's final cells are its curve with the pick, trained on the full training set as usual
after selection; a final cell whose settings the pick does not change keeps its id and record.
A pick whose training diverged in every final cell of a seed gives way to the next best (``resolve``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields

import numpy as np

from benchmark.core.method import SWEEP_PARAMETERS
from benchmark.core import method as method_base
from benchmark.core.interpolation import interpolate_log_cr
from benchmark.engine.schedule import Schedule
from benchmark.execution.cell import Cell
from benchmark.execution.records import diverged

TUNE_KEYS = {"parameter", "candidates", "validation", "crs", "seeds", "methods", "at"}
#: A scoring CR more than this factor beyond a candidate's measured CRs counts as chance accuracy
#: (nearer, it takes the nearest measured point): the matched-CR criterion of the tables.
REACH_RATIO = 1.5
RULE = ("mean validation accuracy over the tuning seeds and the scoring CRs (each interpolated in log CR "
        f"between the candidate's points; beyond them by more than {REACH_RATIO}x: chance accuracy; a failed "
        "cell gives no point); the highest wins, ties to the earlier candidate; a winner whose training diverged "
        "in every final cell of a seed (no curve for that seed) is dropped for the next best")


@dataclass(frozen=True)
class TuneSpec:
    parameter: str
    candidates: tuple
    validation: int
    crs: tuple[float, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...] | None = None
    at: tuple[tuple[str, tuple], ...] = ()

    def tunes(self, method: str) -> bool:
        return self.methods is None or method in self.methods


@dataclass
class TuneGroup:
    """One curve to tune: its final cells (as the grid wrote them) and its tuning cells per candidate."""

    spec: TuneSpec
    target: str  # "method" (a parameter of the method) or "schedule"
    finals: list[Cell]
    tuning: list[list[Cell]] = field(default_factory=list)  # per candidate
    #: the curve's final cells as the grid has them when ``finals`` is a run's selection of them: a
    #: pick's divergence check reads all of them, so that no selection changes the pick
    whole_curve: list[Cell] | None = None

    @property
    def first(self) -> Cell:
        return self.finals[0]

    @property
    def label(self) -> str:
        cell = self.first
        name = method_base.get_method(cell.method).curve_label(_values(cell))
        fixed = {k: v for k, v in sorted(cell.params.items()) if k not in SWEEP_PARAMETERS and k != self.spec.parameter}
        extra = "".join(f" {k}={v}" for k, v in fixed.items() if str(v) not in name)
        return f"{name}{extra} {cell.arch}/{cell.dataset}"

    def with_value(self, cell: Cell, value, **schedule_changes) -> Cell:
        """``cell`` with the tuned parameter set to ``value`` (and other schedule changes)."""
        params, schedule = dict(cell.params), cell.schedule
        if self.target == "method":
            params[self.spec.parameter] = value
        else:
            schedule_changes[self.spec.parameter] = value
        if schedule_changes:
            schedule = Schedule.from_dict(schedule.config() | schedule_changes)
        return Cell.make(cell.method, cell.arch, cell.dataset, cell.seed, params, schedule, cell.subset)

    def final_cells(self, value) -> list[Cell]:
        return [] if value is None else [self.with_value(cell, value) for cell in self.finals]

    def curve_cells(self, value) -> list[Cell]:
        """Every final cell of the curve at ``value``, whatever a run selected."""
        return [self.with_value(cell, value) for cell in (self.whole_curve or self.finals)]

    def all_tuning_cells(self) -> list[Cell]:
        return [cell for cells in self.tuning for cell in cells]


def target_of(method: str, parameter: str) -> str | None:
    """Where ``parameter`` lives for ``method``: "method", "schedule", or None (nowhere)."""
    if parameter in method_base.param_fields(method_base.get_method(method)):
        return "method"
    if parameter in {f.name for f in fields(Schedule)} and parameter != "validation":
        return "schedule"
    return None


def parse_spec(raw, methods_here: list[str], where: str, problems: list[str]) -> TuneSpec | None:
    """A validated TuneSpec from an experiment's ``tune`` table; problems appended with ``where``."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: tune must be a table (parameter = ..., candidates = [...], ...), got {raw!r}")
        return None
    before = len(problems)
    for key in sorted(set(raw) - TUNE_KEYS):
        problems.append(f"{where}: unknown key {key!r} in tune; allowed: {sorted(TUNE_KEYS)}")
    parameter = raw.get("parameter")
    if not isinstance(parameter, str) or not parameter:
        problems.append(f"{where}: tune needs parameter = \"<a method parameter or schedule key>\", got {parameter!r}")
    candidates = raw.get("candidates")
    if not isinstance(candidates, list) or len(candidates) < 2 or len(set(map(str, candidates))) != len(candidates):
        problems.append(f"{where}: tune.candidates must be a list of at least 2 different values, got {candidates!r}")
    validation = raw.get("validation")
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 1:
        problems.append(f"{where}: tune.validation must be a positive number of training examples to hold out "
                        f"(e.g. 5000), got {validation!r}")
    crs = raw.get("crs", [10, 100, 1000])
    if not isinstance(crs, list) or not crs or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 1 for c in crs):
        problems.append(f"{where}: tune.crs must be a non-empty list of compression ratios >= 1, got {crs!r}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds):
        problems.append(f"{where}: tune.seeds must be a non-empty list of seeds (integers in [0, 2^32 - 1]), got {seeds!r}")
    methods = raw.get("methods")
    if methods is not None:
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            problems.append(f"{where}: tune.methods must be a non-empty list of method names, got {methods!r}")
        else:
            for name in methods:
                if name not in methods_here:
                    problems.append(f"{where}: tune.methods names {name!r}, which this experiment does not run "
                                    f"(it runs: {', '.join(methods_here)})")
    at = raw.get("at", {})
    if not isinstance(at, dict) or not all(isinstance(v, list) and v for v in at.values()):
        problems.append(f"{where}: tune.at must be a table of non-empty lists, e.g. at = {{ lam = [1e-4, 1e-3] }}, "
                        f"got {at!r}")
        at = {}
    for key in at:
        if key not in SWEEP_PARAMETERS:
            problems.append(f"{where}: tune.at.{key}: only sweep parameters ({', '.join(SWEEP_PARAMETERS)}) take "
                            f"other values in tuning cells")
    if len(problems) > before:
        return None
    tuned = methods if methods is not None else methods_here
    known = method_base.all_methods()
    for name in (m for m in tuned if m in known):  # an unknown method is reported with its own table
        if target_of(name, parameter) is None:
            problems.append(f"{where}: tune.parameter {parameter!r} is neither a parameter of method {name!r} nor a "
                            f"schedule setting; name one both have, or list the methods it applies to in tune.methods")
    if len(problems) > before:
        return None
    return TuneSpec(parameter, tuple(candidates), validation, tuple(float(c) for c in crs), tuple(seeds),
                    None if methods is None else tuple(methods), tuple((k, tuple(v)) for k, v in at.items()))


def group_key(spec: TuneSpec, cell: Cell) -> tuple:
    """Cells with equal keys are one curve: equal in all but the seed and the sweep parameters."""
    target = target_of(cell.method, spec.parameter)
    params = {k: v for k, v in cell.params.items() if k not in SWEEP_PARAMETERS and not (
        target == "method" and k == spec.parameter)}
    schedule = cell.schedule.config()
    if target == "schedule":
        schedule.pop(spec.parameter, None)
    return (spec, cell.method, cell.arch, cell.dataset, cell.subset, repr(sorted(params.items())),
            repr(sorted(schedule.items())))


def build_groups(spec: TuneSpec, finals: list[Cell]) -> list[TuneGroup]:
    """The tune groups of ``finals`` (one experiment's cells of tuned methods), tuning cells included."""
    by_key: dict[tuple, TuneGroup] = {}
    for cell in finals:
        key = group_key(spec, cell)
        if key not in by_key:
            by_key[key] = TuneGroup(spec, target_of(cell.method, spec.parameter), [])
        by_key[key].finals.append(cell)
    at = dict(spec.at)
    for group in by_key.values():
        sweeps: dict[str, list] = {}
        for name in SWEEP_PARAMETERS:
            values = list(dict.fromkeys(getattr(c.method_params, name) for c in group.finals
                                        if hasattr(c.method_params, name)))
            if values:
                sweeps[name] = list(at[name]) if name in at and len(values) > 1 else values
        template = group.first
        for candidate in spec.candidates:
            cells: dict[str, Cell] = {}
            for combo in _product(sweeps):
                for seed in spec.seeds:
                    base = Cell.make(template.method, template.arch, template.dataset, seed,
                                     dict(template.params) | combo, template.schedule, template.subset)
                    cell = group.with_value(base, candidate, validation=spec.validation)
                    cells.setdefault(cell.id, cell)
            group.tuning.append(list(cells.values()))
    return list(by_key.values())


def _product(sweeps: dict[str, list]) -> list[dict]:
    combos = [{}]
    for name, values in sweeps.items():
        combos = [c | {name: v} for c in combos for v in values]
    return combos


def _values(cell: Cell) -> dict:
    from dataclasses import asdict

    return asdict(cell.method_params)


# -- the rule --------------------------------------------------------------------------------------

def score(points: list[tuple[float, float]], crs: tuple[float, ...], chance: float, *,
          without_crs: bool = False) -> float:
    """One seed's score of one candidate: its mean validation accuracy at ``crs`` from its
    (CR, validation accuracy) points (``RULE``). A curve ``without_crs`` (the dense model): their
    mean. A compressing curve whose points all stayed at CR 1 reaches none of ``crs``: chance there,
    like any curve that stops short (it once scored its dense accuracy and won: docs/tuning.md)."""
    if not points:
        return chance
    cr = np.array([p[0] for p in points], float)
    acc = np.array([p[1] for p in points], float)
    if without_crs:
        return float(acc.mean())
    order = np.argsort(cr, kind="stable")
    cr, acc = cr[order], acc[order]
    unique, inverse = np.unique(cr, return_inverse=True)  # equal CRs: their mean accuracy
    mean_acc = np.bincount(inverse, weights=acc) / np.bincount(inverse)
    values = []
    for target in crs:
        inside = interpolate_log_cr(unique, mean_acc, target)[0]
        if math.isfinite(inside):
            values.append(inside)
        elif unique[0] / REACH_RATIO <= target < unique[0]:
            values.append(mean_acc[0])
        elif unique[-1] < target <= unique[-1] * REACH_RATIO:
            values.append(mean_acc[-1])
        else:
            values.append(chance)
    return float(np.mean(values))


@dataclass
class Pick:
    """A group's choice: the candidates' scores, the pick, and what the tuning cost."""

    group: TuneGroup
    scores: list[float]
    value: object  # None: every candidate was dropped
    cells: int
    cpu_hours: float
    #: candidates dropped because their training diverged in every final cell of a seed: {candidate: those cells}
    dropped: dict = field(default_factory=dict)

    def row(self) -> dict:
        cell = self.group.first
        return {"curve": self.group.label, "method": cell.method, "arch": cell.arch, "dataset": cell.dataset,
                "parameter": self.group.spec.parameter, "where": self.group.target, "pick": self.value,
                "candidates": list(self.group.spec.candidates), "val_scores": [round(s, 6) for s in self.scores],
                "crs": list(self.group.spec.crs), "seeds": list(self.group.spec.seeds),
                "validation": self.group.spec.validation, "tuning_cells": self.cells,
                "tuning_cpu_hours": round(self.cpu_hours, 4), "rule": RULE, "dropped": dict(self.dropped),
                "final_cells": [c.id for c in self.group.final_cells(self.value)]}


def pick(group: TuneGroup, results: dict[str, dict | None], num_classes: int, dropped: dict | None = None) -> Pick | None:
    """The group's pick from its tuning cells' results (``Store.read`` of each id), or None while one
    has none or is blocked. Only ``val_acc`` and ``cr`` of the records are read. ``dropped`` candidates
    (diverged in final cells: ``resolve``) cannot win; value None when every candidate is dropped."""
    chance = 1.0 / num_classes
    without_crs = method_base.get_method(group.first.method).is_reference
    scores, cells, cpu_seconds = [], 0, 0.0
    for candidate_cells in group.tuning:
        by_seed: dict[int, list[tuple[float, float]]] = {seed: [] for seed in group.spec.seeds}
        for cell in candidate_cells:
            result = results.get(cell.id)
            if result is None or result.get("status") == "blocked":
                return None
            cells += 1
            records = result.get("records") or []
            cpu_seconds += _cpu_seconds(records[0]) if records else 0.0  # every record repeats its cell's wall_s
            for record in records:
                if record.get("status") == "ok" and _finite(record.get("val_acc")) and _finite(record.get("cr")):
                    by_seed[cell.seed].append((float(record["cr"]), float(record["val_acc"])))
        scores.append(float(np.mean([score(points, group.spec.crs, chance, without_crs=without_crs)
                                     for points in by_seed.values()])))
    dropped = dict(dropped or {})
    eligible = [i for i, c in enumerate(group.spec.candidates) if c not in dropped]
    best = max(eligible, key=lambda i: (scores[i], -i), default=None)
    value = None if best is None else group.spec.candidates[best]
    return Pick(group, scores, value, cells, cpu_seconds / 3600, dropped)


def lost_seeds(cells: list[Cell], read_final) -> int:
    """How many diverged cells the seeds have whose every final cell diverged (0: every seed has a
    curve, or has cells still to run)."""
    by_seed: dict[int, list[bool]] = {}
    for cell in cells:
        by_seed.setdefault(cell.seed, []).append(diverged(read_final(cell.id)))
    return sum(len(flags) for flags in by_seed.values() if all(flags))


#: A pick at an end of its candidates asks for the next candidate only when it leads the next best
#: score by more than this many standard errors of a difference of two validation accuracies
#: (docs/tuning.md, "A pick at an end"): a lead within it is noise the validation split cannot resolve.
EDGE_LEAD_SE = 2.0


def edge_resolution(first: float, second: float, examples: int) -> float:
    """EDGE_LEAD_SE standard errors of the difference of two accuracies ``first`` and ``second``, each
    measured on ``examples`` validation examples (binomial, as if independent: sampling error only,
    so seed-to-seed noise comes on top and the yardstick errs towards extending)."""
    p = np.clip([first, second], 0.0, 1.0)
    return EDGE_LEAD_SE * float(np.sqrt(np.sum(p * (1 - p)) / examples))


def edge_note(candidates: list, value, scores: list | None = None, examples: int | None = None) -> str:
    """Where a numeric pick is the smallest or largest of several candidates, the words that say the
    best setting may lie beyond them (a reviewer asks for the range to be extended before trusting
    the pick); else "". With the candidates' ``scores`` and the number of validation ``examples``
    behind each (validation size x tuning seeds), an end whose lead over the next best is within
    ``edge_resolution`` says the candidates do not resolve that end instead: no extension is asked.
    Categorical candidates have no edge."""
    if value is None or len(candidates) < 2 or not all(map(_finite, [*candidates, value])):
        return ""
    if float(value) == max(map(float, candidates)):
        where, beyond = "the largest candidate", "above"
    elif float(value) == min(map(float, candidates)):
        where, beyond = "the smallest candidate", "below"
    else:
        return ""
    at = [float(c) for c in candidates].index(float(value))
    others = [float(s) for i, s in enumerate(scores or []) if i != at and _finite(s)]
    if not examples or not others or at >= len(scores) or not _finite(scores[at]):
        return f"{where}: the best may lie {beyond}; extend the candidates"
    lead, resolution = float(scores[at]) - max(others), edge_resolution(float(scores[at]), max(others), examples)
    if lead <= resolution:
        return (f"{where}, but its lead over the next best ({100 * lead:.2f} points) is within the validation "
                f"split's resolution ({100 * resolution:.2f}): the candidates do not resolve this end; not extended")
    return (f"{where}, {100 * lead:.2f} points ahead of the next best (resolution {100 * resolution:.2f}): "
            f"the best may lie {beyond}; extend the candidates")


def dropped_note(parameter: str, dropped: dict) -> str:
    """The words that say which candidates a curve lost to diverged final training (``resolve``)."""
    return "; ".join(f"{parameter}={value:g} dropped: its training diverged in every final cell of a seed ({int(count)} cells)"
                     if _finite(value) else
                     f"{parameter}={value} dropped: its training diverged in every final cell of a seed ({int(count)} cells)"
                     for value, count in dropped.items())


def _finite(value) -> bool:
    """A finite number, numpy's too (a CSV's integers come back as numpy integers: numbers.Real, not int)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _cpu_seconds(record: dict) -> float:
    wall, threads = record.get("wall_s"), record.get("threads") or 1
    return float(wall) * float(threads) if _finite(wall) and _finite(threads) else 0.0


# -- the runner's side -----------------------------------------------------------------------------

#: The file of a grid's picks, beside its results.csv: one row per tuned curve and candidate.
TABLE = "tuning.csv"
#: Columns ``collect`` adds to the rows of tuned curves' final cells.
PICK_COLUMNS = ("tuned_parameter", "tuned_value", "tuning_val_scores", "tuning_cells", "tuning_cpu_hours")


def folder(grid_name: str) -> str:
    """The results folder of a grid's tuning cells (a grid folder of its own, beside the grid's)."""
    return f"{grid_name}-tuning"


def tuning_cells(groups: list[TuneGroup]) -> list[Cell]:
    unique: dict[str, Cell] = {}
    for group in groups:
        for cell in group.all_tuning_cells():
            unique.setdefault(cell.id, cell)
    return list(unique.values())


def resolve(groups: list[TuneGroup], read, read_final=None) -> tuple[list[Pick], list[tuple[TuneGroup, int, int]]]:
    """(picks, waiting): each group's pick from ``read(cell_id)`` (a tuning cell's result dict or
    None), or (group, tuning cells with a usable result, tuning cells) while it waits. With
    ``read_final`` (the same for final cells), a pick that left a seed without a curve (every final
    cell of that seed diverged) is dropped and the next best taken, until none has (``RULE``): a rate
    that trained on the tuning split can still be at the edge of stability on the full set. A point
    that diverged where the seed's others trained is a result (the curve ends there), not a reason."""
    from benchmark.engine.data import get_spec

    picks, waiting = [], []
    for group in groups:
        ids = [cell.id for cell in group.all_tuning_cells()]
        results = {cell_id: read(cell_id) for cell_id in ids}
        classes = get_spec(group.first.dataset).num_classes
        chosen = pick(group, results, classes)
        while chosen is not None and chosen.value is not None and read_final is not None:
            failed = lost_seeds(group.curve_cells(chosen.value), read_final)
            if not failed:
                break
            chosen = pick(group, results, classes, chosen.dropped | {chosen.value: failed})
        if chosen is None:
            usable = sum(1 for r in results.values() if r is not None and r.get("status") != "blocked")
            waiting.append((group, usable, len(ids)))
        else:
            picks.append(chosen)
    return picks, waiting


def picked_finals(picks: list[Pick]) -> list[Cell]:
    """The final cells the picks make: each curve's cells with its picked value."""
    return [cell for chosen in picks for cell in chosen.group.final_cells(chosen.value)]


def dropped_finals(picks: list[Pick]) -> list[Cell]:
    """The final cells of candidates dropped for diverged training: not the curve any more, but their
    records are what dropped them, so they stay beside it."""
    return [cell for chosen in picks for value in chosen.dropped for cell in chosen.group.curve_cells(value)]


def table_rows(picks: list[Pick]) -> list[dict]:
    """Tidy rows of ``TABLE``: one per curve and candidate."""
    rows = []
    for chosen in picks:
        info = chosen.row()
        for candidate, value in zip(chosen.group.spec.candidates, chosen.scores):
            rows.append({"curve": info["curve"], "method": info["method"], "arch": info["arch"],
                         "dataset": info["dataset"], "parameter": info["parameter"], "where": info["where"],
                         "candidate": candidate, "val_score": value, "picked": candidate == chosen.value,
                         "validation": info["validation"], "crs": " ".join(f"{c:g}" for c in info["crs"]),
                         "seeds": " ".join(map(str, info["seeds"])), "tuning_cells": info["tuning_cells"],
                         "tuning_cpu_hours": info["tuning_cpu_hours"],
                         "final_diverged": chosen.dropped.get(candidate, 0),
                         "final_cells": " ".join(info["final_cells"]) if candidate == chosen.value else ""})
    return rows


def pick_columns(table) -> dict[str, dict]:
    """Per final cell id, the ``PICK_COLUMNS`` values ``TABLE`` (a DataFrame) gives it."""
    out: dict[str, dict] = {}
    for (curve, arch, dataset), rows in table.groupby(["curve", "arch", "dataset"], sort=False):
        chosen = rows[rows["picked"].astype(str).str.lower() == "true"]
        if len(chosen) != 1:
            continue
        row = chosen.iloc[0]
        scores = " ".join(f"{c}:{s:.4f}" for c, s in zip(rows["candidate"], rows["val_score"].astype(float)))
        values = {"tuned_parameter": row["parameter"], "tuned_value": row["candidate"], "tuning_val_scores": scores,
                  "tuning_cells": row["tuning_cells"], "tuning_cpu_hours": row["tuning_cpu_hours"]}
        for cell_id in str(row["final_cells"]).split():
            out[cell_id] = values
    return out
