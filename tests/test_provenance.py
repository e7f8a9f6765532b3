"""Records say where they came from: the CPU model and the code's commit (docs/design.md, Reproducibility)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from benchmark.core import provenance

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_model_is_the_name_the_os_reports():
    name = provenance.cpu_model()
    assert name and name != "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        assert f": {name}" in cpuinfo.read_text()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_source_commit_names_the_checkout_and_marks_changed_code_dirty(tmp_path):
    """A copy of the package in a fresh repository: clean gives the commit, an edited module ``-dirty``,
    a changed results file nothing extra (records are not code)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "benchmark" / "core", repo / "benchmark" / "core")
    (repo / "benchmark" / "__init__.py").write_text("")
    (repo / "results").mkdir()
    (repo / "results" / "r.json").write_text("{}")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmark.core.provenance import source_commit;"
             "print(source_commit())")

    def commit() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(repo)], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert commit() == head
    (repo / "results" / "r.json").write_text('{"changed": 1}')
    assert commit() == head
    (repo / "benchmark" / "core" / "errors.py").write_text("# edited\n")
    assert commit() == f"{head}-dirty"


def test_outside_a_checkout_there_is_no_commit(tmp_path):
    shutil.copytree(ROOT / "benchmark" / "core", tmp_path / "benchmark" / "core")
    (tmp_path / "benchmark" / "__init__.py").write_text("")
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmark.core.provenance import source_commit;"
             "print(source_commit())")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_citation_file_matches_the_package_and_the_readme():
    """CITATION.cff is valid YAML with the fields GitHub's citation widget needs, the package's version,
    and the same paper as the README's BibTeX entry."""
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert {"cff-version", "message", "title", "authors", "version", "preferred-citation"} <= set(cff)
    assert cff["version"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    paper = cff["preferred-citation"]
    readme = (ROOT / "README.md").read_text()
    eprint = re.search(r"eprint\s*=\s*\{([^}]+)\}", readme).group(1)
    assert f"arXiv:{eprint}" in [i["value"] for i in paper["identifiers"]]
    assert paper["title"] in readme and paper["year"] == 2025
