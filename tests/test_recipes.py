"""The authors' output-layer recipes beside ours (docs/recipes.md): layer-wise magnitude pruning and
GMP with the output layer at another rate, and the lottery ticket pruning its output layer on its
own (Frankle & Carbin's LeNet-300-100: 20 % per level, the output layer 10 %). Expectations are
written out here from the rules, not taken from the methods' helpers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

import pytest
import torch

from benchmark.execution import grids
from benchmark.execution.cell import Cell, run_cell
from benchmark.execution.collection import variant_label
from methods.masks import kept_count, layer_counts_for_cr, masks_from_scores

from conftest import make_data

LENET300 = [784 * 300, 300 * 100, 100 * 10]
TINY = (64 * 300, 300 * 100, 100 * 4)  # lenet300 on the 8x8, 4-class synthetic data
SCHEDULE = {"epochs": 2, "batch_size": 64, "warmup_epochs": 0}


@pytest.mark.parametrize("target_cr", [10, 100, 1000])
def test_at_rate_one_every_layer_keeps_its_share_and_at_half_rate_the_output_keeps_the_square_root(target_cr):
    assert layer_counts_for_cr(LENET300, target_cr) == [kept_count(n, target_cr) for n in LENET300]
    counts = layer_counts_for_cr(LENET300, target_cr, 0.5)
    density = counts[0] / LENET300[0]
    assert counts[-1] == pytest.approx(LENET300[-1] * math.sqrt(density), abs=1)
    assert abs(sum(counts) - sum(LENET300) / target_cr) <= len(LENET300)  # the target, to rounding per layer
    assert counts[-1] / LENET300[-1] > 10 * counts[0] / LENET300[0] if target_cr >= 100 else True


def test_layer_wise_masks_use_the_output_rate_and_global_pruning_refuses_it():
    gen = torch.Generator().manual_seed(0)
    scores = {f"layer{i}": torch.rand(n, generator=gen) for i, n in enumerate(LENET300)}
    masks = masks_from_scores(scores, 1000, "layer", output_rate=0.5)
    assert [int(m.sum()) for m in masks.values()] == layer_counts_for_cr(LENET300, 1000, 0.5)
    assert int(masks["layer2"].sum()) == 30  # ours (rate 1) keeps 1 of the 1,000 output weights
    with pytest.raises(ValueError, match="output_rate=0.5 applies to layer-wise pruning"):
        Cell.make("global-magnitude", "lenet300", "fashion-mnist", params={"output_rate": 0.5})
    with pytest.raises(ValueError, match="output_rate=0.5 applies to scope=\"layer\" only"):
        Cell.make("gmp", "lenet300", "fashion-mnist", params={"output_rate": 0.5, "scope": "global"})
    with pytest.raises(ValueError, match="output_rate=1.5 must be in"):
        Cell.make("magnitude", "lenet300", "fashion-mnist", params={"output_rate": 1.5})


@pytest.mark.parametrize("method", ["magnitude", "gmp"])
def test_magnitude_and_gmp_end_with_the_output_layer_at_its_own_rate(method, tmp_path):
    cell = Cell.make(method, "lenet300", "fashion-mnist", params={"target_cr": 20.0, "output_rate": 0.5,
                                                                  **({"interval": 2} if method == "gmp" else {})},
                     schedule=SCHEDULE)
    [record] = run_cell(cell, data=make_data(), work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False)
    assert record["status"] == "ok", record.get("traceback")
    assert [layer["nonzero"] for layer in record["layers"]] == layer_counts_for_cr(list(TINY), 20.0, 0.5)
    assert variant_label(record) == f"{method} output-rate=0.5"


def test_the_lottery_prunes_its_output_layer_at_its_own_fraction_per_level(tmp_path):
    cell = Cell.make("lottery", "lenet300", "fashion-mnist", schedule=SCHEDULE,
                     params={"target_cr": 4.0, "prune_fraction": 0.5, "output_fraction": 0.25})
    records = run_cell(cell, data=make_data(), work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False)
    assert [r["status"] for r in records] == ["ok"] * len(records), records[0].get("traceback")
    # written out: level l keeps 400 * 0.75^l of the output layer and 49,200 * 0.5^l of the rest, until
    # the sum reaches 49,600 / 4 = 12,400; the last level keeps exactly that
    rest, output = sum(TINY[:-1]), TINY[-1]
    expected, level = [], 1
    while round(rest * 0.5 ** level) + round(output * 0.75 ** level) > 12400:
        expected.append((round(rest * 0.5 ** level) + round(output * 0.75 ** level), round(output * 0.75 ** level)))
        level += 1
    expected.append((12400, round(output * 0.75 ** level)))
    assert [(r["nonzero_params"], r["layers"][-1]["nonzero"]) for r in records[1:]] == expected
    assert variant_label(records[-1]) == "lottery p=0.5/out=0.25"


def test_the_authors_lottery_recipe_reaches_cr_1000_on_lenet_300_100_and_bad_options_are_named():
    grid = grids.parse_grid('[[experiment]]\narchs = ["lenet300"]\ndatasets = ["fashion-mnist"]\n'
                            '[experiment.methods.lottery]\ntarget_cr = 1000\nprune_fraction = 0.2\n'
                            'output_fraction = 0.1\n', "recipe")
    assert len(grid.cells) == 1
    with pytest.raises(ValueError, match="output_fraction=0.1 with prune_output=false"):
        Cell.make("lottery", "lenet300", "fashion-mnist", params={"output_fraction": 0.1, "prune_output": False})
    with pytest.raises(ValueError, match="needs more than 1000 levels"):
        Cell.make("lottery", "lenet300", "fashion-mnist",
                  params={"target_cr": 1000, "prune_fraction": 0.001, "output_fraction": 0.1})


# ------------------------------------------------------------------------------------------------
# Training cost: per record, per curve, and accuracy against it at a fixed CR
# ------------------------------------------------------------------------------------------------


def test_training_cost_is_epochs_over_the_schedules_and_follows_a_curve_to_a_fixed_cr(tmp_path):
    from benchmark.analysis import curves as cv
    from benchmark.analysis import tables as tb
    from benchmark.analysis.plot import cost_at_cr, plot_cost_vs_accuracy
    from benchmark.execution.collection import training_cost

    assert training_cost({"epochs": 330, "epochs_schedule": 30}) == 11.0
    assert training_cost({"epochs": 30}) is None and training_cost({"epochs": 30, "epochs_schedule": 0}) is None
    rows = []
    for seed in (0, 1):
        rows.append({"method": "dense", "variant": "dense", "cr": 1.0, "test_acc": 0.9, "train_cost": 1.0})
        # a lottery ticket: level k at CR 2^k costs k + 1 dense trainings
        rows += [{"method": "lottery", "variant": "lottery", "cr": 2.0 ** k, "test_acc": 0.9 - 0.05 * k - 0.01 * seed,
                  "train_cost": k + 1.0, "level": k} for k in range(1, 5)]
        rows += [{"method": "snip", "variant": "snip", "cr": cr, "test_acc": acc, "train_cost": 1.0}
                 for cr, acc in ((2.0, 0.85), (16.0, 0.5))]
    frame = pd.DataFrame(rows).assign(arch="lenet300", dataset="fashion-mnist", status="ok")
    frame["seed"] = [s for s in (0, 1) for _ in range(7)]
    frame["cell_id"] = [f"c{i}" for i in range(len(frame))]
    frame.to_csv(tmp_path / "results.csv", index=False)
    results = cv.load_results(tmp_path / "results.csv")
    costs, accs = cost_at_cr(results, "lenet300", "fashion-mnist", "lottery", 2.0 ** 2.5)
    assert costs == pytest.approx([3.5, 3.5]) and accs == pytest.approx([0.775, 0.765])
    assert cost_at_cr(results, "lenet300", "fashion-mnist", "lottery", 100.0) == ([], [])  # beyond its points
    assert plot_cost_vs_accuracy(results, 100.0) is None
    fig = plot_cost_vs_accuracy(results, 8.0)
    drawn = {tuple(np.round(line.get_xydata()[0], 3)) for ax in fig.axes for line in ax.get_lines()
             if len(line.get_xydata()) == 1}
    assert (4.0, 74.5) in drawn and (1.0, 61.667) in drawn  # lottery level 3; SNIP interpolated at CR 8
    table = tb.cost_table(results)
    lottery = table[table.variant == "lottery"].iloc[0]
    assert (lottery.train_cost_min, lottery.train_cost_max) == (2.0, 5.0)
