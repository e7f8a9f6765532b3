"""Structured pruning: the model really shrinks, still runs, and is measured against the dense one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from benchmark.engine import models, sparsity
from benchmark.execution.cell import Cell, run_cell
from benchmark.engine.schedule import Schedule
from benchmark.core.method import make_params
from methods.structured import StructuredMagnitude, _choose_removals, prune_channels

from conftest import make_data

MAGNITUDE = tp.importance.GroupMagnitudeImportance()


def linear_params(shapes):
    """Weights plus biases of linear layers given as (out, in)."""
    return sum(o * i + o for o, i in shapes)


def run(tmp_path, method, arch, params, classes=4):
    cell = Cell.make(method, arch, "fashion-mnist", params={"latency_repeats": 3, **params},
                     schedule={"epochs": 1, "batch_size": 64, "warmup_epochs": 0})
    data = make_data(shape=(1, 28, 28), classes=classes, n_train=256, n_test=128)
    [record] = run_cell(cell, data=data, work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False)
    assert record["status"] == "ok", record.get("traceback")
    return record


def test_lenet300_end_to_end_halves_every_hidden_layer(tmp_path):
    r = run(tmp_path, "structured-magnitude", "lenet300", {"channel_ratio": 0.5})
    dense = [(300, 784), (100, 300), (4, 100)]
    pruned = [(150, 784), (50, 150), (4, 50)]  # classifier outputs kept, its inputs follow fc2
    assert [tuple(layer["shape"]) for layer in r["layers"]] == pruned
    assert [tuple(layer["dense_shape"]) for layer in r["layers"]] == dense
    assert r["params_dense"] == linear_params(dense) and r["params_pruned"] == linear_params(pruned)
    dense_w, pruned_w = sum(o * i for o, i in dense), sum(o * i for o, i in pruned)
    assert r["cr"] == pytest.approx(dense_w / pruned_w)
    assert r["cr_effective"] == pytest.approx(r["cr"])
    assert r["cr_total"] == pytest.approx(linear_params(dense) / linear_params(pruned))
    # an MLP does one multiply-add per weight and sample
    assert (r["macs_dense"], r["macs_pruned"]) == (dense_w, pruned_w)
    assert r["speedup"] == pytest.approx(dense_w / pruned_w)
    assert r["prunable_params"] == dense_w and r["nonzero_params"] == pruned_w
    assert r["sparsity"] == pytest.approx(1 - pruned_w / dense_w)
    assert r["layers"][0]["sparsity"] == pytest.approx(0.5)
    assert r["channels_dense"] == 400 and r["channels_kept"] == 200 and r["floored_groups"] == 0
    assert r["latency_ms_dense"] > 0 and r["latency_ms_pruned"] > 0
    # default fine-tuning: ceil(10% of 1 epoch) at lr / 10, after the cached dense epoch
    assert r["finetune_epochs"] == 1 and len(r["history"]) == 1 and r["epochs"] == 2
    assert r["finetune_lr"] == pytest.approx(0.015)
    assert r["test_acc"] > 0.8  # the pruned model still runs and still classifies the patterns


def test_lenet5_end_to_end_shrinks_convs_and_flattened_inputs(tmp_path):
    r = run(tmp_path, "structured-magnitude", "lenet5", {"channel_ratio": 0.5, "finetune_epochs": 0})
    shapes = {layer["name"]: tuple(layer["shape"]) for layer in r["layers"]}
    assert shapes == {"conv1": (3, 1, 5, 5), "conv2": (8, 3, 5, 5), "fc1": (60, 200), "fc2": (42, 60),
                      "fc3": (4, 42)}
    assert r["macs_dense"] / r["macs_pruned"] == pytest.approx(r["speedup"])
    assert 3.0 < r["speedup"] < 4.5  # convs lose half their inputs and outputs, fc3 only inputs
    assert 3.0 < r["cr"] < 4.5 and r["params_pruned"] < r["params_dense"] / 3
    assert r["finetune_epochs"] == 0 and r["history"] == [] and r["test_acc"] == r["test_acc_before_finetune"]


def test_global_random_reaches_the_overall_ratio(tmp_path):
    r = run(tmp_path, "structured-random", "lenet5", {"channel_ratio": 0.5, "global_pruning": True})
    assert r["channels_kept"] == r["channels_dense"] // 2 == 113
    assert r["params_pruned"] < r["params_dense"] and r["macs_pruned"] < r["macs_dense"]
    assert r["layers"][-1]["shape"][0] == 4


@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_deep_models_shrink_and_still_run(arch):
    torch.manual_seed(0)
    model = models.build(arch, (3, 32, 32), 10, seed=0)
    before = sparsity.summarize(model, (3, 32, 32), effective=False)
    report = prune_channels(model, torch.randn(1, 3, 32, 32), 0.5, MAGNITUDE)
    after = sparsity.summarize(model, (3, 32, 32), effective=False)
    assert report.channel_ratio_reached == pytest.approx(0.5)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    classifier = sparsity.prunable_layers(model)[-1][1]
    assert classifier.out_features == 10
    # halving both sides of (almost) every conv leaves about a quarter of params and MACs
    assert 3.5 < before["total_params"] / after["total_params"] < 4.5
    assert 3.5 < before["macs"] / after["macs"] < 4.5


def known_mlp():
    """fc1's rows have known norms (channels 1, 3, 5 smallest); fc2's columns are tiny and distinct."""
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])[:, None] * torch.ones(6, 5))
        model[0].bias.copy_(torch.arange(6.0))
        model[2].weight.copy_(0.01 * torch.arange(18.0).view(3, 6))
    return model


def test_magnitude_removes_the_smallest_norm_channels_and_their_inputs_downstream():
    model = known_mlp()
    original = copy.deepcopy(model)
    prune_channels(model, torch.randn(1, 5), 0.5, MAGNITUDE)
    kept = [0, 2, 4]
    assert torch.equal(model[0].weight, original[0].weight[kept])
    assert torch.equal(model[0].bias, original[0].bias[kept])
    assert torch.equal(model[2].weight, original[2].weight[:, kept])
    assert model[2].out_features == 3


def random_kept_rows(seed):
    model = models.build("lenet300", (1, 28, 28), 10, seed=0)
    rows = {tuple(r.tolist()): i for i, r in enumerate(model.fc1.weight)}
    prune_channels(model, torch.ones(1, 1, 28, 28), 0.5, tp.importance.RandomImportance(), seed=seed)
    return sorted(rows[tuple(r.tolist())] for r in model.fc1.weight)


def test_random_importance_depends_on_the_seed_only():
    state = torch.random.get_rng_state()
    first = random_kept_rows(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert len(first) == 150
    assert random_kept_rows(0) == first
    assert random_kept_rows(1) != first


def test_every_layer_keeps_a_channel():
    # local: 0.95 of conv1's 6 channels rounds to all 6; one is kept and the net still runs
    model = models.build("lenet5", (1, 28, 28), 10, seed=0)
    with pytest.warns(UserWarning, match="keep one"):
        report = prune_channels(model, torch.randn(1, 1, 28, 28), 0.95, MAGNITUDE)
    assert model.conv1.out_channels == 1 and report.floored_groups == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # global: the 4 lowest scores would take all of the first group; its best channel stays
    removals, floored = _choose_removals([torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6, 7, 8])], 0.5, True)
    assert removals == [[0, 1], [0, 1]] and floored == 1


def test_default_finetuning_is_a_tenth_of_the_schedule_at_a_tenth_of_its_lr():
    method = StructuredMagnitude(make_params("structured-magnitude", {}))
    assert method.finetune_schedule(Schedule(epochs=200, lr=0.1)).epochs == 20
    assert method.finetune_schedule(Schedule(epochs=15, lr=0.1)).epochs == 2
    assert method.finetune_schedule(Schedule(epochs=15, lr=0.1)).lr == pytest.approx(0.01)
    chosen = StructuredMagnitude(make_params("structured-magnitude", {"finetune_epochs": "3", "finetune_lr": "0.05"}))
    assert chosen.finetune_schedule(Schedule(epochs=200, lr=0.1)) == Schedule(epochs=3, lr=0.05)


@pytest.mark.parametrize("method, values, named", [
    ("structured-magnitude", {"channel_ratio": 1.0}, "channel_ratio=1.0"),
    ("structured-magnitude", {"channel_ratio": "0"}, "channel_ratio=0.0"),
    ("structured-random", {"channel_ratio": -0.2}, "channel_ratio=-0.2"),
    ("structured-magnitude", {"finetune_epochs": -1}, "finetune_epochs=-1"),
    ("structured-random", {"finetune_lr": 0}, "finetune_lr=0"),
    ("structured-magnitude", {"importance_norm": 3}, "importance_norm=3"),
    ("structured-random", {"importance_norm": 2}, "unknown parameter"),
])
def test_bad_parameters_are_refused_by_name(method, values, named):
    with pytest.raises(ValueError, match=named):
        make_params(method, values)
