"""What a change of protocol changed: test accuracy at fixed CRs (LeNet-300-100, or LeNet-5 with
--arch lenet5), seed by seed on the seeds both sides have, then averaged; interpolated in log CR as the report's tables are
(benchmark.core.interpolation), never extrapolated. A description, not a test: reference/README.md
and docs/recipes.md quote it with its seeds.

    python reference/compare_protocols.py --seeds 0,1   # lenet-reference (every rate chosen on a
                                                        # validation split) minus lenet-reference-v1
    python reference/compare_protocols.py --arch lenet5 --seeds 0,1   # the same for LeNet-5
    python reference/compare_protocols.py --recipes     # lenet-recipes (the authors' output-layer and
                                                        # lottery recipes, seed 0) minus the same
                                                        # method in lenet-reference-v1, seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmark.core.interpolation import interpolate_log_cr  # noqa: E402

CRS = (10, 30, 100, 300, 1000)


def ok_rows(path: Path, seeds: list[int], arch: str = "lenet300") -> pd.DataFrame:
    rows = pd.read_csv(path, low_memory=False)
    return rows[(rows.arch == arch) & (rows.status == "ok") & rows.seed.isin(seeds) & np.isfinite(rows.cr)]


def per_seed(rows: pd.DataFrame) -> dict[str, dict[int, np.ndarray]]:
    """{curve: {seed: accuracy (%) at CRS}}."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for (curve, seed), group in rows.groupby(["variant", "seed"]):
        points = group.groupby("cr").test_acc.mean().sort_index()
        out.setdefault(curve, {})[int(seed)] = 100 * interpolate_log_cr(points.index.values, points.values, CRS)
    return out


def differences(seeds: list[int], arch: str = "lenet300") -> pd.DataFrame:
    """One row per curve: its pick, tuned minus first protocol at each CR (mean over the seeds both
    have, which can differ per curve where the first protocol stopped early, as LeNet-5's did; NaN
    where a seed's curve does not reach the CR) and how many seeds; dense at CR 1."""
    rows = ok_rows(HERE / "lenet-reference" / "results.csv", seeds, arch)
    rows = rows[rows.tuned_value.notna()]  # the final cells of the picks, which carry their pick
    first_rows = ok_rows(HERE / "lenet-reference-v1" / "results.csv", seeds, arch)
    picks = rows.groupby("variant").tuned_value.first().to_dict()
    tuned, first = per_seed(rows), per_seed(first_rows)
    table = []
    for curve in sorted(tuned):
        common = sorted(set(tuned[curve]) & set(first.get(curve, {})))
        if not common:
            continue
        if curve == "dense":  # one point at CR 1
            mine, theirs = (frame[(frame.variant == "dense") & frame.seed.isin(common)].groupby("seed").test_acc.mean()
                            for frame in (rows, first_rows))
            diff = {"CR 1": 100 * float((mine - theirs).mean())}
        else:
            mean = np.mean([tuned[curve][s] - first[curve][s] for s in common], axis=0)
            diff = {f"CR {c}": d for c, d in zip(CRS, mean)}
        table.append({"curve": curve, "lr": float(picks[curve]), **diff, "seeds": len(common)})
    return pd.DataFrame(table, columns=["curve", "lr", "seeds", "CR 1", *(f"CR {c}" for c in CRS)])


#: lenet-recipes' curves and the lenet-reference-v1 curve each replaces (same method, schedule and seed)
RECIPE_BASES = {"gmp output-rate=0.5": "gmp", "magnitude output-rate=0.5": "magnitude",
                "magnitude +FT output-rate=0.5": "magnitude +FT", "lottery": "lottery",
                "lottery p=0.2/out=0.1": "lottery"}


def recipes() -> pd.DataFrame:
    """One row per lenet-recipes curve: its accuracy at each CR, minus its lenet-reference-v1 curve's
    (seed 0), and both curves' training epochs behind their last point."""
    rows = ok_rows(HERE / "lenet-recipes" / "results.csv", [0])
    first = ok_rows(HERE / "lenet-reference-v1" / "results.csv", [0])
    mine, theirs = per_seed(rows), per_seed(first)
    table = []
    for curve, base in RECIPE_BASES.items():
        if curve not in mine or base not in theirs:
            continue
        table.append({"recipe": curve, "instead of": base,
                      **{f"CR {c}": a for c, a in zip(CRS, mine[curve][0])},
                      **{f"Δ CR {c}": d for c, d in zip(CRS, mine[curve][0] - theirs[base][0])},
                      "epochs": rows[rows.variant == curve].epochs.max(),
                      "epochs before": first[first.variant == base].epochs.max()})
    return pd.DataFrame(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds both protocols have (default 0,1)")
    parser.add_argument("--arch", default="lenet300", choices=["lenet300", "lenet5"],
                        help="which LeNet to compare (default lenet300; lenet-recipes has LeNet-300-100 only)")
    parser.add_argument("--recipes", action="store_true", help="lenet-recipes against lenet-reference-v1 (seed 0)")
    args = parser.parse_args(argv)
    if args.recipes:
        table = recipes()
        print("lenet-recipes, seed 0: test accuracy (%) at CR, and minus the lenet-reference-v1 curve it replaces")
        print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}", na_rep="–"))
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    table = differences(seeds, args.arch)
    print(f"{args.arch}: tuned minus first protocol, test accuracy points, mean over seeds {seeds} "
          "(both must have the seed; 'seeds' says how many did)")
    points = {c: (lambda x: "–" if np.isnan(x) else f"{x:+.2f}") for c in table.columns if c.startswith("CR ")}
    print(table.to_string(index=False, formatters={"lr": "{:g}".format, **points}, na_rep="–"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
