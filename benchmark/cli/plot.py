"""``python -m benchmark plot``: flags in, the figures of ``benchmark.analysis.plot`` written, their files out."""

from __future__ import annotations

import sys

from benchmark.analysis import curves as cv
from benchmark.analysis import plot, plot_layers
from benchmark.core.validation import argparse_type, positive_numbers


def add_commands(sub) -> None:
    p = sub.add_parser(
        "plot",
        description="Read <results-dir>/<grid>/results.csv (and layers.csv), collecting them first from the "
                    "result files when they are missing or older than the newest one, and write PNG and PDF "
                    "figures to <plots-dir>/<grid>/: accuracy_vs_cr (mean "
                    "± std over seeds, seeds' curves interpolated on log CR), layer_sparsity (the run of each "
                    "method closest to --at-cr) and effective_cr (only if some run's effective CR differs). "
                    "Never trains. Notes about failed or missing runs go to stderr.",
    )
    p.add_argument("--grid", metavar="NAME", help=cv.GRID_HELP)
    p.add_argument("--results-dir", default="results", metavar="DIR",
                   help="folder holding <grid>/results.csv (default results)")
    p.add_argument("--plots-dir", default="plots", metavar="DIR",
                   help="figures go to <plots-dir>/<grid>/ (default plots)")
    one_cr = argparse_type(lambda text, where: positive_numbers(text, where)[0], "--at-cr")
    p.add_argument("--at-cr", type=one_cr, default=None, metavar="CR",
                   help="CR of the per-layer figure: each method's run closest to it (within a factor "
                        f"{plot_layers.AT_CR_FACTOR:g}) is shown (default: {plot_layers.DEFAULT_AT_CR:g}, or less if "
                        "most methods of a panel stop earlier: the median of their largest CRs)")
    p.set_defaults(handler=plot_command)


def plot_command(args) -> int:
    from benchmark.execution.store import grid_to_read

    grid, said = grid_to_read(args.grid, args.results_dir)
    for line in said:
        print(line, file=sys.stderr)
    files, notes = plot.write_plots(grid, args.results_dir, args.plots_dir, args.at_cr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for path in files:
        print(path)
    return 0
