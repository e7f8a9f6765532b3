"""Baselines (methods with a ``target_cr`` parameter): the targets of the 1-2-5 sequence that take a
baseline curve past the largest CR a λ curve of its panel reaches within the tolerance of dense (the
rules: ``matching``'s docstring).

Its own module because a baseline's grid is extended from the λ curves' reach, not from gaps of its
own; ``matching.match_grid`` works out that reach with ``seed_reach`` and calls ``match_baseline``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from benchmark.analysis import curves as cv
from benchmark.analysis.matching_records import (CHANCE_POINTS, Family, FamilyCells, Match, chance_level,
                                                 has_value, same_value)


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
    waiting = sorted({seed for cid, (value, seed) in fam.ids.items() if cid not in run and same_value(value, grid_max)})
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
        if has_value(fam.values, value):
            continue
        try:
            family.cell(value, min(fam.seeds))
        except ValueError as exc:
            notes.append(f"{value:g} left out: {exc}")
            continue
        good.append(value)
    ext.values, ext.note = good, "; ".join(notes)
