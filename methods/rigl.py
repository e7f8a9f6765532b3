"""RigL, ``rigl`` (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners"), and the
dynamic sparse training it shares with SET (``methods.sparse_evolutionary``).

The network is sparse from the start at ``target_cr``, with a random mask per layer at the layer's
density (``distribution``), and keeps every layer's number of weights through training. Every
``interval`` (ΔT) optimizer steps while t < T_end = round(end * T), each layer drops the fraction

    ζ_t = (α / 2) * (1 + cos(π t / T_end)),      α = ``drop_fraction``,

of its active weights with the smallest magnitude (k = round(ζ_t * active), halves up) and grows k
weights among those inactive after the drop: for RigL the k with the largest magnitude of the dense
gradient, for SET k at random. The candidates include the weights just dropped (the paper's
Algorithm 1 grows among all connections not kept), and one of those that is grown again keeps its
value; every weight new to the mask starts at exactly zero with zero momentum, and every inactive
weight is held at zero with zero momentum (``methods.sparse_training.set_masks``).

Densities (``distribution``):

- ``uniform``: every layer at 1/target_cr. The paper keeps the first layer dense under "uniform";
  ours does not (LeNet-300-100's first layer holds 88% of its weights, so a dense first layer
  would make most targets unreachable).
- ``erk`` (Erdős–Rényi-Kernel, the paper's procedure): a layer's density is ε times (sum of its
  weight's dimensions) / (product of them), ε chosen so that the kept weights total
  prunable weights / target_cr; while the layer(s) with the largest ratio would exceed density 1
  they are made dense and ε is solved again over the rest.

Each layer keeps round(density * weights), so the masks' CR can differ from ``target_cr`` by under
half a weight per layer. The record's ``cr`` counts nonzero weights, as for every method: a weight
grown late that got no gradient since (a dead unit, say) is still exactly zero and counts as pruned,
so ``cr`` can exceed the masks' CR (``mask_cr`` in the history).

The dense gradient. The mask is a parametrization, so the gradient the stored original receives is
the masked one (zero outside the mask): useless for choosing what to grow. ``DenseGradMask`` keeps
instead the gradient of the loss with respect to the parametrization's *output*, the effective
weight ``original * mask``, by a tensor hook on that output in its forward pass: that is
dL/dW at W = the sparse weights, dense, exactly what RigL ranks, and it costs no extra forward or
backward pass. A new mask captures; after each step the hooks leave the capture on only if an update
follows the next step, and drop the captured tensors.

Choices of ours: the update follows optimizer step t (t counts steps taken, so there is none before
training) and ranks the dense gradient of step t's minibatch; ties in magnitude or gradient go to
the lower flat index; the initial weights are the model's own initialization, masked (``init="dense"``,
the default); the learning rate is the shared cosine schedule. ``init="sparse"`` rescales each unit's
kept weights by sqrt(fan-in / kept fan-in) (Evci et al. 2022, as the RigL authors' later code offers):
with the dense initialization a unit keeping 1% of its inputs starts with a tenth of the dense
pre-activation scale, and on LeNet-5 at CR 100 the signal that reaches the output is then too small
to train at all (loss ln 10 for 30 epochs); rescaled, the same cell trains (reference/README.md). The defaults α = 0.3, ΔT = 100 and end = 0.75 are the paper's;
``distribution="erk"`` is the paper's more accurate (and more costly in FLOPs) choice.

The record carries ``pruning_log``: per update the step t, its epoch, ``drop_fraction`` ζ_t,
``dropped`` = ``grown`` (Σ k over layers), ``regrown`` (of those grown, how many had just been
dropped) and the masks' ``mask_sparsity`` and ``mask_kept``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from benchmark.engine.sparsity import prunable_layers
from benchmark.core.context import MethodContext
from benchmark.core.method import Method, Plotting, register
from methods.masks import (Mask, apply_masks, check_target_cr, kept_count, mask_of_module, read_masks, remove_masks,
                           top_k_mask, warn_empty_layers)
from methods.sparse_training import SparseTrainingHooks, decision_generator, kept_for_density, set_masks


class DenseGradMask(Mask):
    """A mask that can keep dL/d(weight * mask), the dense gradient of the effective weight, from
    the backward passes of the forward passes made while ``capture`` is on (summed if several)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask)
        self.capture = True  # a fresh mask captures: the first step of a (resumed) run has no step before it
        self.grad: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out = weight * self.mask
        if self.capture and out.requires_grad:
            out.register_hook(self._keep)
        return out

    def _keep(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        self.grad = grad.clone() if self.grad is None else self.grad + grad


def arm_dense_gradients(model: nn.Module, on: bool) -> None:
    """Switch the capture of every ``DenseGradMask`` on or off and forget what it holds."""
    for _, module in prunable_layers(model):
        mask = mask_of_module(module)
        if isinstance(mask, DenseGradMask):
            mask.capture, mask.grad = on, None


def dense_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """The dense gradients the masks captured in the last armed step."""
    grads = {}
    for name, module in prunable_layers(model):
        mask = mask_of_module(module)
        if not isinstance(mask, DenseGradMask) or mask.grad is None:
            raise RuntimeError(f"no dense gradient was captured for layer {name!r} (capture was not armed)")
        grads[name] = mask.grad
    return grads


def erk_densities(shapes: dict[str, tuple[int, ...]], target_cr: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities: ε * sum(shape) / prod(shape) per layer, totalling 1/target_cr
    of all weights, with the layers that would exceed density 1 made dense (largest ratio first,
    then ε solved again over the rest)."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    ratio = {n: sum(s) / numel[n] for n, s in shapes.items()}
    budget = sum(numel.values()) / target_cr
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        divisor = sum(ratio[n] * numel[n] for n in rest)
        if not rest or divisor <= 0:
            return {n: 1.0 for n in shapes}
        eps = (budget - sum(numel[n] for n in dense)) / divisor
        largest = max(ratio[n] for n in rest)
        if eps * largest <= 1.0:
            return {n: 1.0 if n in dense else eps * ratio[n] for n in shapes}
        dense |= {n for n in rest if ratio[n] == largest}


def layer_densities(shapes: dict[str, tuple[int, ...]], target_cr: float, distribution: str) -> dict[str, float]:
    if distribution == "uniform":
        return {n: 1.0 / target_cr for n in shapes}
    if distribution == "erk":
        return erk_densities(shapes, target_cr)
    raise ValueError(f"distribution={distribution!r}; choose 'uniform' or 'erk'")


def layer_kept_counts(model: nn.Module, target_cr: float, distribution: str) -> dict[str, int]:
    shapes = {name: tuple(m.weight.shape) for name, m in prunable_layers(model)}
    if distribution == "uniform":
        return {n: kept_count(math.prod(s), target_cr) for n, s in shapes.items()}
    return {n: kept_for_density(math.prod(shapes[n]), d) for n, d in layer_densities(shapes, target_cr,
                                                                                       distribution).items()}


def random_masks(model: nn.Module, counts: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Per layer ``counts[name]`` weights kept, uniformly at random (seeded)."""
    gen = decision_generator(seed, 4_242)
    masks = {}
    for name, module in prunable_layers(model):
        scores = torch.rand(module.weight.shape, generator=gen)
        masks[name] = top_k_mask(scores, counts[name]).to(module.weight.device)
    return masks


def rescale_to_sparse_fan_in(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Multiply each unit's (output row's or filter's) weights by sqrt(fan-in / kept fan-in), so that
    its pre-activation has the variance the dense initialization gives a dense unit (the "sparse"
    initialization of Evci et al. 2022, "Gradient flow in sparse neural networks and how lottery
    tickets win"). A unit with nothing kept is left as it is."""
    with torch.no_grad():
        for name, module in prunable_layers(model):
            weight = module.weight
            kept = keep[name].flatten(1).sum(1).to(weight.dtype)
            scale = torch.where(kept > 0, (keep[name][0].numel() / kept.clamp(min=1)).sqrt(), torch.ones_like(kept))
            weight.mul_(scale.view(-1, *[1] * (weight.dim() - 1)))


def drop_and_grow(weight: torch.Tensor, active: torch.Tensor, grow_scores: torch.Tensor, k: int) -> torch.Tensor:
    """The new mask: the ``k`` active weights of smallest |weight| dropped, the ``k`` highest
    ``grow_scores`` among the weights inactive after the drop grown."""
    drop = top_k_mask((-weight.abs()).masked_fill(~active, -math.inf), k)
    kept = active & ~drop
    grow = top_k_mask(grow_scores.masked_fill(kept, -math.inf), k)
    return kept | grow


class DynamicSparseHooks(SparseTrainingHooks):
    """Drop-and-grow mask updates on the cosine schedule; ``growth`` is "gradient" (RigL) or
    "random" (SET)."""

    def __init__(self, drop_fraction: float, interval: int, end: float, growth: str, seed: int):
        super().__init__()
        if growth not in ("gradient", "random"):
            raise ValueError(f"growth={growth!r}; choose 'gradient' or 'random'")
        self.alpha, self.interval, self.end, self.growth, self.seed = drop_fraction, interval, end, growth, seed
        self.end_step = 0

    def bind(self, optimizer, steps_per_epoch, total_steps):
        super().bind(optimizer, steps_per_epoch, total_steps)
        self.end_step = round(self.end * total_steps)

    def is_update(self, t: int) -> bool:
        return t >= 1 and t % self.interval == 0 and t < self.end_step

    def drop_fraction(self, t: int) -> float:
        return self.alpha / 2 * (1.0 + math.cos(math.pi * t / self.end_step)) if self.end_step else 0.0

    def after_step(self, model, step):
        t = step + 1
        if self.is_update(t):
            self.update(model, t)
        if self.growth == "gradient":
            arm_dense_gradients(model, self.is_update(t + 1))

    def grow_scores(self, model: nn.Module, t: int) -> dict[str, torch.Tensor]:
        layers = prunable_layers(model)
        if self.growth == "gradient":
            return {name: g.abs() for name, g in dense_gradients(model).items()}
        gen = decision_generator(self.seed, 1_000 + t)
        return {name: torch.rand(m.weight.shape, generator=gen).to(m.weight.device) for name, m in layers}

    @torch.no_grad()
    def update(self, model: nn.Module, t: int) -> None:
        zeta = self.drop_fraction(t)
        current = read_masks(model)
        scores = self.grow_scores(model, t)
        new, changed, regrown = {}, 0, 0
        for name, module in prunable_layers(model):
            active = current[name]
            k = min(int(math.floor(zeta * int(active.sum()) + 0.5)), int(active.sum()))
            new[name] = drop_and_grow(module.weight.detach(), active, scores[name], k)
            changed += k
            regrown += k - int((new[name] & ~active).sum())
        set_masks(model, new, self.optimizer)
        self.log.append(self.entry(model, t, drop_fraction=zeta, dropped=changed, grown=changed, regrown=regrown))


class DynamicSparse(Method):
    """Sparse training with drop-and-grow mask updates (RigL, SET)."""

    family = "during-training"
    columns = ("prune_wall_s", "mask_updates")
    growth: str

    @dataclass(frozen=True)
    class Params(Method.Params):
        target_cr: float = 10.0
        distribution: Literal["erk", "uniform"] = "erk"
        drop_fraction: float = 0.3  # α, the paper's
        interval: int = 100  # ΔT in optimizer steps, the paper's
        end: float = 0.75  # T_end as a fraction of the training steps, the paper's
        init: Literal["dense", "sparse"] = "dense"  # "sparse": rescaled to each unit's kept fan-in

        def validate(self):
            problems = check_target_cr(self.target_cr)
            if not 0 <= self.drop_fraction < 1:
                problems.append(f"drop_fraction={self.drop_fraction} must be in [0, 1) (the fraction α of active "
                                f"weights replaced at the first update; 0 = a fixed random mask)")
            if self.interval < 1:
                problems.append(f"interval={self.interval} must be >= 1 (optimizer steps between mask updates)")
            if not 0 < self.end <= 1:
                problems.append(f"end={self.end} must be in (0, 1] (fraction of the training steps after which "
                                f"the mask stays fixed)")
            return problems

    @classmethod
    def curve_label(cls, values):
        """``rigl sparse-init`` when the initial weights are rescaled to the sparse fan-in."""
        return f"{cls.name} sparse-init" if values.get("init") == "sparse" else cls.name

    def hooks(self, ctx: MethodContext) -> DynamicSparseHooks:
        p = self.params
        return DynamicSparseHooks(p.drop_fraction, p.interval, p.end, self.growth, ctx.cell.seed)

    def prepare(self, ctx: MethodContext):
        """The masked model and the hooks that ``run`` trains."""
        p = self.params
        model = ctx.new_model()
        counts = layer_kept_counts(model, p.target_cr, p.distribution)
        keep = random_masks(model, counts, ctx.cell.seed)
        warn_empty_layers(keep)
        if p.init == "sparse":
            rescale_to_sparse_fan_in(model, keep)
        apply_masks(model, keep, DenseGradMask if self.growth == "gradient" else Mask)
        set_masks(model, keep, None)  # inactive weights hold zero from the start
        return model, self.hooks(ctx)

    def run(self, ctx: MethodContext) -> list[dict]:
        began = time.perf_counter()
        model, hooks = self.prepare(ctx)
        prune_wall_s = time.perf_counter() - began
        history, _ = ctx.train(model, hooks)
        remove_masks(model)
        return [ctx.measure(model, history=history, epochs=ctx.schedule.epochs, prune_wall_s=prune_wall_s,
                            mask_updates=len(hooks.log), pruning_log=hooks.log)]


@register
class RigL(DynamicSparse):
    """RigL: sparse training, drop smallest |w| and grow largest |dense gradient| on a cosine schedule."""

    name = "rigl"
    plotting = Plotting(order=7, style=(6, 0.0, "^", (0, (3, 1, 1, 1))))
    growth = "gradient"
