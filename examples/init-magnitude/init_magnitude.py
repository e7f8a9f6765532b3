"""Magnitude pruning at initialization: keep the largest initial weights, train with the mask held.

A dwf-bench method shipped as its own package (docs/extending.md walks through it): the entry
point in pyproject.toml names ``InitMagnitude``, and the benchmark finds it once installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.core.context import MethodContext
from benchmark.core.method import Method, Plotting
from methods.masks import apply_masks, magnitude_scores, masks_from_scores, remove_masks


class InitMagnitude(Method):
    """Keep the largest |w| of the fresh model (global), then train with the mask held."""

    name = "init-magnitude"
    family = "at-init"
    # After the built-in methods in legends and tables; (palette slot, darkening, marker, line style).
    plotting = Plotting(order=20, style=(0, 0.5, "o", ":"))

    @dataclass(frozen=True)
    class Params(Method.Params):
        target_cr: float = 10.0

        def validate(self):
            return [] if self.target_cr >= 1 else [f"target_cr={self.target_cr} must be >= 1"]

    def run(self, ctx: MethodContext) -> list[dict]:
        model = ctx.new_model()
        apply_masks(model, masks_from_scores(magnitude_scores(model), self.params.target_cr, "global"))
        history, _ = ctx.train(model)
        remove_masks(model)
        return [ctx.measure(model, history=history)]
