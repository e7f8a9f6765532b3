"""What the regularization methods (DWF, shallow, L1) share: the zero threshold, their common
parameters, and their learning rate (the grid's, else the calibrated default)."""

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
    lr: float | None = None  # None: the calibrated default for the arch and depth (calibrated_lr), set at run time

    def validate(self) -> list[str]:
        problems = []
        if not self.lam >= 0:
            problems.append(f"lam={self.lam} must be >= 0")
        if self.threshold < 0:
            problems.append(f"threshold={self.threshold} must be >= 0")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0")
        return problems


#: Learning rates of the regularized methods where a grid sets none (docs/methods.md, Learning rates):
#: the calibration behind lenet-reference (30 epochs, Fashion-MNIST, best accuracy at λ = 1e-5 among
#: the rates that trained over the whole λ grid), keyed by DWF depth (``None``: L1). LeNet-300-100's
#: rates are the methods' default on every architecture; LeNet-5, where D=3/4 diverged at them, has
#: its own. Deeper factorizations than the table's take its deepest rate.
CALIBRATED_LR: dict[str, dict[int | None, float]] = {
    "default": {2: 0.2, 3: 0.5, 4: 0.3, None: 0.05},
    "lenet5": {2: 0.2, 3: 0.1, 4: 0.1, None: 0.05},
}


def calibrated_lr(arch: str, depth: int | None) -> float:
    """The learning rate a regularized method trains with when its grid sets none."""
    rates = CALIBRATED_LR.get(arch, CALIBRATED_LR["default"])
    if depth is None:
        return rates[None]
    deepest = max(d for d in rates if d is not None)
    return rates[min(max(depth, 2), deepest)]


def schedule_with_lr(schedule, lr: float | None, arch: str, depth: int | None = None):
    """``schedule`` at the method's own learning rate (factorized nets need larger rates than dense
    ones): the grid's ``lr``, else the calibrated one. It is resolved here, at run time, and never in
    the cell's config, so cells that leave ``lr`` out keep their ids; each record's ``lr`` column says
    the rate it trained at."""
    return schedule.replace(lr=lr if lr is not None else calibrated_lr(arch, depth))


def settling_metrics(model, threshold: float) -> dict:
    """Per-epoch CR at the zero threshold and at 0.01x / 100x of it (is sparsity settling?)."""
    return {"cr": cr_at(model, threshold), **threshold_sensitivity(model, threshold)}
