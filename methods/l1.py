"""Vanilla L1: ``lam * sum |w|`` on the plain conv/linear weights, trained with (sub)gradient SGD.

Plain SGD does not land exactly on zero, so sparsity comes from the same threshold as DWF's; this
is the weakness the factorized methods are meant to fix, and the baseline shows it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from benchmark.engine.sparsity import prunable_layers, threshold_sensitivity, zero_below
from benchmark.engine.train import TrainHooks
from benchmark.core.context import MethodContext
from benchmark.core.method import Method, Plotting, register
from methods import structures
from methods.regularization import (L1_DEPTH, SCHEDULE_LR, RegularizerParams, calibrated_lr, schedule_with_lr,
                                    settling_metrics)


class L1Hooks(TrainHooks):
    """No weight decay on the penalized weights; the penalty is added to the loss."""

    def __init__(self, lam: float, threshold: float = 0.0):
        self.lam, self.threshold = lam, threshold

    def param_groups(self, model, schedule):
        weights = {id(m.weight) for _, m in prunable_layers(model)}
        groups = super().param_groups(model, schedule)
        for g in groups:
            if any(id(p) in weights for p in g["params"]):
                g["weight_decay"] = 0.0
        return groups

    def penalty(self, model):
        return self.lam * sum(m.weight.abs().sum() for _, m in prunable_layers(model))

    def epoch_metrics(self, model):
        return settling_metrics(model, self.threshold)


def l1_stand_in(structure: str, model: nn.Module, index: int) -> L1Hooks:
    """Member ``index`` of a pack of L1-penalized models, for timing packs (its own λ)."""
    return L1Hooks(1e-5 * (1 + index))


structures.provide_stand_in(structures.L1, l1_stand_in)


@register
class L1(Method):
    """Vanilla L1 penalty on the weights, then the zero threshold."""

    name = "l1"
    family = "regularization"
    plotting = Plotting(order=2, style=(2, 0.0, "P", "-"))
    columns = ("lr", "zeroed_by_threshold", "cr_thr_small", "cr_thr_large")
    keep_default = {"lr": SCHEDULE_LR}

    @dataclass(frozen=True)
    class Params(RegularizerParams):
        lam: float = 1e-5

    @classmethod
    def default_params(cls, arch, params):
        """The learning rate calibrated for this architecture (docs/methods.md)."""
        return calibrated_lr(arch, L1_DEPTH)

    class Workload(Method.Workload):
        def pack_family(self):
            return structures.L1, (self.params.lr,)

    def run(self, ctx: MethodContext) -> list[dict]:
        p = self.params
        model = ctx.new_model()
        schedule = schedule_with_lr(ctx.schedule, p.lr)
        history, _ = ctx.train(model, L1Hooks(p.lam, p.threshold), schedule=schedule)
        settling = threshold_sensitivity(model, p.threshold)
        zeroed = zero_below(model, p.threshold)
        return [ctx.measure(model, p.threshold, history, lr=schedule.lr, zeroed_by_threshold=zeroed, **settling)]
