"""A curve is one setting: records of one method label whose settings differ (a method parameter of
any type, or the schedule) get labels of their own, so no table or figure averages them together."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmark.__main__ import main

GRID = """
seeds = [0]
subset = 300
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, lr = 0.1 }
[experiment.methods.gmp]
target_cr = [2, 10]
scope = ["layer", "global"]
interval = 1
[experiment.methods.dwf]
depth = 2
lam = [1e-4, 1e-3]
lr = [0.05, 0.2]
[experiment.methods.snip]
target_cr = 10

[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, lr = 0.05 }
[experiment.methods.snip]
target_cr = 10
"""


@pytest.mark.slow  # a whole grid of 10 cells and report
def test_curves_of_different_settings_get_their_own_labels_rows_and_lines(tmp_path, capsys):
    grid = tmp_path / "mixed.toml"
    grid.write_text(GRID)
    results = tmp_path / "results"
    assert main(["run", "--grid", str(grid), "--results-dir", str(results), "--jobs", "1", "--pack", "off",
                 "--no-progress", "--device", "cpu"]) == 0
    frame = pd.read_csv(results / "mixed" / "results.csv")
    assert set(frame.variant) == {"gmp scope=layer", "gmp scope=global", "dwf D=2 lr=0.05", "dwf D=2 lr=0.2",
                                  "snip schedule.lr=0.1", "snip schedule.lr=0.05"}
    # a λ or target sweep stays one curve
    assert frame.groupby("variant").size().to_dict() == {"dwf D=2 lr=0.05": 2, "dwf D=2 lr=0.2": 2,
                                                         "gmp scope=global": 2, "gmp scope=layer": 2,
                                                         "snip schedule.lr=0.05": 1, "snip schedule.lr=0.1": 1}
    history = pd.read_csv(results / "mixed" / "history.csv")
    assert set(history.variant) == set(frame.variant)
    assert main(["report", "--grid", "mixed", "--results-dir", str(results), "--no-page"]) == 0
    table = (results / "mixed" / "accuracy_at_cr.md").read_text()
    assert "gmp scope=layer" in table and "gmp scope=global" in table and "| gmp |" not in table


def test_a_run_with_a_failed_cell_ends_naming_it_and_exits_1(tmp_path, capsys):
    grid = tmp_path / "bad.toml"
    grid.write_text('seeds = [0]\nsubset = 300\n[[experiment]]\narchs = ["lenet300"]\ndatasets = ["fashion-mnist"]\n'
                    'schedule = { epochs = 1 }\n[experiment.methods.dense]\n[experiment.methods.dwf]\n'
                    'lr = 1e6\nlam = 1\n')
    assert main(["run", "--grid", str(grid), "--results-dir", str(tmp_path / "r"), "--jobs", "1", "--pack", "off",
                 "--no-progress", "--device", "cpu"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("NOT ALL CELLS FINISHED: 1 failed, 0 blocked")
    assert lines[-2].startswith("  failed: dwf D=3") and "Diverged" in lines[-2]
    assert lines[-3].endswith("1 of the failed diverged):")
    assert "--errors" in lines[-1] and "--retry-diverged" in lines[-1] and "--retry-failed" not in lines[-1]


def test_status_and_collect_default_to_the_last_run_and_say_so(tmp_path, capsys):
    grid = tmp_path / "mine.toml"
    grid.write_text('seeds = [0]\nsubset = 200\n[[experiment]]\narchs = ["lenet300"]\ndatasets = ["fashion-mnist"]\n'
                    'schedule = { epochs = 1 }\n[experiment.methods.dense]\n')
    results = str(tmp_path / "r")
    assert main(["status", "--results-dir", results]) == 2
    assert "does not say which grid ran last" in capsys.readouterr().err
    assert main(["run", "--grid", str(grid), "--results-dir", results, "--jobs", "1", "--pack", "off",
                 "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["status", "--results-dir", results]) == 0
    captured = capsys.readouterr()
    assert f"grid {grid}: the last run in {results}" in captured.err and "grid mine (1 cells)" in captured.out
    assert main(["collect", "--results-dir", results]) == 0
    assert "the last run" in capsys.readouterr().err


def test_settings_that_only_failed_records_have_label_those_records_not_the_curve():
    """lenet-reference's magnitude curve: its pick 0.8 diverged in every final cell and gave way to
    0.2 (docs/tuning.md). The failed 0.8 records stay beside the curve; they draw nothing, so the
    curve keeps its plain label and they get their own (else they would count as the curve's cells
    and make its other seeds look partial), while two settings that both have ok records still get
    their own labels."""
    from benchmark.execution.collection import distinguish_curves

    def record(method, status, lr, **params):
        return {"method": method, "status": status, "arch": "lenet300", "dataset": "fashion-mnist",
                "config": {"params": params, "schedule": {"epochs": 30, "lr": lr}}}

    records = [record("magnitude", "failed", 0.8, target_cr=10.0), record("magnitude", "failed", 0.8, target_cr=100.0),
               record("magnitude", "ok", 0.2, target_cr=10.0), record("magnitude", "ok", 0.2, target_cr=100.0),
               record("snip", "ok", 0.1, target_cr=10.0), record("snip", "ok", 0.05, target_cr=10.0),
               record("snip", "failed", 0.8, target_cr=10.0)]
    rows = [{"arch": r["arch"], "dataset": r["dataset"], "variant": r["method"], "status": r["status"],
             "cell_id": str(i), "level": None} for i, r in enumerate(records)]
    distinguish_curves(rows, records)
    assert [row["variant"] for row in rows] == ["magnitude schedule.lr=0.8"] * 2 + ["magnitude"] * 2 + [
        "snip schedule.lr=0.1", "snip schedule.lr=0.05", "snip schedule.lr=0.8"]
