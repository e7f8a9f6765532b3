"""Lottery ticket (Frankle & Carbin 2019): iterative global magnitude pruning with rewinding.

Level 0 is the cached dense model. Each level prunes ``prune_fraction`` of the weights that
survived the previous level, ranked globally by the magnitude of that level's *trained* weights
(the last level prunes exactly to ``target_cr``), rewinds every surviving weight, bias and
BatchNorm entry to the dense run's state at epoch ``rewind`` (0 = the original initialization),
and trains with the mask held. Every level is a point on the curve, so the cell returns one record
per level, level 0 included.

Each level trains the rest of the schedule from the rewound state: epochs ``rewind`` .. end, with
the learning rate and batch order of those epochs and a fresh optimizer state, so every level ends
at the same point of the schedule as the dense run. Each level checkpoints as its own phase, so a
killed cell resumes at the level it was in; finished levels replay from their checkpoints without
training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import Method, register
from methods.masks import (apply_masks, check_target_cr, kept_count, magnitude_scores, masks_from_scores, read_masks,
                           remove_masks)


def rewind_epochs() -> tuple[int, ...]:
    """The epochs the dense cache keeps (imported late: benchmark.cell imports this package)."""
    from benchmark.cell import REWIND_EPOCHS

    return REWIND_EPOCHS


def level_keep_counts(total: int, target_cr: float, prune_fraction: float) -> list[int]:
    """Weights kept after each level 1..L: (1 - fraction)^l of ``total``, and exactly
    ``total / target_cr`` at the last level L, the first one that reaches the target."""
    levels = max(1, math.ceil(math.log(target_cr) / -math.log1p(-prune_fraction) - 1e-9))
    counts = [kept_count(total, (1.0 - prune_fraction) ** -level) for level in range(1, levels)]
    return counts + [kept_count(total, target_cr)]


def rewound_model(ctx, snapshot: dict, keep: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model holding the rewind state exactly, with ``keep`` applied as masks."""
    model = ctx.new_model()
    model.load_state_dict(snapshot)
    apply_masks(model, keep)
    check_rewound(model, snapshot)
    return model


def check_rewound(model: nn.Module, snapshot: dict) -> None:
    """Every kept weight equals its saved value bit for bit (guards against a silent non-rewind)."""
    masks = read_masks(model)
    for name, module in model.named_modules():
        if name in masks:
            saved = snapshot[f"{name}.weight"]
            if not torch.equal(module.weight.detach()[masks[name]], saved[masks[name]]):
                raise RuntimeError(f"rewinding failed: kept weights of {name!r} differ from the snapshot")


@register
class Lottery(Method):
    """Lottery ticket: iterative global magnitude pruning with rewinding; one record per level."""

    name = "lottery"
    family = "lottery"
    needs_dense = True

    @dataclass(frozen=True)
    class Params(Method.Params):
        target_cr: float = 10.0
        prune_fraction: float = 0.2  # of the remaining weights per level, as in the LTH paper
        rewind: int = 0  # epoch of the dense run to rewind to; 0 = the original initialization

        def validate(self):
            problems = check_target_cr(self.target_cr, strict=True)
            if not 0 < self.prune_fraction < 1:
                problems.append(f"prune_fraction={self.prune_fraction} must be in (0, 1) "
                                f"(the fraction of remaining weights pruned per level)")
            allowed = rewind_epochs()
            if self.rewind not in allowed:
                problems.append(f"rewind={self.rewind} is not allowed; choose one of {list(allowed)} "
                                f"(the epochs the dense cache keeps)")
            return problems

    def run(self, ctx):
        p = self.params
        dense = ctx.dense()
        if p.rewind not in dense.snapshots:
            raise ValueError(f"rewind={p.rewind}: the dense run has snapshots only at epochs "
                             f"{sorted(dense.snapshots)} (schedule of {ctx.schedule.epochs} epochs)")
        epochs = ctx.schedule.epochs
        records = [ctx.measure(dense.model, history=dense.history, level=0, level_target_cr=1.0,
                               epochs=epochs, dense_test_acc=dense.test_acc)]
        trained, keep = dense.model, None
        total = sum(w.numel() for w in magnitude_scores(trained).values())
        for level, count in enumerate(level_keep_counts(total, p.target_cr, p.prune_fraction), start=1):
            scores = magnitude_scores(trained)
            if keep is not None:  # what an earlier level pruned stays pruned
                scores = {name: s.masked_fill(~keep[name], -math.inf) for name, s in scores.items()}
            keep = masks_from_scores(scores, p.target_cr, "global", keep=count)
            model = rewound_model(ctx, dense.snapshots[p.rewind], keep)
            history, _ = ctx.train(model, phase=f"level{level}", first_epoch=p.rewind)
            remove_masks(model)
            records.append(ctx.measure(model, history=history, level=level,
                                       level_target_cr=total / count if count else math.inf,
                                       epochs=epochs + level * (epochs - p.rewind), dense_test_acc=dense.test_acc))
            trained = model
        return records
