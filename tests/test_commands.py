"""The one table of sub-commands (``benchmark.cli.commands``): what ``--help`` lists and what runs."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.__main__ import build_parser, main
from benchmark.cli import commands

ROOT = Path(__file__).resolve().parents[1]


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_help_lists_every_command_of_the_table_in_its_order_with_its_help(capsys):
    listed = subcommands(build_parser())._choices_actions
    assert [(a.dest, a.help) for a in listed] == [(c.name, c.help) for c in commands.COMMANDS]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width, also at hyphens
    for command in commands.COMMANDS:
        assert "".join(f"{command.name} {command.help}".split()) in text


@pytest.mark.parametrize("command", [c.name for c in commands.COMMANDS])
def test_a_command_builds_only_its_own_modules_parsers(command):
    own = commands.BY_NAME[command].module
    built = set(subcommands(build_parser(command)).choices)
    assert built == {c.name for c in commands.COMMANDS if c.module == own}


@pytest.mark.parametrize("command", [c.name for c in commands.COMMANDS])
def test_every_flag_of_every_command_is_explained(command):
    parser = subcommands(build_parser()).choices[command]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # data's actions: each has its own help
            assert all(choice.help for choice in action._choices_actions), command
            continue
        assert action.help and action.help != argparse.SUPPRESS, (command, action.option_strings or action.dest)
    assert parser.description


def test_a_module_cannot_add_a_command_the_table_does_not_give_it():
    sub = argparse.ArgumentParser().add_subparsers()
    with pytest.raises(RuntimeError, match="'report'.*add it there"):
        commands.TableSubparsers(sub, "benchmark.cli.plot").add_parser("report")
    with pytest.raises(RuntimeError, match="'frobnicate'"):
        commands.TableSubparsers(sub, "benchmark.cli.plot").add_parser("frobnicate")


def test_an_unknown_command_is_refused_with_every_choice(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err and all(c.name in err for c in commands.COMMANDS)


def test_running_a_grid_command_does_not_import_the_figures():
    """``run`` builds only its own parser: matplotlib and the perf benchmarks stay unloaded."""
    code = ("import sys; from benchmark.__main__ import build_parser; build_parser('run'); "
            "print(sorted(m for m in ('matplotlib', 'benchmark.speed.perf', 'benchmark.cli.plot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
