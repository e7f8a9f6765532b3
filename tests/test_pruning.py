"""Magnitude and at-init pruning: scores against hand computations, exact target sparsity, and every
method's cell end to end through ``run_cell``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmark.execution.cell import Cell, run_cell
from methods.atinit import (grasp_scores, linearized_copy, random_scores, scoring_batches, snip_scores,
                            synflow_masks, synflow_scores)
from methods.masks import kept_count
from tests.conftest import make_data

SCHEDULE = {"epochs": 2, "batch_size": 64, "warmup_epochs": 0}


def tiny_net(seed=0, bias=True) -> nn.Sequential:
    """3 -> 4 -> 2 in float64, weights of mixed sign."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.ReLU(), nn.Linear(4, 2, bias=bias)).double()


def tiny_batches(seed=0, n=5, count=2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (n,), generator=gen))
            for _ in range(count)]


def explicit_gradients(W1, b1, W2, b2, x, y):
    """Backpropagation of the mean cross-entropy written out by hand for relu(x W1^T + b1) W2^T + b2."""
    pre = x @ W1.T + b1
    h = pre.clamp(min=0)
    z = h @ W2.T + b2
    delta = (torch.softmax(z, 1) - F.one_hot(y, 2).double()) / len(y)
    gW2 = delta.T @ h
    gW1 = ((delta @ W2) * (pre > 0).double()).T @ x
    return gW1, gW2


def test_snip_scores_equal_hand_computed_connection_sensitivity():
    net, batches = tiny_net(), tiny_batches()
    W1, b1, W2, b2 = (t.detach() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    g1 = sum(explicit_gradients(W1, b1, W2, b2, x, y)[0] for x, y in batches)
    g2 = sum(explicit_gradients(W1, b1, W2, b2, x, y)[1] for x, y in batches)
    scores = snip_scores(net, batches)
    torch.testing.assert_close(scores["0"], (g1 * W1).abs())
    torch.testing.assert_close(scores["2"], (g2 * W2).abs())
    assert net[0].weight.grad is None  # scoring leaves the real model alone


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_scores_equal_weight_times_full_hessian_times_gradient(temperature):
    net, batches = tiny_net(seed=1), tiny_batches(seed=1)
    b1, b2 = net[0].bias.detach(), net[2].bias.detach()
    n1 = net[0].weight.numel()

    def loss(theta):  # the summed loss as a function of all prunable weights, biases fixed
        W1, W2 = theta[:n1].view(4, 3), theta[n1:].view(2, 4)
        return sum(F.cross_entropy((torch.relu(x @ W1.T + b1) @ W2.T + b2) / temperature, y) for x, y in batches)

    theta = torch.cat([net[0].weight.detach().flatten(), net[2].weight.detach().flatten()])
    g = torch.autograd.functional.jacobian(loss, theta)
    H = torch.autograd.functional.hessian(loss, theta)
    expected = theta * (H @ g)
    scores = grasp_scores(net, batches, temperature)
    torch.testing.assert_close(torch.cat([scores["0"].flatten(), scores["2"].flatten()]), expected)
    assert expected.abs().max() > 0


def hand_synflow(W1, b1, W2, b2):
    """SynFlow scores of |W2| (|W1| 1 + |b1|) + |b2| with R = sum of outputs, by the chain rule."""
    h = W1.abs().sum(1) + b1.abs()  # hidden units (all positive, so the relu is the identity)
    dR_dW2 = h.expand(2, 4)  # dR/dW2[i, j] = h_j
    dR_dW1 = W2.abs().sum(0)[:, None].expand(4, 3)  # dR/dW1[j, k] = sum_i |W2[i, j]| * 1
    return (W1.abs() * dR_dW1), (W2.abs() * dR_dW2)


def test_synflow_scores_equal_hand_computation_and_leave_the_model_untouched():
    net = tiny_net(seed=2).float()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scores = synflow_scores(linearized_copy(net), (3,))
    W1, b1, W2, b2 = (before[k].double() for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    s1, s2 = hand_synflow(W1, b1, W2, b2)
    assert scores["0"].dtype == torch.float64
    torch.testing.assert_close(scores["0"], s1)
    torch.testing.assert_close(scores["2"], s2)
    synflow_masks(net, (3,), target_cr=3.0, rounds=5)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # real signed weights kept
    assert (net[0].weight < 0).any()


def test_iterative_synflow_follows_the_exponential_schedule_rescoring_each_round():
    net = tiny_net(seed=3)
    W1, b1, W2, b2 = (t.detach() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    keep1, keep2 = torch.ones_like(W1, dtype=torch.bool), torch.ones_like(W2, dtype=torch.bool)
    target_cr, rounds, total = 4.0, 3, W1.numel() + W2.numel()
    for k in range(1, rounds + 1):  # rescore the masked net, keep (1/CR)^(k/rounds) of all weights
        s1, s2 = hand_synflow(W1 * keep1, b1, W2 * keep2, b2)
        flat = torch.cat([s1.masked_fill(~keep1, -1).flatten(), s2.masked_fill(~keep2, -1).flatten()])
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[torch.topk(flat, round(total / target_cr ** (k / rounds))).indices] = True
        keep1, keep2 = kept[:W1.numel()].view_as(W1), kept[W1.numel():].view_as(W2)
    masks = synflow_masks(net, (3,), target_cr, rounds)
    assert torch.equal(masks["0"], keep1) and torch.equal(masks["2"], keep2)
    assert int(keep1.sum() + keep2.sum()) == kept_count(total, target_cr)


def bn_net(seed=0) -> nn.Sequential:
    """3 -> 4 -> BatchNorm -> relu -> 2 in float64. With its fresh running statistics (mean 0,
    variance 1) and scale sqrt(1 + eps) the BatchNorm is the identity (to rounding); with batch
    statistics it is not."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[1].weight.fill_((1.0 + net[1].eps) ** 0.5)
    return net


def without_bn(net: nn.Sequential) -> nn.Sequential:
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    plain[0].load_state_dict(net[0].state_dict())
    plain[2].load_state_dict(net[3].state_dict())
    return plain


def test_snip_scores_with_running_statistics_by_default_and_grasp_with_batch_statistics():
    from methods import make_params

    assert make_params("snip").bn_mode == "eval"  # snip-public: is_train False when pruning
    assert make_params("grasp").bn_mode == "train"  # GraSP's code: a deep copy left in training mode
    net, batches = bn_net(), tiny_batches(n=6)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    plain = without_bn(net)
    scores, expected = snip_scores(net, batches), snip_scores(plain, batches)
    torch.testing.assert_close(scores["0"], expected["0"])
    torch.testing.assert_close(scores["3"], expected["2"])
    assert not torch.allclose(snip_scores(net, batches, bn_mode="train")["0"], scores["0"])
    grasp_eval, grasp_plain = grasp_scores(net, batches, 1.0, bn_mode="eval"), grasp_scores(plain, batches, 1.0)
    torch.testing.assert_close(grasp_eval["0"], grasp_plain["0"])
    torch.testing.assert_close(grasp_eval["3"], grasp_plain["2"])
    assert not torch.allclose(grasp_scores(net, batches, 1.0)["0"], grasp_eval["0"])
    assert net.training and all(torch.equal(net.state_dict()[k], v) for k, v in state.items())  # copy scored


def test_random_scores_are_seeded_and_spread_over_layers():
    from benchmark.engine import models
    from methods.masks import masks_from_scores

    model = models.build("lenet300", (1, 8, 8), 4, 0)
    assert all(torch.equal(a, b) for a, b in zip(random_scores(model, 0).values(), random_scores(model, 0).values()))
    assert not torch.equal(random_scores(model, 0)["fc1"], random_scores(model, 1)["fc1"])
    masks = masks_from_scores(random_scores(model, 0), 10.0, "global")
    for keep in masks.values():
        assert abs(keep.float().mean().item() - 0.1) < 0.04


def test_scoring_batches_are_deterministic_per_seed():
    data = make_data()
    a, b, c = (scoring_batches(data, 2, 16, seed) for seed in (0, 0, 1))
    assert len(a) == 2 and a[0][0].shape == (16, 1, 8, 8)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])


def run(method, tmp_path, tiny_data, cache, **params):
    cell = Cell.make(method, "lenet300", "fashion-mnist", params=params, schedule=SCHEDULE)
    records = run_cell(cell, data=tiny_data, work_root=tmp_path / "w", cache_dir=cache, progress=False)
    assert [r["status"] for r in records] == ["ok"], records[0].get("traceback")
    return records[0]


def layer_counts(record):
    return {layer["name"]: (layer["nonzero"], layer["numel"]) for layer in record["layers"]}


def test_magnitude_methods_reach_the_target_exactly_and_share_one_dense_training(tmp_path, tiny_data):
    cache = tmp_path / "c"
    layer = run("magnitude", tmp_path, tiny_data, cache, target_cr=8.0)
    dense_files = sorted(cache.glob("dense-*.pt"))
    stamp = dense_files[0].stat().st_mtime_ns
    glob = run("global-magnitude", tmp_path, tiny_data, cache, target_cr=8.0)
    assert sorted(cache.glob("dense-*.pt")) == dense_files and dense_files[0].stat().st_mtime_ns == stamp
    for nonzero, numel in layer_counts(layer).values():
        assert nonzero == kept_count(numel, 8.0)
    total = layer["prunable_params"]
    assert glob["nonzero_params"] == kept_count(total, 8.0)
    assert layer_counts(glob) != layer_counts(layer)  # global scope moves sparsity between layers
    for r in (layer, glob):
        assert r["epochs"] == 2 and r["train_acc"] is None and r["dense_test_acc"] > 0.5
        assert r["test_acc"] > 0.4  # a learnable 4-class problem: chance is 0.25


def test_finetuning_holds_the_mask_and_counts_its_epochs(tmp_path, tiny_data):
    r = run("global-magnitude", tmp_path, tiny_data, tmp_path / "c", target_cr=20.0, finetune_epochs=1)
    assert r["nonzero_params"] == kept_count(r["prunable_params"], 20.0)
    assert r["epochs"] == 3 and r["finetune_lr"] == pytest.approx(0.015)
    assert [e["phase"] for e in r["history"]] == ["dense", "dense", "finetune"]
    assert r["train_acc"] == r["history"][-1]["train_acc"]


@pytest.mark.parametrize("method,params", [
    ("random", {}), ("snip", {"score_batches": 2}), ("grasp", {}), ("synflow", {"rounds": 10}),
])
def test_at_init_methods_run_end_to_end_at_the_target(tmp_path, tiny_data, method, params):
    r = run(method, tmp_path, tiny_data, tmp_path / "c", target_cr=10.0, **params)
    assert r["nonzero_params"] == kept_count(r["prunable_params"], 10.0)
    assert r["cr"] == pytest.approx(10.0, rel=1e-3)
    assert r["epochs"] == 2 and len(r["history"]) == 2
    assert r["test_acc"] > 0.3
    assert not list((tmp_path / "c").glob("dense-*.pt"))  # no dense training for at-init methods


@pytest.mark.parametrize("method,params,named", [
    ("magnitude", {"target_cr": 0.5}, "target_cr=0.5"),
    ("global-magnitude", {"finetune_epochs": -2}, "finetune_epochs=-2"),
    ("snip", {"target_cr": "inf"}, "target_cr=inf"),
    ("grasp", {"score_batches": 0}, "score_batches=0"),
    ("synflow", {"rounds": 0}, "rounds=0"),
    ("snip", {"bn_mode": "frozen"}, r"bn_mode='frozen' is not allowed; choose one of \['train', 'eval'\]"),
    ("random", {"target_crr": 3}, "target_crr"),
])
def test_bad_parameters_fail_before_training_naming_the_value(method, params, named):
    with pytest.raises(ValueError, match=named) as err:
        Cell.make(method, "lenet300", "fashion-mnist", params=params)
    assert method in str(err.value)
