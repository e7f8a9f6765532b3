"""Curves that cannot say anything about their method, named with what to change.

A DWF grid at too small a λ or learning rate (the schedule's, before the calibrated rates were the
default) stays at CR 1, the tolerance table says "≥ 1.00" and the figure shows a vertical segment:
without a word, that reads as "DWF does not work". Two cases
of a thresholded curve (a λ sweep: DWF, L1 — records with ``cr_thr_small``) are caught here:

- **Stuck at CR ≈ 1**: no point of the curve compresses by more than ``FLAT_CR``: λ, the learning rate or
  the schedule is too small for the penalty to zero anything.
- **Never leaves dense accuracy**: every point of every seed stays within ``DENSE_POINTS`` of that seed's
  dense accuracy, so every tolerance figure is a lower bound set by the grid: larger λ are needed to
  see where accuracy breaks.

These are printed by ``run`` and ``report``; they never change a table (the committed tables are
rebuilt byte for byte from their CSVs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.analysis.curves import Results, load_results

#: A curve whose largest CR is at most this compresses nothing worth plotting.
FLAT_CR = 1.1
#: Accuracy points below dense that a λ sweep should reach somewhere to show where it breaks.
DENSE_POINTS = 1.0


def _sweep(frame: pd.DataFrame) -> str:
    if "lam" not in frame.columns:
        return ""
    lams = pd.to_numeric(frame.lam, errors="coerce").dropna()
    if lams.empty:
        return ""
    low, high = lams.min(), lams.max()
    return f" (λ {low:g})" if low == high else f" (λ {low:g} to {high:g})"


def _trained_at(frame: pd.DataFrame) -> str:
    """The learning rates a curve's records trained at, for a warning ("" where they do not say)."""
    if "lr" not in frame.columns:
        return ""
    rates = sorted(set(pd.to_numeric(frame.lr, errors="coerce").dropna()))
    return f"it trained at {', '.join(f'{rate:g}' for rate in rates)}; " if rates else ""


def curve_warnings(results: Results) -> list[str]:
    """One line per thresholded curve that is stuck at CR ≈ 1 or never leaves dense accuracy."""
    frame = results.ok
    if "cr_thr_small" not in frame.columns:
        return []
    frame = frame[pd.to_numeric(frame.cr_thr_small, errors="coerce").notna()]
    lines = []
    for (arch, dataset, variant), curve in frame.groupby(["arch", "dataset", "variant"], sort=True):
        name = f"{variant} on {arch}/{dataset}{_sweep(curve)}"
        largest = float(curve.cr.replace(np.inf, np.nan).max())
        if not largest > FLAT_CR:
            lines.append(f"{name}: every point has CR <= {FLAT_CR:g} (largest {largest:.2f}), so the penalty zeroed "
                         f"almost no weights and its tolerance figures say nothing. Raise lam (steps of 10x), "
                         f"the learning rate ({_trained_at(curve)}without an lr of their own, the LeNets take the "
                         f"calibrated per-depth rates of docs/methods.md) or the epochs.")
            continue
        drops = [results.dense_for(arch, dataset, seed) - rows.test_acc.min()
                 for seed, rows in curve.groupby("seed")]
        drops = [d for d in drops if np.isfinite(d)]
        if drops and max(drops) < DENSE_POINTS / 100:
            lines.append(f"{name}: no point falls more than {DENSE_POINTS:g} point below dense accuracy "
                         f"(largest CR {largest:.3g}), so its tolerance figures are lower bounds set by the "
                         f"grid. Add larger lam values to see where accuracy breaks.")
    return lines


def warning_lines(csv_path: Path | str) -> list[str]:
    """``curve_warnings`` of a grid's ``results.csv``, each starting "warning: "; none without a CSV
    (no CSV yet, or one that could not be read: said elsewhere)."""
    try:
        results = load_results(csv_path)
    except (ValueError, OSError):
        return []
    return [f"warning: {line}" for line in curve_warnings(results)]
