"""The one table of ``python -m benchmark``'s sub-commands: each command's name, the ``benchmark.cli``
module that defines its parser and handler, and the line ``--help`` lists it with.

``benchmark.__main__`` reads it both ways: to run a command it imports only that command's module
(a dry run of a large grid does not wait for matplotlib), and for ``--help`` it imports every
module, in the table's order. A command module adds its parsers through ``add_commands(sub)``; the
``sub`` it gets refuses a command that is not in the table under that module, and gives each
command its help line from here, so the listing cannot drift from the table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # defines add_commands(sub), which adds this command's parser and its handler
    help: str  # the line ``python -m benchmark --help`` lists the command with


#: Every sub-command, in the order ``--help`` lists them (a module's commands next to each other).
COMMANDS: tuple[Command, ...] = (
    Command("run", "benchmark.cli.run", "run every unfinished cell of a grid (rerun to resume)"),
    Command("status", "benchmark.cli.run", "finished / failed / blocked / running / to do, per method"),
    Command("collect", "benchmark.cli.run", "write RESULTS_DIR/GRID/results.csv and layers.csv from the result files"),
    Command("list", "benchmark.cli.run", "grids, methods (with parameters), architectures and datasets"),
    Command("cell", "benchmark.cli.cell",
            "run one cell (method x arch x dataset x params x seed) and print its result records"),
    Command("plot", "benchmark.cli.plot",
            "draw accuracy-vs-compression, per-layer sparsity and effective-CR figures from the CSV"),
    Command("report", "benchmark.cli.report",
            "write the tolerance, accuracy-at-CR and comparisons tables (Markdown, LaTeX, CSV)"),
    Command("match", "benchmark.cli.match", "propose the λs and target CRs that put every curve near every reported CR"),
    Command("data", "benchmark.cli.data", "locate, check or fetch datasets"),
    Command("perf", "benchmark.cli.perf",
            "measure the data path, DWF's step overhead and grid throughput (ratios vs targets)"),
    Command("doctor", "benchmark.cli.doctor",
            "check this machine: device, dtype, datasets, threads, backends, a training step"),
)

BY_NAME: dict[str, Command] = {command.name: command for command in COMMANDS}


class TableSubparsers:
    """The argparse sub-parsers as one command module sees them: ``add_parser`` accepts only the
    commands the table gives that module, with the table's help line."""

    def __init__(self, subparsers, module: str):
        self.subparsers = subparsers
        self.module = module

    def add_parser(self, name: str, **options):
        command = BY_NAME.get(name)
        if command is None or command.module != self.module:
            raise RuntimeError(f"{self.module} adds the command {name!r}, which benchmark.cli.commands.COMMANDS "
                               f"does not list under that module; add it there")
        options["help"] = command.help
        return self.subparsers.add_parser(name, **options)


def add_commands(subparsers, only: str | None = None) -> None:
    """Add every command to ``subparsers``, or with ``only`` (a command's name) just the commands of
    its module. A name not in the table adds them all, so argparse lists every choice."""
    modules = [BY_NAME[only].module] if only in BY_NAME else [command.module for command in COMMANDS]
    for module in dict.fromkeys(modules):
        importlib.import_module(module).add_commands(TableSubparsers(subparsers, module))
