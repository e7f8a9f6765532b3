"""Magnitude pruning after dense training: layer-wise (``magnitude``) and global (``global-magnitude``).

Both start from the cached dense model of the cell's arch x dataset x schedule x seed, so a curve
over many target CRs costs one dense training. The smallest |w| are pruned, layer by layer (every
layer keeps the same fraction) or over the whole network at once. The paper evaluates without
fine-tuning (``finetune_epochs=0``); with fine-tuning the mask is held and the learning rate is the
schedule's divided by ten unless ``finetune_lr`` is given (ours). Layer-wise pruning prunes the
output layer at the same rate as the others (ours); ``output_rate = 0.5`` prunes it at half their
rate, as Frankle & Carbin treat LeNet's output layer (``methods.masks.layer_counts_for_cr``).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.core.context import MethodContext
from benchmark.core.method import Method, Plotting, register
from methods import structures
from methods.masks import (apply_masks, check_target_cr, magnitude_scores, masks_from_scores, output_rate_problems,
                          remove_masks)


@register
class Magnitude(Method):
    """Layer-wise magnitude pruning of the trained dense model (optionally fine-tuned)."""

    name = "magnitude"
    family = "after-training"
    needs_dense = True
    scope = "layer"
    plotting = Plotting(order=3, style=(1, 0.0, "X", "--"))
    columns = ("scope", "finetune_lr", "dense_test_acc")

    @dataclass(frozen=True)
    class Params(Method.Params):
        target_cr: float = 10.0
        finetune_epochs: int = 0  # the paper: no fine-tuning
        finetune_lr: float | None = None  # None: the schedule's lr / 10 (ours)
        output_rate: float = 1.0  # the output layer's pruning rate / the others' (1: the same, ours)

        def validate(self):
            problems = check_target_cr(self.target_cr) + output_rate_problems(self.output_rate)
            if self.finetune_epochs < 0:
                problems.append(f"finetune_epochs={self.finetune_epochs} must be >= 0")
            if self.finetune_lr is not None and not self.finetune_lr > 0:
                problems.append(f"finetune_lr={self.finetune_lr} must be > 0 (or none for the schedule's lr / 10)")
            return problems

    @classmethod
    def curve_label(cls, values):
        """``+FT`` when fine-tuned: the paper's magnitude baselines are not; ``output-rate=0.5`` when
        the output layer is pruned at another rate."""
        label = f"{cls.name} +FT" if (values.get("finetune_epochs") or 0) > 0 else cls.name
        rate = values.get("output_rate")
        return label + (f" output-rate={rate:g}" if rate not in (None, 1.0) and rate == rate else "")

    class Workload(Method.Workload):
        def training_epochs(self, schedule, layer_sizes):
            return self.params.finetune_epochs

        def pack_family(self):
            p = self.params
            return (structures.MASKED, (p.finetune_epochs, p.finetune_lr)) if p.finetune_epochs else None

    def run(self, ctx: MethodContext) -> list[dict]:
        p = self.params
        dense = ctx.dense()
        model = dense.model
        apply_masks(model, masks_from_scores(magnitude_scores(model), p.target_cr, self.scope,
                                             output_rate=p.output_rate))
        history = [e | {"phase": "dense"} for e in dense.history]
        finetune_lr = None
        if p.finetune_epochs > 0:
            finetune_lr = p.finetune_lr or ctx.schedule.lr / 10
            tuned, _ = ctx.train(model, phase="finetune",
                                 schedule=ctx.schedule.finetune(p.finetune_epochs, finetune_lr))
            history += [e | {"phase": "finetune"} for e in tuned.epochs]
        remove_masks(model)
        # Without fine-tuning the last training epoch is the dense model's, not this one's.
        train_acc = history[-1]["train_acc"] if p.finetune_epochs > 0 and history else None
        return [ctx.measure(model, history=history, train_acc=train_acc, scope=self.scope,
                            epochs=ctx.schedule.epochs + p.finetune_epochs, finetune_lr=finetune_lr,
                            dense_test_acc=dense.test_acc)]


@register
class GlobalMagnitude(Magnitude):
    """Global magnitude pruning of the trained dense model (optionally fine-tuned)."""

    name = "global-magnitude"
    scope = "global"
    plotting = Plotting(order=4, style=(3, 0.0, "*", "--"))

    @dataclass(frozen=True)
    class Params(Magnitude.Params):
        def validate(self):
            problems = super().validate()
            if self.output_rate != 1.0:
                problems.append(f"output_rate={self.output_rate} applies to layer-wise pruning (magnitude, gmp with "
                                f"scope = \"layer\"); global pruning ranks the output layer with the rest")
            return problems
