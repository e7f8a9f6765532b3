"""Command line: ``python -m benchmark COMMAND --help`` explains every command and flag.

Each concept module registers its own sub-commands through ``add_commands(subparsers)``; this file
only assembles them, so the CLI stays next to the code it drives.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: Modules that contribute sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "benchmark.runner",  # run, status, collect, list
    "benchmark.cli_cell",  # cell
    "benchmark.plot",  # plot
    "benchmark.report",  # report
    "benchmark.data_cli",  # data
    "benchmark.perf",  # perf
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="DWF pruning benchmark: run grids of method x architecture x dataset x "
                    "sparsity/lambda x seed cells, collect a tidy CSV, plot curves and tables.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Typical use:\n  python -m benchmark run --grid quick\n  python -m benchmark collect --grid quick\n"
               "  python -m benchmark plot --grid quick\n  python -m benchmark report --grid quick",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
