"""λ curves (methods with a ``lam`` parameter): the reported CRs each seed has no measured point near,
and the λ that closes each gap, rounded and merged over seeds (the rules: ``matching``'s docstring).

Its own module because it is the one place that interpolates and steps in log λ against log CR;
``matching.match_grid`` calls ``match_lambda`` once per λ curve.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from benchmark.analysis.matching_records import (CHANCE_POINTS, Family, FamilyCells, Match, chance_level,
                                                 has_value)

#: Extrapolation: at most this factor in λ per step; this fixed factor where no slope is usable.
MAX_STEP = 10 ** 0.5
FIXED_STEP = 10 ** 0.25
#: Two λs closer than this factor are not split further (the curve jumps there: an L1 collapse).
MIN_SPLIT = 1.05
#: Proposals of different seeds for one reported CR this close in λ become one λ.
MERGE_FACTOR = 1.1


def round3(value: float) -> float:
    """``value`` to 3 significant digits."""
    return float(f"{value:.3g}")


@dataclass
class Gap:
    """A reported CR that one seed of a λ curve does not match, and what closes it."""

    label: str
    family: Family
    seed: int
    cr: float
    nearest: float  # nearest measured finite CR (nan: none)
    ratio: float  # max(nearest/cr, cr/nearest)
    reason: str  # "gap", "beyond" (past the last point), "below" (before the first point),
    # "pruned" (past the last finite point, where a larger λ pruned everything)
    between: tuple | None  # ((λ, CR), (λ, CR)) around the gap, or the points a step is taken from
    raw: float | None = None  # the seed's own λ, before rounding and merging
    proposed: float | None = None  # the λ that the written grid adds for it
    note: str = ""  # why nothing is proposed (waits on grid cells, not monotone, ...)
    jump: bool = False  # the CR jumps across it between λs closer than MIN_SPLIT: no λ closes it


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
    # the tables interpolate between finite CRs only: a point that pruned everything bounds no range
    lo, hi = (float(cr[finite].min()), float(cr[finite].max())) if finite.any() else (math.inf, math.inf)
    out = []
    for c in crs:
        if c > chance_cr * (1 + 1e-9):
            continue
        near = float(cr[finite][np.argmin(np.abs(np.log(cr[finite] / c)))]) if finite.any() else math.nan
        far = max(near / c, c / near) if math.isfinite(near) else math.inf
        if c > hi * (1 + 1e-9):
            # short of it, and a larger λ pruned everything: a λ between them reaches it
            reason = "pruned" if (~finite).any() else "beyond"
        elif c < lo * (1 - 1e-9):
            reason = "below"
        elif far > ratio * (1 + 1e-9):
            reason = "gap"
        else:
            continue
        gap = {"cr": c, "nearest": near, "ratio": far, "reason": reason, "between": None, "raw": None, "note": "",
               "jump": False}
        if reason in ("gap", "pruned"):
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
        gap["jump"] = True
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
    gaps, measured = [], 0
    for seed in sorted(fam.seeds):
        mine = rows[rows.seed == seed]
        run = set(mine.value)
        pending = sorted(v for v in fam.values if not has_value(run, v))
        points = seed_points(mine)
        if points.empty:
            match.notes.append(f"{fam.label} seed {seed}: no ok results yet ({len(pending)} of its "
                               f"{len(fam.values)} cells not run, {len(run)} failed or blocked)")
            continue
        measured += 1
        for g in seed_gaps(points, match.crs, match.ratio, chance, pending):
            gaps.append(Gap(fam.label, family, seed, **g))
    if not gaps:
        if measured:  # seeds without results are in the notes, not counted as matched
            match.complete.append((fam.label, measured, len(fam.seeds)))
        return
    if all(g.jump for g in gaps):  # nothing left that a λ can close: say so once, beside the matched
        match.jumps.append((fam.label, len({g.seed for g in gaps}), measured))
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
            if has_value(fam.values, merged):  # merged onto a grid λ: each seed's own instead
                for g in cluster:
                    _choose(g, round3(g.raw), fam.values, chosen)
            else:
                for g in cluster:
                    g.proposed = merged
                chosen.add(merged)
    match.gaps += gaps
    match.proposals[family] = sorted(chosen)


def _choose(gap: Gap, value: float, grid_values, chosen: set) -> None:
    if has_value(grid_values, value):
        gap.note = f"its λ {value:g} (3 digits) is in the grid already; the λs around it are too close to split"
    else:
        gap.proposed = value
        chosen.add(value)
