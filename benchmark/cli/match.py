"""``python -m benchmark match``: propose the cells that put every curve near every reported CR."""

from __future__ import annotations

import shlex
import sys

from benchmark.core.validation import argparse_type, positive_numbers


def add_commands(sub) -> None:
    from benchmark.analysis import matching

    p = sub.add_parser(
        "match",
        description="Read a grid and its results so far (<results-dir>/<grid>/results.csv, or the result files "
                    "when they are newer) and list what is missing: each seed of each λ curve (DWF, L1) needs a "
                    "measured point within --ratio of every reported CR, up to where it reaches chance, and each "
                    "pruning baseline needs targets past the largest CR at which a λ curve stays within "
                    "--reach-points of dense. Proposes a λ per gap "
                    "(log λ interpolated in log CR between the seed's own points around it) and target_cr values "
                    "of the 1-2-5 sequence; --write saves them as a grid file of exactly those cells, with the "
                    "schedule, parameters and seeds of the curves they extend (docs/matching.md). Never trains; "
                    "says 'nothing to add' and exits 0 when every curve is matched.",
    )
    p.add_argument("--grid", required=True, metavar="NAME", help="preset name or path to the grid TOML file")
    p.add_argument("--results-dir", default="results", metavar="DIR",
                   help="folder holding <grid>/results.csv or <grid>/cells/ (default results)")
    p.add_argument("--crs", type=argparse_type(positive_numbers, "--crs"), default=list(matching.REPORTED_CRS),
                   metavar="CR,CR,...", help="the reported CRs (default 10,30,100,300,1000)")
    p.add_argument("--ratio", type=float, default=matching.RATIO,
                   help="a seed needs a measured CR within this factor of each reported CR (default 1.5)")
    p.add_argument("--reach-points", type=float, default=matching.REACH_POINTS, metavar="K",
                   help="baselines are extended past the largest CR at which a λ curve seed is within K accuracy "
                        "points of dense (default 10, the report's widest tolerance; 100: its last point above "
                        "chance)")
    p.add_argument("--write", metavar="FILE.toml",
                   help="write the proposed cells as a grid file (checked to parse into exactly them)")
    p.set_defaults(handler=match_command)


def match_command(args) -> int:
    from benchmark.analysis import matching, matching_output

    if not args.ratio > 1:
        raise ValueError(f"--ratio={args.ratio:g} must be > 1")
    if not args.reach_points > 0:
        raise ValueError(f"--reach-points={args.reach_points:g} must be > 0")
    match = matching.match_grid(args.grid, args.results_dir, args.crs, args.ratio, args.reach_points)
    print(matching_output.format_match(match))
    if args.write:
        if not match.cells():
            print(f"nothing to add: {args.write} not written", file=sys.stderr)
            return 0
        command = "python -m benchmark " + " ".join(shlex.quote(w) for w in args.argv)
        cells = matching_output.write_grid(match, args.write, command)
        print(f"wrote {args.write}: {len(cells)} cells (parsed back and checked); run them with "
              f"`python -m benchmark run --grid {args.write}`, or add the file to the grid's include list",
              file=sys.stderr)
    return 0
