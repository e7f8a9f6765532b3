"""The tables of ``python -m benchmark report``: tolerance and accuracy-at-CR tables from ``results.csv`` only.

Writes ``<results-dir>/<grid>/tolerance.{md,tex,csv}`` and ``accuracy_at_cr.{md,tex,csv}`` and
prints both Markdown tables; also ``cost.{md,csv}`` (training epochs and CPU-hours behind each curve)
and ``settling.{md,csv}`` (thresholded records whose CR still depends on the zero threshold),
``comparisons.{md,tex,csv}`` (Welch t-tests of each DWF curve against every other curve at the same
CRs, Holm-corrected: :mod:`benchmark.analysis.comparisons`), and the results page ``report.html``
(:mod:`benchmark.analysis.page`). The numbers come from
:mod:`benchmark.analysis.curves`, whose docstring pins the definitions ("largest CR within k points",
interpolation in log CR, no extrapolation, mean ± sample std over seeds). The CSVs are tidy (one row
per number, unformatted) for further analysis; Markdown and LaTeX (booktabs) are wide and formatted
for reading.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.analysis import comparisons as cmp
from benchmark.analysis import curves as cv
from benchmark.analysis import tables as tb
from benchmark.core.files import atomic_write
from benchmark.execution import tuning

MISSING = "–"  # shown where a value is not defined (out of the measured range)


def format_cr(mean: float, std: float, n: int, lower_bound: bool = False) -> str:
    """'1014 ± 35', '≥ 12.3 ± 0.4'; std left out for one seed; decimals follow the size."""
    if n == 0 or not math.isfinite(mean):
        return MISSING
    decimals = 0 if mean >= 100 else 1 if mean >= 10 else 2
    text = f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if n > 1 else "")
    return ("≥ " if lower_bound else "") + text


def format_acc(mean: float, std: float, n: int, total: int | None = None) -> str:
    """'97.81 ± 0.12', with '(1/2 seeds)' when not every seed reaches that CR."""
    if n == 0 or not math.isfinite(mean):
        return MISSING
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 else "")
    return text + (f" ({n}/{total} seeds)" if total is not None and n < total else "")


def _points_label(k: float) -> str:
    return f"≤ {k:g} pt" + ("" if k == 1 else "s")


def tolerance_wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (arch, dataset, variant), one column per tolerance level, formatted."""
    rows = []
    for (arch, dataset, variant), group in table.groupby(["arch", "dataset", "variant"], sort=False):
        row = {"arch": cv.ARCH_NAMES.get(arch, arch), "dataset": cv.DATASET_NAMES.get(dataset, dataset),
               "method": variant, "seeds": str(int(group.n_seeds.max()))}
        for r in group.itertuples():
            row[_points_label(r.points)] = format_cr(r.cr_mean, r.cr_std, r.n_seeds, r.lower_bound)
        rows.append(row)
    return pd.DataFrame(rows)


def accuracy_wide(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (arch, dataset, variant), group in table.groupby(["arch", "dataset", "variant"], sort=False):
        row = {"arch": cv.ARCH_NAMES.get(arch, arch), "dataset": cv.DATASET_NAMES.get(dataset, dataset),
               "method": variant, "seeds": str(int(group.seeds_total.max()))}
        for r in group.itertuples():
            row[f"CR {r.cr:g}"] = format_acc(r.acc_pct_mean, r.acc_pct_std, r.n_seeds, r.seeds_total)
        rows.append(row)
    return pd.DataFrame(rows)


def dense_lines(dense: pd.DataFrame) -> list[str]:
    return [f"{cv.panel_title(r.arch, r.dataset)}: {format_acc(r.acc_pct_mean, r.acc_pct_std, r.n_seeds)} % "
            f"({r.n_seeds} seed{'s' if r.n_seeds != 1 else ''})" for r in dense.itertuples()]


# -- Markdown ---------------------------------------------------------------------------------------


#: Columns of text, aligned left; the others hold numbers and are aligned right.
TEXT_COLUMNS = ("arch", "dataset", "method", "note", "A", "B", "verdict")


def markdown_table(wide: pd.DataFrame) -> str:
    if wide.empty:
        return "_no rows_"
    cols = list(wide.columns)
    right = [c not in TEXT_COLUMNS for c in cols]
    lines = ["| " + " | ".join(cols) + " |",
             "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in wide.itertuples(index=False)]
    return "\n".join(lines)


def markdown_document(title: str, explanation: str, wide: pd.DataFrame, dense: pd.DataFrame, notes: list[str]) -> str:
    parts = [f"## {title}", "", explanation, ""]
    if len(dense):
        parts += ["Dense accuracy (mean ± std over seeds): " + "; ".join(dense_lines(dense)) + ".", ""]
    parts += [markdown_table(wide), ""]
    if notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


# -- LaTeX ------------------------------------------------------------------------------------------

# TeX specials, and the non-ASCII signs our tables use, so the file compiles under plain pdflatex
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "≥": r"$\geq$", "≤": r"$\leq$", "<": r"$<$", ">": r"$>$", "±": r"$\pm$", "–": "--",
                  "×": r"$\times$", "∞": r"$\infty$"}


def latex_escape(text: str) -> str:
    """Any text (a method, variant, panel or column name, a caption) as LaTeX that typesets it."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex_label(text: str) -> str:
    """A ``\\label`` key from any text (it holds the grid's name): characters other than letters,
    digits and ``:._-`` become ``-``, since a key is not typeset and escapes do not work in it."""
    return re.sub(r"[^A-Za-z0-9:._-]", "-", text)


def latex_table(wide: pd.DataFrame, caption: str, label: str, long: bool = False) -> str:
    """A booktabs table; a \\midrule separates arch x dataset panels. ``long``: a longtable, which
    breaks across pages (for tables of hundreds of rows)."""
    if wide.empty:
        wide = pd.DataFrame({"note": ["no rows (see the notes of the Markdown table)"]})
    cols = list(wide.columns)
    spec = "".join("l" if c in TEXT_COLUMNS else "r" for c in cols)
    header = {"arch": "Architecture", "dataset": "Dataset", "method": "Method", "seeds": "Seeds", "note": ""}
    head = " & ".join(latex_escape(header.get(c, c)) for c in cols) + r" \\"
    if long:
        lines = ["% generated by `python -m benchmark report`; needs \\usepackage{booktabs,longtable}",
                 rf"\begin{{longtable}}{{{spec}}}",
                 rf"\caption{{{latex_escape(caption)}}}\label{{{latex_label(label)}}} \\",
                 r"\toprule", head, r"\midrule", r"\endhead"]
    else:
        lines = ["% generated by `python -m benchmark report`; needs \\usepackage{booktabs}",
                 r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
                 rf"\label{{{latex_label(label)}}}",
                 rf"\begin{{tabular}}{{{spec}}}", r"\toprule", head, r"\midrule"]
    previous = None
    for row in wide.itertuples(index=False):
        panel = tuple(row[:2])
        if previous is not None and panel != previous:
            lines.append(r"\midrule")
        previous = panel
        lines.append(" & ".join(latex_escape(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{longtable}", ""] if long else [r"\bottomrule", r"\end{tabular}", r"\end{table}",
                                                                   ""]
    return "\n".join(lines)


# -- command ----------------------------------------------------------------------------------------

TOLERANCE_EXPLANATION = (
    "Largest compression ratio (CR) whose test accuracy stays within k percentage points of the dense "
    "model, per seed (accuracy interpolated linearly in log CR between measured points, the dense model "
    "taken as the point at CR 1), then mean ± std over seeds. ≥: the largest measured CR still "
    "qualifies, so the true value is at least this (never extrapolated); 1 means no compression qualifies."
)
ACCURACY_EXPLANATION = (
    "Test accuracy (%) at fixed compression ratios, interpolated linearly in log CR between each seed's "
    f"measured points, then mean ± std over seeds. {MISSING}: the CR lies outside every seed's measured "
    "range (never extrapolated); (n/m seeds): only n seeds reach it."
)


@dataclass
class Table:
    """One table of the report, tidy (the CSV) and wide (formatted for reading)."""

    stem: str  # file name without suffix
    title: str
    explanation: str
    tidy: pd.DataFrame | None  # None: the table's CSV is written by another command
    wide: pd.DataFrame
    headline: bool  # tolerance and accuracy: with the dense accuracy and the notes, in LaTeX too, printed
    latex: bool = False  # written as LaTeX (a longtable) although not a headline table
    notes: list[str] = field(default_factory=list)  # the table's own notes, under it


def build_tables(results: cv.Results, label: str, points=tb.TOLERANCE_POINTS, crs=tb.FIXED_CRS,
                 with_cost: bool = True, with_comparisons: bool = True) -> list[Table]:
    """The tolerance and accuracy-at-CR tables, then (``with_comparisons``) the comparisons table,
    then (``with_cost``) the cost and settling tables."""
    tolerance = tb.tolerance_table(results, points)
    accuracy = tb.accuracy_at_cr_table(results, crs)
    tables = [
        Table("tolerance", f"Largest CR within {', '.join(f'{k:g}' for k in points)} points of dense ({label} grid)",
              TOLERANCE_EXPLANATION, tolerance, tolerance_wide(tolerance), True),
        Table("accuracy_at_cr", f"Accuracy at CR {', '.join(f'{c:g}' for c in crs)} ({label} grid)",
              ACCURACY_EXPLANATION, accuracy, accuracy_wide(accuracy), True),
    ]
    if with_comparisons:
        compared = cmp.comparisons_table(results, crs)
        tables.append(Table("comparisons", f"DWF against every other curve at CR {', '.join(f'{c:g}' for c in crs)}: "
                                           f"Welch t-tests, Holm-corrected ({label} grid)", COMPARISONS_EXPLANATION,
                            compared, comparisons_wide(compared), False, latex=True,
                            notes=cmp.family_notes(compared) + cmp.resolved_notes(compared)))
    if with_cost:
        cost, settling = tb.cost_table(results), tb.settling_table(results)
        tables += [Table("cost", f"Training cost per curve ({label} grid)", COST_EXPLANATION, cost, cost_wide(cost),
                         False),
                   Table("settling", f"Is sparsity settled? ({label} grid)", SETTLING_EXPLANATION, settling,
                         settling_wide(settling), False)]
        picks = tuning_table(results.path.parent)
        if picks is not None:
            tables.append(Table("tuning", f"Settings chosen on the validation split ({label} grid)",
                                TUNING_EXPLANATION, None, picks, False))
    return tables


def write_report(grid: str, results_dir: Path | str = "results", points=tb.TOLERANCE_POINTS,
                 crs=tb.FIXED_CRS, threshold_scale: float = 1.0) -> tuple[list[Path], str]:
    """Write the tables next to the CSV (tolerance, accuracy and comparisons as CSV, Markdown and
    LaTeX, cost and settling as CSV and Markdown); returns (files, Markdown of the first two).

    With ``threshold_scale`` 0.01 or 100 thresholded records are placed at their CR at that multiple
    of the zero threshold, and the files get a ``-thr<scale>x`` suffix (a robustness check; no cost
    or settling tables, which do not depend on it, and no comparisons)."""
    folder = Path(results_dir) / grid
    results = cv.load_results(folder / "results.csv", threshold_scale)
    suffix = "" if threshold_scale == 1.0 else f"-thr{threshold_scale:g}x"
    label = grid if not suffix else f"{grid}, thresholded CR counted at {threshold_scale:g}x the zero threshold"
    notes = results.notes()
    dense = tb.dense_summary(results)
    files, markdown = [], []
    for table in build_tables(results, label, points, crs, with_cost=not suffix, with_comparisons=not suffix):
        if not table.headline:
            md = markdown_document(table.title, table.explanation, table.wide, pd.DataFrame(), table.notes)
            outputs = {folder / f"{table.stem}.md": md}
            if table.tidy is not None:  # None: its CSV is the run's own (tuning.csv)
                outputs[folder / f"{table.stem}.csv"] = table.tidy.to_csv(index=False)
            if table.latex:
                outputs[folder / f"{table.stem}.tex"] = latex_table(
                    table.wide, f"{table.title}. {table.explanation}", f"tab:{folder.name}-{table.stem}", long=True)
        else:
            md = markdown_document(table.title, table.explanation, table.wide, dense, notes)
            caption = f"{table.title}. {table.explanation}"
            if len(dense):
                caption += " Dense accuracy: " + "; ".join(dense_lines(dense)) + "."
            label_tex = f"tab:{folder.name}-{table.stem.replace('_', '-')}{suffix}"
            outputs = {folder / f"{table.stem}{suffix}.csv": table.tidy.to_csv(index=False),
                       folder / f"{table.stem}{suffix}.md": md,
                       folder / f"{table.stem}{suffix}.tex": latex_table(table.wide, caption, label_tex)}
            markdown.append(md)
        for path, text in outputs.items():
            write_table(path, text)
            files.append(path)
    return files, "\n".join(markdown)


def write_table(path: Path, text: str) -> None:
    """Write one table file atomically (a reader, or a run of report beside this one, sees the old
    table or the new one, never a torn one: docs/design.md), in UTF-8 whatever the locale."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), binary=True)


TUNING_EXPLANATION = (
    "Each tuned curve's candidates with their validation score (mean validation accuracy over the tuning seeds "
    "and scoring CRs, log-CR interpolation; beyond a candidate's measured CRs by more than 1.5x: chance); "
    "the pick in bold. Test data never enters a pick. Tuning cells and their CPU-hours are what the choice cost "
    "(docs/tuning.md). A pick at the edge of its candidates is noted: the range should be extended before it is "
    "trusted. A pick whose training diverged in every final cell of a seed is dropped for the next best, and noted."
)


def tuning_table(folder: Path) -> pd.DataFrame | None:
    """The grid's tuning table (``tuning.csv``, written by ``run``) one row per curve, formatted; None
    without one."""
    path = folder / "tuning.csv"
    if not path.is_file():
        return None
    tidy = cv.read_csv_checked(path, ("curve", "parameter", "candidate", "val_score", "picked", "tuning_cells",
                                      "tuning_cpu_hours"))
    rows = []
    for curve, group in tidy.groupby("curve", sort=False):
        picked = group["picked"].astype(str).str.lower() == "true"
        scores = [f"**{c:g}: {100 * v:.2f}**" if p else f"{c:g}: {100 * v:.2f}"
                  for c, v, p in zip(group["candidate"].astype(float), group["val_score"].astype(float), picked)]
        first = group.iloc[0]
        rows.append({"curve": curve, "parameter": first["parameter"], "candidates: validation score (%)": ", ".join(scores),
                     "tuning cells": int(first["tuning_cells"]), "CPU-hours": f"{float(first['tuning_cpu_hours']):.2f}",
                     "note": _tuning_note(group, picked)})
    return pd.DataFrame(rows)


def _tuning_note(group: pd.DataFrame, picked: pd.Series) -> str:
    """A curve's note in the tuning table: a pick at an edge of its candidates, candidates dropped for
    diverged final training (``final_diverged``; tables written before it have no such column)."""
    examples = None
    if {"validation", "seeds"} <= set(group.columns):
        validation = pd.to_numeric(group["validation"], errors="coerce").iloc[0]
        seeds = len(str(group["seeds"].iloc[0]).split())
        examples = int(validation) * seeds if math.isfinite(validation) and validation > 0 else None
    notes = [tuning.edge_note(group["candidate"].tolist(), group["candidate"][picked].iloc[0] if picked.any() else None,
                              pd.to_numeric(group["val_score"], errors="coerce").tolist(), examples)]
    if "final_diverged" in group:
        counts = pd.to_numeric(group["final_diverged"], errors="coerce").fillna(0)
        dropped = {c: n for c, n in zip(group["candidate"], counts) if n > 0}
        if dropped:
            notes.append(tuning.dropped_note(str(group.iloc[0]["parameter"]), dropped)
                         + ("; the next best is picked" if picked.any() else "; no candidate is left"))
    return "; ".join(n for n in notes if n)


COMPARISONS_EXPLANATION = (
    "Each DWF curve (A) against every other curve of its arch × dataset (B; each pair of DWF depths once), "
    "at each CR of the accuracy table, from the same per-seed accuracies (interpolated linearly in log CR, never "
    "extrapolated; seeds: how many of A's / B's seeds reach the CR). A - B in percentage points with its 95 % "
    "confidence interval (Welch-Satterthwaite); p: Welch's two-sided t-test (seeds are independent trainings, not "
    "paired; spreads differ between methods); p Holm: Holm-Bonferroni over every comparison with a p of that "
    f"arch × dataset, all pairs at all CRs (family sizes in the notes). Verdict: A or B better where p Holm < "
    f"{cmp.ALPHA:g}; otherwise not resolved with that many seeds, which is no evidence that they are equal. A side "
    "with one seed gets no interval or p. Seed variance only: test-set sampling error comes on top "
    "(docs/comparisons.md)."
)
COST_EXPLANATION = (
    "Training behind each curve: epochs behind one point (a lottery ticket at level k trains k+1 times; "
    "pruned dense models count the dense training they start from), the same in dense trainings of the schedule "
    "(every method computes with dense kernels, so also its share of training FLOPs) and the hours its cells ran (CPU-hours = "
    "wall time x threads; a dense training shared through the cache is counted once, in the cell that ran it)."
)
SETTLING_EXPLANATION = (
    f"Thresholded records (DWF, L1): CR at 0.01x and 100x the zero threshold. A record counts as settled "
    f"when the two differ by at most {100 * (tb.SETTLED_RATIO - 1):.0f}%; otherwise its CR is decided by the "
    f"threshold, not by training."
)


def format_p(p: float) -> str:
    """'0.034', '2.1e-05'; – where there is no p."""
    if not math.isfinite(p):
        return MISSING
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def comparisons_wide(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in table.itertuples():
        diff = MISSING if not math.isfinite(r.diff_pts) else f"{r.diff_pts:+.2f}"
        ci = MISSING if not math.isfinite(r.ci_low_pts) else f"[{r.ci_low_pts:+.2f}, {r.ci_high_pts:+.2f}]"
        rows.append({"arch": cv.ARCH_NAMES.get(r.arch, r.arch), "dataset": cv.DATASET_NAMES.get(r.dataset, r.dataset),
                     "CR": f"{r.cr:g}", "A": r.a, "B": r.b, "seeds": f"{r.n_a}/{r.n_b}",
                     "A %": format_acc(r.acc_a_pct, r.std_a_pct, r.n_a),
                     "B %": format_acc(r.acc_b_pct, r.std_b_pct, r.n_b),
                     "A - B (pts)": diff, "95 % CI": ci, "p": format_p(r.p), "p Holm": format_p(r.p_holm),
                     "verdict": r.verdict, "note": r.note or ""})
    return pd.DataFrame(rows)


def cost_wide(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in table.itertuples():
        epochs = MISSING if not math.isfinite(r.epochs_min) else (
            f"{r.epochs_min:.0f}" if r.epochs_min == r.epochs_max else f"{r.epochs_min:.0f}–{r.epochs_max:.0f}")
        cost = MISSING if not math.isfinite(r.train_cost_min) else (
            f"{r.train_cost_min:.2g}" if r.train_cost_min == r.train_cost_max
            else f"{r.train_cost_min:.2g}–{r.train_cost_max:.2g}")
        rows.append({"arch": cv.ARCH_NAMES.get(r.arch, r.arch), "dataset": cv.DATASET_NAMES.get(r.dataset, r.dataset),
                     "method": r.variant, "points": str(r.points), "seeds": str(r.seeds), "epochs per point": epochs,
                     "dense trainings per point": cost,
                     "hours": f"{r.wall_h:.3g}", "CPU-hours": f"{r.cpu_h:.3g}", "device": r.devices})
    return pd.DataFrame(rows)


def settling_wide(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (arch, dataset, variant), group in table.groupby(["arch", "dataset", "variant"], sort=False):
        unsettled = group[~group.settled.astype(bool)]
        # name the learning rate and length only where they vary within the curve (calibration grids)
        varying = [c for c in ("lr", "epochs_schedule") if group[c].nunique(dropna=True) > 1]

        def setting(r) -> str:
            extra = "".join(f", lr={r.lr:g}" if c == "lr" else f", {r.epochs_schedule:g} ep" for c in varying)
            return f"λ={r.lam:g}{extra}, seed {r.seed}"

        listed = "; ".join(f"{setting(r)}: {r.cr_thr_small:.3g} / {r.cr:.3g} / {r.cr_thr_large:.3g}"
                           for r in unsettled.itertuples())
        rows.append({"arch": cv.ARCH_NAMES.get(arch, arch), "dataset": cv.DATASET_NAMES.get(dataset, dataset),
                     "method": variant, "records": str(len(group)), "settled": str(int(group.settled.sum())),
                     "not settled (CR at 0.01x / 1x / 100x threshold)": listed or MISSING})
    return pd.DataFrame(rows)
