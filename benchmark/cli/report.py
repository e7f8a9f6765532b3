"""``python -m benchmark report``: flags in, the tables of ``benchmark.analysis.report`` and the
results page written, the headline Markdown printed."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from benchmark.analysis import comparisons as cmp
from benchmark.analysis import curves as cv
from benchmark.analysis import tables as tb
from benchmark.analysis import report
from benchmark.core.validation import argparse_type, positive_numbers


def add_commands(sub) -> None:
    p = sub.add_parser(
        "report",
        description="Read <results-dir>/<grid>/results.csv (collected first from the result files when it is "
                    "missing or older than the newest one) and write tolerance.{md,tex,csv} (largest CR within k "
                    "points of dense), accuracy_at_cr.{md,tex,csv} (accuracy at fixed CRs), comparisons.{md,tex,csv} "
                    "(each DWF curve against every other at those CRs: Welch t-test, Holm-corrected), cost and "
                    "settling tables and report.html next to it, then print the Markdown. report.html is one "
                    "self-contained page (figures, tables, the grid, failed cells, machines, how to rerun) to open in "
                    "a browser or send. Accuracy is interpolated linearly in log CR per seed, never extrapolated; "
                    "mean ± std over seeds. Never trains.",
    )
    p.add_argument("--grid", metavar="NAME", help=cv.GRID_HELP)
    p.add_argument("--results-dir", default="results", metavar="DIR",
                   help="folder holding <grid>/results.csv; the tables are written beside it (default results)")
    p.add_argument("--tolerances", type=argparse_type(positive_numbers, "--tolerances"),
                   default=list(tb.TOLERANCE_POINTS), metavar="K,K,...",
                   help="accuracy drops in percentage points for the tolerance table (default 1,5,10)")
    p.add_argument("--crs", type=argparse_type(positive_numbers, "--crs"), default=list(tb.FIXED_CRS),
                   metavar="CR,CR,...",
                   help="compression ratios for the accuracy table (default 10,100,1000)")
    p.add_argument("--threshold-scale", type=float, choices=sorted(cv.THRESHOLD_SCALES), default=1.0,
                   help="place thresholded records (DWF, L1) at their CR counted at 0.01x or 100x the zero "
                        "threshold instead of 1x (default 1); the tables get a -thr<scale>x suffix. 0.01 is the "
                        "conservative check: does a conclusion survive weights having to decay 100x further?")
    p.add_argument("--no-page", action="store_true",
                   help="write the tables only, not report.html (which draws the figures: seconds more)")
    p.set_defaults(handler=report_command)


def report_command(args) -> int:
    from benchmark.analysis.diagnostics import warning_lines
    from benchmark.execution.store import grid_to_read

    grid, said = grid_to_read(args.grid, args.results_dir)
    for line in said:
        print(line, file=sys.stderr)
    files, markdown = report.write_report(grid, args.results_dir, args.tolerances, args.crs, args.threshold_scale)
    print(markdown)
    for line in warning_lines(Path(args.results_dir) / grid / "results.csv"):
        print(line, file=sys.stderr)
    compared = [f for f in files if f.name == "comparisons.csv"]
    if compared:
        table = pd.read_csv(compared[0])
        print(f"{cmp.summary_line(table)}: {compared[0].with_suffix('.md')}")
    print("wrote: " + ", ".join(str(f) for f in files), file=sys.stderr)
    if not args.no_page and args.threshold_scale == 1.0:
        from benchmark.analysis.page import write_page

        page = write_page(grid, args.results_dir, args.tolerances, args.crs)
        print(f"page: {page} (one self-contained file: open it in a browser, or send it)", file=sys.stderr)
    return 0
