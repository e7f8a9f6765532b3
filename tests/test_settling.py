"""Is sparsity settled? CR at 0.01x / 100x the zero threshold, per-epoch trajectories, history.csv."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from benchmark.analysis import curves as cv
from benchmark.core.provenance import cpu_model, source_commit
from benchmark.analysis import plot as plot_mod
from benchmark.analysis import plot_style
from benchmark.__main__ import main
from benchmark.execution.cell import Cell, run_cell
from benchmark.engine.sparsity import cr_at, threshold_sensitivity
from benchmark.execution.collection import variant_label


THRESHOLD = 1.19e-7


def test_cr_at_the_three_thresholds_counts_the_weights_between_them():
    layer = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        w = layer.weight.view(-1)
        w[:50] = 1.0  # kept at every threshold
        w[50:75] = -1e-8  # below 1.19e-7, above 1.19e-9
        w[75:] = 1e-6  # above 1.19e-7, below 1.19e-5
    model = nn.Sequential(layer)
    assert cr_at(model, THRESHOLD) == pytest.approx(100 / 75)
    settling = threshold_sensitivity(model, THRESHOLD)
    assert settling["cr_thr_small"] == pytest.approx(1.0)
    assert settling["cr_thr_large"] == pytest.approx(2.0)


@pytest.mark.parametrize("method,params", [("dwf", {"depth": 3, "lam": 3e-3}), ("l1", {"lam": 1e-3})])
def test_regularized_records_carry_settling_columns_and_a_per_epoch_trajectory(tiny_data, tmp_path, method, params):
    cell = Cell.make(method, "lenet300", "fashion-mnist", 0, params, {"epochs": 3, "lr": 0.1, "batch_size": 32,
                                                                      "warmup_epochs": 0})
    [record] = run_cell(cell, data=tiny_data, device="cpu", work_root=tmp_path / "w", cache_dir=tmp_path / "c",
                        progress=False)
    assert record["status"] == "ok", record.get("error")
    assert record["cr_thr_small"] <= record["cr"] <= record["cr_thr_large"]
    assert record["torch_version"] == torch.__version__ and record["threads"] == torch.get_num_threads()
    assert record["cpu_model"] == cpu_model() and record["commit"] == source_commit()
    history = record["history"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    # the last epoch's CR is measured on the trained weights before collapsing and zeroing: the same count
    assert history[-1]["cr"] == pytest.approx(record["cr"])
    assert history[-1]["cr_thr_small"] == pytest.approx(record["cr_thr_small"])
    assert history[-1]["cr_thr_large"] == pytest.approx(record["cr_thr_large"])
    assert ("balance_error" in history[-1]) == (method == "dwf")
    if method == "dwf":
        assert history[-1]["balance_error"] == pytest.approx(record["balance_error"])


@pytest.mark.slow  # a whole grid, collect and plot
@pytest.mark.filterwarnings("error::UserWarning")  # matplotlib's warnings flag a degenerate axis
def test_collect_writes_one_history_row_per_record_and_epoch_and_plot_draws_trajectories(tmp_path, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml", lams=(1e-3, 1e-2), epochs=2)
    results = tmp_path / "results"
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress"]) == 0
    assert main(["collect", "--grid", str(grid_file), "--results-dir", str(results)]) == 0
    history = pd.read_csv(results / "g" / "history.csv")
    table = pd.read_csv(results / "g" / "results.csv")
    assert len(history) == 2 * len(table)  # 2 epochs per record (dense and DWF alike)
    dwf = history[history.method == "dwf"]
    assert dwf["cr"].notna().all() and dwf["balance_error"].notna().all()
    assert history[history.method == "dense"]["cr"].isna().all()  # dense tracks no CR per epoch
    fig, _ = plot_mod.plot_trajectories(cv.load_results(results / "g" / "results.csv"), cv.load_history(
        results / "g" / "history.csv"))
    axes = fig.axes
    assert len(axes) == 3  # accuracy, CR, misalignment
    drawn = {line.get_label() for line in axes[0].get_lines()}
    assert any(label.startswith("dwf D=2") for label in drawn) and any(label.startswith("dwf D=3") for label in drawn)
    assert main(["plot", "--grid", "g", "--results-dir", str(results), "--plots-dir", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "g" / "trajectories.png").stat().st_size > 0


def test_fine_tuned_magnitude_is_its_own_curve():
    base = {"method": "magnitude", "family": "after-training"}
    assert variant_label(base | {"finetune_epochs": 0}) == "magnitude"
    assert variant_label(base | {"finetune_epochs": 5}) == "magnitude +FT"
    assert variant_label({"method": "structured-magnitude", "family": "structured", "finetune_epochs": 5}) == \
        "structured-magnitude"
    styles = plot_style.variant_styles({"magnitude": ("magnitude", None), "magnitude +FT": ("magnitude", None)})
    assert styles["magnitude"].color != styles["magnitude +FT"].color
    assert not math.isnan(styles["magnitude +FT"].color[0])
