"""Deep Weight Factorization (Kolb et al., ICLR 2025) and shallow factorization (D = 2).

Each conv/linear weight becomes the elementwise product of ``depth`` factors of its shape, held as
a ``torch.nn.utils.parametrize`` parametrization (``original0 .. original{D-1}``). Training adds
``(lam / D) * sum_d ||w_d||^2`` to the mean cross-entropy, whose minima are those of
``lam * sum |w|^(2/D)`` on the collapsed weight (D = 2: lasso). By default the term is applied as
SGD weight decay ``2 * lam / D`` on the factors, which is the same gradient and uses the
optimizer's fused path (``penalty="explicit"`` adds it to the loss instead).

After training the factors are collapsed into plain weights and entries with ``|w| < threshold``
are set to zero; accuracy is measured on that model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from benchmark.engine.sparsity import prunable_layers, threshold_sensitivity, unparametrize, zero_below
from benchmark.engine.train import TrainHooks
from benchmark.core.context import MethodContext
from benchmark.core.method import Method, Plotting, register
from methods import structures
from methods.regularization import SCHEDULE_LR, RegularizerParams, calibrated_lr, schedule_with_lr, settling_metrics

#: Deepest factorization accepted (ours): far beyond any depth studied, and the truncated
#: initialization gets slower with depth (at depth 10^6 it never ends).
MAX_DEPTH = 32

#: How ``lam`` enters the objective, recorded with every result (lam grids differ across conventions).
LAM_CONVENTION = "mean CE + (lam/D) * sum_d ||w_d||^2  ==  lam * ||w||_{2/D}^{2/D} at balance"


class Product(nn.Module):
    """Parametrization ``w = w_1 * w_2 * ... * w_D`` (elementwise)."""

    def __init__(self, depth: int):
        super().__init__()
        self.depth = depth

    def forward(self, *factors: torch.Tensor) -> torch.Tensor:
        w = factors[0]
        for f in factors[1:]:
            w = w * f
        return w

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Balanced factors of ``w``: |w_d| = |w|^(1/D), the sign on the first factor."""
        magnitude = w.abs().pow(1.0 / self.depth)
        return (torch.sign(w) * magnitude,) + tuple(magnitude.clone() for _ in range(self.depth - 1))


def kaiming_std(weight: torch.Tensor) -> float:
    """The std a dense layer would get from Kaiming-normal init (fan-in, ReLU gain): sqrt(2/fan_in)."""
    fan_in = weight[0].numel()
    return math.sqrt(2.0 / fan_in)


def truncated_normal(shape, std: float, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std^2) entries redrawn until low < |x| < high; signs stay random.

    Only the entries still out of range are checked and redrawn (in index order, so the draws are
    exactly those of redrawing over the whole tensor): at D=4 three in four draws are rejected, and
    re-scanning a VGG-16 layer ~50 times made factorizing take seconds.
    """
    x = torch.randn(shape, generator=gen) * std
    flat = x.view(-1)
    redraw = ((flat.abs() <= low) | (flat.abs() >= high)).nonzero().squeeze(1)
    while len(redraw):
        values = torch.randn(len(redraw), generator=gen) * std
        flat[redraw] = values
        redraw = redraw[(values.abs() <= low) | (values.abs() >= high)]
    return x


def init_factors(shape, depth: int, sigma: float, gen: torch.Generator, scheme: str = "dwf",
                 eps_ratio: float = 0.25) -> list[torch.Tensor]:
    """Initial factors for a weight whose dense init std is ``sigma``.

    - ``dwf`` (Algorithm 1): factors from N(0, sigma^(2/D)) truncated to
      eps^(1/D) < |w_d| < min(1, (2 sigma)^(1/D)) with eps = eps_ratio * sigma, so every collapsed
      weight lies in (eps, 2 sigma);
    - ``variance``: the same without truncation (many near-zero products);
    - ``kaiming``: every factor Kaiming-normal on its own (the product's variance vanishes).
    """
    if scheme == "kaiming":
        return [torch.randn(shape, generator=gen) * sigma for _ in range(depth)]
    factor_std = sigma ** (1.0 / depth)
    if scheme == "variance":
        return [torch.randn(shape, generator=gen) * factor_std for _ in range(depth)]
    low = (eps_ratio * sigma) ** (1.0 / depth)
    high = min(1.0, (2.0 * sigma) ** (1.0 / depth))
    return [truncated_normal(shape, factor_std, low, high, gen) for _ in range(depth)]


def factorize(model: nn.Module, depth: int, seed: int, scheme: str = "dwf", eps_ratio: float = 0.25,
              skip_last: bool = False) -> list[nn.Module]:
    """Replace conv/linear weights by ``depth`` factors, initialized per ``scheme``. Returns the
    factorized modules."""
    layers = [m for _, m in prunable_layers(model)]
    if skip_last:
        layers = layers[:-1]
    gen = torch.Generator().manual_seed(seed * 7_727 + depth)
    for module in layers:
        weight = module.weight
        factors = init_factors(weight.shape, depth, kaiming_std(weight), gen, scheme, eps_ratio)
        parametrize.register_parametrization(module, "weight", Product(depth), unsafe=True)
        with torch.no_grad():
            for i, f in enumerate(factors):
                getattr(module.parametrizations.weight, f"original{i}").copy_(f.to(weight.device, weight.dtype))
    return layers


def factors_of(module: nn.Module) -> list[torch.Tensor]:
    p = module.parametrizations.weight
    return [getattr(p, f"original{i}") for i in range(p[0].depth)]


def factorized_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")
            and isinstance(m.parametrizations.weight[0], Product)]


def balance_error(model: nn.Module) -> float:
    """How far the factors are from balance (|w_d| = |w|^(1/D) for all d), as
    sum_j max_d | w_dj^2 - |w_j|^(2/D) |  /  sum_j mean_d w_dj^2  over all factorized weights.

    0 means balanced. Squared-norm units make it dominated by the weights the loss sustains; weights
    decaying to zero shrink their imbalance and their norm at the same rate.
    """
    numerator = denominator = 0.0
    with torch.no_grad():
        for module in factorized_modules(model):
            squares = torch.stack([f.pow(2) for f in factors_of(module)])
            target = module.weight.abs().pow(2.0 / len(squares))
            numerator += float((squares - target).abs().amax(0).sum())
            denominator += float(squares.mean(0).sum())
    return numerator / denominator if denominator else float("nan")


def collapse(model: nn.Module) -> None:
    """Turn factorized weights back into plain weights holding their product."""
    factorized = set(factorized_modules(model))
    unparametrize(model, lambda module: module in factorized)


class FactorHooks(TrainHooks):
    """Factors get weight decay 2*lam/D (or an explicit penalty); other weights the schedule's."""

    def __init__(self, lam: float, depth: int, penalty: str, threshold: float = 0.0):
        self.lam, self.depth, self.mode, self.threshold = lam, depth, penalty, threshold

    def param_groups(self, model, schedule):
        factor_ids = {id(f) for m in factorized_modules(model) for f in factors_of(m)}
        factors = [p for p in model.parameters() if id(p) in factor_ids]
        rest = [g | {"params": [p for p in g["params"] if id(p) not in factor_ids]}
                for g in super().param_groups(model, schedule)]
        decay = 2.0 * self.lam / self.depth if self.mode == "decay" else 0.0
        return [{"params": factors, "weight_decay": decay}] + [g for g in rest if g["params"]]

    def penalty(self, model):
        if self.mode != "explicit" or self.lam == 0:
            return None
        total = sum(f.pow(2).sum() for m in factorized_modules(model) for f in factors_of(m))
        return (self.lam / self.depth) * total

    def epoch_metrics(self, model):
        """CR of the collapsed weights (at 0.01x / 1x / 100x the threshold) and the factors' misalignment."""
        return settling_metrics(model, self.threshold) | {"balance_error": balance_error(model)}


def factorized_stand_in(structure: str, model: nn.Module, index: int) -> FactorHooks:
    """Member ``index`` of a pack of factorized models, for timing packs (its own λ and factors)."""
    depth = structures.depth_of(structure)
    factorize(model, depth, seed=index)
    return FactorHooks(1e-4 * (1 + index), depth, "decay")


structures.provide_stand_in(structures.FACTORIZED, factorized_stand_in)


def depth_rank(values) -> float:
    """DWF's curves in order of depth (a record's or CSV row's ``depth``; 0 where it has none)."""
    depth = values.get("depth")
    return float(depth) if depth is not None and depth == depth else 0.0


@register
class DWF(Method):
    """Deep Weight Factorization: D factors per weight, L2 on factors, collapse and threshold."""

    name = "dwf"
    family = "regularization"
    is_subject = True  # the report's comparisons table tests its curves against every other one
    plotting = Plotting(order=0, ramp=True, rank=depth_rank)  # one blue ramp over the depths, darker = deeper
    columns = ("lr", "balance_error", "zeroed_by_threshold", "lam_convention", "cr_thr_small", "cr_thr_large")
    keep_default = {"lr": SCHEDULE_LR}

    @dataclass(frozen=True)
    class Params(RegularizerParams):
        depth: int = 3
        init_eps: float = 0.25  # epsilon as a fraction of sigma_w (ours, as a third-party implementation)
        penalty: Literal["decay", "explicit"] = "decay"
        init: Literal["dwf", "variance", "kaiming"] = "dwf"
        skip_last: bool = False  # leave the classifier dense and unfactorized

        def validate(self):
            problems = super().validate()
            if self.depth < 2:
                problems.append(f"depth={self.depth} must be >= 2 (2 is shallow factorization)")
            elif self.depth > MAX_DEPTH:
                problems.append(f"depth={self.depth} must be <= {MAX_DEPTH} (every weight is stored as depth factors, "
                                f"and the initialization's range for each factor narrows towards nothing as depth grows)")
            if not 0 < self.init_eps < 2:
                problems.append(f"init_eps={self.init_eps} must be in (0, 2) (a fraction of sigma_w)")
            return problems

    @classmethod
    def default_params(cls, arch, params):
        """The learning rate calibrated for this architecture and depth (docs/methods.md)."""
        return calibrated_lr(arch, params.depth)

    @classmethod
    def curve_label(cls, values):
        depth = values.get("depth")
        return f"dwf D={int(float(depth))}" if depth is not None and depth == depth else cls.name

    class Workload(Method.Workload):
        def step_variant(self):
            return structures.factorized(self.params.depth)

        def pack_family(self):
            return structures.factorized(self.params.depth), (self.params.lr, self.params.skip_last)

    def run(self, ctx: MethodContext) -> list[dict]:
        p = self.params
        model = ctx.new_model()
        factorize(model, p.depth, ctx.cell.seed, p.init, p.init_eps, p.skip_last)
        schedule = schedule_with_lr(ctx.schedule, p.lr)
        history, _ = ctx.train(model, FactorHooks(p.lam, p.depth, p.penalty, p.threshold), schedule=schedule)
        balance = balance_error(model)
        collapse(model)
        settling = threshold_sensitivity(model, p.threshold)
        zeroed = zero_below(model, p.threshold)
        return [ctx.measure(model, p.threshold, history, lr=schedule.lr, balance_error=balance,
                            zeroed_by_threshold=zeroed, lam_convention=LAM_CONVENTION, **settling)]


@register
class Shallow(DWF):
    """Shallow factorization: DWF with D = 2 (lasso-equivalent), reported under its own name."""

    name = "shallow"
    is_subject = False  # a baseline of its own name, not one of DWF's curves
    plotting = Plotting(order=1, style=(9, 0.0, "v", "-"))

    @classmethod
    def curve_label(cls, values):
        return cls.name

    @dataclass(frozen=True)
    class Params(DWF.Params):
        depth: int = 2

        def validate(self):
            problems = super().validate()
            if self.depth != 2:
                problems.append(f"depth={self.depth}: shallow factorization is depth 2; use method 'dwf' for others")
            return problems
