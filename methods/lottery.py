"""Lottery ticket (Frankle & Carbin 2019): iterative global magnitude pruning, then retraining.

Level 0 is the cached dense model. Each level prunes ``prune_fraction`` of the weights that
survived the previous level, ranked globally by the magnitude of that level's *trained* weights,
and retrains the survivors with the mask held. ``level_keep_counts`` plans the levels, for this
method and for the runner's estimate alike; the last level keeps exactly ``round(total /
target_cr)`` weights. How a level retrains is ``retrain``:

- ``rewind`` (the LTH; OpenLTH's default): every surviving weight, bias and BatchNorm entry goes
  back to the dense run's state at ``rewind``, an epoch (0 = the original initialization) or an
  iteration (``"500it"``: after that many optimizer steps, Frankle et al. 2020's late rewinding),
  and the rest of the schedule is trained from there: the learning rate and batch order of those
  steps (joining mid-epoch for an iteration), with a fresh optimizer state, so every level ends at
  the same point of the schedule as the dense run. Only the points the dense cache keeps
  (``benchmark.engine.schedule.REWIND_POINTS``) are allowed.
- ``lr_rewind`` (learning-rate rewinding, Renda et al. 2020): the weights stay as the previous level
  trained them (pruned ones zero); only the learning-rate schedule and batch order go back to
  ``rewind`` (any epoch or iteration: no snapshot is needed), and the rest of the schedule is
  trained.
- ``finetune`` (Renda et al.'s fine-tuning baseline): the weights stay; ``finetune_epochs`` at the
  constant ``finetune_lr``.

``prune_output=false`` leaves the output layer dense, as OpenLTH does by default; its weights count
as kept, so the other layers are pruned further for the same ``target_cr``. Ours prunes it (the
default, which existing cells were run with). ``output_fraction`` prunes it on its own, that fraction
of its remaining weights per level, and the other layers globally to the level's total: Frankle &
Carbin's LeNet-300-100 recipe is ``prune_fraction = 0.2, output_fraction = 0.1``.

Every level is a point on the curve, so the cell returns one record per level, level 0 included.
Each level checkpoints as its own phase, so a killed cell resumes at the level it was in; finished
levels replay from their checkpoints without training.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from benchmark.engine import schedule as schedule_mod
from benchmark.engine.sparsity import prunable_layers
from benchmark.core.context import MethodContext
from benchmark.core.method import Method, Plotting, register
from methods import structures
from methods.masks import (apply_masks, check_target_cr, kept_count, magnitude_scores, masks_from_scores, read_masks,
                           remove_masks, top_k_mask)

#: Fine-tuning's learning rate when ``finetune_lr`` is none: the schedule's divided by this (ours).
#: Renda et al. fine-tune at the final rate of their step schedules (0.1 after two tenfold drops:
#: 0.001); our cosine schedule ends at zero, so a hundredth of its peak stands in for it.
FINETUNE_LR_DIVISOR = 100

_ITERATION = re.compile(r"(\d+)it")


def rewind_points() -> tuple[int | str, ...]:
    """The points the dense cache keeps (read when asked: tests change them)."""
    return schedule_mod.REWIND_POINTS


def rewind_steps(point: int | str, steps_per_epoch: int) -> int:
    """Optimizer steps before ``point``: an epoch (int) or an iteration (``"500it"``)."""
    if isinstance(point, int):
        return point * steps_per_epoch
    return int(_ITERATION.fullmatch(point).group(1))


#: The most levels a ticket may plan (a tiny prune_fraction would otherwise plan millions).
MAX_LEVELS = 1000


def level_keep_counts(total: int, target_cr: float, prune_fraction: float, fixed: int = 0) -> list[int]:
    """Weights kept after each level 1..L out of ``total``, ``fixed`` of them (a layer left dense)
    included. The others, ``total - fixed``, keep (1 - fraction)^l of theirs at level l; the last
    level L, the first whose fraction reaches the target, keeps ``kept_count(total, target_cr)`` in
    all: total / target_cr within half a weight."""
    final = kept_count(total, target_cr)
    if fixed and final <= fixed:
        raise ValueError(f"target_cr={target_cr:g} keeps {final} of {total} weights, not more than the {fixed} "
                         f"left dense")
    pool = total - fixed
    pool_cr = pool / (total / target_cr - fixed)  # = target_cr when nothing is left dense
    levels = max(1, math.ceil(math.log(pool_cr) / -math.log1p(-prune_fraction) - 1e-9))
    if levels > MAX_LEVELS:
        raise ValueError(f"target_cr={target_cr:g} needs {levels:,} levels at prune_fraction={prune_fraction:g}, "
                         f"more than {MAX_LEVELS}; raise prune_fraction")
    counts = [fixed + kept_count(pool, (1.0 - prune_fraction) ** -level) for level in range(1, levels)]
    return counts + [final]


def output_level_counts(total: int, output: int, target_cr: float, prune_fraction: float,
                        output_fraction: float) -> list[tuple[int, int]]:
    """(weights kept in all, of them in the output layer) after each level 1..L, the output layer
    pruned ``output_fraction`` of its weights per level and the ``total - output`` others
    ``prune_fraction``; the last level keeps ``kept_count(total, target_cr)`` in all (the others
    make up the difference). ValueError when the output layer alone keeps more than that."""
    final, rest = kept_count(total, target_cr), total - output
    plan = []
    for level in range(1, MAX_LEVELS + 1):
        out = kept_count(output, (1.0 - output_fraction) ** -level)
        others = kept_count(rest, (1.0 - prune_fraction) ** -level)
        if others + out <= final:
            return plan + [(final, out)]
        plan.append((others + out, out))
    raise ValueError(f"target_cr={target_cr:g} needs more than {MAX_LEVELS} levels at prune_fraction="
                     f"{prune_fraction:g} and output_fraction={output_fraction:g}; raise either fraction")


def planned_levels(params: "Lottery.Params", layer_sizes: tuple[int, ...] | list[int]) -> list[int]:
    """``level_keep_counts`` for a network with these prunable layers (the output layer last)."""
    if params.output_fraction is not None:
        return [kept for kept, _ in output_level_counts(sum(layer_sizes), layer_sizes[-1], params.target_cr,
                                                        params.prune_fraction, params.output_fraction)]
    fixed = 0 if params.prune_output else layer_sizes[-1]
    return level_keep_counts(sum(layer_sizes), params.target_cr, params.prune_fraction, fixed)


def level_epochs(params: "Lottery.Params", epochs: int, steps_per_epoch: int | None) -> float:
    """Epochs one level trains in a schedule of ``epochs``. Without ``steps_per_epoch`` (an estimate
    made before the data is loaded) an iteration rewind counts the whole schedule, an upper bound."""
    if params.retrain == "finetune":
        return epochs if params.finetune_epochs is None else params.finetune_epochs
    if isinstance(params.rewind, int):
        return epochs - params.rewind
    if steps_per_epoch is None:
        return epochs
    return epochs - rewind_steps(params.rewind, steps_per_epoch) / steps_per_epoch


def rewound_model(ctx: MethodContext, state: dict, keep: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model holding ``state`` exactly, with ``keep`` applied as masks."""
    model = ctx.new_model()
    model.load_state_dict(state)
    apply_masks(model, keep)
    check_rewound(model, state)
    return model


def check_rewound(model: nn.Module, state: dict) -> None:
    """Every kept weight equals its saved value bit for bit (guards against a silent non-rewind)."""
    masks = read_masks(model)
    for name, module in model.named_modules():
        if name in masks:
            saved = state[f"{name}.weight"].to(module.weight.device)
            if not torch.equal(module.weight.detach()[masks[name]], saved[masks[name]]):
                raise RuntimeError(f"rewinding failed: kept weights of {name!r} differ from the snapshot")


@register
class Lottery(Method):
    """Lottery ticket: iterative global magnitude pruning with rewinding (or LR rewinding, fine-tuning)."""

    name = "lottery"
    family = "lottery"
    needs_dense = True
    plotting = Plotting(order=5, style=(4, 0.0, "h", "-."))
    columns = ("level", "level_target_cr", "dense_test_acc")

    @dataclass(frozen=True)
    class Params(Method.Params):
        target_cr: float = 10.0
        prune_fraction: float = 0.2  # of the remaining weights per level, as in the LTH paper
        rewind: int | str = 0  # epoch (2) or iteration ("500it") the weights or the LR schedule go back to
        retrain: Literal["rewind", "lr_rewind", "finetune"] = "rewind"
        finetune_epochs: int | None = None  # retrain=finetune; none: the schedule's epochs (ours)
        finetune_lr: float | None = None  # retrain=finetune; none: the schedule's lr / 100 (ours)
        prune_output: bool = True  # ours; OpenLTH leaves the output layer dense
        #: Prune the output layer on its own, this fraction per level (LTH's LeNet: 0.1); none: with the rest.
        output_fraction: float | None = None

        def validate(self):
            problems = check_target_cr(self.target_cr, strict=True)
            if self.output_fraction is not None and not 0 < self.output_fraction < 1:
                problems.append(f"output_fraction={self.output_fraction} must be in (0, 1) (the fraction of the "
                                f"output layer's remaining weights pruned per level), or none to prune it with the rest")
            if self.output_fraction is not None and not self.prune_output:
                problems.append(f"output_fraction={self.output_fraction} with prune_output=false: a dense output "
                                f"layer is not pruned at any rate; drop one of them")
            if not 0 < self.prune_fraction < 1:
                problems.append(f"prune_fraction={self.prune_fraction} must be in (0, 1) "
                                f"(the fraction of remaining weights pruned per level)")
            points = rewind_points()
            epochs = [p for p in points if isinstance(p, int)]
            iterations = [p for p in points if isinstance(p, str)]
            is_point = (isinstance(self.rewind, int) and self.rewind >= 0) or (
                isinstance(self.rewind, str) and _ITERATION.fullmatch(self.rewind) is not None)
            if self.retrain == "rewind" and self.rewind not in points:
                problems.append(f"rewind={self.rewind!r} is not allowed; choose one of {epochs} (epochs) or "
                                f"{iterations} (iterations): the points the dense cache keeps")
            elif self.retrain == "lr_rewind" and not is_point:
                problems.append(f"rewind={self.rewind!r} is not allowed; choose an epoch (an integer >= 0) or an "
                                f"iteration such as '500it'")
            elif self.retrain == "finetune" and self.rewind != 0:
                problems.append(f"rewind={self.rewind!r} does not apply to retrain='finetune' (it keeps the trained "
                                f"weights at a constant learning rate); leave rewind at 0")
            for name in ("finetune_epochs", "finetune_lr"):
                value = getattr(self, name)
                if value is not None and self.retrain != "finetune":
                    problems.append(f"{name}={value} applies only to retrain='finetune', not "
                                    f"retrain={self.retrain!r}")
            if self.finetune_epochs is not None and self.finetune_epochs < 1:
                problems.append(f"finetune_epochs={self.finetune_epochs} must be >= 1 (or none for the schedule's)")
            if self.finetune_lr is not None and not self.finetune_lr > 0:
                problems.append(f"finetune_lr={self.finetune_lr} must be > 0 (or none for the schedule's lr / "
                                f"{FINETUNE_LR_DIVISOR})")
            return problems

        def schedule_problems(self, schedule) -> list[str]:
            """A rewind epoch past the schedule's end would train nothing (found before anything trains)."""
            if isinstance(self.rewind, int) and self.retrain != "finetune" and self.rewind >= schedule.epochs > 0:
                return [f"rewind={self.rewind} is at or past the end of the schedule ({schedule.epochs} epochs): "
                        f"nothing would be retrained; choose an epoch below {schedule.epochs}"]
            return []

        def capacity_problems(self, layer_sizes: tuple[int, ...]) -> list[str]:
            """With the output layer dense, the target must keep more weights than it has; with it
            pruned on its own, the levels must reach the target."""
            total, output = sum(layer_sizes), layer_sizes[-1]
            if self.output_fraction is not None or self.prune_output:
                try:
                    planned_levels(self, layer_sizes)
                except ValueError as exc:
                    return [str(exc)]
                return []
            if kept_count(total, self.target_cr) > output:
                try:
                    planned_levels(self, layer_sizes)
                except ValueError as exc:
                    return [str(exc)]
                return []
            return [f"target_cr={self.target_cr:g} with prune_output=false is out of reach: it keeps "
                    f"{kept_count(total, self.target_cr):,} of {total:,} prunable weights, no more than the "
                    f"{output:,} of the output layer, which stays dense; target_cr must be <= "
                    f"{math.floor(total / (output + 1) * 100) / 100:g}"]

    @classmethod
    def curve_label(cls, values):
        """What differs from the LTH's ticket: ``lottery LRR rewind=500it dense-output``."""
        retrain = values.get("retrain") or "rewind"
        label = cls.name + {"lr_rewind": " LRR", "finetune": " FT"}.get(retrain, "")
        if retrain != "finetune" and values.get("rewind") not in (None, 0):
            label += f" rewind={values['rewind']}"
        label += " dense-output" if values.get("prune_output") is False else ""
        fraction, output = values.get("prune_fraction"), values.get("output_fraction")
        if output is not None and output == output:
            label += f" p={fraction:g}/out={output:g}"
        return label

    class Workload(Method.Workload):
        def trainings(self, layer_sizes):
            return len(planned_levels(self.params, layer_sizes))

        def training_epochs(self, schedule, layer_sizes):
            """Its levels, each training ``level_epochs`` (an iteration rewind counts whole epochs)."""
            return self.trainings(layer_sizes) * level_epochs(self.params, schedule.epochs, None)

        def pack_family(self):
            return structures.MASKED, ("lottery", self.params.rewind)

    def run(self, ctx: MethodContext) -> list[dict]:
        p = self.params
        dense = ctx.dense(snapshot=p.rewind if p.retrain == "rewind" else None)
        epochs, steps_per_epoch = ctx.schedule.epochs, ctx.steps_per_epoch()
        start = rewind_steps(p.rewind, steps_per_epoch)
        if p.retrain == "rewind" and p.rewind not in dense.snapshots:
            kept = [point for point in rewind_points() if point in dense.snapshots]
            raise ValueError(f"rewind={p.rewind!r}: the dense run has snapshots only at {kept} (a schedule of "
                             f"{epochs} epochs of {steps_per_epoch} steps)")
        if p.retrain == "lr_rewind" and start >= epochs * steps_per_epoch:
            raise ValueError(f"rewind={p.rewind!r} is at or past the end of the schedule ({epochs} epochs of "
                             f"{steps_per_epoch} steps): nothing would be trained")
        first_epoch, first_batch = divmod(start, steps_per_epoch)
        per_level = level_epochs(p, epochs, steps_per_epoch)
        finetune, extra = None, {}
        if p.retrain == "finetune":
            lr = ctx.schedule.lr / FINETUNE_LR_DIVISOR if p.finetune_lr is None else p.finetune_lr
            finetune = ctx.schedule.finetune(per_level, lr)
            extra = {"finetune_epochs": per_level, "finetune_lr": lr}

        layers = prunable_layers(dense.model)
        sizes = [module.weight.numel() for _, module in layers]
        output_name = layers[-1][0]
        own_output = p.output_fraction is not None  # the output layer pruned on its own
        pruned = {name for name, _ in (layers if p.prune_output and not own_output else layers[:-1])}
        fixed = 0 if p.prune_output else sizes[-1]
        total = sum(sizes)
        output_counts = [out for _, out in output_level_counts(total, sizes[-1], p.target_cr, p.prune_fraction,
                                                               p.output_fraction)] if own_output else []
        records = [ctx.measure(dense.model, history=dense.history, level=0, level_target_cr=1.0,
                               epochs=epochs, dense_test_acc=dense.test_acc)]
        trained, keep = dense.model, None
        for level, count in enumerate(planned_levels(p, sizes), start=1):
            all_scores = magnitude_scores(trained)
            if keep is not None:  # what an earlier level pruned stays pruned
                all_scores = {name: s.masked_fill(~keep[name], -math.inf) if name in keep else s
                              for name, s in all_scores.items()}
            scores = {name: s for name, s in all_scores.items() if name in pruned}
            if own_output:
                out = output_counts[level - 1]
                keep = masks_from_scores(scores, p.target_cr, "global", keep=count - out, warn=False)
                keep[output_name] = top_k_mask(all_scores[output_name], out) & (all_scores[output_name] > -math.inf)
            else:
                keep = masks_from_scores(scores, p.target_cr, "global", keep=count - fixed)
            source = dense.snapshots[p.rewind] if p.retrain == "rewind" else trained.state_dict()
            model = rewound_model(ctx, source, keep)
            if finetune is not None:
                history, _ = ctx.train(model, phase=f"level{level}", schedule=finetune, constant_lr=True)
            else:
                history, _ = ctx.train(model, phase=f"level{level}", first_epoch=first_epoch, first_batch=first_batch)
            remove_masks(model)
            records.append(ctx.measure(model, history=history, level=level,
                                       level_target_cr=total / count if count else math.inf,
                                       epochs=epochs + level * per_level, dense_test_acc=dense.test_acc, **extra))
            trained = model
        return records
