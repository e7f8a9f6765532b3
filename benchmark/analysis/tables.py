"""The numbers of the report's tables, per (arch, dataset, variant), from a validated ``results.csv``.

Kept apart from :mod:`benchmark.analysis.curves`, which turns the CSV into curves: these functions
only ask the curves questions (largest CR within k points of dense, accuracy at a fixed CR, how
settled a thresholded CR is, what a curve cost). The definitions they follow are pinned in the
curves module's docstring; ``report`` formats the numbers, ``page`` and ``comparisons`` reuse them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from benchmark.analysis.curves import Results, largest_cr_within, mean_std, reference_rows

#: Tolerance levels in accuracy points and fixed CRs of the report (the paper's headline metric).
TOLERANCE_POINTS = (1.0, 5.0, 10.0)
FIXED_CRS = (10.0, 100.0, 1000.0)


def tolerance_table(results: Results, points=TOLERANCE_POINTS) -> pd.DataFrame:
    """Largest CR within k points of dense, per (arch, dataset, variant, k), over seeds.

    Columns: arch, dataset, variant, points, cr_mean, cr_std, n_seeds, lower_bound, dense_acc_pct."""
    rows = []
    for arch, dataset in results.panels():
        if not results.dense_by_seed(arch, dataset):
            continue
        dense_mean = mean_std(results.dense_by_seed(arch, dataset).values())[0]
        for variant in results.variants(arch, dataset):
            curves = [c for c in results.seed_curves(arch, dataset, variant) if len(c.cr)]
            if not curves:
                continue
            for k in points:
                answers = [largest_cr_within(c.cr, c.acc, results.dense_for(arch, dataset, c.seed), k) for c in curves]
                m, s, n = mean_std([a[0] for a in answers])
                rows.append({"arch": arch, "dataset": dataset, "variant": variant, "points": k, "cr_mean": m,
                             "cr_std": s, "n_seeds": n, "lower_bound": any(a[1] for a in answers),
                             "dense_acc_pct": 100 * dense_mean})
    return pd.DataFrame(rows, columns=["arch", "dataset", "variant", "points", "cr_mean", "cr_std", "n_seeds",
                                       "lower_bound", "dense_acc_pct"])


def accuracy_at_cr_table(results: Results, crs=FIXED_CRS) -> pd.DataFrame:
    """Accuracy (%) interpolated at fixed CRs, per (arch, dataset, variant, CR), over the seeds covering it.

    Columns: arch, dataset, variant, cr, acc_pct_mean, acc_pct_std, n_seeds, seeds_total."""
    rows = []
    for arch, dataset in results.panels():
        for variant in results.variants(arch, dataset):
            curves = [c for c in results.seed_curves(arch, dataset, variant) if len(c.cr)]
            if not curves:
                continue
            for cr in crs:
                m, s, n = mean_std([100 * float(c.at(cr)[0]) for c in curves])
                rows.append({"arch": arch, "dataset": dataset, "variant": variant, "cr": cr, "acc_pct_mean": m,
                             "acc_pct_std": s, "n_seeds": n, "seeds_total": len(curves)})
    return pd.DataFrame(rows, columns=["arch", "dataset", "variant", "cr", "acc_pct_mean", "acc_pct_std",
                                       "n_seeds", "seeds_total"])


#: A thresholded record's CR has settled when its CR at 100x the zero threshold is within 10% of its
#: CR at 0.01x (docs/design.md, Reproducibility); otherwise the threshold, not training, decides its CR.
SETTLED_RATIO = 1.10


def settling_table(results: Results) -> pd.DataFrame:
    """Per thresholded ok record (those with ``cr_thr_small``/``cr_thr_large``): its CR at the three
    thresholds, their ratio and whether it counts as settled.

    Columns: arch, dataset, variant, seed, lam, lr, epochs_schedule, cr, cr_thr_small, cr_thr_large, ratio,
    settled."""
    columns = ["arch", "dataset", "variant", "seed", "lam", "lr", "epochs_schedule", "cr", "cr_thr_small",
               "cr_thr_large", "ratio", "settled"]
    frame = results.ok
    if not {"cr_thr_small", "cr_thr_large"} <= set(frame.columns):
        return pd.DataFrame(columns=columns)
    frame = frame[pd.to_numeric(frame.cr_thr_small, errors="coerce").notna()].copy()
    small = pd.to_numeric(frame.cr_thr_small)
    large = pd.to_numeric(frame.cr_thr_large)
    frame["cr_thr_small"], frame["cr_thr_large"] = small, large
    # every weight pruned at both ends (CR inf / inf) has settled too
    frame["ratio"] = np.where(np.isinf(small) & np.isinf(large), 1.0, large / small)
    frame["settled"] = frame["ratio"] <= SETTLED_RATIO
    for col in ("lam", "lr", "epochs_schedule"):
        if col not in frame.columns:
            frame[col] = np.nan
    return frame[columns].sort_values(["arch", "dataset", "variant", "lam", "lr", "epochs_schedule", "seed"]
                                      ).reset_index(drop=True)


def cost_table(results: Results) -> pd.DataFrame:
    """What each curve cost: per (arch, dataset, variant), its ok points and seeds, the training epochs
    behind one point (``epochs``: a lottery ticket at level k trains k+1 times; a pruned dense model
    counts the dense training it starts from) and the CPU-hours its cells took (wall time x threads,
    each cell once; shared dense trainings are counted in the cell that ran them, usually ``dense``).

    ``train_cost``: the same in dense trainings of the schedule (``benchmark.execution.collection.training_cost``).

    Columns: arch, dataset, variant, points, seeds, epochs_min, epochs_max, train_cost_min,
    train_cost_max, wall_h, cpu_h, devices."""
    rows = []
    frame = results.ok
    for arch, dataset in results.panels():
        panel = frame[(frame.arch == arch) & (frame.dataset == dataset)]
        reference = reference_rows(panel)
        groups = [panel[reference & (panel.variant == v)] for v in sorted(set(panel.variant[reference]))]
        groups += [panel[~reference & (panel.variant == v)] for v in results.variants(arch, dataset)]
        for group in groups:
            if group.empty:
                continue
            variant = group.variant.iloc[0]
            epochs = pd.to_numeric(group.get("epochs"), errors="coerce") if "epochs" in group else pd.Series(dtype=float)
            cells = group.drop_duplicates("cell_id") if "cell_id" in group else group
            wall = pd.to_numeric(cells.get("wall_s"), errors="coerce").fillna(0.0) if "wall_s" in cells else 0.0
            threads = pd.to_numeric(cells["threads"], errors="coerce").fillna(1.0) if "threads" in cells else 1.0
            devices = sorted(set(cells["device"].dropna().astype(str))) if "device" in cells else []
            cost = pd.to_numeric(group.get("train_cost"), errors="coerce") if "train_cost" in group else pd.Series(dtype=float)
            rows.append({"arch": arch, "dataset": dataset, "variant": variant, "points": len(group),
                         "seeds": group.seed.nunique(), "epochs_min": epochs.min(), "epochs_max": epochs.max(),
                         "train_cost_min": cost.min(), "train_cost_max": cost.max(),
                         "wall_h": float(np.sum(wall)) / 3600, "cpu_h": float(np.sum(wall * threads)) / 3600,
                         "devices": ",".join(devices)})
    return pd.DataFrame(rows, columns=["arch", "dataset", "variant", "points", "seeds", "epochs_min", "epochs_max",
                                       "train_cost_min", "train_cost_max", "wall_h", "cpu_h", "devices"])


def dense_summary(results: Results) -> pd.DataFrame:
    """Dense accuracy (%) per panel: mean, std, seeds."""
    rows = []
    for arch, dataset in results.panels():
        m, s, n = mean_std([100 * a for a in results.dense_by_seed(arch, dataset).values()])
        if n:
            rows.append({"arch": arch, "dataset": dataset, "acc_pct_mean": m, "acc_pct_std": s, "n_seeds": n})
    return pd.DataFrame(rows, columns=["arch", "dataset", "acc_pct_mean", "acc_pct_std", "n_seeds"])
