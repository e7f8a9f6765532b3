"""Thresholded curves that say nothing about their method are named, with what to change."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmark.analysis import curves as cv
from benchmark.analysis.diagnostics import curve_warnings


def row(method, seed, cr, acc, depth=None, lam=None, thresholded=True) -> dict:
    return {"grid": "g", "cell_id": f"{method}{depth}-{seed}-{cr}-{lam}", "method": method, "arch": "lenet300",
            "dataset": "fashion-mnist", "seed": seed, "depth": depth, "level": "", "test_acc": acc, "cr": cr,
            "cr_effective": cr, "status": "ok", "lam": lam,
            "cr_thr_small": cr if thresholded else None, "cr_thr_large": cr if thresholded else None}


def warnings_for(rows, tmp_path) -> list[str]:
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    return curve_warnings(cv.load_results(tmp_path / "results.csv"))


DENSE = [row("dense", 0, 1.0, 0.90, thresholded=False), row("dense", 1, 1.0, 0.89, thresholded=False)]


def test_a_curve_stuck_at_cr_1_is_named_with_its_lambda_range_and_what_to_raise(tmp_path):
    rows = DENSE + [row("dwf", s, 1.0, 0.90, depth=3, lam=lam) for s in (0, 1) for lam in (1e-3, 3e-3)]
    rows += [row("dwf", s, cr, acc, depth=2, lam=lam) for s in (0, 1)
             for cr, acc, lam in ((10, 0.89, 1e-4), (100, 0.85, 1e-3))]
    [line] = warnings_for(rows, tmp_path)
    assert line.startswith("dwf D=3 on lenet300/fashion-mnist (λ 0.001 to 0.003): every point has CR <= 1.1")
    assert "Raise lam" in line and "learning rate" in line and "epochs" in line


def test_a_sweep_that_never_leaves_dense_accuracy_is_named_and_a_working_one_is_not(tmp_path):
    gentle = [row("l1", s, cr, 0.895, lam=lam) for s in (0, 1) for cr, lam in ((3, 1e-5), (8, 1e-4))]
    working = [row("dwf", s, cr, acc, depth=3, lam=lam) for s in (0, 1)
               for cr, acc, lam in ((10, 0.89, 1e-4), (300, 0.70, 1e-2))]
    # pruning baselines have no threshold: a flat one is a choice of targets, not a stuck penalty
    pruned = [row("magnitude", s, 2.0, 0.90, thresholded=False) for s in (0, 1)]
    [line] = warnings_for(DENSE + gentle + working + pruned, tmp_path)
    assert line.startswith("l1 on lenet300/fashion-mnist (λ 1e-05 to 0.0001): no point falls more than 1 point")
    assert "largest CR 8" in line and "Add larger lam" in line


def test_one_seed_that_breaks_is_enough(tmp_path):
    """The check is per seed: a sweep is fine when any seed's curve leaves dense accuracy."""
    rows = DENSE + [row("l1", 0, 8, 0.895, lam=1e-4), row("l1", 1, 8, 0.85, lam=1e-4)]
    assert warnings_for(rows, tmp_path) == []


@pytest.mark.slow  # a whole grid and report
def test_run_and_report_end_with_the_warning_for_a_dwf_grid_that_compresses_nothing(tmp_path, capsys, tiny_grid):
    """The new user's trap: DWF at a tiny λ for one epoch stays at CR 1; `run` and `report` say so and
    what to change, after the CSV line, and `run` still exits 0 (nothing failed)."""
    from benchmark.__main__ import main
    
    grid = tiny_grid(tmp_path / "flat.toml", lams=(1e-7,)).read_text().replace("depth = [2, 3]", "depth = 3")
    (tmp_path / "flat.toml").write_text(grid)
    results = str(tmp_path / "r")
    assert main(["run", "--grid", str(tmp_path / "flat.toml"), "--results-dir", results, "--no-progress"]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert line.startswith("warning: dwf D=3 on lenet300/fashion-mnist (λ 1e-07): every point has CR <= 1.1")
    # it already trained at the calibrated default (a grid without lr): the warning says so
    assert "learning rate (it trained at 0.5; without an lr of their own, the LeNets take the calibrated " \
           "per-depth rates of docs/methods.md)" in line
    assert out.index("CSV: ") < out.index(line)
    assert main(["report", "--grid", "flat", "--results-dir", results, "--no-page"]) == 0
    assert line in capsys.readouterr().err
