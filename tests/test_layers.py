"""The architecture stays as README "Layout" draws it: the import-linter layer contract holds, every
module says in its first line what it owns, and no module outside ``methods/`` names a method."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_layer_contract_holds():
    pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extra")
    # In a child process: import-linter configures logging with dictConfig, which disables every
    # logger that exists already (the runner's among them) for the rest of this test session.
    script = ("import sys; from importlinter.cli import lint_imports; "
              "sys.exit(lint_imports(config_filenames=('pyproject.toml',), no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's packages, not an installed copy
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def _modules():
    for folder in ("benchmark", "methods"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_module_opens_with_what_it_owns():
    missing = [str(p.relative_to(ROOT)) for p in _modules()
               if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip().splitlines()]
    assert not missing, f"modules without a docstring: {missing}"
