"""What a new user reads agrees with itself (issue 29): durations said in one place and repeated
verbatim elsewhere, cell labels that show what a cell runs."""

from __future__ import annotations

import re
from pathlib import Path

from benchmark.__main__ import main
from benchmark.cli import doctor
from benchmark.execution import grids
from benchmark.execution.cell import Cell

ROOT = Path(__file__).resolve().parents[1]


def _help(capsys, *words) -> str:
    try:
        main([*words, "--help"])
    except SystemExit:
        pass
    return " ".join(capsys.readouterr().out.split())


def test_doctors_duration_is_the_same_in_its_help_and_the_readme(capsys):
    assert f"Takes {doctor.DURATION}" in _help(capsys, "doctor")
    [row] = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `doctor`")]
    assert f"({doctor.DURATION})" in row


def test_smokes_duration_is_the_same_in_list_and_the_docs(capsys):
    description = grids.load_grid("smoke").description
    duration = re.search(r"\(([^()]*(?:second|minute)[^()]*)\)$", description).group(1)
    [row] = [line for line in (ROOT / "docs" / "grids.md").read_text().splitlines() if line.startswith("| `smoke`")]
    assert f"({duration})" in row
    main(["list"])
    assert duration in capsys.readouterr().out


def test_perf_help_names_no_module_paths(capsys):
    text = _help(capsys, "perf")
    assert "benchmark." not in text and "methods." not in text and "``" not in text
    assert "grid-pack" in text and "8x" in text


def test_a_cell_at_its_defaults_shows_them_in_its_label():
    """``snip []`` hid the default target CR."""
    assert Cell.make("snip", "lenet300", "fashion-mnist").label() == "snip [target_cr=10.0] lenet300/fashion-mnist seed=0"
    # the curve's sweep parameter is always shown; other defaults stay out
    assert Cell.make("magnitude", "lenet300", "fashion-mnist", params={"finetune_epochs": 10}).label() == \
        "magnitude +FT [finetune_epochs=10,target_cr=10.0] lenet300/fashion-mnist seed=0"
    assert Cell.make("snip", "lenet300", "fashion-mnist", params={"target_cr": 100}).label() == \
        "snip [target_cr=100.0] lenet300/fashion-mnist seed=0"
    assert Cell.make("dense", "lenet300", "fashion-mnist").label() == "dense lenet300/fashion-mnist seed=0"
