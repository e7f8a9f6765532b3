"""Read the tidy results CSV and turn it into accuracy-vs-compression curves.

``plot`` and ``tables`` (the report's numbers) both build on this module, so a figure and a table
made from the same CSV agree on every choice below. Nothing here trains or imports torch.

Choices (docs/design.md, "Sparsity is an outcome": compare at matched CR, never at a target):

- **Curve.** One curve per (arch, dataset, variant, seed): its rows with status ``ok`` sorted by
  ``cr``. Rows that reach the same CR are averaged. Rows with infinite CR (everything pruned) cannot
  be placed on a log axis, so they are left out and counted in the notes.
- **Interpolation.** Accuracy is linear in log(CR) between two measured points of one seed, and
  undefined (NaN) outside that seed's first..last measured CR: we never extrapolate.
- **Mean curve over seeds** (plots). λ-driven methods reach a different CR for each seed, so the
  points of different seeds do not line up. Each seed's curve is evaluated on a common grid (80
  log-spaced CRs over the union of the seeds' ranges, plus every measured CR); at each grid CR the
  mean and std use the seeds whose range covers it. The line is drawn only where every seed covers
  the CR, so the mean never jumps where a seed's curve ends (if the ranges do not overlap at all,
  it is drawn wherever some seed covers it). The measured points themselves are drawn too.
- **Partial seeds.** A seed that has run fewer cells of a variant than that variant's fullest seed
  in the panel (failed cells count as run) is a sweep still going: its few points would pull the
  mean and std toward one end of the curve, so curves, tables and figures leave it out, and the
  notes say so. Grids cross seeds with everything, so a finished grid has no partial seed.
- **Dense reference.** Rows with method ``dense`` give the dense accuracy per (arch, dataset, seed).
  A seed without its own dense row is compared with the mean dense accuracy of that panel.
- **Largest CR within k points.** Walk each seed's curve (points sorted by CR, with the dense point
  (CR 1, dense accuracy) put first in place of any measured point at CR <= 1). The answer is the
  largest CR at which the accuracy interpolated linearly in log(CR) is >= dense_acc - k/100. The
  accuracy need not fall monotonically; the largest such CR wins. If the last measured point still
  satisfies it, the answer is that point's CR and is only a lower bound (``lower_bound`` True, shown
  as "≥"): no extrapolation. CR 1 means "no compression stays within k points".
- **Accuracy at a fixed CR.** Interpolated in the same way on the measured points only (no dense
  point, which is a different model); blank for a seed whose measured range does not contain it.
- **Over seeds.** Mean and sample std (ddof=1; 0 with one seed) of the per-seed answers, on the
  CR itself (not its log), as in the papers' tables.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.core.interpolation import REL_EPS, interpolate_log_cr

#: Columns ``results.csv`` must have; the rest are optional.
REQUIRED_RESULT_COLUMNS = ("arch", "dataset", "method", "seed", "test_acc", "cr")
#: Columns ``layers.csv`` must have.
REQUIRED_LAYER_COLUMNS = ("cell_id", "level", "layer", "layer_index", "sparsity")
#: Readable names for panel titles; unknown names are shown as they are.
ARCH_NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5", "vgg16": "VGG-16", "vgg19": "VGG-19",
              "resnet18": "ResNet-18"}
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "kmnist": "KMNIST", "cifar10": "CIFAR-10",
                 "cifar100": "CIFAR-100", "tiny-imagenet": "Tiny ImageNet"}
_GRID_POINTS = 80
_REL_EPS = REL_EPS  # CRs closer than this (relative) count as equal
_ACC_EPS = 1e-12  # so that 0.99 - 0.10 >= 0.89 holds despite float rounding


def panel_title(arch: str, dataset: str) -> str:
    return f"{ARCH_NAMES.get(arch, arch)} / {DATASET_NAMES.get(dataset, dataset)}"


#: What --grid means to plot and report.
GRID_HELP = ("preset name or path to a grid TOML file, as for run: its results folder <results-dir>/<name> is read "
             "(an earlier run's folder name works too); default: the grid of the last run in --results-dir")


def collect_hint(path: Path) -> str:
    grid = path.parent.name or "GRID"
    return (f"produce it with `python -m benchmark run --grid {grid}` (which writes it when it ends), or rebuild it "
            f"from the result files with `python -m benchmark collect --grid {grid}`")


def read_csv_checked(path: Path | str, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV or fail with one message that names the file, the problem and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {collect_hint(path)}")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; {collect_hint(path)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable CSV ({str(exc).strip()}); {collect_hint(path)}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks required column(s) {', '.join(missing)} (it has: "
                         f"{', '.join(map(str, frame.columns))}); {collect_hint(path)}")
    if frame.empty:
        raise ValueError(f"{path} has a header but no rows; {collect_hint(path)}")
    return frame


def level_key(values: pd.Series) -> pd.Series:
    """Lottery level as a join key: '' when empty, '3' for 3 or 3.0, so both CSVs agree."""
    def one(v):
        if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() in ("", "nan", "None"):
            return ""
        try:
            f = float(v)
            return str(int(f)) if f.is_integer() else str(f)
        except ValueError:
            return str(v)
    return values.map(one)


def method_class(method: str):
    """The installed method of this name, or None (a CSV may hold methods of a plugin that is not
    installed here: they are drawn and tabled by their name, after the known ones)."""
    from benchmark.core.method import all_methods

    return all_methods().get(str(method))


def is_reference(method: str) -> bool:
    """Whether rows of ``method`` are the reference line (the dense model), not a curve."""
    found = method_class(method)
    return bool(found and found.is_reference)


def reference_rows(frame: pd.DataFrame) -> pd.Series:
    """Which rows of ``frame`` are the reference (dense) model's."""
    return frame["method"].map(is_reference).astype(bool)


def derive_variant(method: str, values) -> str:
    """The curve of a row that has no ``variant`` (CSVs written before it was a column):
    ``Method.curve_label`` of its columns, the method's name for a method not installed here."""
    found = method_class(method)
    return found.curve_label(values) if found else str(method)


def _variant_sort_key(method: str, values, variant: str):
    """Known methods in their ``plotting.order``, each one's curves by ``plotting.rank``; unknown ones
    after them, by name."""
    found = method_class(method)
    order = found.plotting.order if found else math.inf
    rank = found.plotting.rank(values) if found else 0.0
    return (order, method if order == math.inf else "", rank, variant)


@dataclass
class Curve:
    """One seed's measured points, sorted by CR with equal CRs merged."""

    seed: object
    cr: np.ndarray
    acc: np.ndarray

    @classmethod
    def from_points(cls, seed, cr, acc) -> "Curve":
        points = pd.DataFrame({"cr": np.asarray(cr, float), "acc": np.asarray(acc, float)})
        points = points[np.isfinite(points.cr) & np.isfinite(points.acc) & (points.cr > 0)]
        merged = points.groupby("cr", sort=True)["acc"].mean()
        return cls(seed, merged.index.to_numpy(float), merged.to_numpy(float))

    def covers(self, cr: float) -> bool:
        return len(self.cr) > 0 and self.cr[0] * (1 - _REL_EPS) <= cr <= self.cr[-1] * (1 + _REL_EPS)

    def at(self, crs) -> np.ndarray:
        """Accuracy interpolated linearly in log(CR); NaN outside the measured range."""
        return interpolate_log_cr(self.cr, self.acc, crs)


def largest_cr_within(cr, acc, dense_acc: float, points: float) -> tuple[float, bool]:
    """Largest CR whose log-CR-interpolated accuracy is >= dense_acc - points/100 (module docstring).

    Returns (CR, lower_bound); lower_bound is True when the last measured point still qualifies."""
    cr, acc = np.asarray(cr, float), np.asarray(acc, float)
    keep = cr > 1 * (1 + _REL_EPS)
    xs = np.log(np.concatenate([[1.0], cr[keep]]))
    ys = np.concatenate([[dense_acc], acc[keep]])
    threshold = dense_acc - points / 100.0 - _ACC_EPS
    best = 0.0  # log(1): the dense point always qualifies
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if y1 >= threshold:
            best = max(best, x1)
        elif y0 >= threshold:  # falls below within this segment: where it crosses the threshold
            best = max(best, x0 + (threshold - y0) / (y1 - y0) * (x1 - x0))
    lower_bound = len(xs) > 1 and ys[-1] >= threshold
    return float(math.exp(best)), bool(lower_bound)


def mean_std(values) -> tuple[float, float, int]:
    """Mean, sample std (0 for one value) and count of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def mean_curve(curves: list[Curve], grid_points: int = _GRID_POINTS) -> pd.DataFrame:
    """Mean and std over seeds on a common log-CR grid (see the module docstring).

    Columns: cr, mean, std, n (seeds covering the CR), drawn (where the line is shown)."""
    curves = [c for c in curves if len(c.cr)]
    if not curves:
        return pd.DataFrame(columns=["cr", "mean", "std", "n", "drawn"])
    lo, hi = min(c.cr[0] for c in curves), max(c.cr[-1] for c in curves)
    grid = np.unique(np.concatenate([np.geomspace(lo, hi, grid_points)] + [c.cr for c in curves]))
    values = np.vstack([c.at(grid) for c in curves])
    n = np.isfinite(values).sum(axis=0)
    with warnings.catch_warnings():  # grid CRs no seed covers (disjoint ranges) give NaN, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        std = np.where(n > 1, np.nanstd(values, axis=0, ddof=1), 0.0)
    drawn = n == len(curves)
    if not drawn.any():
        drawn = n > 0
    return pd.DataFrame({"cr": grid, "mean": mean, "std": std, "n": n, "drawn": drawn})


@dataclass
class Results:
    """A validated ``results.csv``: usable rows, the rest, and what is missing."""

    path: Path
    rows: pd.DataFrame  # every row, with ``variant``, ``status`` and numeric columns filled
    ok: pd.DataFrame = field(init=False)  # status ok with a finite accuracy and a CR

    def __post_init__(self):
        usable = (self.rows.status == "ok") & np.isfinite(self.rows.test_acc) & self.rows.cr.notna()
        self.ok = self.rows[usable]

    # -- structure -----------------------------------------------------------------------------

    def panels(self) -> list[tuple[str, str]]:
        """Every (arch, dataset) with at least one row, in a stable order."""
        pairs = self.rows[["arch", "dataset"]].drop_duplicates()
        return sorted(map(tuple, pairs.itertuples(index=False)),
                      key=lambda p: (list(ARCH_NAMES).index(p[0]) if p[0] in ARCH_NAMES else 99, p))

    def variants(self, arch: str | None = None, dataset: str | None = None, ok_only: bool = True) -> list[str]:
        """Variants (dense excluded) in drawing order, optionally of one panel."""
        frame = self.ok if ok_only else self.rows
        frame = frame[~reference_rows(frame)]
        if arch is not None:
            frame = frame[(frame.arch == arch) & (frame.dataset == dataset)]
        firsts = frame.drop_duplicates("variant")
        keyed = [(_variant_sort_key(r["method"], r, r["variant"]), r["variant"]) for r in firsts.to_dict("records")]
        return [v for _, v in sorted(keyed)]

    def variant_info(self) -> dict[str, tuple[str, dict]]:
        """variant -> (method, columns of its first row), for styling."""
        firsts = self.rows.drop_duplicates("variant")
        return {r["variant"]: (r["method"], r) for r in firsts.to_dict("records")}

    def panel_rows(self, arch: str, dataset: str, variant: str | None = None) -> pd.DataFrame:
        frame = self.ok[(self.ok.arch == arch) & (self.ok.dataset == dataset)]
        return frame if variant is None else frame[frame.variant == variant]

    # -- curves ----------------------------------------------------------------------------------

    def seed_curves(self, arch: str, dataset: str, variant: str) -> list[Curve]:
        frame = self.panel_rows(arch, dataset, variant)
        partial = self.partial_seeds(arch, dataset, variant)
        return [Curve.from_points(seed, g.cr, g.test_acc) for seed, g in frame.groupby("seed", sort=True)
                if seed not in partial]

    def partial_seeds(self, arch: str, dataset: str, variant: str) -> dict:
        """seed -> (cells run, cells of the fullest seed) for each seed with fewer cells of ``variant``
        than its fullest seed in this panel (see "Partial seeds" above)."""
        frame = self.rows[(self.rows.arch == arch) & (self.rows.dataset == dataset) & (self.rows.variant == variant)]
        if "cell_id" in frame.columns and frame.cell_id.astype(str).str.len().gt(0).all():
            counts = frame.groupby("seed").cell_id.nunique()
        else:
            counts = frame.groupby("seed").size()
        most = counts.max() if len(counts) else 0
        return {seed: (int(n), int(most)) for seed, n in counts.items() if n < most}

    def dense_by_seed(self, arch: str, dataset: str) -> dict:
        frame = self.panel_rows(arch, dataset)
        frame = frame[reference_rows(frame)]
        return frame.groupby("seed")["test_acc"].mean().to_dict()

    def dense_for(self, arch: str, dataset: str, seed) -> float:
        """That seed's dense accuracy, else the panel's mean dense accuracy (NaN when none)."""
        by_seed = self.dense_by_seed(arch, dataset)
        if seed in by_seed:
            return float(by_seed[seed])
        return float(np.mean(list(by_seed.values()))) if by_seed else math.nan

    # -- what is missing -------------------------------------------------------------------------

    def notes(self) -> list[str]:
        """Human-readable lines about everything left out or missing; empty for a full grid."""
        notes = []
        bad = self.rows[self.rows.status != "ok"]
        if len(bad):
            counts = ", ".join(f"{s}: {n}" for s, n in bad.status.value_counts().sort_index().items())
            listed = [f"{r.variant} {r.arch}/{r.dataset} seed {r.seed} [{r.status}]" for r in bad.itertuples()]
            more = f" ... and {len(listed) - 20} more" if len(listed) > 20 else ""
            notes.append(f"{len(bad)} row(s) not ok, ignored ({counts}): {'; '.join(listed[:20])}{more}")
        unusable = self.rows[(self.rows.status == "ok") & ~self.rows.index.isin(self.ok.index)]
        if len(unusable):
            notes.append(f"{len(unusable)} ok row(s) without a test_acc or cr, ignored")
        infinite = self.ok[np.isinf(self.ok.cr)]
        if len(infinite):
            per = ", ".join(f"{v}: {n}" for v, n in infinite.variant.value_counts().sort_index().items())
            notes.append(f"{len(infinite)} run(s) with infinite CR (every weight pruned) are not on the "
                         f"curves ({per})")
        all_variants = self.variants(ok_only=False)
        for arch, dataset in self.panels():
            name = f"{arch}/{dataset}"
            if not self.dense_by_seed(arch, dataset):
                notes.append(f"{name}: no dense run, so no dense line and no tolerance numbers")
            present = set(self.variants(arch, dataset))
            missing = [v for v in all_variants if v not in present]
            if missing:
                notes.append(f"{name}: no ok results for {', '.join(missing)}")
            seeds = set(self.rows[(self.rows.arch == arch) & (self.rows.dataset == dataset)].seed)
            for variant in sorted(present, key=all_variants.index):
                have = set(self.panel_rows(arch, dataset, variant).seed)
                if seeds - have:
                    notes.append(f"{name} {variant}: seed(s) {', '.join(map(str, sorted(seeds - have)))} missing")
                for seed, (run, most) in sorted(self.partial_seeds(arch, dataset, variant).items()):
                    notes.append(f"{name} {variant}: seed {seed} left out of curves and tables, {run} of its "
                                 f"{most} cells run so far")
        return notes


#: ``threshold_scale`` -> the column holding a thresholded record's CR at that multiple of its threshold.
THRESHOLD_SCALES = {1.0: "cr", 0.01: "cr_thr_small", 100.0: "cr_thr_large"}


def load_results(path: Path | str, threshold_scale: float = 1.0) -> Results:
    """Read and validate ``results.csv`` (see docs/design.md, Metrics for the columns).

    ``threshold_scale`` 0.01 or 100 places every thresholded record (DWF, L1) at its CR counted at
    that multiple of its zero threshold instead of at the threshold itself (0.01: the conservative
    CR, weights must have decayed a hundred times further to count as pruned); others are unchanged.
    """
    path = Path(path)
    frame = read_csv_checked(path, REQUIRED_RESULT_COLUMNS)
    frame = frame.copy()
    if threshold_scale not in THRESHOLD_SCALES:
        raise ValueError(f"threshold_scale={threshold_scale:g} is not one of {sorted(THRESHOLD_SCALES)}")
    column = THRESHOLD_SCALES[threshold_scale]
    if column != "cr" and column in frame.columns:
        moved = pd.to_numeric(frame[column], errors="coerce")
        frame["cr"] = moved.where(moved.notna(), pd.to_numeric(frame["cr"], errors="coerce"))
    for col in ("test_acc", "cr", "cr_effective", "depth"):
        if col in frame.columns:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    if "depth" not in frame.columns:
        frame["depth"] = np.nan
    frame["status"] = frame["status"].fillna("missing").astype(str).str.strip() if "status" in frame.columns else "ok"
    frame["method"] = frame["method"].astype(str)
    frame["arch"], frame["dataset"] = frame["arch"].astype(str), frame["dataset"].astype(str)
    derived = [derive_variant(row["method"], row) for row in frame.to_dict("records")]
    if "variant" in frame.columns:
        given = frame["variant"]
        frame["variant"] = [str(g) if isinstance(g, str) and g.strip() else d for g, d in zip(given, derived)]
    else:
        frame["variant"] = derived
    frame["level_key"] = level_key(frame["level"]) if "level" in frame.columns else ""
    ok_acc = frame.loc[frame.status == "ok", "test_acc"]
    if (ok_acc > 1.0 + 1e-9).any():
        raise ValueError(f"{path}: test_acc must be a fraction in 0..1, found {ok_acc.max():g}; "
                         f"{collect_hint(path)}")
    return Results(path, frame.reset_index(drop=True))


def load_layers(path: Path | str) -> pd.DataFrame | None:
    """Read ``layers.csv``; None when it does not exist (the per-layer figure is then skipped)."""
    path = Path(path)
    if not path.exists():
        return None
    frame = read_csv_checked(path, REQUIRED_LAYER_COLUMNS).copy()
    frame["level_key"] = level_key(frame["level"])
    frame["sparsity"] = pd.to_numeric(frame["sparsity"], errors="coerce")
    frame["layer_index"] = pd.to_numeric(frame["layer_index"], errors="coerce")
    return frame


#: Columns ``history.csv`` must have (the per-epoch trajectory of every record).
REQUIRED_HISTORY_COLUMNS = ("cell_id", "variant", "seed", "epoch", "test_acc")


def load_history(path: Path | str) -> pd.DataFrame | None:
    """Read ``history.csv``; None when it does not exist (the trajectory figure is then skipped)."""
    path = Path(path)
    if not path.exists():
        return None
    return read_csv_checked(path, REQUIRED_HISTORY_COLUMNS).copy()
