"""The figures of ``python -m benchmark plot``, from ``results.csv`` and ``layers.csv`` only (no training).

Three figures, each as PNG and PDF in ``<plots-dir>/<grid>/``:

- ``accuracy_vs_cr``: one panel per arch x dataset, accuracy against compression on a log axis,
  a mean line with a ±1 std band over seeds per variant (aggregation in :mod:`benchmark.analysis.curves`),
  the single runs as faint markers and the dense accuracy as a dashed reference line;
- ``layer_sparsity``: per panel, the weights each layer keeps in the run of each variant closest
  to one CR, so layer collapse (a layer pruned to nothing) is visible;
- ``effective_cr``: direct CR against effective CR (weights on no input-output path count as
  pruned), for the variants where the two differ;
- ``trajectories`` (from ``history.csv``): for the methods that track it every epoch (DWF, L1),
  test accuracy, CR (with the band between 0.01x and 100x the zero threshold) and the factors'
  misalignment against the epoch, for the run of each variant closest to one final CR.

This module draws every figure but the per-layer one (:mod:`benchmark.analysis.plot_layers`: it alone
joins ``layers.csv``) and writes them all; every figure's colours, markers and axes come from
:mod:`benchmark.analysis.plot_style`, so a variant looks the same in each.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; must come before pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from benchmark.analysis import curves as cv  # noqa: E402
from benchmark.analysis import tables as tb  # noqa: E402
from benchmark.analysis.plot_layers import plot_layer_sparsity  # noqa: E402
from benchmark.analysis.plot_style import (Style, legend_handle, panel_axes, plain_log_axis,  # noqa: E402
                                           variant_styles)

FIGURE_FORMATS = ("png", "pdf")


# -- accuracy against CR, and against training cost -------------------------------------------------


def plot_accuracy_vs_cr(results: cv.Results, title: str = "") -> plt.Figure:
    """One panel per arch x dataset: accuracy (%) against CR (log), mean ± std over seeds per variant."""
    panels = results.panels()
    styles = variant_styles(results.variant_info())
    fig, axes = panel_axes(len(panels))
    used, whiskers = [], 0
    for ax, (arch, dataset) in zip(axes, panels):
        dense = results.dense_by_seed(arch, dataset)
        if dense:
            ax.axhline(100 * float(np.mean(list(dense.values()))), color="0.2", linestyle="--", linewidth=1.1,
                       zorder=1)
        for variant in results.variants(arch, dataset):
            style = styles[variant]
            curves = results.seed_curves(arch, dataset, variant)
            mean = cv.mean_curve(curves)
            if mean.empty:
                continue
            drawn = mean.drawn.to_numpy(bool)
            y = np.where(drawn, 100 * mean["mean"], np.nan)
            spread = np.where(drawn, 100 * mean["std"], np.nan)
            ax.plot(mean.cr, y, linewidth=1.8, label=variant, zorder=3, **style.line_kwargs())
            if len(curves) > 1:
                ax.fill_between(mean.cr, y - spread, y + spread, color=style.color, alpha=0.18, linewidth=0, zorder=2)
            for curve in curves:
                ax.plot(curve.cr, 100 * curve.acc, linestyle="none", marker=style.marker, markersize=4,
                        color=style.color, alpha=0.55, zorder=4)
            whiskers += _threshold_whiskers(ax, results.panel_rows(arch, dataset, variant), style)
            if variant not in used:
                used.append(variant)
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
        ax.set_title(cv.panel_title(arch, dataset))
        ax.set_xlabel("compression ratio (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", axis="x", alpha=0.1)
    order = results.variants()
    handles = [legend_handle(styles[v], v) for v in order if v in used]
    handles.append(Line2D([], [], color="0.2", linestyle="--", linewidth=1.1, label="dense (mean over seeds)"))
    fig.legend(handles=handles, loc="outside right upper", frameon=False, alignment="left",
               title="line: mean over seeds\nband: ±1 std\nmarkers: single runs"
               + ("\nwhisker: CR at 0.01x..100x\nthe zero threshold (unsettled)" if whiskers else ""),
               title_fontsize="small")
    fig.suptitle((f"{title}: " if title else "") + "test accuracy vs compression", fontsize="medium",
                 x=0.02, ha="left")
    return fig


def cost_at_cr(results: cv.Results, arch: str, dataset: str, variant: str, at_cr: float) -> tuple[list, list]:
    """Per complete seed, (training cost, test accuracy) at ``at_cr``, each interpolated in log CR as the
    tables do (a lottery ticket's cost grows with its level); seeds that do not reach it are left out."""
    frame = results.panel_rows(arch, dataset, variant)
    if "train_cost" not in frame:
        return [], []
    partial = results.partial_seeds(arch, dataset, variant)
    costs, accs = [], []
    for seed, rows in frame.groupby("seed", sort=True):
        if seed in partial:
            continue
        cost = cv.Curve.from_points(seed, rows.cr, pd.to_numeric(rows.train_cost, errors="coerce")).at(at_cr)[0]
        acc = cv.Curve.from_points(seed, rows.cr, rows.test_acc).at(at_cr)[0]
        if np.isfinite(cost) and np.isfinite(acc):
            costs.append(cost)
            accs.append(acc)
    return costs, accs


def plot_cost_vs_accuracy(results: cv.Results, at_cr: float, title: str = "") -> plt.Figure | None:
    """One panel per arch x dataset: each curve's test accuracy at ``at_cr`` against the training it
    cost (dense trainings of the schedule, log scale), mean ± std over seeds. None when no curve
    reaches ``at_cr`` or the CSV has no ``train_cost``."""
    panels = results.panels()
    styles = variant_styles(results.variant_info())
    points = {(arch, dataset, v): cost_at_cr(results, arch, dataset, v, at_cr)
              for arch, dataset in panels for v in results.variants(arch, dataset)}
    if not any(costs for costs, _ in points.values()):
        return None
    fig, axes = panel_axes(len(panels))
    used = []
    for ax, (arch, dataset) in zip(axes, panels):
        for variant in results.variants(arch, dataset):
            costs, accs = points[(arch, dataset, variant)]
            if not costs:
                continue
            style = styles[variant]
            ax.errorbar(np.mean(costs), 100 * np.mean(accs), yerr=100 * np.std(accs, ddof=1) if len(accs) > 1 else None,
                        linestyle="none", marker=style.marker, markersize=7, color=style.color, capsize=3, zorder=3)
            if variant not in used:
                used.append(variant)
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
        ax.set_title(cv.panel_title(arch, dataset))
        ax.set_xlabel("training cost (dense trainings of the schedule, log scale)")
        ax.set_ylabel(f"test accuracy at CR {at_cr:g} (%)")
        ax.grid(True, which="major", alpha=0.3)
    handles = [legend_handle(styles[v], v) for v in results.variants() if v in used]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, alignment="left",
               title="mean ± std over seeds", title_fontsize="small")
    fig.suptitle((f"{title}: " if title else "") + f"accuracy at CR {at_cr:g} vs training cost", fontsize="medium",
                 x=0.02, ha="left")
    return fig


def _threshold_whiskers(ax, rows: pd.DataFrame, style: Style) -> int:
    """For thresholded runs whose CR still depends on the zero threshold (CR at 0.01x and 100x differ
    by more than ``tb.SETTLED_RATIO``), a horizontal whisker over that CR range: how far the point
    could move if the threshold did."""
    if not {"cr_thr_small", "cr_thr_large"} <= set(rows.columns):
        return 0
    small = pd.to_numeric(rows.cr_thr_small, errors="coerce")
    large = pd.to_numeric(rows.cr_thr_large, errors="coerce")
    loose = (large / small > tb.SETTLED_RATIO) & np.isfinite(small) & np.isfinite(large)
    for lo, hi, acc in zip(small[loose], large[loose], rows.test_acc[loose]):
        ax.plot([lo, hi], [100 * acc, 100 * acc], color=style.color, alpha=0.45, linewidth=0.9, zorder=2,
                solid_capstyle="butt")
    return int(loose.sum())


# -- direct against effective CR --------------------------------------------------------------------


def plot_effective_cr(results: cv.Results, title: str = "", rel_tol: float = 1e-3) -> plt.Figure | None:
    """Direct CR against effective CR (log-log) for the variants where they differ; None if nowhere."""
    if "cr_effective" not in results.ok.columns:
        return None
    ok = results.ok[~cv.reference_rows(results.ok)]
    ok = ok[np.isfinite(ok.cr) & ok.cr_effective.notna()]
    differs = ~np.isclose(ok.cr_effective, ok.cr, rtol=rel_tol, atol=0)
    shown = set(ok.loc[differs, "variant"])
    panels = [p for p in results.panels() if ((ok.arch == p[0]) & (ok.dataset == p[1]) & differs).any()]
    if not panels:
        return None
    styles = variant_styles(results.variant_info())
    fig, axes = panel_axes(len(panels), panel_size=(4.4, 4.0))
    any_infinite = False
    for ax, (arch, dataset) in zip(axes, panels):
        frame = ok[(ok.arch == arch) & (ok.dataset == dataset) & ok.variant.isin(shown)]
        finite = frame[np.isfinite(frame.cr_effective)]
        top = max(finite.cr_effective.max(), frame.cr.max()) if len(finite) else frame.cr.max()
        for variant in results.variants(arch, dataset):
            rows = frame[frame.variant == variant]
            if rows.empty:
                continue
            style = styles[variant]
            fin = rows[np.isfinite(rows.cr_effective)]
            # hollow markers, so runs of different methods at the same spot stay visible
            ax.plot(fin.cr, fin.cr_effective, linestyle="none", marker=style.marker, color=style.color,
                    markerfacecolor="none", markeredgewidth=1.5, markersize=7, label=variant)
            inf = rows[~np.isfinite(rows.cr_effective)]
            if len(inf):
                ax.plot(inf.cr, np.full(len(inf), top * 4), linestyle="none", marker=style.marker, color=style.color,
                        markerfacecolor="none", markeredgewidth=1.5, markersize=7)
        lo = min(frame.cr.min(), finite.cr_effective.min() if len(finite) else frame.cr.min())
        panel_infinite = bool((~np.isfinite(frame.cr_effective)).any())
        any_infinite |= panel_infinite
        if panel_infinite:  # a separate row above the finite values, labelled on the axis
            ax.axhline(top * 4, color="0.6", linestyle=":", linewidth=1, zorder=0)
            ax.text(0.02, top * 4, " effective CR = ∞", transform=ax.get_yaxis_transform(), va="bottom",
                    fontsize="small", color="0.3")
        hi = top * 1.5
        ax.plot([lo / 1.5, hi], [lo / 1.5, hi], color="0.3", linestyle="--", linewidth=1, zorder=0)
        ax.set_ylim(lo / 1.5, top * (8 if panel_infinite else 2))
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain_log_axis(ax.xaxis)
        plain_log_axis(ax.yaxis)
        ax.set_title(cv.panel_title(arch, dataset))
        ax.set_xlabel("CR (nonzero weights)")
        ax.set_ylabel("effective CR (weights on a path)")
        ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], linestyle="none", marker=styles[v].marker, color=styles[v].color, markerfacecolor="none",
                      markeredgewidth=1.5, markersize=7, label=v) for v in results.variants() if v in shown]
    handles.append(Line2D([], [], color="0.3", linestyle="--", label="effective = direct"))
    if any_infinite:
        handles.append(Line2D([], [], color="0.6", linestyle=":", label="effective CR = ∞:\nno input-output path left"))
    on_diagonal = [v for v in results.variants() if v not in shown and v in set(ok.variant)]
    if on_diagonal:  # say where the missing methods went
        handles.append(Line2D([], [], linestyle="none", label=f"not shown (effective = direct\nwithin {rel_tol:.1%} everywhere): "
                              + textwrap.fill(", ".join(on_diagonal), 28)))
    fig.legend(handles=handles, loc="outside right upper", frameon=False, alignment="left",
               title="above the diagonal: kept weights\nthat no longer carry signal", title_fontsize="small")
    fig.suptitle((f"{title}: " if title else "") + "direct vs effective compression", fontsize="medium",
                 x=0.02, ha="left")
    return fig


# -- per-epoch trajectories -------------------------------------------------------------------------

TRAJECTORY_AT_CR = 100.0


def plot_trajectories(results: cv.Results, history: pd.DataFrame, at_cr: float = TRAJECTORY_AT_CR,
                      seed: int | None = None) -> tuple[plt.Figure | None, list[str]]:
    """Per-epoch test accuracy, CR and (DWF) misalignment of one run per variant: the run whose final
    CR is closest to ``at_cr`` (log scale) among the lowest seed's, for the variants whose history has a
    per-epoch ``cr``. The first panel only (one arch x dataset) is drawn; the CR band spans the CR at
    0.01x and 100x the zero threshold, so a wide band means sparsity has not settled yet."""
    if "cr" not in history.columns:
        return None, ["history.csv has no per-epoch cr: no trajectory figure"]
    tracked = history[pd.to_numeric(history["cr"], errors="coerce").notna()]
    panels = [p for p in results.panels() if not tracked.empty]
    if not panels:
        return None, ["no method recorded a per-epoch CR: no trajectory figure"]
    arch, dataset = panels[0]
    frame = results.panel_rows(arch, dataset)
    frame = frame[frame.cell_id.isin(set(tracked.cell_id)) & np.isfinite(frame.cr) & (frame.status == "ok")]
    if frame.empty:
        return None, [f"no tracked run in {arch}/{dataset}: no trajectory figure"]
    seed = int(frame.seed.min()) if seed is None else seed
    frame = frame[frame.seed == seed].copy()
    frame["distance"] = np.abs(np.log(frame.cr / at_cr))
    picked = frame.sort_values("distance").drop_duplicates("variant")
    styles = variant_styles(results.variant_info())
    order = [v for v in results.variants(arch, dataset) if v in set(picked.variant)]
    has_balance = "balance_error" in tracked.columns and tracked["balance_error"].notna().any()
    fig, axes = plt.subplots(1, 3 if has_balance else 2, figsize=(14 if has_balance else 9.5, 3.8),
                             layout="constrained")
    dense = results.dense_by_seed(arch, dataset)
    if seed in dense:
        axes[0].axhline(100 * dense[seed], color="0.2", linestyle="--", linewidth=1.1, label="dense")
    for variant in order:
        row = picked[picked.variant == variant].iloc[0]
        run = tracked[tracked.cell_id == row.cell_id].sort_values("epoch")
        epoch = pd.to_numeric(run["epoch"])
        style = styles[variant]
        knob = f"λ={row.lam:g}, " if pd.notna(row.get("lam")) else ""
        label = f"{variant} ({knob}final CR {row.cr:.0f})"
        marker = {"marker": style.marker, "markersize": 3} if len(run) < 20 else {}
        axes[0].plot(epoch, 100 * pd.to_numeric(run["test_acc"]), label=label, **style.line_kwargs(), **marker)
        axes[1].plot(epoch, pd.to_numeric(run["cr"]), **style.line_kwargs(), **marker)
        if {"cr_thr_small", "cr_thr_large"} <= set(run.columns):
            axes[1].fill_between(epoch, pd.to_numeric(run["cr_thr_small"]), pd.to_numeric(run["cr_thr_large"]),
                                 color=style.color, alpha=0.15, linewidth=0)
        if has_balance and run["balance_error"].notna().any():
            axes[2].plot(epoch, pd.to_numeric(run["balance_error"]), **style.line_kwargs(), **marker)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("CR (band: threshold x0.01 .. x100)")
    axes[1].set_yscale("log")
    plain_log_axis(axes[1].yaxis)
    if has_balance:
        axes[2].set_ylabel("factor misalignment (DWF)")
        axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right upper", frameon=False, fontsize="small")
    fig.suptitle(f"{cv.panel_title(arch, dataset)}, seed {seed}: per-epoch trajectory of the run closest to "
                 f"CR {at_cr:g} per variant", fontsize="medium", x=0.02, ha="left")
    notes = []
    if len(results.panels()) > 1:
        notes.append(f"trajectory figure shows {arch}/{dataset} only")
    return fig, notes


# -- command -----------------------------------------------------------------------------------------


def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """Writes each format; a PDF without its creation date, so that the same results give the same
    bytes (a rebuilt reference figure that did not change shows no change in git)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FIGURE_FORMATS:
        path = stem.with_suffix(f".{fmt}")
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata=metadata)
        written.append(path)
    plt.close(fig)
    return written


#: The CR of the training-cost figure unless ``plot --at-cr`` names one: where the reference's curves
#: separate and most of them still train.
COST_AT_CR = 100.0


def figures(grid: str, results_dir: Path | str = "results",
            at_cr: float | None = None) -> tuple[list[tuple[str, plt.Figure]], list[str]]:
    """Every figure of a grid's CSVs as (file stem, figure), and notes about what is left out."""
    source = Path(results_dir) / grid
    results = cv.load_results(source / "results.csv")
    layers = cv.load_layers(source / "layers.csv")
    notes = results.notes()
    drawn = [("accuracy_vs_cr", plot_accuracy_vs_cr(results, title=grid))]
    if layers is None:
        notes.append(f"{source / 'layers.csv'} does not exist: no per-layer figure")
    else:
        fig, layer_notes = plot_layer_sparsity(results, layers, at_cr, title=grid)
        notes += layer_notes
        if fig is not None:
            drawn.append(("layer_sparsity", fig))
    fig = plot_effective_cr(results, title=grid)
    if fig is None:
        notes.append("effective CR equals CR for every run (or is not in the CSV): no effective-CR figure")
    else:
        drawn.append(("effective_cr", fig))
    cost_cr = at_cr or COST_AT_CR
    fig = plot_cost_vs_accuracy(results, cost_cr, title=grid)
    if fig is None:
        notes.append(f"no curve reaches CR {cost_cr:g} (or the CSV has no train_cost): no training-cost figure")
    else:
        drawn.append(("cost_vs_accuracy", fig))
    history = cv.load_history(source / "history.csv")
    if history is not None and len(history):
        fig, trajectory_notes = plot_trajectories(results, history)
        notes += trajectory_notes
        if fig is not None:
            drawn.append(("trajectories", fig))
    return drawn, notes


def write_plots(grid: str, results_dir: Path | str = "results", plots_dir: Path | str = "plots",
                at_cr: float | None = None) -> tuple[list[Path], list[str]]:
    """Draw every figure of a grid's CSVs into ``plots_dir/grid``; returns (files, notes)."""
    drawn, notes = figures(grid, results_dir, at_cr)
    files = []
    for stem, fig in drawn:
        files += save_figure(fig, Path(plots_dir) / grid / stem)
    return files, notes
