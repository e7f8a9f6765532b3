"""What the tuned protocol changed: LeNet-300-100 test accuracy at fixed CRs in lenet-reference (every
curve's learning rate chosen on a validation split) minus lenet-reference-v1 (the first protocol), seed
by seed on the seeds both have, then averaged. Interpolated in log CR as the report's tables are
(benchmark.core.interpolation), never extrapolated. A description of two runs of one curve, not a test:
reference/README.md quotes it with its seeds.

    python reference/compare_protocols.py --seeds 0,1
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


def ok_rows(path: Path, seeds: list[int]) -> pd.DataFrame:
    rows = pd.read_csv(path, low_memory=False)
    return rows[(rows.arch == "lenet300") & (rows.status == "ok") & rows.seed.isin(seeds) & np.isfinite(rows.cr)]


def per_seed(rows: pd.DataFrame) -> dict[str, dict[int, np.ndarray]]:
    """{curve: {seed: accuracy (%) at CRS}}."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for (curve, seed), group in rows.groupby(["variant", "seed"]):
        points = group.groupby("cr").test_acc.mean().sort_index()
        out.setdefault(curve, {})[int(seed)] = 100 * interpolate_log_cr(points.index.values, points.values, CRS)
    return out


def differences(seeds: list[int]) -> pd.DataFrame:
    """One row per curve: its pick, tuned minus first protocol at each CR (mean over the common seeds;
    NaN where a seed's curve does not reach the CR) and how many seeds; dense at CR 1."""
    rows = ok_rows(HERE / "lenet-reference" / "results.csv", seeds)
    rows = rows[rows.tuned_value.notna()]  # the final cells of the picks, which carry their pick
    first_rows = ok_rows(HERE / "lenet-reference-v1" / "results.csv", seeds)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds both protocols have (default 0,1)")
    seeds = [int(s) for s in parser.parse_args(argv).seeds.split(",")]
    table = differences(seeds)
    print(f"tuned minus first protocol, test accuracy points, mean over seeds {seeds} (both must have the seed)")
    points = {c: (lambda x: "–" if np.isnan(x) else f"{x:+.2f}") for c in table.columns if c.startswith("CR ")}
    print(table.to_string(index=False, formatters={"lr": "{:g}".format, **points}, na_rep="–"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
