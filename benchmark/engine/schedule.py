"""The training schedule every method of one architecture x dataset shares (docs/design.md, Schedules).

``Schedule`` holds the settings that are part of a cell's id; the rest of this module is what follows
from them alone: the default per architecture family, optimizer steps per epoch, the learning rate
of each step (warm-up, then cosine annealing) and the points along the schedule at which the dense
cache keeps a copy of the weights (lottery-ticket rewind points).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from benchmark.core.validation import coerce


#: Bounds past which a schedule value is a typo that would exhaust the machine, not a setting.
MAX_BATCH_SIZE = 2**17
MAX_EPOCHS = 100_000


@dataclass(frozen=True)
class Schedule:
    """The training pipeline shared by all methods of one architecture x dataset."""

    epochs: int = 10
    lr: float = 0.15
    momentum: float = 0.9
    weight_decay: float = 0.0  # on conv/linear weights of unregularized methods; never on biases/BN
    batch_size: int = 128
    nesterov: bool = False
    warmup_epochs: int = 0  # linear warm-up of the learning rate before the cosine decay
    #: Training examples held out as a validation split (class-stratified, the same examples for every
    #: cell of a dataset whatever its seed: ``benchmark.engine.data.validation_indices``); 0: none, and
    #: all of the training set trains. Settings are chosen on this split, never on the test set.
    validation: int = 0

    def __post_init__(self):
        problems = []
        if self.epochs < 0:
            problems.append(f"epochs={self.epochs} must be >= 0")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum={self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay} must be >= 0")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            problems.append(f"batch_size={self.batch_size} must be in [1, {MAX_BATCH_SIZE}] (larger than any "
                            f"training set here: a typo, and one batch would not fit in memory)")
        if self.epochs > MAX_EPOCHS:
            problems.append(f"epochs={self.epochs} must be <= {MAX_EPOCHS}")
        if not 0 <= self.warmup_epochs <= max(self.epochs, 0):
            problems.append(f"warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs}]")
        if self.validation < 0:
            problems.append(f"validation={self.validation} must be >= 0 (training examples held out; 0: none)")
        if problems:
            raise ValueError("bad schedule: " + "; ".join(problems))

    def config(self) -> dict:
        """The settings that identify this schedule (cell ids, dense-cache keys, records). Options
        added after the first records were written are left out while they have their default, so
        every earlier cell keeps its id."""
        values = asdict(self)
        for name, default in OPT_IN_DEFAULTS.items():
            if values[name] == default:
                del values[name]
        return values

    def replace(self, **changes) -> "Schedule":
        return Schedule(**(asdict(self) | changes))

    def finetune(self, epochs: int, lr: float) -> "Schedule":
        """The schedule for fine-tuning trained weights: same pipeline, no warm-up."""
        return self.replace(epochs=epochs, lr=lr, warmup_epochs=0)

    @classmethod
    def from_dict(cls, values: dict) -> "Schedule":
        """A schedule from (possibly string) values, through the coercer method parameters use:
        integers refuse 2.7 and true, numbers refuse nan and inf. One ValueError lists every
        problem."""
        if not isinstance(values, dict):
            raise ValueError(f"schedule must be a table of settings (e.g. {{ epochs = 20 }}), got {values!r}")
        known = {f.name: f.type for f in fields(cls)}
        problems = []
        unknown = sorted(set(values) - set(known))
        if unknown:
            problems.append(f"unknown schedule key(s) {unknown}; allowed: {sorted(known)}")
        coerced = {}
        for key, value in values.items():
            if key in known:
                try:
                    coerced[key] = coerce(value, _SCHEDULE_TYPES[key], f"schedule {key}")
                except ValueError as exc:
                    problems.append(str(exc))
        if not problems:
            try:
                return cls(**coerced)
            except ValueError as exc:
                problems.append(str(exc))
        raise ValueError("; ".join(problems))


#: Field types of Schedule as classes (its annotations are strings under postponed evaluation).
_SCHEDULE_TYPES = {"epochs": int, "lr": float, "momentum": float, "weight_decay": float, "batch_size": int,
                   "nesterov": bool, "warmup_epochs": int, "validation": int}
#: Schedule settings that are part of a cell's identity only when they differ from these defaults.
OPT_IN_DEFAULTS = {"validation": 0}


#: Default schedules per architecture family (docs/design.md, Schedules). LeNet weight decay and the
#: one-epoch warm-up are ours: LeNet-5 at LR 0.15 with momentum 0.9 diverged within 50 steps for
#: one of three seeds without it.
PAPER_SCHEDULES = {
    "lenet": Schedule(epochs=100, lr=0.15, weight_decay=1e-4, batch_size=128, warmup_epochs=1),
    "vgg": Schedule(epochs=200, lr=0.1, weight_decay=5e-4, batch_size=128),
    "resnet": Schedule(epochs=200, lr=0.2, weight_decay=5e-4, batch_size=128),
}


def default_schedule(arch: str) -> Schedule:
    for prefix, schedule in PAPER_SCHEDULES.items():
        if arch.startswith(prefix):
            return schedule
    return Schedule()


#: Where the dense cache keeps a copy of the weights (lottery-ticket rewind points): after these
#: epochs and after these optimizer steps (keyed ``"500it"``). Every point is one more copy of the
#: model in the cache file and in each per-epoch checkpoint of the dense run (VGG-16: 59 MB each), so
#: the set is small: the epochs ticket papers rewind to and a log-spaced set of early iterations.
REWIND_EPOCHS = (0, 1, 2)
REWIND_ITERATIONS = (100, 500, 2000)
REWIND_POINTS: tuple[int | str, ...] = REWIND_EPOCHS + tuple(f"{k}it" for k in REWIND_ITERATIONS)  # step_key


def epoch_steps(examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (the last batch may be smaller)."""
    return max(1, math.ceil(examples / batch_size))


def step_key(steps: int) -> str:
    """How a snapshot after ``steps`` optimizer steps is named (OpenLTH's notation)."""
    return f"{steps}it"


def lr_factor(warmup_steps: int, total_steps: int):
    """Per-step learning-rate factor: linear warm-up to 1, then cosine annealing to 0 at the end."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
