"""Shared fixtures: tiny in-memory datasets for fast unit tests, and a speed cache of the session's own."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from benchmark.engine import data as data_mod

torch.set_num_threads(2)

# `run` packs nothing by default (--pack off), but $BENCHMARK_PACK may say otherwise: the suite's
# runner tests are about one cell per task; tests/test_packed.py tests packing, auto included.
os.environ.setdefault("BENCHMARK_PACK", "off")

def make_data(shape=(1, 8, 8), classes=4, n_train=256, n_test=128, seed=0, augment=False) -> data_mod.Data:
    """A learnable synthetic dataset: each class is a fixed random pattern plus noise."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, *shape, generator=gen)

    def split(n):
        y = torch.randint(0, classes, (n,), generator=gen)
        x = patterns[y] + 0.5 * torch.randn(n, *shape, generator=gen)
        return data_mod.Split(x, y, torch.zeros(1, shape[0], 1, 1), torch.ones(1, shape[0], 1, 1))

    spec = dataclasses.replace(data_mod.get_spec("fashion-mnist"), name="synthetic", shape=shape,
                               num_classes=classes, augment=augment)
    return data_mod.Data(spec, split(n_train), split(n_test), Path("synthetic"))


@pytest.fixture(scope="session", autouse=True)
def speed_cache(tmp_path_factory) -> Path:
    """Dry runs measure speeds and cache them: in a folder of this session (shared by its tests, and
    by the commands they start), never in the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("speed-cache")
    before = os.environ.get("BENCHMARK_CACHE_DIR")
    os.environ["BENCHMARK_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("BENCHMARK_CACHE_DIR", None)
    else:
        os.environ["BENCHMARK_CACHE_DIR"] = before


@pytest.fixture
def tiny_data() -> data_mod.Data:
    return make_data()


def write_tiny_grid(path: Path, lams=(1e-4, 1e-3), epochs=1, extra="") -> Path:
    """The suite's one tiny grid: dense and DWF D=2/3 at ``lams`` on 600 Fashion-MNIST examples of
    LeNet-300-100, seed 0 (seconds per cell); ``extra`` is appended as TOML (more methods)."""
    lam_list = ", ".join(repr(x) for x in lams)
    path.write_text(f"""
description = "runner test grid"
seeds = [0]
subset = 600
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = {{ epochs = {epochs}, batch_size = 64 }}
[experiment.methods.dense]
[[experiment.methods.dwf]]
depth = [2, 3]
lam = [{lam_list}]
{extra}
""")
    return path


@pytest.fixture
def tiny_grid():
    """``write_tiny_grid``, for a test to call with the path and overrides it needs."""
    return write_tiny_grid


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where no GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none is visible here (torch.cuda.is_available() is False); "
                                   "`make gpu-check` runs these on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """tests/test_fault_injection.py: how many kills the runner survived, and with how many cells."""
    import sys

    lines = getattr(sys.modules.get("test_fault_injection"), "REPORT", None)
    if lines:
        terminalreporter.section("fault injection")
        for line in lines:
            terminalreporter.write_line(line)
