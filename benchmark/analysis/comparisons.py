"""Significance of the DWF claims: Welch t-tests of accuracy at matched CR, Holm-corrected per panel.

``report`` writes the table as ``comparisons.{md,tex,csv}``; docs/comparisons.md says why this test
and this correction, and how small a difference a few seeds can resolve. Choices:

- **Pairs.** Every curve of the method under study (``Method.is_subject``: DWF, one curve per
  depth) is side A against every other curve of the same arch x dataset as side B: the baselines,
  and the other DWF depths (each unordered pair of depths once, the shallower one as A). Nothing
  else is compared; the dense model is a line, not a curve.
- **Per-seed accuracy** at a CR is that seed's curve interpolated linearly in log CR, exactly as the
  accuracy table does it (:meth:`benchmark.analysis.curves.Curve.at` on
  :meth:`~benchmark.analysis.curves.Results.seed_curves`: partial seeds left out, never
  extrapolated). A side's n is the number of its seeds whose curve reaches that CR.
- **Test.** Welch's two-sided t-test (``scipy.stats.ttest_ind(equal_var=False)``) on the two sides'
  per-seed accuracies: seeds are independent trainings (not paired across methods), and the spread
  differs between methods. The difference is A - B in percentage points; its 95 % confidence
  interval uses the Welch-Satterthwaite degrees of freedom. A side with fewer than 2 seeds, or two
  sides without any spread, get the difference but no interval and no p (the row's note says why).
- **Correction.** Holm-Bonferroni over the family of every comparison with a p in one arch x
  dataset: all its pairs at all the table's CRs together. A (or B) is called better where the
  corrected p is below 0.05; otherwise the row is "not resolved with n seeds", which is no evidence
  that the two are equal.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from benchmark.analysis import curves as cv
from benchmark.analysis import tables as tb

ALPHA = 0.05  # family-wise error rate of the verdicts
CONFIDENCE = 0.95  # of the interval on the difference
COLUMNS = ["arch", "dataset", "cr", "a", "b", "n_a", "n_b", "acc_a_pct", "acc_b_pct", "std_a_pct", "std_b_pct",
           "diff_pts", "ci_low_pts", "ci_high_pts", "t", "df", "p", "p_holm", "family_size", "verdict", "note"]


def is_subject_variant(results: cv.Results, arch: str, dataset: str, variant: str) -> bool:
    """Whether ``variant`` is a curve of the method under study (``Method.is_subject``)."""
    methods = set(results.panel_rows(arch, dataset, variant)["method"])
    return any(getattr(cv.method_class(m), "is_subject", False) for m in methods)


def pairs(results: cv.Results, arch: str, dataset: str) -> list[tuple[str, str]]:
    """(A, B) for every comparison a claim about the subject's curves involves, in table order."""
    variants = results.variants(arch, dataset)
    subjects = [v for v in variants if is_subject_variant(results, arch, dataset, v)]
    out = []
    for a in subjects:
        out += [(a, b) for b in variants if b != a and not (b in subjects and subjects.index(b) < subjects.index(a))]
    return out


def seed_accuracies(curves: list[cv.Curve], cr: float) -> np.ndarray:
    """Accuracy (%) of each seed whose curve reaches ``cr``, interpolated as the accuracy table does."""
    values = np.array([100 * float(c.at(cr)[0]) for c in curves if len(c.cr)], float)
    return values[np.isfinite(values)]


def welch(a, b, confidence: float = CONFIDENCE) -> dict:
    """Mean difference A - B, its Welch-Satterthwaite interval, t, df and two-sided p; ``note`` says
    why the interval and p are missing (NaN) when they are."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = {"diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "t": math.nan, "df": math.nan,
           "p": math.nan, "note": ""}
    if len(a) == 0 or len(b) == 0:
        side = "A" if len(a) == 0 else "B"
        out["note"] = f"no seed of {side} reaches this CR"
        return out
    out["diff"] = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        sides = " and ".join(f"{s} has 1 seed" for s, x in (("A", a), ("B", b)) if len(x) < 2)
        out["note"] = f"{sides}: no spread, no interval or p"
        return out
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        out["note"] = "no spread on either side: t undefined"
        return out
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(va + vb)
    with warnings.catch_warnings():  # a side at chance accuracy on every seed: scipy warns of its zero spread
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_ind(a, b, equal_var=False)
    out.update(ci_low=out["diff"] - half, ci_high=out["diff"] + half, t=float(test.statistic), df=float(df),
               p=float(test.pvalue))
    return out


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order as given): the k-th smallest of m is multiplied by
    m - k + 1, then made non-decreasing in that order and capped at 1. NaN stays NaN and is not
    counted in m."""
    p = np.asarray(p_values, float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    m, running = len(tested), 0.0
    for rank, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def seeds_text(n_a: int, n_b: int) -> str:
    return f"{n_a} seed{'s' if n_a != 1 else ''}" if n_a == n_b else f"{n_a}/{n_b} seeds"


def verdict(diff: float, p_holm: float, n_a: int, n_b: int, alpha: float = ALPHA) -> str:
    if math.isfinite(p_holm) and p_holm < alpha:
        return "A better" if diff > 0 else "B better"
    return f"not resolved with {seeds_text(n_a, n_b)}"


def comparisons_table(results: cv.Results, crs=tb.FIXED_CRS, alpha: float = ALPHA) -> pd.DataFrame:
    """One row per (arch, dataset, CR, A, B): see the module docstring. Accuracies, their std over
    seeds, the difference and its interval are in percentage points; ``family_size`` is the number
    of comparisons with a p in the arch x dataset, over which ``p_holm`` is corrected."""
    frames = []
    for arch, dataset in results.panels():
        compared = pairs(results, arch, dataset)
        if not compared:
            continue
        curves = {v: results.seed_curves(arch, dataset, v) for v in {x for pair in compared for x in pair}}
        rows = []
        for cr in crs:
            for a, b in compared:
                acc_a, acc_b = seed_accuracies(curves[a], cr), seed_accuracies(curves[b], cr)
                test = welch(acc_a, acc_b)
                rows.append({"arch": arch, "dataset": dataset, "cr": float(cr), "a": a, "b": b,
                             "n_a": len(acc_a), "n_b": len(acc_b),
                             "acc_a_pct": cv.mean_std(acc_a)[0], "acc_b_pct": cv.mean_std(acc_b)[0],
                             "std_a_pct": cv.mean_std(acc_a)[1], "std_b_pct": cv.mean_std(acc_b)[1],
                             "diff_pts": test["diff"], "ci_low_pts": test["ci_low"], "ci_high_pts": test["ci_high"],
                             "t": test["t"], "df": test["df"], "p": test["p"], "note": test["note"]})
        panel = pd.DataFrame(rows)
        panel["p_holm"] = holm(panel["p"])
        panel["family_size"] = int(panel["p"].notna().sum())
        panel["verdict"] = [verdict(r.diff_pts, r.p_holm, r.n_a, r.n_b, alpha) for r in panel.itertuples()]
        frames.append(panel)
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def family_notes(table: pd.DataFrame) -> list[str]:
    """Per arch x dataset: the Holm family and how the verdicts fell."""
    notes = []
    for (arch, dataset), panel in table.groupby(["arch", "dataset"], sort=False):
        untested = int(panel.p.isna().sum())
        better_a, better_b = int((panel.verdict == "A better").sum()), int((panel.verdict == "B better").sum())
        if untested == len(panel):
            notes.append(f"{cv.panel_title(arch, dataset)}: none of its {len(panel)} comparisons has a p (a side "
                         f"with fewer than 2 seeds at the CR), so none is resolved.")
            continue
        notes.append(f"{cv.panel_title(arch, dataset)}: Holm over the {int(panel.family_size.iloc[0])} comparisons "
                     f"with a p (every pair at every CR of the table)"
                     + (f"; {untested} without one are not in the family" if untested else "")
                     + f". A better: {better_a}, B better: {better_b}, "
                       f"not resolved: {len(panel) - better_a - better_b}.")
    return notes


def resolved_notes(table: pd.DataFrame) -> list[str]:
    """Per arch x dataset, the resolved rows in a line a reader can quote: winner over loser at each
    CR with the difference and its interval turned to the winner's side (a B-better row's A - B
    [lo, hi] is read as B - A [-hi, -lo]), so claims need not be picked out of hundreds of rows."""
    notes = []
    for (arch, dataset), panel in table.groupby(["arch", "dataset"], sort=False):
        won = panel[panel.verdict.isin(["A better", "B better"])]
        if won.empty:
            continue
        by_cr = []
        for cr, rows in won.groupby("cr", sort=True):
            claims = []
            for r in rows.itertuples():
                flip = r.verdict == "B better"
                winner, loser = (r.b, r.a) if flip else (r.a, r.b)
                diff, low, high = ((-r.diff_pts, -r.ci_high_pts, -r.ci_low_pts) if flip
                                   else (r.diff_pts, r.ci_low_pts, r.ci_high_pts))
                claims.append(f"{winner} over {loser} {diff:+.2f} [{low:+.2f}, {high:+.2f}]")
            by_cr.append(f"CR {cr:g}: " + "; ".join(claims))
        notes.append(f"{cv.panel_title(arch, dataset)}, resolved (winner over loser, points, 95 % CI): "
                     + " · ".join(by_cr) + ".")
    return notes


def summary_line(table: pd.DataFrame) -> str:
    """One line for the terminal: how many comparisons, how many resolved."""
    if table.empty:
        return "comparisons: no curve of the studied method (DWF) to compare"
    resolved = int(table.verdict.isin(["A better", "B better"]).sum())
    return (f"comparisons: {len(table)} (DWF curve vs other curve at a CR), {resolved} resolved at Holm-corrected "
            f"p < {ALPHA:g} ({int((table.verdict == 'A better').sum())} DWF better, "
            f"{int((table.verdict == 'B better').sum())} other better), the rest not resolved with these seeds")


# -- how small a difference a few seeds resolve (docs/comparisons.md) ------------------------------


def minimum_detectable_difference(std: float, n: int, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Smallest true difference (same unit as ``std``) that a two-sided two-sample t-test at level
    ``alpha`` rejects with probability ``power``, for ``n`` seeds per side with the same ``std``:
    the noncentral t with nu = 2(n-1) and noncentrality delta / (std sqrt(2/n))."""
    from scipy.optimize import brentq

    nu, scale = 2 * (n - 1), std * math.sqrt(2 / n)
    crit = stats.t.ppf(1 - alpha / 2, nu)

    def shortfall(delta):
        ncp = delta / scale
        wrong_sign = np.nan_to_num(stats.nct.cdf(-crit, nu, ncp))  # NaN far out in the tail, where it is 0
        return stats.nct.sf(crit, nu, ncp) + wrong_sign - power

    return float(brentq(shortfall, 1e-6 * scale, 100 * scale))  # noncentrality 100: power 1 at any level here


def detectable_differences(results: cv.Results, crs=(10, 30, 100, 300, 1000), ns=(3, 5),
                           alpha: float = ALPHA, arch: str | None = None) -> pd.DataFrame:
    """The seed std (points) of the accuracy table's cells (of ``arch``, or all) with 2+ seeds and some
    spread (curves at chance accuracy have none), at its quartiles, and the minimum detectable
    difference at 80 % power for ``ns`` seeds per side, at level ``alpha`` and at Holm's strictest
    level alpha/m (m: the largest family of those panels in the comparisons table)."""
    accuracy, table = tb.accuracy_at_cr_table(results, crs), comparisons_table(results, crs)
    if arch is not None:
        accuracy, table = accuracy[accuracy.arch == arch], table[table.arch == arch]
    stds = accuracy.acc_pct_std[(accuracy.n_seeds >= 2) & (accuracy.acc_pct_std > 0)]
    m = int(table.family_size.max())
    rows = []
    for q, label in ((0.25, "25th percentile"), (0.5, "median"), (0.75, "75th percentile")):
        s = float(stds.quantile(q))
        row = {"seed std": label, "std_pts": round(s, 3)}
        for n in ns:
            row[f"n={n}, α={alpha:g}"] = round(minimum_detectable_difference(s, n, alpha), 2)
            row[f"n={n}, α={alpha:g}/{m}"] = round(minimum_detectable_difference(s, n, alpha / m), 2)
        rows.append(row)
    return pd.DataFrame(rows)
