"""Pruning at initialization: ``random``, ``snip``, ``grasp``, ``synflow``.

Each scores the weights of the freshly initialized model, keeps the highest scores over the whole
network (global scope), and trains the masked model with the shared loop; the mask is held the
whole time. Scoring works on a copy of the model, so the weights, BatchNorm statistics and
gradients of the model that is trained are never touched by it.

- SNIP (Lee et al. 2019): |g * w|, g the loss gradient on a few training batches.
- GraSP (Wang et al. 2020): keep the largest w * (H g) (the paper prunes the largest -w * Hg),
  H g a Hessian-gradient product by double backward.
- SynFlow (Tanaka et al. 2020): data-free and iterative. The copy is put in eval mode and float64
  with every parameter replaced by its absolute value; R = sum of the outputs for an all-ones
  input; score |w * dR/dw|; after round k of ``rounds`` the kept fraction is (1/CR)^(k/rounds).

SNIP and GraSP score a copy in the mode ``bn_mode`` says, which matters only for networks with
BatchNorm (or dropout, which the models here do not have): ``"train"`` normalizes each scoring batch
by its own statistics, ``"eval"`` by the running statistics, which at initialization are mean 0 and
variance 1, so BatchNorm is then (nearly) the identity. Each default is what the authors' released
code does. SNIP's (namhoonlee/snip-public, TensorFlow) scores in the pruning graph fed with
``is_train: False`` (snip/prune.py), and its networks pass ``is_train`` to
``tf.layers.batch_normalization(training=...)``: eval. GraSP's (alecwangcq/GraSP, PyTorch) deep-copies
the freshly built model, whose modules are in training mode by default, with the ``.eval()`` of that
line commented out (pruner/GraSP.py): train. Until this parameter existed SNIP scored in training
mode; VGG/ResNet SNIP results from before then differ from the default's (the LeNets have no
BatchNorm and are unchanged).
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from benchmark.engine import data as data_mod
from benchmark.engine.sparsity import prunable_layers
from benchmark.engine.precision import exact_float32
from benchmark.core.context import MethodContext
from benchmark.core.method import Method, Plotting, register
from methods import structures
from methods.masks import apply_masks, check_target_cr, kept_count, masks_from_scores, remove_masks

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def scoring_generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator for pruning decisions, distinct from the init and data-order streams."""
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) % (2**63 - 1))


def scoring_batches(data: data_mod.Data, count: int, batch_size: int, seed: int) -> Batches:
    """The first ``count`` batches of one seeded shuffle of the training split, unaugmented."""
    gen = scoring_generator(seed, 31_337)
    return list(itertools.islice(data_mod.batches(data.train, batch_size, gen), count))


def prunable_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight for name, module in prunable_layers(net)}


def random_scores(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """I.i.d. uniform scores: a global top-k keeps about the same fraction of every layer."""
    gen = scoring_generator(seed, 7_001)
    return {name: torch.rand(w.shape, generator=gen).to(w.device) for name, w in prunable_weights(model).items()}


def loss_gradients(net: nn.Module, batches: Batches, temperature: float = 1.0) -> list[torch.Tensor]:
    """Sum over batches of the gradient of the mean cross-entropy w.r.t. the prunable weights."""
    weights = list(prunable_weights(net).values())
    total = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), weights)
        for acc, g in zip(total, grads):
            acc += g
    return total


def scoring_copy(model: nn.Module, bn_mode: str) -> nn.Module:
    """A copy of ``model`` in training (``bn_mode='train'``) or evaluation mode (``'eval'``)."""
    if bn_mode not in ("train", "eval"):
        raise ValueError(f"bn_mode={bn_mode!r}; choose 'train' or 'eval'")
    return copy.deepcopy(model).train(bn_mode == "train")


def snip_scores(model: nn.Module, batches: Batches, bn_mode: str = "eval") -> dict[str, torch.Tensor]:
    """Connection sensitivity |g * w| (scale-free, so summing over batches equals averaging)."""
    net = scoring_copy(model, bn_mode)
    weights = prunable_weights(net)
    with exact_float32():  # scores rank single weights: no TF32 convolutions on a GPU
        grads = loss_gradients(net, batches)
    return {name: (g * w.detach()).abs() for (name, w), g in zip(weights.items(), grads)}


def grasp_scores(model: nn.Module, batches: Batches, temperature: float = 1.0,
                 bn_mode: str = "train") -> dict[str, torch.Tensor]:
    """Keep-scores w * (H g), H and g of the loss summed over ``batches`` (logits / temperature)."""
    net = scoring_copy(model, bn_mode)
    weights = prunable_weights(net)
    params = list(weights.values())
    hg = [torch.zeros_like(w) for w in params]
    with exact_float32():  # scores rank single weights: no TF32 convolutions on a GPU
        g = loss_gradients(net, batches, temperature)
        for x, y in batches:
            grads = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), params, create_graph=True)
            g_dot = sum((gr * gi).sum() for gr, gi in zip(grads, g))
            for acc, h in zip(hg, torch.autograd.grad(g_dot, params)):
                acc += h
    return {name: w.detach() * h for (name, w), h in zip(weights.items(), hg)}


def linearized_copy(model: nn.Module) -> nn.Module:
    """Float64, eval-mode copy with every parameter and buffer made non-negative (SynFlow).
    On CPU when the model is on MPS, which has no float64."""
    net = copy.deepcopy(model)
    if next(net.parameters()).device.type == "mps":
        net = net.cpu()
    net = net.double().eval()
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    return net


def synflow_scores(net: nn.Module, input_shape) -> dict[str, torch.Tensor]:
    """|w * dR/dw| with R the sum of the outputs of ``net`` for an all-ones input."""
    weights = prunable_weights(net)
    device = next(net.parameters()).device
    R = net(torch.ones((1, *input_shape), dtype=torch.float64, device=device)).sum()
    grads = torch.autograd.grad(R, list(weights.values()))
    return {name: (w.detach() * g).abs() for (name, w), g in zip(weights.items(), grads)}


def synflow_masks(model: nn.Module, input_shape, target_cr: float, rounds: int) -> dict[str, torch.Tensor]:
    """Iterative SynFlow: re-score the masked linearized copy ``rounds`` times, pruning on an
    exponential schedule; pruned weights are never revived. ``model`` is left untouched."""
    net = linearized_copy(model)
    layers = dict(prunable_layers(net))
    magnitudes = {name: m.weight.detach().clone() for name, m in layers.items()}
    total = sum(w.numel() for w in magnitudes.values())
    keep = {name: torch.ones_like(w, dtype=torch.bool) for name, w in magnitudes.items()}
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for name, module in layers.items():
                module.weight.copy_(magnitudes[name] * keep[name])
        scores = {name: s.masked_fill(~keep[name], -torch.inf) for name, s in synflow_scores(net, input_shape).items()}
        count = kept_count(total, target_cr ** (k / rounds))
        keep = masks_from_scores(scores, target_cr, "global", keep=count, warn=k == rounds)
    return keep


class AtInit(Method):
    """Shared run: score the initial model, keep the top scores globally, train with the mask held."""

    family = "at-init"
    columns = ("scope", "prune_wall_s")

    class Workload(Method.Workload):
        def pack_family(self):
            return structures.MASKED, ()

    @dataclass(frozen=True)
    class Params(Method.Params):
        target_cr: float = 10.0

        def validate(self):
            return check_target_cr(self.target_cr)

    def masks(self, model: nn.Module, ctx: MethodContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def run(self, ctx: MethodContext) -> list[dict]:
        model = ctx.new_model()
        began = time.perf_counter()
        apply_masks(model, self.masks(model, ctx))
        prune_wall_s = time.perf_counter() - began
        history, _ = ctx.train(model)
        remove_masks(model)
        return [ctx.measure(model, history=history, scope="global", prune_wall_s=prune_wall_s)]


class ScoredAtInit(AtInit):
    """At-init methods that rank one score tensor per layer in a single shot."""

    def scores(self, model: nn.Module, ctx: MethodContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def masks(self, model, ctx):
        return masks_from_scores(self.scores(model, ctx), self.params.target_cr, "global")


@register
class RandomPruning(ScoredAtInit):
    """Random pruning at initialization (uniform over the network)."""

    name = "random"
    plotting = Plotting(order=9, style=(7, 0.2, "8", ":"))

    def scores(self, model, ctx):
        return random_scores(model, ctx.cell.seed)


@dataclass(frozen=True)
class DataScoredParams(AtInit.Params):
    # One minibatch of the schedule's batch size: SNIP's paper uses a single minibatch; GraSP's
    # uses ten examples per class, about one batch of 128 on ten classes (ours for other sets).
    score_batches: int = 1
    # Mode of the scored copy (BatchNorm batch vs running statistics); each method's default is its
    # authors' code (module docstring).
    bn_mode: Literal["train", "eval"] = "train"

    def validate(self):
        problems = super().validate()
        if self.score_batches < 1:
            problems.append(f"score_batches={self.score_batches} must be >= 1 (training batches used for scoring)")
        return problems


@register
class SNIP(ScoredAtInit):
    """SNIP: prune at initialization by connection sensitivity |g * w|."""

    name = "snip"
    plotting = Plotting(order=10, style=(5, 0.0, "<", ":"))

    @dataclass(frozen=True)
    class Params(DataScoredParams):
        bn_mode: Literal["train", "eval"] = "eval"  # snip-public scores with is_train=False

    def scores(self, model, ctx):
        batches = scoring_batches(ctx.data, self.params.score_batches, ctx.schedule.batch_size, ctx.cell.seed)
        return snip_scores(model, batches, self.params.bn_mode)


@register
class GraSP(ScoredAtInit):
    """GraSP: prune at initialization preserving gradient flow (keep the largest w * Hg)."""

    name = "grasp"
    plotting = Plotting(order=11, style=(6, 0.35, ">", ":"))

    @dataclass(frozen=True)
    class Params(DataScoredParams):
        # Logits are divided by this before the loss; 200 is the setting of the authors' released
        # code (the paper's formula is temperature 1).
        temperature: float = 200.0

        def validate(self):
            problems = super().validate()
            if not self.temperature > 0:
                problems.append(f"temperature={self.temperature} must be > 0")
            return problems

    def scores(self, model, ctx):
        batches = scoring_batches(ctx.data, self.params.score_batches, ctx.schedule.batch_size, ctx.cell.seed)
        return grasp_scores(model, batches, self.params.temperature, self.params.bn_mode)


@register
class SynFlow(AtInit):
    """SynFlow: data-free iterative pruning at initialization (100 rounds, exponential schedule)."""

    name = "synflow"
    plotting = Plotting(order=12, style=(8, 0.45, "p", ":"))

    @dataclass(frozen=True)
    class Params(AtInit.Params):
        rounds: int = 100  # the paper's setting

        def validate(self):
            problems = super().validate()
            if self.rounds < 1:
                problems.append(f"rounds={self.rounds} must be >= 1")
            return problems

    def masks(self, model, ctx):
        return synflow_masks(model, ctx.input_shape, self.params.target_cr, self.params.rounds)
