"""``make gpu-check`` without a GPU: it says so, its parts keep to their budget and are all recorded,
and the pieces it computes (VGG-16's share of the peak, CIFAR-shaped data) are right."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.engine import data as data_mod
from benchmark.speed import gpu_check

pytestmark = pytest.mark.slow  # processes, clusters or whole grids: left out of make test-fast

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["env", "cuda-tests", "cells", "doctor", "perf-step", "perf-pack", "epoch-lenet300", "epoch-vgg16"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_without_a_gpu_the_check_says_so_and_checks_nothing(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    summary = (tmp_path / "summary.md").read_text()
    assert "no CUDA GPU visible" in summary and "nothing checked" in summary and "--cpu-dry-run" in summary
    assert "nothing checked" in capsys.readouterr().err


def test_a_dry_run_records_every_part_and_skips_what_its_budget_does_not_cover(tmp_path):
    code = gpu_check.main(["--out", str(tmp_path), "--cpu-dry-run", "--budget-s", "20"])
    summary = (tmp_path / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(PARTS) <= set(rows)
    assert "the check's time budget is spent" in rows["epoch-vgg16"]
    assert code in (0, 1)  # the first part may run out of its few seconds; that is recorded, not raised
    assert (tmp_path / "cuda-tests.log").is_file()


def test_vgg_share_of_the_peak_counts_three_passes_of_two_flops_per_multiply_add():
    line = gpu_check.vgg_share_of_peak(step_s=0.01, batch=128, peak_tflops=100.0)
    # VGG-16 (CIFAR) forward: 313.2 M multiply-adds per image
    assert "24.1 TFLOP/s = 24.1% of" in line and "missed" in line


def test_cifar_shaped_random_data_reads_as_cifar10(tmp_path):
    gpu_check.write_cifar10_shaped(tmp_path / "cifar-10-batches-py", n_train=50, n_test=10)
    data = data_mod.load("cifar10", tmp_path)
    assert data.train.x.shape == (50, 3, 32, 32) and data.test.x.shape == (10, 3, 32, 32)


def test_fashion_mnist_shaped_random_data_reads_as_fashion_mnist(tmp_path):
    gpu_check.write_fashion_mnist_shaped(tmp_path / "fashion-mnist", n_train=60, n_test=20)
    data = data_mod.load("fashion-mnist", tmp_path)
    assert data.train.x.shape == (60, 1, 28, 28) and data.test.x.shape == (20, 1, 28, 28)
    assert data_mod.locate("fashion-mnist", tmp_path) == tmp_path / "fashion-mnist"


def test_the_parts_timeouts_fit_the_default_budget_of_under_8_minutes():
    assert sum(gpu_check.TIMEOUTS.values()) <= gpu_check.DEFAULT_BUDGET_S <= 450


def test_a_dry_run_on_a_bare_machine_runs_every_part_and_says_what_it_did_not_run(tmp_path):
    """As on a lent GPU machine: no torch-pruning, no dask, no tqdm, no dataset anywhere (an empty
    $BENCHMARK_DATA, the system folders hidden), run from another folder. Every part runs from the
    check's own data; the structured cell is reported not run, with why, never as passed."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "site_fakes"), str(ROOT)]),
           "DWF_TEST_BLOCK": "torch_pruning,dask,distributed,dask_jobqueue,tqdm", "DWF_TEST_HIDE_SYSTEM_DATA": "1",
           "BENCHMARK_DATA": str(empty)}
    out = tmp_path / "out"
    probe = subprocess.run([sys.executable, "-c", "from benchmark.engine import data; data.locate('fashion-mnist')"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "not found" in probe.stderr  # the machine really has no dataset
    done = subprocess.run([sys.executable, "-m", "benchmark.speed.gpu_check", "--out", str(out), "--cpu-dry-run",
                           "--budget", "1200"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1300)
    summary = (out / "summary.md").read_text()
    assert done.returncode == 0, summary
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in summary.splitlines() if line.startswith("| ") and "---" not in line}
    timed = ["cells", "doctor", "perf-step", "perf-pack", "epoch-lenet300", "epoch-vgg16", "grid-jobs-1",
             "grid-jobs-2", "grid-pack-4", "grid-pack-auto"]
    assert {part: rows[part][0] for part in timed} == {part: "passed" for part in timed}
    assert rows["cells-structured"][0] == "not run" and "torch-pruning is not installed" in rows["cells-structured"][2]
    assert "6/6 families ok" in rows["cells"][2]
    assert rows["cuda-tests"][0] == "not run"  # no GPU here: skipped tests are not passed tests
