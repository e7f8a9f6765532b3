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

This module reads the grid and its results and runs the proposers: the λ curves' in
``matching_lambda``, the baselines' in ``matching_baselines``, both filling the ``Match`` of
``matching_records``. ``matching_output.write_grid`` writes the proposed cells as a grid TOML (one
experiment per curve, its full schedule and parameters), and checks that it parses into exactly
those cells. Never trains.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmark.analysis import curves as cv
from benchmark.analysis import tables as tb
from benchmark.analysis.matching_baselines import match_baseline, seed_reach
from benchmark.analysis.matching_lambda import match_lambda, seed_points
from benchmark.analysis.matching_records import LAM, TARGET, Match, chance_level, families

#: Reported CRs of the tables (the report's fixed CRs and the ones between).
REPORTED_CRS = (10.0, 30.0, 100.0, 300.0, 1000.0)
#: A seed needs a measured point within this factor of each reported CR.
RATIO = 1.5
#: A λ curve reaches as far as it stays within this many points of dense (the report's widest tolerance).
REACH_POINTS = max(tb.TOLERANCE_POINTS)


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


# -- the whole grid -------------------------------------------------------------------------------


def match_grid(grid: str, results_dir="results", crs=REPORTED_CRS, ratio: float = RATIO,
               reach_points: float = REACH_POINTS) -> Match:
    """Read grid ``grid`` (a preset or a file) and its results so far; propose what closes the gaps."""
    from benchmark.execution import tuning
    from benchmark.execution.grids import load_grid
    from benchmark.execution.store import Store

    if not ratio > 1:
        raise ValueError(f"--ratio={ratio:g} must be > 1")
    loaded = load_grid(grid)
    # tuned curves count with the final cells of their picks (docs/tuning.md); one still tuning has none yet
    picks, _ = tuning.resolve(loaded.tune_groups, Store(results_dir, tuning.folder(loaded.name)).read_or_none,
                              Store(results_dir, loaded.name).read_or_none)
    cells = loaded.cells + tuning.picked_finals(picks)
    folder, results, said = read_results(grid, results_dir)
    grid_arg = str(Path(grid).resolve()) if Path(grid).is_file() else grid
    match = Match(loaded.name, grid_arg, folder, tuple(sorted(float(c) for c in crs)), float(ratio),
                  float(reach_points), 0 if results is None else len(results.rows))
    match.notes += said
    fams = families(cells)
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
    grid_ids = {cell.id for cell in cells} | {cell.id for cell in tuning.dropped_finals(picks)}
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
