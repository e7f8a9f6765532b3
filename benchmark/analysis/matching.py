"""Matched CRs: which extra cells a grid needs so that every curve is measured near every reported CR.

Regularized methods (those with a ``lam`` parameter: DWF, L1) reach a CR that is an outcome of λ,
and the tables interpolate each seed's curve in log CR without extrapolating, so a seed whose points
lie far apart around a reported CR is interpolated across a wide gap, and one that stops short of it
has no value there. Pruning baselines (methods with a ``target_cr`` parameter) stop at the grid's
largest target, which caps "largest CR within k points of dense" for them while DWF runs further.
``match_grid`` reads a grid and its results so far and proposes the cells that close both
(docs/matching.md):

- **λ curves.** A curve is one method x arch x dataset x parameters x schedule x subset: the grid's
  cells that differ only in λ and seed. Every seed on its own needs a measured point within ``ratio``
  (default 1.5x) of each reported CR and, since tables never extrapolate, the CR inside its measured
  range, up to where the curve reaches chance (a point within ``CHANCE_POINTS`` of 1/classes, or a
  run that pruned every weight: CRs past it are not needed). A gap between two measured points gets
  the λ interpolated linearly in log λ against log CR between the seed's own two points around it,
  on a piece where CR grows with λ (consecutive λs of the grid); past the seed's largest (or below
  its smallest) CR the λ moves one step along its last (first) segment's slope, aimed at
  ``sqrt(ratio)`` beyond the CR and at most ``MAX_STEP``; without a usable slope λ moves by the
  fixed ``FIXED_STEP`` (10^0.25, a quarter decade). Gaps around a λ of the grid that has not run
  yet for that seed wait for it instead; a gap between λs less than ``MIN_SPLIT`` apart (the CR
  jumps there) is not split further.
- **Proposals.** λ rounded to 3 significant digits; the seeds' λs for one reported CR within
  ``MERGE_FACTOR`` of each other become one (their geometric mean), since the grid crosses every λ
  with every seed; λs the grid has already are never proposed.
- **Baselines.** A λ curve reaches as far as a seed of it stays within ``reach_points`` (default 10,
  the report's widest tolerance) of dense: its "largest CR within k points", never past its last point
  above chance. Each baseline curve of the panel whose largest target is below that reach gets the
  next targets of the 1-2-5 sequence up to the first one at or past it, never more than the model's
  prunable weights; none while its largest target has not run for every seed, and none when every
  seed's last point is at chance or more than ``reach_points`` below dense (its tolerance numbers are
  not capped by the grid).

``matching_output.write_grid`` writes the proposed cells as a grid TOML (one experiment per curve, its full schedule
and parameters), and checks that it parses into exactly those cells. Never trains.
"""

from __future__ import annotations

import math
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.analysis import curves as cv
from benchmark.analysis import tables as tb

#: Reported CRs of the tables (the report's fixed CRs and the ones between).
REPORTED_CRS = (10.0, 30.0, 100.0, 300.0, 1000.0)
#: A seed needs a measured point within this factor of each reported CR.
RATIO = 1.5
#: A point within this many accuracy points of 1/classes is at chance.
CHANCE_POINTS = 2.0
#: Extrapolation: at most this factor in λ per step; this fixed factor where no slope is usable.
MAX_STEP = 10 ** 0.5
FIXED_STEP = 10 ** 0.25
#: Two λs closer than this factor are not split further (the curve jumps there: an L1 collapse).
MIN_SPLIT = 1.05
#: Proposals of different seeds for one reported CR this close in λ become one λ.
MERGE_FACTOR = 1.1
#: A λ curve reaches as far as it stays within this many points of dense (the report's widest tolerance).
REACH_POINTS = max(tb.TOLERANCE_POINTS)
#: The swept parameter of a λ curve and of a baseline curve.
LAM, TARGET = "lam", "target_cr"
_REL = 1e-6  # λs / targets closer than this (relative) are the same value


def round3(value: float) -> float:
    """``value`` to 3 significant digits."""
    return float(f"{value:.3g}")


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= _REL * max(abs(a), abs(b))


def _has(values, value: float) -> bool:
    return any(_same(v, value) for v in values)


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
class Gap:
    """A reported CR that one seed of a λ curve does not match, and what closes it."""

    label: str
    family: Family
    seed: int
    cr: float
    nearest: float  # nearest measured finite CR (nan: none)
    ratio: float  # max(nearest/cr, cr/nearest)
    reason: str  # "gap", "beyond" (past the last point), "below" (before the first point)
    between: tuple | None  # ((λ, CR), (λ, CR)) around the gap, or the points a step is taken from
    raw: float | None = None  # the seed's own λ, before rounding and merging
    proposed: float | None = None  # the λ that the written grid adds for it
    note: str = ""  # why nothing is proposed (waits on grid cells, not monotone, ...)


@dataclass
class Extension:
    """A baseline curve and the targets that take it past the λ curves' reach."""

    label: str
    family: Family
    grid_max: float
    reach: float  # largest CR within reach_points of dense of a λ curve seed in the panel (0: none)
    reach_by: str
    values: list = field(default_factory=list)
    note: str = ""


@dataclass
class Match:
    grid: str  # the grid's name
    grid_arg: str  # how to name it again: a preset's name, or the absolute path of its file
    folder: Path
    crs: tuple
    ratio: float
    reach_points: float
    rows: int
    gaps: list = field(default_factory=list)
    complete: list = field(default_factory=list)  # (label, seeds) of λ curves that need nothing
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


# -- reading --------------------------------------------------------------------------------------


def read_results(grid: str, results_dir) -> tuple[Path, cv.Results | None, list[str]]:
    """The grid's results so far: its results.csv, or, where the result files are newer (a run still
    going), those collected in memory (the folder is left as it is). None when there are none yet."""
    from benchmark.execution.grids import grid_folder
    from benchmark.execution.store import Store

    store = Store(results_dir, grid_folder(grid, reading=True))
    said = []
    csv = store.root / "results.csv"
    if store.stale_csvs():
        table, _, _ = store.tables()
        if table.empty:
            return store.root, None, [f"{store.root}: no result files yet"]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "results.csv"
            table.to_csv(path, index=False)
            results = cv.load_results(path)
        said.append(f"read the {len(table)} records of {store.cells_dir} ({store.stale_csvs()}; not written)")
        return store.root, results, said
    if not csv.is_file():
        return store.root, None, [f"{store.root}: no results yet ({csv} does not exist)"]
    return store.root, cv.load_results(csv), said


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
    from benchmark.engine.data import get_spec

    return 1.0 / get_spec(dataset).num_classes


# -- λ curves -------------------------------------------------------------------------------------


def seed_points(rows: pd.DataFrame) -> pd.DataFrame:
    """One seed's ok points as (value, cr, acc), sorted by value; records of one value averaged."""
    ok = rows[(rows.status == "ok") & np.isfinite(rows.test_acc) & rows.cr.notna() & (rows.cr > 0)]
    return ok.groupby("value", sort=True).agg(cr=("cr", "mean"), acc=("test_acc", "mean")).reset_index()


def seed_gaps(points: pd.DataFrame, crs, ratio: float, chance: float, pending: list[float]) -> list[dict]:
    """The reported CRs one seed's points do not match, each with the raw λ that would close it (or
    why there is none). ``points`` as ``seed_points``; ``pending``: grid values not yet run here."""
    lam, cr, acc = points.value.to_numpy(float), points.cr.to_numpy(float), points.acc.to_numpy(float)
    if not len(lam):
        return []
    at_chance = acc <= chance + CHANCE_POINTS / 100 + 1e-12
    at_chance |= np.isinf(cr)  # every weight pruned: nothing is left to measure past it
    chance_cr = float(cr[at_chance].min()) if at_chance.any() else math.inf
    finite = np.isfinite(cr)
    lo, hi = float(cr[finite].min()) if finite.any() else math.inf, float(cr.max())
    out = []
    for c in crs:
        if c > chance_cr * (1 + 1e-9):
            continue
        near = float(cr[finite][np.argmin(np.abs(np.log(cr[finite] / c)))]) if finite.any() else math.nan
        far = max(near / c, c / near) if math.isfinite(near) else math.inf
        if c > hi * (1 + 1e-9):
            reason = "beyond"
        elif c < lo * (1 - 1e-9):
            reason = "below"
        elif far > ratio * (1 + 1e-9):
            reason = "gap"
        else:
            continue
        gap = {"cr": c, "nearest": near, "ratio": far, "reason": reason, "between": None, "raw": None, "note": ""}
        if reason == "gap":
            _interpolate(gap, lam, cr, c, pending)
        else:
            _step(gap, lam, cr, c, ratio, pending, up=reason == "beyond")
        out.append(gap)
    return out


def _interpolate(gap: dict, lam, cr, c: float, pending) -> None:
    """Log λ linear in log CR between consecutive λs whose CRs straddle ``c`` upward (the one with
    the largest λ if several); the geometric mean of the λs when the upper point pruned everything."""
    pieces = [j for j in range(len(lam) - 1) if cr[j] < c < cr[j + 1]]
    if not pieces:
        gap["note"] = "CR does not grow with λ around this CR; no λ proposed"
        return
    j = pieces[-1]
    gap["between"] = ((lam[j], cr[j]), (lam[j + 1], cr[j + 1]))
    if lam[j + 1] < lam[j] * MIN_SPLIT:
        gap["note"] = (f"CR jumps from {cr[j]:.4g} to {cr[j + 1]:.4g} between λs less than "
                       f"{100 * (MIN_SPLIT - 1):.0f}% apart; not split further")
        return
    waiting = [v for v in pending if lam[j] < v < lam[j + 1]]
    if waiting:
        gap["note"] = "waits on grid λ " + ", ".join(f"{v:g}" for v in waiting) + " (not run yet)"
        return
    if math.isinf(cr[j + 1]):
        t = 0.5
    else:
        t = math.log(c / cr[j]) / math.log(cr[j + 1] / cr[j])
    gap["raw"] = math.exp(math.log(lam[j]) + t * (math.log(lam[j + 1]) - math.log(lam[j])))


def _step(gap: dict, lam, cr, c: float, ratio: float, pending, up: bool) -> None:
    """One step past the seed's largest (``up``) or below its smallest λ: along the slope of log λ
    against log CR of its last (first) two points, aimed at sqrt(ratio) past ``c``, at most
    ``MAX_STEP``; ``FIXED_STEP`` where that slope is not usable (one point, CR not growing)."""
    finite = np.isfinite(cr)
    if not finite.any():  # every run so far pruned everything: step below the smallest λ
        lam, cr = lam[:1], np.array([math.inf])
    else:
        lam, cr = lam[finite], cr[finite]
    ends = [len(lam) - 2, len(lam) - 1] if up else [0, 1]
    base = lam[-1] if up else lam[0]
    waiting = [v for v in pending if (v > base if up else v < base)]
    if waiting:
        gap["note"] = "waits on grid λ " + ", ".join(f"{v:g}" for v in waiting) + " (not run yet)"
        return
    step = FIXED_STEP
    if len(lam) >= 2 and cr[ends[1]] > cr[ends[0]] * 1.01 and cr[ends[0]] > 1.01:
        (l0, c0), (l1, c1) = (lam[ends[0]], cr[ends[0]]), (lam[ends[1]], cr[ends[1]])
        gap["between"] = ((l0, c0), (l1, c1))
        slope = math.log(l1 / l0) / math.log(c1 / c0)
        aim = c * math.sqrt(ratio) if up else c / math.sqrt(ratio)
        from_cr = cr[-1] if up else cr[0]
        step = min(MAX_STEP, max(MIN_SPLIT, (aim / from_cr) ** slope if up else (from_cr / aim) ** slope))
    else:
        gap["between"] = ((base, cr[-1] if up else cr[0]),)
    gap["raw"] = base * step if up else base / step


def match_lambda(match: Match, fam: FamilyCells, rows: pd.DataFrame) -> None:
    """Fill ``match`` with one λ curve's gaps and proposals (seeds each on their own)."""
    family, chance = fam.family, chance_level(fam.family.dataset)
    gaps = []
    for seed in sorted(fam.seeds):
        mine = rows[rows.seed == seed]
        run = set(mine.value)
        pending = sorted(v for v in fam.values if not _has(run, v))
        points = seed_points(mine)
        if points.empty:
            match.notes.append(f"{fam.label} seed {seed}: no ok results yet ({len(pending)} of its "
                               f"{len(fam.values)} cells not run, {len(run)} failed or blocked)")
            continue
        for g in seed_gaps(points, match.crs, match.ratio, chance, pending):
            gaps.append(Gap(fam.label, family, seed, **g))
    if not gaps:
        match.complete.append((fam.label, len(fam.seeds)))
        return
    # round, merge the seeds' λs for one CR, drop what the grid has
    by_cr = defaultdict(list)
    for g in gaps:
        if g.raw is not None:
            by_cr[g.cr].append(g)
    chosen = set()
    for group in by_cr.values():
        group.sort(key=lambda g: g.raw)
        clusters: list[list[Gap]] = []
        for g in group:
            if clusters and g.raw <= clusters[-1][0].raw * MERGE_FACTOR:
                clusters[-1].append(g)
            else:
                clusters.append([g])
        for cluster in clusters:
            merged = round3(math.exp(np.mean([math.log(g.raw) for g in cluster])))
            if _has(fam.values, merged):  # merged onto a grid λ: each seed's own instead
                for g in cluster:
                    _choose(g, round3(g.raw), fam.values, chosen)
            else:
                for g in cluster:
                    g.proposed = merged
                chosen.add(merged)
    match.gaps += gaps
    match.proposals[family] = sorted(chosen)


def _choose(gap: Gap, value: float, grid_values, chosen: set) -> None:
    if _has(grid_values, value):
        gap.note = f"its λ {value:g} (3 digits) is in the grid already; the λs around it are too close to split"
    else:
        gap.proposed = value
        chosen.add(value)


# -- baselines ------------------------------------------------------------------------------------


def one_two_five(above: float, upto: float) -> list[float]:
    """The 1-2-5 sequence's values after ``above``, up to and including the first one >= ``upto``."""
    out, exponent = [], math.floor(math.log10(above)) if above > 0 else 0
    while not out or out[-1] < upto * (1 - 1e-9):
        for mantissa in (1, 2, 5):
            value = float(mantissa * 10 ** exponent)
            if value > above * (1 + 1e-9) and (not out or out[-1] < upto * (1 - 1e-9)):
                out.append(value)
        exponent += 1
    return out


def seed_reach(points: pd.DataFrame, chance: float, dense: float, reach_points: float) -> float:
    """How far one seed of a λ curve reaches: its largest CR within ``reach_points`` of ``dense``
    (``curves.largest_cr_within``, the tolerance table's number), and never past its last point above
    chance; without a dense accuracy, its largest CR above chance. 0 when no point counts."""
    finite = points[np.isfinite(points.cr)].sort_values("cr")
    above = finite[finite.acc > chance + CHANCE_POINTS / 100 + 1e-12]
    if above.empty:
        return 0.0
    if not math.isfinite(dense):
        return float(above.cr.max())
    found, _ = cv.largest_cr_within(finite.cr.to_numpy(float), finite.acc.to_numpy(float), dense, reach_points)
    found = min(found, float(above.cr.max()))
    return found if found > 1 + 1e-9 else 0.0


def match_baseline(match: Match, fam: FamilyCells, rows: pd.DataFrame, reach: float, reach_by: str,
                   dense: dict) -> None:
    """One baseline curve: the targets of the 1-2-5 sequence past its grid's largest, up to the first
    one at or past ``reach``, within the model's prunable weights; none while its largest target has
    not run for every seed, or when every seed's last point is at chance or more than
    ``match.reach_points`` below its dense accuracy (then its tolerance numbers are not capped by
    the grid)."""
    from benchmark.execution.cell import prunable_weights

    family = fam.family
    grid_max = max(fam.values)
    ext = Extension(fam.label, family, grid_max, reach, reach_by)
    match.extensions.append(ext)
    if not reach > 0:
        ext.note = "no λ curve of this panel reaches past CR 1 within the tolerance yet"
        return
    if grid_max >= reach * (1 - 1e-9):
        ext.note = "its grid reaches past every λ curve already"
        return
    run = set(rows.cell_id)
    waiting = sorted({seed for cid, (value, seed) in fam.ids.items() if cid not in run and _same(value, grid_max)})
    if waiting:
        ext.note = (f"waits on its target_cr {grid_max:g} (not run yet for seed(s) "
                    f"{', '.join(map(str, waiting))})")
        return
    chance = chance_level(family.dataset) + CHANCE_POINTS / 100 + 1e-12
    ok = rows[(rows.status == "ok") & np.isfinite(rows.test_acc) & rows.cr.notna()]
    lasts = {seed: g.sort_values("cr").iloc[-1] for seed, g in ok.groupby("seed")}
    if lasts and set(lasts) >= fam.seeds:
        if all(r.test_acc <= chance or math.isinf(r.cr) for r in lasts.values()):
            ext.note = "at chance at its largest CR for every seed; nothing past it"
            return
        low = [seed for seed, r in lasts.items()
               if r.test_acc < dense.get(seed, math.nan) - match.reach_points / 100 - 1e-12]
        if len(low) == len(lasts):
            ext.note = (f"more than {match.reach_points:g} points below dense at its largest CR for every seed: "
                        f"its tolerance CRs are not capped by the grid")
            return
    limit = prunable_weights(family.arch, family.dataset)
    values = one_two_five(grid_max, reach)
    kept = [v for v in values if v <= limit]
    notes = [] if lasts else ["no ok results of its own"]
    if len(kept) < len(values):
        notes.append(f"{', '.join(f'{v:g}' for v in values if v > limit)} left out: the model has {limit:,} "
                     f"prunable weights")
    good = []
    for value in kept:
        if _has(fam.values, value):
            continue
        try:
            family.cell(value, min(fam.seeds))
        except ValueError as exc:
            notes.append(f"{value:g} left out: {exc}")
            continue
        good.append(value)
    ext.values, ext.note = good, "; ".join(notes)


# -- the whole grid -------------------------------------------------------------------------------


def match_grid(grid: str, results_dir="results", crs=REPORTED_CRS, ratio: float = RATIO,
               reach_points: float = REACH_POINTS) -> Match:
    """Read grid ``grid`` (a preset or a file) and its results so far; propose what closes the gaps."""
    from benchmark.execution.grids import load_grid

    if not ratio > 1:
        raise ValueError(f"--ratio={ratio:g} must be > 1")
    loaded = load_grid(grid)
    folder, results, said = read_results(grid, results_dir)
    grid_arg = str(Path(grid).resolve()) if Path(grid).is_file() else grid
    match = Match(loaded.name, grid_arg, folder, tuple(sorted(float(c) for c in crs)), float(ratio),
                  float(reach_points), 0 if results is None else len(results.rows))
    match.notes += said
    fams = families(loaded.cells)
    for fam in fams.values():
        match.seeds[fam.family] = sorted(fam.seeds)
        match.labels[fam.family] = fam.label
    if results is None:
        match.notes.append("nothing to match against until cells have run")
        return match
    frame = results.rows
    if "cell_id" not in frame.columns:
        raise ValueError(f"{folder / 'results.csv'} has no cell_id column; rebuild it with "
                         f"`python -m benchmark collect --grid {grid}`")
    frame = frame.assign(cell_id=frame.cell_id.astype(str))
    grid_ids = {cell.id for cell in loaded.cells}
    strangers = frame[~cv.reference_rows(frame) & ~frame.cell_id.isin(grid_ids)]
    if len(strangers):
        match.notes.append(f"{len(strangers)} record(s) of cells not in grid {loaded.name} left out")
    per_family = {}
    for fam in fams.values():
        rows = frame[frame.cell_id.isin(fam.ids.keys())]
        per_family[fam.family] = rows.assign(value=rows.cell_id.map(lambda cid: fam.ids[cid][0]).astype(float))
    reach: dict = {}
    for fam in fams.values():
        if fam.family.swept != LAM:
            continue
        rows = per_family[fam.family]
        match_lambda(match, fam, rows)
        arch, dataset = fam.family.arch, fam.family.dataset
        chance = chance_level(dataset)
        for seed, mine in rows.groupby("seed"):
            far = seed_reach(seed_points(mine), chance, results.dense_for(arch, dataset, seed), match.reach_points)
            if far > reach.get((arch, dataset), (0.0, ""))[0]:
                reach[(arch, dataset)] = (far, f"{fam.label} seed {seed}")
    for fam in fams.values():
        if fam.family.swept == TARGET:
            arch, dataset = fam.family.arch, fam.family.dataset
            far, by = reach.get((arch, dataset), (0.0, ""))
            dense = {seed: results.dense_for(arch, dataset, seed) for seed in fam.seeds}
            match_baseline(match, fam, per_family[fam.family], far, by, dense)
    return match
