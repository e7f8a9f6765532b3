"""Gradual magnitude pruning during training, ``gmp`` (Zhu & Gupta 2017, "To prune, or not to prune").

Training starts dense (every prunable layer carries an all-ones mask). After optimizer step t of the
T in the schedule, for t = t0, t0 + dt, ..., t0 + n dt, the weights are pruned by magnitude to the
sparsity of the paper's cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3,      s_f = 1 - 1/target_cr,

and the mask is held in between. Pruned weights stay pruned: each pruning step ranks only the
weights its predecessor kept, by the magnitude of their current values (the effective weights after
step t). ``scope="layer"`` prunes every layer to s_t (the paper's setting: one threshold per layer),
``scope="global"`` ranks all layers together. Counts are rounded to the nearest whole weight; at the
last pruning step they are exactly those of every other method at ``target_cr``.

Ours, not the paper's (its experiments set the schedule per model in steps):

- ``start`` and ``end`` are fractions of the schedule's T steps: t0 = round(start * T) (at least 1;
  pruning acts after an optimizer step), and n = floor((round(end * T) - t0) / dt), so the final
  sparsity is reached at the last multiple of ``interval`` after t0 that does not pass ``end``
  (with n = 0, one pruning step at t0 goes straight to s_f). Defaults start=0.1, end=0.75,
  interval=100 steps: the last quarter of the schedule trains the final mask, leaving the network
  time to recover from the last pruning steps.
- The learning rate follows the shared schedule (cosine), not the paper's.
- A pruned weight's stored value and momentum are set to zero (``methods.sparse_training``).

The record carries ``pruning_log``: per pruning step the step t, its epoch (t / steps per epoch),
``target_sparsity`` s_t and the masks' ``mask_sparsity`` and ``mask_kept`` after pruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from benchmark.engine.sparsity import prunable_layers
from benchmark.core.context import MethodContext
from benchmark.core.method import Method, Plotting, register
from methods.masks import (apply_masks, check_target_cr, kept_count, layer_counts_for_cr, magnitude_scores,
                           output_rate_problems, read_masks, remove_masks, top_k_mask, warn_empty_layers)
from methods.sparse_training import SparseTrainingHooks, kept_for_density, set_masks


def gmp_schedule(total_steps: int, target_cr: float, initial_sparsity: float, start: float, end: float,
                 interval: int) -> dict[int, float]:
    """{step t: sparsity s_t} for every pruning step (t counts optimizer steps, 1..total_steps)."""
    if total_steps < 1:
        return {}
    final = 1.0 - 1.0 / target_cr
    t0 = min(total_steps, max(1, round(start * total_steps)))
    t_end = min(total_steps, max(t0, round(end * total_steps)))
    n = (t_end - t0) // interval
    if n == 0:
        return {t0: final}
    return {t0 + k * interval: final + (initial_sparsity - final) * (1.0 - k / n) ** 3 for k in range(n + 1)}


class GMPHooks(SparseTrainingHooks):
    """Prunes by magnitude at the scheduled steps; see the module docstring."""

    def __init__(self, target_cr: float, scope: str, initial_sparsity: float, start: float, end: float,
                 interval: int, output_rate: float = 1.0):
        super().__init__()
        self.target_cr, self.scope, self.output_rate = target_cr, scope, output_rate
        self.initial_sparsity, self.start, self.end, self.interval = initial_sparsity, start, end, interval
        self.schedule: dict[int, float] = {}

    def bind(self, optimizer, steps_per_epoch, total_steps):
        super().bind(optimizer, steps_per_epoch, total_steps)
        self.schedule = gmp_schedule(total_steps, self.target_cr, self.initial_sparsity, self.start, self.end,
                                     self.interval)

    def after_step(self, model, step):
        t = step + 1
        if t not in self.schedule:
            return
        sparsity = self.schedule[t]
        final = t == max(self.schedule)
        set_masks(model, self.masks(model, sparsity, final), self.optimizer)
        self.log.append(self.entry(model, t, target_sparsity=sparsity))

    def masks(self, model, sparsity: float, final: bool) -> dict[str, torch.Tensor]:
        """Keep the largest |w| among the weights still kept, to ``sparsity`` (per layer or globally)."""
        current = read_masks(model)
        scores = {name: s.masked_fill(~current[name], -math.inf) for name, s in magnitude_scores(model).items()}

        def count(numel: int, kept_now: int) -> int:  # never more than are kept now: no revival
            wanted = kept_count(numel, self.target_cr) if final else kept_for_density(numel, 1.0 - sparsity)
            return min(wanted, kept_now)

        if self.scope == "layer" and self.output_rate != 1.0:  # the output layer at its own rate
            sizes = [s.numel() for s in scores.values()]
            wanted = layer_counts_for_cr(sizes, self.target_cr, self.output_rate) if final else [
                kept_for_density(n, (1.0 - sparsity) ** (self.output_rate if i == len(sizes) - 1 else 1.0))
                for i, n in enumerate(sizes)]
            keep = {name: top_k_mask(s, min(k, int(current[name].sum())))
                    for (name, s), k in zip(scores.items(), wanted)}
        elif self.scope == "layer":
            keep = {name: top_k_mask(s, count(s.numel(), int(current[name].sum()))) for name, s in scores.items()}
        else:
            names = list(scores)
            flat = torch.cat([scores[n].flatten() for n in names])
            kept_now = sum(int(current[n].sum()) for n in names)
            keep_flat, keep, begin = top_k_mask(flat, count(flat.numel(), kept_now)), {}, 0
            for name in names:
                keep[name] = keep_flat[begin:begin + scores[name].numel()].view(scores[name].shape)
                begin += scores[name].numel()
        if final:
            warn_empty_layers(keep)
        return keep


@register
class GMP(Method):
    """Gradual magnitude pruning during training (Zhu & Gupta 2017), cubic sparsity schedule."""

    name = "gmp"
    family = "during-training"
    plotting = Plotting(order=6, style=(1, 0.6, "s", (0, (3, 1, 1, 1))))
    columns = ("pruning_steps",)

    @dataclass(frozen=True)
    class Params(Method.Params):
        target_cr: float = 10.0  # final sparsity s_f = 1 - 1/target_cr
        scope: Literal["layer", "global"] = "layer"  # the paper: every layer to the same sparsity
        initial_sparsity: float = 0.0  # s_i: training starts dense
        start: float = 0.1  # first pruning step, a fraction of the training steps (ours)
        end: float = 0.75  # last pruning step at or before this fraction (ours)
        interval: int = 100  # dt, optimizer steps between pruning steps (ours)
        #: The output layer's pruning rate / the others' (1: the same, ours; layer scope only).
        output_rate: float = 1.0

        def validate(self):
            problems = check_target_cr(self.target_cr) + output_rate_problems(self.output_rate)
            if self.output_rate != 1.0 and self.scope != "layer":
                problems.append(f"output_rate={self.output_rate} applies to scope=\"layer\" only; global pruning "
                                f"ranks the output layer with the rest")
            final = 1.0 - 1.0 / self.target_cr if not problems else 1.0
            if not 0 <= self.initial_sparsity <= final:
                problems.append(f"initial_sparsity={self.initial_sparsity} must be in [0, {final:g}] (from 0 to "
                                f"the final sparsity 1 - 1/target_cr)")
            if not 0 <= self.start < self.end <= 1:
                problems.append(f"start={self.start}, end={self.end}: need 0 <= start < end <= 1 (fractions of "
                                f"the training steps)")
            if self.interval < 1:
                problems.append(f"interval={self.interval} must be >= 1 (optimizer steps between pruning steps)")
            return problems

    def hooks(self) -> GMPHooks:
        p = self.params
        return GMPHooks(p.target_cr, p.scope, p.initial_sparsity, p.start, p.end, p.interval, p.output_rate)

    @classmethod
    def curve_label(cls, values):
        """``gmp output-rate=0.5`` when the output layer is pruned at another rate."""
        rate = values.get("output_rate")
        return cls.name + (f" output-rate={rate:g}" if rate not in (None, 1.0) and rate == rate else "")

    def prepare(self, ctx: MethodContext):
        """The model (with all-ones masks) and hooks that ``run`` trains."""
        model = ctx.new_model()
        apply_masks(model, {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in prunable_layers(model)})
        return model, self.hooks()

    def run(self, ctx: MethodContext) -> list[dict]:
        model, hooks = self.prepare(ctx)
        history, _ = ctx.train(model, hooks)
        remove_masks(model)
        return [ctx.measure(model, history=history, epochs=ctx.schedule.epochs, scope=self.params.scope,
                            pruning_steps=len(hooks.log), pruning_log=hooks.log)]
