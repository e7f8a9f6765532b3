"""The mask mechanism: exact counts, deterministic ties, masks that hold through real SGD steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import parametrize

from benchmark.engine import models, sparsity
from benchmark.engine.schedule import Schedule
from benchmark.engine.train import train
from methods.masks import (apply_masks, kept_count, magnitude_scores, masks_from_scores, read_masks,
                           remove_masks)
from tests.conftest import make_data

SHAPE, CLASSES = (1, 8, 8), 4


def lenet(seed=0):
    return models.build("lenet300", SHAPE, CLASSES, seed)


def random_scores(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.weight.shape, generator=gen) for name, m in sparsity.prunable_layers(model)}


@pytest.mark.parametrize("target_cr", [1.0, 3.7, 10.0, 57.3])
def test_global_scope_keeps_exactly_the_target_count_of_the_highest_scores(target_cr):
    scores = random_scores(lenet())
    masks = masks_from_scores(scores, target_cr, "global")
    total = sum(s.numel() for s in scores.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(total / target_cr)
    lowest_kept = min(float(s[m].min()) for s, m in zip(scores.values(), masks.values()) if m.any())
    highest_pruned = max((float(s[~m].max()) for s, m in zip(scores.values(), masks.values()) if (~m).any()),
                         default=-math.inf)
    assert lowest_kept > highest_pruned


@pytest.mark.parametrize("target_cr", [2.0, 7.5, 30.0])
def test_layer_scope_keeps_the_target_fraction_of_every_layer(target_cr):
    scores = random_scores(lenet())
    masks = masks_from_scores(scores, target_cr, "layer")
    for name, s in scores.items():
        assert int(masks[name].sum()) == round(s.numel() / target_cr), name
        assert float(s[masks[name]].min()) > float(s[~masks[name]].max())
    reached = sum(s.numel() for s in scores.values()) / sum(int(m.sum()) for m in masks.values())
    assert abs(reached - target_cr) <= target_cr * len(scores) / sum(int(m.sum()) for m in masks.values())


def test_ties_are_broken_by_position_so_masks_are_deterministic():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    with pytest.warns(RuntimeWarning, match="'b'"):
        masks = masks_from_scores(scores, 2.0, "global")  # keep 5 of 10 equal scores
    assert masks["a"].flatten().tolist() == [True] * 5 + [False]
    assert not masks["b"].any()
    again = masks_from_scores({"a": torch.ones(2, 3), "b": torch.ones(4)}, 2.0, "global", warn=False)
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_minus_infinity_and_nan_scores_are_never_kept():
    scores = {"a": torch.tensor([5.0, -math.inf, 1.0, math.nan, 0.5])}
    masks = masks_from_scores(scores, 1.0, "global", keep=4)
    assert masks["a"].tolist() == [True, False, True, False, True]


def test_a_layer_pruned_to_nothing_is_named_in_a_warning():
    scores = {"big": torch.arange(100.0) + 10, "tiny": torch.rand(3)}
    with pytest.warns(RuntimeWarning, match="'tiny'"):
        masks = masks_from_scores(scores, 2.0, "global")
    assert not masks["tiny"].any()
    with pytest.warns(RuntimeWarning, match="'tiny'"):
        masks_from_scores({"tiny": torch.rand(3)}, 10.0, "layer")


def test_kept_count_rounds_to_nearest_and_stays_in_range():
    assert kept_count(10, 4.0) == 3  # 2.5 rounds up
    assert kept_count(10, 1.0) == 10
    assert kept_count(10, 1e9) == 0


def test_mask_zeroes_the_forward_weight_and_survives_state_dict_and_removal():
    model = lenet()
    masks = masks_from_scores(magnitude_scores(model), 5.0, "layer")
    original = {name: m.weight.detach().clone() for name, m in sparsity.prunable_layers(model)}
    apply_masks(model, masks)
    for name, module in sparsity.prunable_layers(model):
        assert torch.equal(module.weight.detach(), original[name] * masks[name])
    # The mask is a persistent buffer: a checkpoint restores it into a masked model.
    state = model.state_dict()
    other = lenet(seed=1)
    apply_masks(other, {name: torch.ones_like(m) for name, m in masks.items()})
    other.load_state_dict(state)
    assert all(torch.equal(read_masks(other)[n], masks[n]) for n in masks)
    remove_masks(model)
    assert not any(parametrize.is_parametrized(m) for _, m in sparsity.prunable_layers(model))
    assert all(k.endswith(("weight", "bias")) and "parametrizations" not in k for k in model.state_dict())
    for name, module in sparsity.prunable_layers(model):
        assert torch.equal(module.weight != 0, masks[name] & (original[name] != 0))


def test_metrics_of_a_masked_model_equal_those_of_the_same_model_unmasked():
    model = lenet()
    apply_masks(model, masks_from_scores(random_scores(model), 8.0, "global"))
    masked = sparsity.summarize(model, SHAPE)
    remove_masks(model)
    plain = sparsity.summarize(model, SHAPE)
    for key in ("cr", "cr_total", "cr_effective", "total_params", "nonzero_params", "speedup"):
        assert masked[key] == plain[key], key
    assert plain["total_params"] == sum(p.numel() for p in model.parameters())


def test_masks_hold_through_sgd_steps_with_momentum_and_weight_decay():
    data = make_data(SHAPE, CLASSES, n_train=256)
    model = lenet()
    masks = masks_from_scores(random_scores(model, seed=3), 4.0, "global")
    apply_masks(model, masks)
    stored_before = {n: m.parametrizations.weight.original.detach().clone() for n, m in sparsity.prunable_layers(model)}
    schedule = Schedule(epochs=2, lr=0.1, momentum=0.9, weight_decay=0.05, batch_size=32)
    train(model, data, schedule, seed=0, progress=False)
    for name, module in sparsity.prunable_layers(model):
        keep = masks[name]
        stored = module.parametrizations.weight.original.detach()
        assert torch.count_nonzero(module.weight.detach()[~keep]) == 0, name  # pruned: exactly zero
        assert not torch.equal(stored[keep], stored_before[name][keep]), name  # kept weights trained
        # Weight decay reached the stored originals of pruned weights (the masked weight is in the
        # decayed group) and shrank them; only the mask keeps them out of the forward pass.
        assert (stored[~keep].abs() < stored_before[name][~keep].abs()).all(), name
        assert torch.count_nonzero(stored[~keep]) > 0
    assert sparsity.summarize(model, SHAPE)["nonzero_params"] == sum(int(m.sum()) for m in masks.values())
