"""Sparsity metrics on small nets whose answers are worked out by hand in the comments."""

import math

import pytest
import torch
from torch import nn

from benchmark.engine import models, sparsity


def _mlp():
    """3 -> 2 -> 2. fc1 keeps w[0,0], w[0,1]; hidden unit 1 has no inputs but a bias of 0.5;
    fc2 keeps w[0,0] (from hidden 0) and w[0,1] (from the input-less hidden 1)."""
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.5]))
        net[2].weight.copy_(torch.tensor([[3.0, 1.0], [0.0, 0.0]]))
        net[2].bias.zero_()
    return net


def test_hand_computed_mlp_metrics():
    m = sparsity.summarize(_mlp(), (3,))
    # prunable weights 6 + 4 = 10, nonzero 2 + 2 = 4
    assert m["cr"] == pytest.approx(10 / 4)
    assert m["sparsity"] == pytest.approx(0.6)
    # all parameters 10 + biases 4 = 14; nonzero 4 weights + 1 bias = 5
    assert m["cr_total"] == pytest.approx(14 / 5)
    # effective: fc1's two weights reach output 0 through fc2.w[0,0]; fc2.w[0,1] starts at a unit
    # with no nonzero input path, so it does not count: 3 effective
    assert m["cr_effective"] == pytest.approx(10 / 3)
    # linear MACs = weights: 10 dense, 4 nonzero
    assert m["speedup"] == pytest.approx(10 / 4)
    assert [layer["effective"] for layer in m["layers"]] == [2, 1]


def test_conv_macs_and_speedup():
    """conv 1->2 (3x3, pad 1) on 4x4: 16 positions x 18 weights = 288 MACs; linear 32->3 = 96 MACs.
    Zeroing the second output channel's 9 weights leaves 144 conv MACs: speedup 384 / 240."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    with torch.no_grad():
        net[0].weight[1].zero_()
    m = sparsity.summarize(net, (1, 4, 4))
    assert [layer["macs"] for layer in m["layers"]] == [288, 96]
    assert m["speedup"] == pytest.approx(384 / 240)
    # the 48 linear weights reading the dead channel lie on no path: effective = 9 + 48 of 114
    assert m["layers"][1]["effective"] == 48
    assert m["cr_effective"] == pytest.approx(114 / (9 + 48))
    assert m["cr"] == pytest.approx(114 / (9 + 96))


def test_threshold_counts_tiny_weights_as_zero():
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1e-8, 1.0], [-5e-8, 2.0]]))
    assert sparsity.summarize(net, (2,))["cr"] == pytest.approx(1.0)
    assert sparsity.summarize(net, (2,), threshold=1.19e-7)["cr"] == pytest.approx(2.0)


def test_layer_collapse_makes_every_weight_ineffective():
    net = _mlp()
    with torch.no_grad():
        net[2].weight.zero_()
    m = sparsity.summarize(net, (3,))
    assert math.isinf(m["cr_effective"])
    assert m["cr"] == pytest.approx(10 / 2)


@pytest.mark.parametrize("arch,shape", [("lenet5", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_dense_conv_nets_are_fully_effective(arch, shape):
    """Max-pooling and residual sums must not hide connections of a dense net."""
    m = sparsity.summarize(models.build(arch, shape, 10, seed=0), shape)
    assert m["cr"] == 1.0 and m["cr_effective"] == 1.0 and m["speedup"] == pytest.approx(1.0)


class _StrictBatchNorm(nn.BatchNorm2d):
    """Rejects a non-positive eps at every call, as torch 2.11's ``F.batch_norm`` does (the first GPU
    check, on an H200 with torch 2.11, failed every VGG-16 record on it)."""

    def forward(self, x):
        if self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive, but got {self.eps}")
        return super().forward(x)


def test_effective_counting_never_runs_a_batchnorm_with_zero_eps():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), _StrictBatchNorm(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with torch.no_grad():
        net[0].weight[1].zero_()  # channel 1 is cut off: its 16 positions feed fc1 with nothing
        net[1].running_mean.fill_(5.0)  # trained statistics must not matter to path counting
    layers = {layer.name: layer for layer in sparsity.layer_stats(net, (1, 6, 6))}
    assert layers["0"].effective == 9
    assert layers["4"].effective == 3 * 16 and layers["4"].nonzero == 3 * 32


def test_parametrized_weights_are_measured_through_their_value():
    from torch.nn.utils import parametrize

    class Half(nn.Module):
        def forward(self, w):
            return w * (torch.arange(w.numel()).view_as(w) % 2 == 0)

    net = nn.Sequential(nn.Linear(4, 2, bias=False))
    parametrize.register_parametrization(net[0], "weight", Half())
    m = sparsity.summarize(net, (4,))
    assert m["cr"] == pytest.approx(2.0)
    assert m["total_params"] == 8


def test_zero_below_sets_exact_zeros():
    net = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1e-9, 1.0], [0.5, -1e-8]]))
    assert sparsity.zero_below(net, 1.19e-7) == 2
    assert (net[0].weight == 0).sum() == 2
