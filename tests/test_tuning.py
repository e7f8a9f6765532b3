"""The validation split and tuning on it (benchmark.execution.tuning, docs/tuning.md): the split is
disjoint from training and the same for every cell, no pick can depend on test data, partial
tuning waits, and grids without a tune table keep every cell id."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.__main__ import main
from benchmark.engine import data as data_mod
from benchmark.execution import grids, tuning
from benchmark.execution.cell import Cell, config_hash, run_cell
from benchmark.execution.store import Store
from test_data import write_idx

# ------------------------------------------------------------------------------------------------
# The validation split
# ------------------------------------------------------------------------------------------------


def test_the_validation_split_is_stratified_disjoint_from_training_and_the_same_for_every_call():
    labels = np.repeat(np.arange(10), [100, 50, 80, 120, 90, 110, 70, 130, 60, 190])
    np.random.default_rng(3).shuffle(labels)
    held = data_mod.validation_indices(labels, 100)
    assert len(held) == len(set(held.tolist())) == 100
    counts = np.bincount(labels[held], minlength=10)
    assert np.all(np.abs(counts - 100 * np.bincount(labels) / len(labels)) < 1)  # each class its share
    assert np.array_equal(held, data_mod.validation_indices(labels.copy(), 100))  # no other input: no seed
    with pytest.raises(ValueError, match="validation=1000 must be between 1 and 999"):
        data_mod.validation_indices(labels, 1000)


def test_loaded_data_moves_the_held_out_examples_out_of_the_training_split():
    full = data_mod.load("fashion-mnist", limit=1200)
    split = data_mod.load("fashion-mnist", limit=1200, validation=200)
    again = data_mod.load("fashion-mnist", limit=1200, validation=200)
    assert len(split.train) == 1000 and len(split.val) == 200 and split.test.x.shape == full.test.x.shape
    held = data_mod.validation_indices(full.train.y.numpy(), 200)
    rest = np.setdiff1d(np.arange(1200), held)
    assert split.val.x.equal(full.train.x[held]) and split.train.x.equal(full.train.x[rest])
    assert split.val.x.equal(again.val.x) and split.val.y.equal(again.val.y)
    assert full.val is None


def test_records_and_each_epoch_carry_validation_metrics_only_with_a_validation_split(tmp_path):
    with_split = Cell.make("dense", "lenet300", "fashion-mnist", 0, schedule={"epochs": 2, "validation": 100},
                           subset=500)
    plain = Cell.make("dense", "lenet300", "fashion-mnist", 0, schedule={"epochs": 2}, subset=500)
    [record] = run_cell(with_split, device="cpu", work_root=tmp_path / "w", cache_dir=tmp_path / "c")
    assert record["status"] == "ok" and 0 <= record["val_acc"] <= 1 and record["val_loss"] > 0
    assert all("val_acc" in epoch and "val_loss" in epoch for epoch in record["history"])
    assert record["history"][-1]["val_acc"] == record["val_acc"]
    [other] = run_cell(plain, device="cpu", work_root=tmp_path / "w", cache_dir=tmp_path / "c")
    assert "val_acc" not in other and all("val_acc" not in epoch for epoch in other["history"])


def test_a_schedule_without_validation_keeps_the_cell_id_it_had_before_the_option_existed():
    cell = Cell.make("dwf", "lenet300", "fashion-mnist", 1, {"depth": 3, "lam": 1e-3}, {"epochs": 30})
    old_schedule = {k: v for k, v in asdict(cell.schedule).items() if k != "validation"}
    old_config = cell.config() | {"schedule": old_schedule}
    assert cell.id == config_hash(old_config)
    held = Cell.make("dwf", "lenet300", "fashion-mnist", 1, {"depth": 3, "lam": 1e-3}, {"epochs": 30, "validation": 50})
    assert held.id != cell.id and held.config()["schedule"]["validation"] == 50


# ------------------------------------------------------------------------------------------------
# Grids with a tune table
# ------------------------------------------------------------------------------------------------

TUNED = """
seeds = [0, 1]
subset = 600
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 2, lr = 0.1 }
[experiment.tune]
parameter = "lr"
candidates = [0.02, 0.2]
validation = 100
crs = [2, 10]
at = { lam = [1e-3, 1e-2], target_cr = [2, 10] }
[experiment.methods.dense]
[experiment.methods.magnitude]
target_cr = [2, 5, 10]
[experiment.methods.lottery]
target_cr = 4
[experiment.methods.dwf]
depth = 2
lam = [1e-4, 1e-3, 1e-2]
"""


def test_a_tune_table_makes_one_group_per_curve_with_tuning_cells_per_candidate():
    grid = grids.parse_grid(TUNED, "tuned")
    assert grid.cells == []  # every method of the experiment is tuned
    groups = {g.first.method: g for g in grid.tune_groups}
    assert set(groups) == {"dense", "magnitude", "lottery", "dwf"}
    dwf = groups["dwf"]
    assert dwf.target == "method" and groups["magnitude"].target == "schedule"
    assert len(dwf.finals) == 6 and [len(c) for c in dwf.tuning] == [2, 2]  # at's 2 lambdas x seed 0
    for candidate, cells in zip((0.02, 0.2), dwf.tuning):
        assert {c.method_params.lam for c in cells} == {1e-3, 1e-2}
        assert all(c.method_params.lr == candidate and c.schedule.validation == 100 and c.seed == 0 for c in cells)
    magnitude = groups["magnitude"].tuning[1]
    assert {c.method_params.target_cr for c in magnitude} == {2, 10} and {c.schedule.lr for c in magnitude} == {0.2}
    # a parameter the curve does not sweep keeps its value: the lottery's one cell stays at target 4
    assert [c.method_params.target_cr for cells in groups["lottery"].tuning for c in cells] == [4.0, 4.0]
    finals = dwf.final_cells(0.2)
    assert {c.method_params.lr for c in finals} == {0.2} and {c.schedule.validation for c in finals} == {0}
    assert {c.seed for c in finals} == {0, 1}


@pytest.mark.parametrize("change, message", [
    ('parameter = "lr"', "parameter 'lrr' is neither"),
    ("candidates = [0.02, 0.2]", "candidates must be a list of at least 2"),
    ("validation = 100", "validation must be a positive number"),
    ("at = { lam = [1e-3, 1e-2], target_cr = [2, 10] }", "only sweep parameters"),
])
def test_a_bad_tune_table_is_named_with_its_line(change, message):
    bad = {'parameter = "lr"': 'parameter = "lrr"', "candidates = [0.02, 0.2]": "candidates = [0.2]",
           "validation = 100": "validation = 0",
           "at = { lam = [1e-3, 1e-2], target_cr = [2, 10] }": "at = { depth = [2, 3] }"}[change]
    with pytest.raises(grids.GridError, match=message) as info:
        grids.parse_grid(TUNED.replace(change, bad), "tuned", "tuned.toml")
    assert "tuned.toml:" in str(info.value)


def test_a_tuned_method_may_not_also_fix_the_tuned_parameter():
    with pytest.raises(grids.GridError, match="dwf.lr is chosen by this experiment's tune table"):
        grids.parse_grid(TUNED.replace("depth = 2", "depth = 2\nlr = 0.3"), "tuned")


# ------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------


def test_the_score_interpolates_in_log_cr_and_counts_unreached_crs_as_chance():
    points = [(10.0, 0.8), (1000.0, 0.4)]
    assert tuning.score(points, (100.0,), 0.1) == pytest.approx(0.6)
    assert tuning.score(points, (1400.0,), 0.1) == pytest.approx(0.4)  # within 1.5x of the last point
    assert tuning.score(points, (2000.0,), 0.1) == pytest.approx(0.1)  # beyond: chance
    dense_points = [(1.0, 0.9), (1.0, 0.7)]
    assert tuning.score(dense_points, (10.0, 100.0), 0.1, without_crs=True) == pytest.approx(0.8)  # dense: its mean
    # a pruning curve that never left CR 1 (DWF at a tiny learning rate) reaches no scoring CR
    assert tuning.score(dense_points, (10.0, 100.0), 0.1) == pytest.approx(0.1)
    assert tuning.score([(1.0, 0.9)], (1.2,), 0.1) == pytest.approx(0.9)  # within 1.5x of its one point
    assert tuning.score([], (10.0,), 0.1) == 0.1  # every cell failed


def _result(cell: Cell, status: str, **record) -> dict:
    return {"cell_id": cell.id, "status": status, "records": [{"status": status, "wall_s": 10.0, "threads": 2} | record]}


def test_a_pick_reads_only_validation_accuracy_waits_for_missing_cells_and_breaks_ties_to_the_first():
    group = next(g for g in grids.parse_grid(TUNED, "tuned").tune_groups if g.first.method == "magnitude")
    low, high = group.tuning
    results = {c.id: _result(c, "ok", cr=float(c.method_params.target_cr), val_acc=0.5, test_acc=0.9) for c in low}
    results |= {c.id: _result(c, "ok", cr=float(c.method_params.target_cr), val_acc=0.6, test_acc=0.1) for c in high}
    chosen = tuning.pick(group, results, 10)
    assert chosen.value == 0.2 and chosen.scores == pytest.approx([0.5, 0.6]) and chosen.cells == 4
    assert chosen.cpu_hours == pytest.approx(4 * 20 / 3600)
    # test accuracy plays no part: swap it between the candidates and nothing changes
    swapped = {k: {**v, "records": [v["records"][0] | {"test_acc": 1 - v["records"][0]["test_acc"]}]}
               for k, v in results.items()}
    assert tuning.pick(group, swapped, 10).value == 0.2
    tied = {k: {**v, "records": [v["records"][0] | {"val_acc": 0.5}]} for k, v in results.items()}
    assert tuning.pick(group, tied, 10).value == 0.02
    diverged = results | {c.id: _result(c, "failed") for c in high}
    assert tuning.pick(group, diverged, 10).value == 0.02  # a failed candidate scores as chance
    partial = dict(results)
    del partial[high[0].id]
    assert tuning.pick(group, partial, 10) is None
    picks, waiting = tuning.resolve([group], partial.get)
    assert picks == [] and waiting[0][1:] == (3, 4)



def test_a_pick_that_leaves_a_seed_without_a_curve_gives_way_to_the_next_best_whatever_the_selection(tmp_path):
    """lenet-reference: magnitude pruning picked 0.8 on the validation split, and its dense training at
    0.8 on the full set diverged at epoch 1, taking every final cell of the seed with it. The rule drops
    such a pick for the next best, for every curve alike, reading only whether the final cells' training
    diverged (never their test accuracy); one diverged point among trained ones is a result, not a reason."""
    from benchmark.analysis import report

    group = next(g for g in grids.parse_grid(TUNED, "tuned").tune_groups if g.first.method == "magnitude")
    low, high = group.tuning
    results = {c.id: _result(c, "ok", cr=float(c.method_params.target_cr), val_acc=0.5) for c in low}
    results |= {c.id: _result(c, "ok", cr=float(c.method_params.target_cr), val_acc=0.6) for c in high}
    finals = {}
    assert tuning.resolve([group], results.get, finals.get)[0][0].value == 0.2  # no final trained yet
    seed1 = [c for c in group.final_cells(0.2) if c.seed == 1]  # target_cr 2, 5, 10
    finals |= {c.id: _result(c, "failed", error="WorkerDied: the worker process died") for c in seed1}
    assert tuning.resolve([group], results.get, finals.get)[0][0].value == 0.2  # not a divergence
    nan = "Diverged: loss became nan at epoch 1, step 250 (lr=0.2)"
    finals |= {c.id: _result(c, "failed", error=nan) for c in seed1[:2]}
    finals[seed1[2].id] = _result(seed1[2], "ok", cr=10.0, val_acc=0.5)
    assert tuning.resolve([group], results.get, finals.get)[0][0].value == 0.2  # the seed still has a curve
    finals[seed1[2].id] = _result(seed1[2], "failed", error=nan)
    chosen = tuning.resolve([group], results.get, finals.get)[0][0]
    assert chosen.value == 0.02 and chosen.dropped == {0.2: 3}
    assert tuning.resolve([group], results.get)[0][0].value == 0.2  # without final results: the tuning alone
    # a run of seed 0 only reaches the same pick: the check reads the whole curve
    selected = tuning.TuneGroup(group.spec, group.target, [c for c in group.finals if c.seed == 0], group.tuning,
                                group.finals)
    assert tuning.resolve([selected], results.get, finals.get)[0][0].value == 0.02
    assert {c.seed for c in tuning.picked_finals([chosen])} == {0, 1}
    assert {c.schedule.lr for c in tuning.dropped_finals([chosen])} == {0.2} and len(tuning.dropped_finals([chosen])) == 6
    # the table says so; report's note names the dropped rate
    rows = tuning.table_rows([chosen])
    assert [(r["candidate"], r["picked"], r["final_diverged"]) for r in rows] == [(0.02, True, 0), (0.2, False, 3)]
    pd.DataFrame(rows).to_csv(tmp_path / "tuning.csv", index=False)
    note = report.tuning_table(tmp_path)["note"].iloc[0]
    assert "lr=0.2 dropped: its training diverged in every final cell of a seed (3 cells); the next best is picked" in note
    # when the next best loses a seed too, nothing is left: no final cells rather than a lost seed
    seed0 = [c for c in group.final_cells(0.02) if c.seed == 0]
    finals |= {c.id: _result(c, "failed", error="Diverged: loss became inf at epoch 2, step 3 (lr=0.02)") for c in seed0}
    none_left = tuning.resolve([group], results.get, finals.get)[0][0]
    assert none_left.value is None and none_left.dropped == {0.2: 3, 0.02: 3}
    assert tuning.picked_finals([none_left]) == []


# ------------------------------------------------------------------------------------------------
# A whole tuned run, twice: with the true test labels and with shuffled ones
# ------------------------------------------------------------------------------------------------


def _fashion_subset(folder: Path, shuffle_test_labels: bool) -> Path:
    source = data_mod.locate("fashion-mnist")
    arrays = {}
    for split, (images, labels) in data_mod.IDX_FILES.items():
        n = 600 if split == "train" else 300
        arrays[images] = data_mod.read_idx(data_mod.idx_file(source, images))[:n]
        arrays[labels] = data_mod.read_idx(data_mod.idx_file(source, labels))[:n]
    if shuffle_test_labels:
        arrays["t10k-labels-idx1-ubyte"] = np.random.default_rng(1).permutation(arrays["t10k-labels-idx1-ubyte"])
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=False)
    return folder


SMALL_TUNED = TUNED.replace("[experiment.methods.lottery]\ntarget_cr = 4\n", "").replace("seeds = [0, 1]", "seeds = [0]")


@pytest.mark.slow  # whole tuning grids, run twice
def test_no_pick_changes_when_the_test_labels_change_and_a_rerun_trains_nothing(tmp_path, capsys):
    grid_file = tmp_path / "tuned.toml"
    grid_file.write_text(SMALL_TUNED)
    tables = []
    for shuffled in (False, True):
        data = _fashion_subset(tmp_path / f"data-{shuffled}", shuffled)
        results = tmp_path / f"results-{shuffled}"
        argv = ["run", "--grid", str(grid_file), "--results-dir", str(results), "--data-dir", str(data),
                "--jobs", "1", "--pack", "off", "--no-progress", "--device", "cpu"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "tuning: 3 of 3 tuned curve(s) have their pick" in out
        tables.append((pd.read_csv(results / "tuned" / "tuning.csv"), pd.read_csv(results / "tuned" / "results.csv")))
        assert main(argv) == 0  # resumed: nothing trains twice
        assert "tuning cells: 0 finished now, 10 already done" in capsys.readouterr().out
    (picks_true, rows_true), (picks_shuffled, rows_shuffled) = tables
    timing = ["tuning_cpu_hours"]  # the only column that may differ: how long the cells took
    pd.testing.assert_frame_equal(picks_true.drop(columns=timing), picks_shuffled.drop(columns=timing))
    assert picks_true.picked.sum() == 3
    assert not np.allclose(rows_true.sort_values("cell_id").test_acc, rows_shuffled.sort_values("cell_id").test_acc)
    # each final row carries its curve's pick; the final cells train on the full training set
    assert rows_true.tuned_parameter.eq("lr").all() and rows_true.tuned_value.notna().all()
    finals = [json.loads(p.read_text()) for p in (tmp_path / "results-False" / "tuned" / "cells").glob("*.json")]
    assert all("validation" not in r["config"]["schedule"] for r in finals)
    assert len(Store(tmp_path / "results-False", "tuned-tuning").finished_ids()) == 10
    # report: the tuning table in Markdown and on the page, one row per curve with its pick in bold
    assert main(["report", "--grid", "tuned", "--results-dir", str(tmp_path / "results-False")]) == 0
    table = (tmp_path / "results-False" / "tuned" / "tuning.md").read_text()
    assert table.count("**") == 2 * 3 and "dwf D=2" in table
    assert "Settings chosen on the validation split" in (tmp_path / "results-False" / "tuned" / "report.html").read_text()


def test_the_reference_tuning_preset_is_what_the_tune_table_in_lenet_reference_makes():
    """The committed tuning cells (written out in lenet-reference-tuning) and those of lenet-reference's
    tune tables are the same cells (same ids), so one folder serves both; and the tune tables' curves
    are the first protocol's curves (lenet-reference-v1) with the learning rate left open, on both LeNets."""
    reference = grids.load_grid("lenet-reference")
    made = {c.id for c in tuning.tuning_cells(reference.tune_groups)}
    written = {c.id for c in grids.load_grid("lenet-reference-tuning").cells}
    # LeNet-5: 568 for 8 candidates, 71 each for 0.00625, 0.003125 and 0.0015625
    assert len(made) == 616 + 781 and made == written
    assert tuning.folder("lenet-reference") == "lenet-reference-tuning"
    assert not reference.cells, "every curve of lenet-reference is tuned"

    def curve_point(cell):  # what a cell is apart from its learning rate
        params = {k: v for k, v in cell.params.items() if k != "lr"}
        return cell.arch, cell.method, repr(sorted(params.items())), cell.seed

    finals = {curve_point(c) for c in reference.final_templates()}
    first = {curve_point(c) for c in grids.load_grid("lenet-reference-v1").cells}
    assert {arch for arch, *_ in first} == {"lenet300", "lenet5"}
    assert first <= finals
    assert {seed for arch, *_, seed in finals if arch == "lenet300"} == {0, 1, 2, 3, 4}
    assert {seed for arch, *_, seed in finals if arch == "lenet5"} == {0, 1, 2}


def test_the_tuning_table_notes_a_pick_at_the_edge_of_its_candidates(tmp_path):
    """lenet-reference-tuning picked 0.8, its largest rate, for every DWF depth: such a pick says only
    that the best rate may lie beyond the candidates, and the table must say so."""
    from benchmark.analysis import report

    rows = []
    for curve, scores in {"dwf D=3": [0.77, 0.85, 0.89], "l1": [0.78, 0.79, 0.54], "snip": [0.60, 0.50, 0.40]}.items():
        best = int(np.argmax(scores))
        rows += [{"curve": curve, "parameter": "lr", "candidate": c, "val_score": s, "picked": i == best,
                  "tuning_cells": 3, "tuning_cpu_hours": 0.1} for i, (c, s) in enumerate(zip([0.2, 0.4, 0.8], scores))]
    pd.DataFrame(rows).to_csv(tmp_path / "tuning.csv", index=False)
    notes = dict(zip(*report.tuning_table(tmp_path)[["curve", "note"]].T.values))
    assert notes["dwf D=3"].startswith("the largest candidate") and "extend" in notes["dwf D=3"]
    assert notes["l1"] == ""
    assert notes["snip"].startswith("the smallest candidate")
    from benchmark.execution import tuning

    assert tuning.edge_note([0, 10], np.int64(10)).startswith("the largest")  # integers read back from a CSV
    assert tuning.edge_note(["layer", "global"], "global") == ""  # categorical: no edge
    assert tuning.edge_note([0.1], 0.1) == ""  # one candidate: nothing was chosen


def test_an_end_pick_asks_for_another_candidate_only_when_its_lead_beats_the_validation_noise(tmp_path):
    """A curve whose candidates all leave it near chance picks an end by noise, and the rule's "extend at
    an end" would add candidates for ever (lenet-reference's LeNet-5 layer-wise magnitude: 16.17 at
    0.003125 against 15.33 at 0.4). An end leading by more than two standard errors of a difference of
    two accuracies on the validation examples still asks for the next candidate."""
    from benchmark.analysis import report

    rows = []
    for curve, scores in {"magnitude": [0.1617, 0.1290, 0.1533], "lottery": [0.6532, 0.6221, 0.5010],
                          "dwf D=3": [0.60, 0.70, 0.80]}.items():
        best = int(np.argmax(scores))
        rows += [{"curve": curve, "parameter": "lr", "candidate": c, "val_score": s, "picked": i == best,
                  "validation": 5000, "crs": "10 100 1000", "seeds": "0", "tuning_cells": 3, "tuning_cpu_hours": 0.1}
                 for i, (c, s) in enumerate(zip([0.003125, 0.1, 0.4], scores))]
    pd.DataFrame(rows).to_csv(tmp_path / "tuning.csv", index=False)
    notes = dict(zip(*report.tuning_table(tmp_path)[["curve", "note"]].T.values))
    # independently: 2 * sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n) at n = 5000
    noise = 2 * np.sqrt((0.1617 * 0.8383 + 0.1533 * 0.8467) / 5000)
    assert round(100 * noise, 2) == 1.46 and 0.1617 - 0.1533 < noise
    assert notes["magnitude"].startswith("the smallest candidate, but") and "not extended" in notes["magnitude"]
    assert "(1.46)" in notes["magnitude"] and "(0.84 points)" in notes["magnitude"]
    assert notes["lottery"].startswith("the smallest candidate, 3.11 points ahead") and notes["lottery"].endswith("extend the candidates")
    assert notes["dwf D=3"].startswith("the largest candidate, 10.00 points ahead")
    from benchmark.execution import tuning

    # more tuning seeds, more examples: the same lead is resolved with 3 seeds
    assert "not extended" in tuning.edge_note([0.003125, 0.1, 0.4], 0.003125, [0.1617, 0.1290, 0.1533], 5000)
    assert "extend the candidates" in tuning.edge_note([0.003125, 0.1, 0.4], 0.003125, [0.1617, 0.1290, 0.1533], 20000)
    assert tuning.edge_note([0.003125, 0.1, 0.4], 0.1, [0.1, 0.9, 0.2], 5000) == ""  # not an end
    # without scores, or with fewer scores than candidates (a damaged tuning.csv), the plain request
    plain = "the smallest candidate: the best may lie below; extend the candidates"
    assert tuning.edge_note([0.003125, 0.1, 0.4], 0.003125) == plain
    assert tuning.edge_note([0.4, 0.1, 0.003125], 0.003125, [0.1617, 0.1290], 5000) == plain
