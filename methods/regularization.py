"""What the regularization methods (DWF, shallow, L1) share: the zero threshold, their common
parameters, and the learning-rate override."""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.engine.sparsity import cr_at, threshold_sensitivity
from benchmark.core.method import Method

#: float32 machine epsilon: the zero threshold of the authors' follow-up work (ours as default).
FLOAT32_EPS = 1.19e-7


@dataclass(frozen=True)
class RegularizerParams(Method.Params):
    lam: float = 1e-4
    threshold: float = FLOAT32_EPS  # |w| below this counts as zero and is set to zero after training
    lr: float | None = None  # None: the schedule's learning rate

    def validate(self) -> list[str]:
        problems = []
        if not self.lam >= 0:
            problems.append(f"lam={self.lam} must be >= 0")
        if self.threshold < 0:
            problems.append(f"threshold={self.threshold} must be >= 0")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0")
        return problems


def schedule_with_lr(schedule, lr: float | None):
    """``schedule`` with the method's own learning rate if it sets one (factorized nets need
    larger rates than dense ones): the schedule DWF and L1 train with."""
    return schedule.replace(lr=lr) if lr else schedule


def settling_metrics(model, threshold: float) -> dict:
    """Per-epoch CR at the zero threshold and at 0.01x / 100x of it (is sparsity settling?)."""
    return {"cr": cr_at(model, threshold), **threshold_sensitivity(model, threshold)}
