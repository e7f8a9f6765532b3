"""A method from a separately installed package (entry-point group ``dwf_bench.methods``) runs
through ``cell`` and ``run`` with no edit here: the package below is docs/extending.md's
example, built and installed into a temporary folder (never into the shared environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "init-magnitude"
version = "0.1.0"

[project.entry-points."dwf_bench.methods"]
init-magnitude = "init_magnitude:InitMagnitude"

[tool.setuptools]
py-modules = ["init_magnitude"]
"""

MODULE = '''\
"""Magnitude pruning at initialization: keep the largest initial weights, train with the mask held."""

from dataclasses import dataclass

from benchmark.core.method import Method
from methods.masks import apply_masks, magnitude_scores, masks_from_scores, remove_masks


class InitMagnitude(Method):
    """Keep the largest |w| of the fresh model (global), then train with the mask held."""

    name = "init-magnitude"
    family = "at-init"
    curve_order = 20  # after the built-in methods in legends and tables
    plot_style = (0, 0.5, "o", ":")  # palette slot, darkening, marker, line style

    @dataclass(frozen=True)
    class Params(Method.Params):
        target_cr: float = 10.0

        def validate(self):
            return [] if self.target_cr >= 1 else [f"target_cr={self.target_cr} must be >= 1"]

    def run(self, ctx):
        model = ctx.new_model()
        apply_masks(model, masks_from_scores(magnitude_scores(model), self.params.target_cr, "global"))
        history, _ = ctx.train(model)
        remove_masks(model)
        return [ctx.measure(model, history=history)]
'''

GRID = """\
description = "the plugin method beside a built-in one"
seeds = [0]
subset = 300

[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, batch_size = 64, warmup_epochs = 0 }

[experiment.methods.init-magnitude]
target_cr = [4, 20]

[experiment.methods.random]
target_cr = 4
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The example package, pip-installed with ``--target`` into a folder of this test only."""
    source = tmp_path_factory.mktemp("plugin-source")
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "init_magnitude.py").write_text(MODULE)
    target = tmp_path_factory.mktemp("plugin-installed")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    assert list(target.glob("init_magnitude-*.dist-info"))
    return target


def benchmark(plugin_path: Path, cwd: Path, *args) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(plugin_path), str(ROOT)]), "BENCHMARK_PACK": "off"}
    return subprocess.run([sys.executable, "-m", "benchmark", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_installed_method_is_listed_and_runs_one_cell(plugin_path, tmp_path):
    listed = benchmark(plugin_path, tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    assert "init-magnitude" in listed.stdout and "Keep the largest |w|" in listed.stdout
    done = benchmark(plugin_path, tmp_path, "cell", "init-magnitude", "--arch", "lenet300", "--dataset",
                     "fashion-mnist", "--epochs", "1", "--subset", "300", "--set", "target_cr=20", "--json",
                     "--no-progress")
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert record["status"] == "ok" and record["method"] == "init-magnitude" and record["family"] == "at-init"
    assert record["target_cr"] == 20 and record["cr"] == pytest.approx(20, rel=0.01)


def test_installed_method_runs_in_a_grid_and_gets_its_curves(plugin_path, tmp_path):
    (tmp_path / "plugin.toml").write_text(GRID)
    ran = benchmark(plugin_path, tmp_path, "run", "--grid", "plugin.toml", "--jobs", "1", "--no-progress")
    assert ran.returncode == 0, ran.stderr
    rows = (tmp_path / "results" / "plugin" / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    methods = sorted(dict(zip(header, row.split(",")))["method"] for row in rows[1:])
    assert methods == ["init-magnitude", "init-magnitude", "random"]
    tables = benchmark(plugin_path, tmp_path, "report", "--grid", "plugin.toml", "--no-page")
    assert tables.returncode == 0, tables.stderr
    accuracy = (tmp_path / "results" / "plugin" / "accuracy_at_cr.md").read_text()
    assert accuracy.index("| random") < accuracy.index("| init-magnitude")  # its curve_order: after the built-ins


def test_a_plugin_that_fails_to_load_is_named(tmp_path):
    broken = tmp_path / "broken"
    dist = broken / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dwf_bench.methods]\nbroken = no_such_module_here\n")
    result = benchmark(broken, tmp_path, "cell", "dense", "--arch", "lenet300", "--dataset", "fashion-mnist")
    assert result.returncode != 0
    assert "broken" in result.stderr and "no_such_module_here" in result.stderr and "dwf_bench.methods" in result.stderr
