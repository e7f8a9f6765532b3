"""A method from a separately installed package (entry-point group ``dwf_bench.methods``) runs
through ``cell`` and ``run`` with no edit here: the package is ``examples/init-magnitude``
(docs/extending.md's example), built and installed into a temporary folder (never into the shared
environment). Every method is written against ``MethodContext``, which the harness's context provides."""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmark.core.context import MEMBERS, MethodContext
from benchmark.core.method import Method, all_methods
from benchmark.execution.cell import Cell, Context
from benchmark.execution.packing.run import PackContext

ROOT = Path(__file__).resolve().parents[1]

#: The example plugin package, as a reader copies it (docs/extending.md walks through it).
EXAMPLE = ROOT / "examples" / "init-magnitude"

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
    """The example package, pip-installed with ``--target`` into a folder of this test only (from a
    copy, so the build leaves nothing in the checkout)."""
    source = tmp_path_factory.mktemp("plugin-source") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("plugin-installed")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    assert list(target.glob("init_magnitude-*.dist-info"))
    return target


def benchmark(plugin_path: Path, cwd: Path, *args) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(plugin_path), str(ROOT)]), "BENCHMARK_PACK": "off"}
    return subprocess.run([sys.executable, "-m", "benchmark", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # pip-installs a package, CLI subprocesses
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


@pytest.mark.slow  # pip-installed package, a whole grid and report
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
    assert accuracy.index("| random") < accuracy.index("| init-magnitude")  # its plotting.order: after the built-ins


@pytest.mark.slow  # a CLI subprocess
def test_a_plugin_that_fails_to_load_is_named(tmp_path):
    broken = tmp_path / "broken"
    dist = broken / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dwf_bench.methods]\nbroken = no_such_module_here\n")
    result = benchmark(broken, tmp_path, "cell", "dense", "--arch", "lenet300", "--dataset", "fashion-mnist")
    assert result.returncode != 0
    assert "broken" in result.stderr and "no_such_module_here" in result.stderr and "dwf_bench.methods" in result.stderr


BROKEN_GRID = """\
seeds = [0]
subset = 300

[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, batch_size = 64 }

[experiment.methods.dense]

[experiment.methods.random]
target_cr = 4

[experiment.methods.snip]
target_cr = 4

[experiment.methods.gmp]
target_cr = 4
"""


@pytest.mark.slow  # pip install and a CLI subprocess
def test_a_pip_installed_plugin_that_fails_to_import_is_one_problem_naming_its_package(tmp_path):
    """Not one grid problem per method line (issue 29: "grid 'cifar' has 25 problem(s)")."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "needs-missing-dep"\nversion = "0.3"\n'
        '[project.entry-points."dwf_bench.methods"]\nmissing-dep = "needs_missing_dep"\n'
        '[tool.setuptools]\npy-modules = ["needs_missing_dep"]\n')
    (source / "needs_missing_dep.py").write_text("import a_dependency_nobody_installed  # noqa: F401\n")
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    (tmp_path / "g.toml").write_text(BROKEN_GRID)
    result = benchmark(target, tmp_path, "run", "--grid", "g.toml", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.count("a_dependency_nobody_installed") == 1, result.stderr
    assert "'needs-missing-dep' 0.3" in result.stderr and "'missing-dep'" in result.stderr
    assert "1 problem" in result.stderr and "4 problem" not in result.stderr


# -- the contract a method is written against -------------------------------------------------------

def _ctx_members_used(path: Path) -> set[str]:
    """Every ``ctx.<member>`` a module's text reads."""
    return {node.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ctx"}


def test_the_context_protocol_names_exactly_what_the_methods_use():
    used = set().union(*map(_ctx_members_used, sorted((ROOT / "methods").glob("*.py"))))
    assert used == MEMBERS, f"used but not in MethodContext: {sorted(used - MEMBERS)}; never used: {sorted(MEMBERS - used)}"
    assert _ctx_members_used(EXAMPLE / "init_magnitude.py") <= MEMBERS


@pytest.mark.parametrize("context_class", [Context, PackContext])
def test_the_execution_context_provides_every_protocol_member(context_class, tmp_path):
    set_in_init = inspect.getsource(Context.__init__)
    missing = [name for name in MEMBERS if not hasattr(context_class, name) and f"self.{name} =" not in set_in_init]
    assert not missing, f"{context_class.__name__} lacks {missing}"
    cell = Cell.make("dense", "lenet300", "fashion-mnist")
    data = SimpleNamespace(spec=SimpleNamespace(shape=(1, 28, 28), num_classes=10))  # no dataset read
    extra = {"member": None} if context_class is PackContext else {}
    ctx = context_class(cell, data, torch.device("cpu"), tmp_path / "w", tmp_path / "c", progress=False, **extra)
    assert isinstance(ctx, MethodContext)
    assert not isinstance(SimpleNamespace(cell=cell, data=data), MethodContext)


def test_every_built_in_method_runs_against_the_protocol():
    for name, method in all_methods().items():
        assert typing.get_type_hints(method.run)["ctx"] is MethodContext, name


def test_a_method_class_with_an_attribute_of_the_old_interface_is_told_where_it_went():
    with pytest.raises(TypeError, match=r"curve_order is now plotting = Plotting\(order=...\)"):
        type("Old", (Method,), {"name": "old", "family": "at-init", "curve_order": 20})
    with pytest.raises(TypeError, match="pack_family is now a method of the nested class Workload"):
        type("Old", (Method,), {"name": "old", "family": "at-init", "pack_family": lambda self: None})


def test_plotting_and_workload_defaults_are_what_figures_and_estimates_assumed():
    plotting = Method.plotting
    assert (plotting.order, plotting.style, plotting.ramp, plotting.rank({"depth": 3})) == (math.inf, None, False, 0.0)
    dwf = all_methods()["dwf"]
    assert dwf.plotting.ramp and dwf.plotting.rank({"depth": 4}) == 4.0 and dwf.plotting.rank({}) == 0.0
    workload = all_methods()["random"](all_methods()["random"].Params()).workload
    schedule = SimpleNamespace(epochs=7)
    assert (workload.trainings((10,)), workload.training_epochs(schedule, (10,)), workload.step_variant()) == (1, 7, "masked")
