"""The per-layer figure of ``plot`` (``layer_sparsity``): the share of weights each layer keeps in the
run of each variant closest to one CR, from ``results.csv`` joined with ``layers.csv``.

Its own module because it alone picks single runs near a CR and joins the per-layer CSV; a layer
pruned to nothing (layer collapse) is marked with a cross, so it is visible next to the bars.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only; must come before pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from benchmark.analysis import curves as cv  # noqa: E402
from benchmark.analysis.plot_style import Style, variant_styles  # noqa: E402

#: A run counts as "at" the chosen CR of the per-layer figure when its CR is within this factor of it
#: (its legend entry says its CR). Half a decade: a λ grid of three points per decade-and-a-half, as
#: the quick grid's DWF D=4 (CR 8.5, 380, 1050), still has a point near CR 100.
AT_CR_FACTOR = 5.0
DEFAULT_AT_CR = 100.0


def default_at_cr(results: cv.Results, arch: str, dataset: str) -> float:
    """100, or less when most variants of the panel never get that far: the median over variants of
    the largest CR each reaches (so one variant that stops early does not pull every panel down)."""
    finite = results.panel_rows(arch, dataset)
    finite = finite[np.isfinite(finite.cr) & ~cv.reference_rows(finite)]
    if finite.empty:
        return DEFAULT_AT_CR
    reached_by_most = float(finite.groupby("variant").cr.max().median())
    return min(DEFAULT_AT_CR, reached_by_most)


def runs_closest_to(results: cv.Results, arch: str, dataset: str, at_cr: float) -> tuple[pd.DataFrame, list[str]]:
    """Per variant, the run whose CR is closest to ``at_cr`` in log scale; variants with none within
    a factor AT_CR_FACTOR are returned by name instead."""
    frame = results.panel_rows(arch, dataset)
    frame = frame[np.isfinite(frame.cr) & (frame.cr > 0) & ~cv.reference_rows(frame)].copy()
    frame["distance"] = np.abs(np.log(frame.cr / at_cr))
    picked, too_far = [], []
    for variant in results.variants(arch, dataset):
        rows = frame[frame.variant == variant].sort_values(["distance", "seed"])
        if rows.empty or rows.distance.iloc[0] > math.log(AT_CR_FACTOR):
            too_far.append(variant)
        else:
            picked.append(rows.iloc[0])
    return pd.DataFrame(picked), too_far


def plot_layer_sparsity(results: cv.Results, layers: pd.DataFrame, at_cr: float | None = None,
                        title: str = "") -> tuple[plt.Figure | None, list[str]]:
    """Grouped bars per layer: the share of weights each variant keeps there, near one CR.

    Returns the figure (None when no panel has a run near the CR) and notes about what is left out."""
    notes = []
    if "cell_id" not in results.rows.columns:
        return None, ["results.csv has no cell_id column, so layers.csv cannot be joined; no per-layer figure"]
    styles = variant_styles(results.variant_info())
    layers = layers.assign(cell_id=layers.cell_id.astype(str))
    jobs = []
    for arch, dataset in results.panels():
        target = at_cr if at_cr is not None else default_at_cr(results, arch, dataset)
        picked, too_far = runs_closest_to(results, arch, dataset, target)
        if too_far:
            notes.append(f"{arch}/{dataset}: no run within a factor {AT_CR_FACTOR:g} of CR {target:g} for "
                         f"{', '.join(too_far)} (left out of the per-layer figure)")
        if picked.empty:
            continue
        picked = picked.assign(cell_id=picked.cell_id.astype(str))
        joined = picked[["variant", "cell_id", "level_key", "cr", "seed"]].merge(
            layers, on=["cell_id", "level_key"], how="left")
        without = sorted(set(joined.loc[joined.layer.isna(), "variant"]))
        if without:
            notes.append(f"{arch}/{dataset}: layers.csv has no rows for the picked run of {', '.join(without)}")
        joined = joined.dropna(subset=["layer"])
        if not joined.empty:
            jobs.append((arch, dataset, target, joined))
    if not jobs:
        return None, notes + ["no per-layer figure: no run near the chosen CR has per-layer rows"]
    widths = [len(j[3].layer.unique()) * max(1, len(j[3].variant.unique())) for j in jobs]
    fig, axes = plt.subplots(len(jobs), 1, squeeze=False, layout="constrained",
                             figsize=(min(18, max(8, 3.5 + 0.16 * max(widths))), 3.6 * len(jobs) + 0.5))
    for ax, (arch, dataset, target, joined) in zip(axes[:, 0], jobs):
        _draw_layer_bars(ax, joined, styles, results.variants(arch, dataset), target)
        ax.set_title(f"{cv.panel_title(arch, dataset)}: runs closest to CR {target:.3g}")
    fig.suptitle((f"{title}: " if title else "") + "weights kept per layer "
                 "(× = layer pruned to nothing; dotted line: every layer pruned alike)", fontsize="medium")
    return fig, notes


def _draw_layer_bars(ax, joined: pd.DataFrame, styles: dict[str, Style], order: list[str], target: float) -> None:
    layer_order = (joined.groupby("layer").agg(index=("layer_index", "min"), numel=("numel", "max"))
                   if "numel" in joined.columns else joined.groupby("layer").agg(index=("layer_index", "min")))
    layer_order = layer_order.sort_values("index")
    names = list(layer_order.index)
    variants = [v for v in order if v in set(joined.variant)]
    width = 0.8 / max(1, len(variants))
    kept_all = 100 * (1 - joined.sparsity.to_numpy(float))
    positive = kept_all[kept_all > 0]
    # down to a whole decade below the smallest bar, so the bottom of the axis has a labelled tick
    floor = 10 ** math.floor(math.log10(max(1e-3, float(positive.min()) / 2))) if len(positive) else 1e-2
    for i, variant in enumerate(variants):
        rows = joined[joined.variant == variant].set_index("layer").reindex(names)
        kept = 100 * (1 - rows.sparsity.to_numpy(float))
        x = np.arange(len(names)) + (i - (len(variants) - 1) / 2) * width
        first = rows.dropna(subset=["cr"]).iloc[0]
        cr = f"{first.cr:,.0f}" if first.cr >= 100 else f"{first.cr:.3g}"  # 2,000, not 2e+03
        label = f"{variant} (CR {cr}, seed {first.seed})"
        ax.bar(x, np.where(kept > 0, kept, np.nan), width=width, color=styles[variant].color, label=label,
               edgecolor="white", linewidth=0.4)
        collapsed = kept <= 0
        if collapsed.any():
            ax.plot(x[collapsed], np.full(collapsed.sum(), floor * 1.5), linestyle="none", marker="x",
                    markersize=7, markeredgewidth=2, color=styles[variant].color)
    ax.axhline(100 / target, color="0.3", linestyle=":", linewidth=1.2, label=f"uniform: {100 / target:.3g} % kept")
    ax.set_ylim(floor, 100 * 1.3)  # limits before the log scale: an all-empty axis has equal ones
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("weights kept in layer (%)")
    ax.set_xticks(np.arange(len(names)))
    if "numel" in layer_order.columns:
        ticks = [f"{n}\n{_count(c)}" for n, c in zip(names, layer_order.numel)]
    else:
        ticks = names
    ax.set_xticklabels(ticks, rotation=0 if len(names) <= 8 else 45, ha="center" if len(names) <= 8 else "right",
                       fontsize="small")
    ax.set_xlabel("layer (input to output) and its number of weights")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize="small")


def _count(n) -> str:
    if n is None or pd.isna(n):
        return ""
    n = float(n)
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"
