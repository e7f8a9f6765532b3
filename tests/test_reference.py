"""The committed reference results (``reference/``, README "Results"): every record is recomputable
from its own config, the committed CSVs are what ``collect`` makes of the committed records, and a
committed record is reproduced by training its cell again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark.execution import grids
from benchmark.execution.cell import Cell, run_cell
from benchmark.execution.store import Store

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference"
GRIDS = sorted(p.parent.name for p in REFERENCE.glob("*/cells"))


def records(grid: str) -> list[tuple[Path, dict]]:
    return [(path, json.loads(path.read_text())) for path in sorted((REFERENCE / grid / "cells").glob("*.json"))]


def test_the_reference_grids_are_committed():
    assert {"lenet-calibration", "lenet-reference"} <= set(GRIDS)


@pytest.mark.parametrize("grid", GRIDS)
def test_every_committed_record_is_recomputable_from_its_own_config(grid):
    preset_ids = {cell.id for cell in grids.load_grid(grid).cells}
    for path, result in records(grid):
        cell = Cell.from_config(result["config"])
        assert cell.id == result["cell_id"] == path.stem, path
        assert cell.id in preset_ids, f"{path}: not a cell of the {grid} preset any more"
        # a diverged run is a result (the curve ends there); anything else failing is a bug
        error = result["records"][0].get("error") or ""
        assert result["status"] == "ok" or error.startswith("Diverged"), f"{path}: {error}"
        for record in result["records"]:
            # what a bit-identical rerun needs besides the config (DESIGN.md section 9)
            assert record["torch_version"] and record["threads"] >= 1, path


@pytest.mark.parametrize("grid", GRIDS)
def test_committed_csvs_are_what_collect_makes_of_the_committed_records(grid, tmp_path):
    shutil.copytree(REFERENCE / grid / "cells", tmp_path / grid / "cells")
    Store(tmp_path, grid).collect()
    for name in ("results.csv", "layers.csv", "history.csv"):
        committed = pd.read_csv(REFERENCE / grid / name)
        rebuilt = pd.read_csv(tmp_path / grid / name)
        pd.testing.assert_frame_equal(rebuilt, committed, check_exact=False, rtol=1e-12, obj=f"{grid}/{name}")


@pytest.mark.slow
def test_a_committed_record_is_reproduced_by_training_its_cell_again(tmp_path):
    """The calibration's dense run (30 epochs, LeNet-300-100): bit-identical with the same torch build and
    thread count on the same kind of machine; elsewhere float summation order may move it a little."""
    [(path, result)] = [(p, r) for p, r in records("lenet-calibration") if r["config"]["method"] == "dense"]
    committed = result["records"][0]
    threads = torch.get_num_threads()
    torch.set_num_threads(committed["threads"])
    try:
        [again] = run_cell(Cell.from_config(result["config"]), device="cpu", work_root=tmp_path / "work",
                           cache_dir=tmp_path / "cache", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert again["status"] == "ok"
    same_build = again["torch_version"] == committed["torch_version"]
    print(f"{path.name}: committed {committed['test_acc']:.4f}, again {again['test_acc']:.4f} "
          f"(torch {again['torch_version']} vs {committed['torch_version']}, {committed['threads']} thread(s))")
    if same_build:
        assert [e["test_acc"] for e in again["history"]] == pytest.approx(
            [e["test_acc"] for e in committed["history"]], abs=0.003)
    assert abs(again["test_acc"] - committed["test_acc"]) <= 0.005


def test_the_quick_grid_is_a_subset_of_the_committed_reference_seed_0():
    """The quick grid's numbers in the README are the reference's seed-0 records of the same cells."""
    quick = grids.load_grid("quick").cells
    committed = {path.stem for path, _ in records("lenet-reference")}
    assert {cell.seed for cell in quick} == {0}
    missing = [cell.label() if hasattr(cell, "label") else cell.id for cell in quick if cell.id not in committed]
    assert not missing, f"quick cells not in reference/lenet-reference: {missing}"
    assert {cell.method for cell in quick} >= {"dense", "dwf", "l1", "gmp", "rigl", "lottery", "synflow"}
