"""Lottery ticket: the level schedule, exact rewinding, one record per level, per-level resume."""

from __future__ import annotations

import pytest
import torch

from benchmark.engine import sparsity
from benchmark.engine.schedule import REWIND_EPOCHS
from benchmark.execution.cell import Cell, Context, run_cell
from methods.lottery import level_keep_counts, rewound_model
from methods.masks import kept_count, magnitude_scores, masks_from_scores, read_masks

SCHEDULE = {"epochs": 2, "batch_size": 64, "warmup_epochs": 0}


def test_levels_prune_a_fraction_of_the_remaining_weights_and_end_exactly_at_the_target():
    assert level_keep_counts(1000, 4.0, 0.5) == [500, 250]
    counts = level_keep_counts(10_000, 10.0, 0.2)
    assert len(counts) == 11  # 0.8^10 = 0.107 > 0.1, so an 11th level reaches 10x
    assert counts[:3] == [8000, 6400, 5120] and counts[-1] == 1000
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert level_keep_counts(1000, 1.5, 0.9) == [kept_count(1000, 1.5)]


def test_rewinding_restores_every_surviving_weight_bias_and_buffer_bit_for_bit(tmp_path, tiny_data):
    cell = Cell.make("lottery", "lenet300", "fashion-mnist", schedule=SCHEDULE)
    ctx = Context(cell, tiny_data, torch.device("cpu"), tmp_path / "w", tmp_path / "c", progress=False)
    dense = ctx.dense()
    assert sorted(dense.snapshots) == list(REWIND_EPOCHS)
    init = ctx.new_model().state_dict()
    assert all(torch.equal(dense.snapshots[0][k], v) for k, v in init.items())  # rewind 0 = the initialization
    keep = masks_from_scores(magnitude_scores(dense.model), 3.0, "global")
    for epoch in (0, 1):
        snapshot = dense.snapshots[epoch]
        model = rewound_model(ctx, snapshot, keep)
        assert {n: m.tolist() for n, m in read_masks(model).items()} == {n: m.tolist() for n, m in keep.items()}
        for name, module in sparsity.prunable_layers(model):
            weight = module.weight.detach()
            assert torch.equal(weight[keep[name]], snapshot[f"{name}.weight"][keep[name]])
            assert torch.count_nonzero(weight[~keep[name]]) == 0
            assert torch.equal(module.bias.detach(), snapshot[f"{name}.bias"])
            trained = dict(dense.model.named_parameters())[f"{name}.weight"].detach()
            assert not torch.equal(weight[keep[name]], trained[keep[name]])  # really went back


def test_lottery_returns_one_record_per_level_at_the_scheduled_compression(tmp_path, tiny_data):
    cell = Cell.make("lottery", "lenet300", "fashion-mnist", schedule=SCHEDULE,
                     params={"target_cr": 4.0, "prune_fraction": 0.5, "rewind": 1})
    records = run_cell(cell, data=tiny_data, work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False)
    assert [r["status"] for r in records] == ["ok"] * 3, records[0].get("traceback")
    assert [r["level"] for r in records] == [0, 1, 2]
    assert [r["epochs"] for r in records] == [2, 3, 4]  # each level trains epoch 2 of 2 after rewinding to 1
    assert [len(r["history"]) for r in records] == [2, 1, 1]
    total = records[0]["prunable_params"]
    assert [r["nonzero_params"] for r in records] == [total, kept_count(total, 2.0), kept_count(total, 4.0)]
    assert records[-1]["cr"] == pytest.approx(4.0, rel=1e-3)
    assert len({r["cell_id"] for r in records}) == 1 and all(r["rewind"] == 1 for r in records)
    assert all(r["test_acc"] > 0.4 for r in records)


def test_a_killed_lottery_cell_resumes_per_level_with_the_same_results(tmp_path, tiny_data):
    cell = Cell.make("lottery", "lenet300", "fashion-mnist", schedule=SCHEDULE,
                     params={"target_cr": 4.0, "prune_fraction": 0.5})
    kwargs = dict(data=tiny_data, work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False)
    first = run_cell(cell, keep_work=True, **kwargs)
    work = tmp_path / "w" / cell.id
    assert (work / "level1.ckpt").is_file() and (work / "level2.ckpt").is_file()
    (work / "level2.ckpt").unlink()  # as if killed during level 2: level 1 replays from its checkpoint
    again = run_cell(cell, **kwargs)
    # Level 1 replayed from its checkpoint: its history, wall-clock seconds included, is the saved one.
    assert again[1]["history"] == first[1]["history"]
    for a, b in zip(first, again):
        assert (a["level"], a["test_acc"], a["test_loss"], a["nonzero_params"]) == \
            (b["level"], b["test_acc"], b["test_loss"], b["nonzero_params"])
    assert not work.exists()


@pytest.mark.parametrize("params,named", [
    ({"rewind": 5}, r"rewind=5 is not allowed; choose one of \[0, 1, 2\]"),
    ({"prune_fraction": 1.0}, r"prune_fraction=1.0 must be in \(0, 1\)"),
    ({"prune_fraction": 0}, r"prune_fraction=0.0 must be in \(0, 1\)"),
    ({"target_cr": 1.0}, r"target_cr=1.0 must be a finite number > 1"),
])
def test_bad_lottery_parameters_fail_naming_the_value_and_what_is_allowed(params, named):
    with pytest.raises(ValueError, match=named):
        Cell.make("lottery", "lenet300", "fashion-mnist", params=params)
