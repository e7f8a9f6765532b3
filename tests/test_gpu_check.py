"""``make gpu-check`` without a GPU: it says so, its parts keep to their budget and are all recorded,
and the pieces it computes (VGG-16's share of the peak, CIFAR-shaped data) are right."""

from __future__ import annotations

import pytest
import torch

from benchmark.engine import data as data_mod
from benchmark.speed import gpu_check

PARTS = ["env", "cuda-tests", "doctor", "perf-step", "perf-pack", "epoch-lenet300", "epoch-vgg16"]


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
