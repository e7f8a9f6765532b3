"""Vanilla L1: ``lam * sum |w|`` on the plain conv/linear weights, trained with (sub)gradient SGD.

Plain SGD does not land exactly on zero, so sparsity comes from the same threshold as DWF's; this
is the weakness the factorized methods are meant to fix, and the baseline shows it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.engine.sparsity import prunable_layers, threshold_sensitivity, zero_below
from benchmark.engine.train import TrainHooks
from benchmark.core.method import Method, register
from methods import structures
from methods.regularization import RegularizerParams, schedule_with_lr, settling_metrics


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


@register
class L1(Method):
    """Vanilla L1 penalty on the weights, then the zero threshold."""

    name = "l1"
    family = "regularization"
    curve_order = 2
    plot_style = (2, 0.0, "P", "-")
    columns = ("lr", "zeroed_by_threshold", "cr_thr_small", "cr_thr_large")

    @dataclass(frozen=True)
    class Params(RegularizerParams):
        lam: float = 1e-5

    def training_schedule(self, schedule):
        return schedule_with_lr(schedule, self.params.lr)

    def pack_family(self):
        return structures.L1, (self.params.lr,)

    def run(self, ctx):
        p = self.params
        model = ctx.new_model()
        schedule = self.training_schedule(ctx.schedule)
        history, _ = ctx.train(model, L1Hooks(p.lam, p.threshold), schedule=schedule)
        settling = threshold_sensitivity(model, p.threshold)
        zeroed = zero_below(model, p.threshold)
        return [ctx.measure(model, p.threshold, history, lr=schedule.lr, zeroed_by_threshold=zeroed, **settling)]
