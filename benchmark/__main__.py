"""Command line: ``python -m benchmark COMMAND --help`` explains every command and flag.

Each concept module registers its own sub-commands through ``add_commands(subparsers)``; this file
only assembles them, so the CLI stays next to the code it drives.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from benchmark.core.console import say
from benchmark.core.errors import Interrupted, RunStopped

#: Modules that contribute sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "benchmark.cli.run",  # run, status, collect, list
    "benchmark.cli.cell",  # cell
    "benchmark.analysis.plot",  # plot
    "benchmark.analysis.report",  # report
    "benchmark.cli.match",  # match
    "benchmark.cli.data",  # data
    "benchmark.speed.perf",  # perf
    "benchmark.cli.doctor",  # doctor
]


#: Which module owns which command, so that one command imports only its module (a dry run of a
#: large grid should not wait for matplotlib). A command missing here still works: then every
#: module is imported, as for ``--help``.
COMMAND_OWNERS = {"run": "benchmark.cli.run", "status": "benchmark.cli.run", "collect": "benchmark.cli.run",
                  "list": "benchmark.cli.run", "cell": "benchmark.cli.cell", "plot": "benchmark.analysis.plot",
                  "report": "benchmark.analysis.report", "match": "benchmark.cli.match", "data": "benchmark.cli.data",
                  "perf": "benchmark.speed.perf", "doctor": "benchmark.cli.doctor"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` (a command name) just that command's module's commands."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="DWF pruning benchmark: run grids of method x architecture x dataset x "
                    "sparsity/lambda x seed cells, collect a tidy CSV, plot curves and tables.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Typical use:\n  python -m benchmark run --grid quick --dry-run   # cells, epochs, hours\n"
               "  python -m benchmark run --grid quick             # writes results/quick/results.csv when it ends\n"
               "  python -m benchmark plot                         # the last run's grid\n"
               "  python -m benchmark report                       # tables and results/quick/report.html",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    owner = COMMAND_OWNERS.get(only or "")
    for name in COMMAND_MODULES:
        if owner is None or name == owner:
            importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = words[0] if words and not words[0].startswith("-") else None
    try:
        parser = build_parser(command)
    except ValueError as exc:  # a method plugin that does not load
        say(f"error: {exc}")
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # how to run the same command again
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Interrupted as exc:  # a second stop signal while the first was being handled
        say(f"stopped at once by a second signal; rerun the same command to resume")
        return 128 + exc.signum
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ValueError, OSError, RunStopped) as exc:  # bad input, a disk that refuses writes, ...
        say(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
