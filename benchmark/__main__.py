"""Command line: ``python -m benchmark COMMAND --help`` explains every command and flag.

Every sub-command is listed once, in ``benchmark.cli.commands.COMMANDS`` (name, the ``benchmark.cli``
module that defines its parser and handler, its help line); this file builds the parser from that
table and turns errors into messages and exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmark.cli.commands import add_commands
from benchmark.core.console import say
from benchmark.core.errors import Interrupted, RunStopped


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
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND"), only)
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
