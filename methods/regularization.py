"""What the regularization methods (DWF, shallow, L1) share: the zero threshold, their common
parameters, the learning-rate override and its calibrated defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmark.engine.sparsity import cr_at, threshold_sensitivity
from benchmark.core.method import Method

#: float32 machine epsilon: the zero threshold of the authors' follow-up work (ours as default).
FLOAT32_EPS = 1.19e-7


#: What a grid or ``--set`` gives ``lr`` to train at the schedule's learning rate (``lr`` None) rather
#: than the calibrated one.
SCHEDULE_LR = "schedule"

#: L1's key in ``CALIBRATED_LR``'s tables (its weights are not factorized: one factor).
L1_DEPTH = 1
#: The learning rates a regularized method trains with where a grid gives no ``lr``, per
#: architecture and depth (DWF's and shallow's depth; L1: ``L1_DEPTH``). Chosen on LeNet-300-100 and
#: LeNet-5 / Fashion-MNIST, 30 epochs (reference/lenet-calibration/README.md; docs/methods.md,
#: "Learning rates of DWF and L1"). Architectures and depths not listed keep the schedule's rate.
CALIBRATED_LR: dict[str, dict[int, float]] = {
    "lenet300": {L1_DEPTH: 0.05, 2: 0.2, 3: 0.5, 4: 0.3},
    "lenet5": {L1_DEPTH: 0.05, 2: 0.2, 3: 0.1, 4: 0.1},
}


def calibrated_lr(arch: str, depth: int) -> dict:
    """``{"lr": rate}`` where ``CALIBRATED_LR`` has one for ``arch`` and ``depth``, else ``{}``."""
    rate = CALIBRATED_LR.get(arch, {}).get(depth)
    return {} if rate is None else {"lr": rate}


@dataclass(frozen=True)
class RegularizerParams(Method.Params):
    lam: float = 1e-4
    threshold: float = FLOAT32_EPS  # |w| below this counts as zero and is set to zero after training
    #: None: the schedule's learning rate. A grid without ``lr`` gets the calibrated rate written
    #: into its cells (``calibrated_lr``); ``lr = "schedule"`` asks for None.
    lr: float | None = field(default=None, metadata={"shown_default": f"calibrated per arch and depth, else "
                                                                       f"the schedule's (docs/methods.md)"})

    def validate(self) -> list[str]:
        problems = []
        if not self.lam >= 0:
            problems.append(f"lam={self.lam} must be >= 0")
        if self.threshold < 0:
            problems.append(f"threshold={self.threshold} must be >= 0")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0, or \"{SCHEDULE_LR}\" for the schedule's learning rate")
        return problems


def schedule_with_lr(schedule, lr: float | None):
    """``schedule`` with the method's own learning rate if it sets one (factorized nets need
    larger rates than dense ones): the schedule DWF and L1 train with."""
    return schedule.replace(lr=lr) if lr else schedule


def settling_metrics(model, threshold: float) -> dict:
    """Per-epoch CR at the zero threshold and at 0.01x / 100x of it (is sparsity settling?)."""
    return {"cr": cr_at(model, threshold), **threshold_sensitivity(model, threshold)}
