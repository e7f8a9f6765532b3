"""One training of a pack (``Job``: the arguments of a ``train`` call), whether it may pack, and where it resumes.

Jobs with equal ``signature`` train together (``benchmark.execution.packing.train``). A packed
job's checkpoint is ``train``'s own (``benchmark.engine.checkpoints.Checkpoint``), at the job's own path,
and the one of the epoch before is kept beside it (``previous_checkpoint``), so a pack killed
between two of its checkpoint writes resumes whole at the earlier epoch (``resume_together``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmark.core.files import temporary_name
from benchmark.engine.checkpoints import Checkpoint, previous_checkpoint
from benchmark.engine.schedule import Schedule
from benchmark.engine.train import TrainHooks, clone_state, make_optimizer
from benchmark.execution.packing.model import NotStackable, structure

#: Hook methods a packed job's hooks must leave as ``TrainHooks`` has them: they act on one model
#: between steps or keep state, which a stacked model cannot give them.
FIXED_HOOKS = ("bind", "after_step", "after_epoch", "state_dict", "load_state_dict")


@dataclass
class Job:
    """One ``train`` call: its arguments, then what training it produced."""

    model: nn.Module
    schedule: Schedule
    seed: int
    checkpoint: Path
    hooks: TrainHooks = field(default_factory=TrainHooks)
    snapshot_epochs: tuple[int, ...] = ()
    first_epoch: int = 0
    channels_last: bool = False
    snapshot_steps: tuple[int, ...] = ()  # as train's: the state after k optimizer steps, keyed step_key(k)
    # filled in by resume and train_packed
    error: Exception | None = None  # Diverged: this model left the pack, the others went on
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    snapshots: dict[int, dict] = field(default_factory=dict)
    start_epoch: int | None = None
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)  # SGD's buffer per trained tensor name


def why_not_packable(job: Job) -> str | None:
    """Why this job must train alone, or None."""
    hooks = type(job.hooks)
    changed = [name for name in FIXED_HOOKS if getattr(hooks, name) is not getattr(TrainHooks, name)]
    if changed:
        return f"its hooks ({hooks.__name__}) act on the model during training ({', '.join(changed)})"
    try:
        decays(job)
    except NotStackable as exc:
        return str(exc)
    return None


def decays(job: Job) -> dict[str, float]:
    """Weight decay per trained tensor name, from the job's hooks' parameter groups."""
    names = {id(p): n for n, p in job.model.named_parameters()}
    decay = {}
    for group in job.hooks.param_groups(job.model, job.schedule):
        extra = sorted(set(group) - {"params", "weight_decay"})
        if extra:
            raise NotStackable(f"its parameter groups set {extra}, which packed training does not vary per model")
        for p in group["params"]:
            decay[names[id(p)]] = float(group.get("weight_decay", 0.0))  # SGD's default, as make_optimizer builds it
    return decay


def checkpoint_epoch(path: Path) -> int | None:
    """The epochs done in the checkpoint at ``path``, or None when there is none."""
    saved = Checkpoint.load(path, mmap=True)
    return None if saved is None else saved.epoch


def keep_previous(checkpoint: Path) -> None:
    """Link the checkpoint about to be replaced as the previous one (a copy where the file system
    has no hard links)."""
    if not checkpoint.is_file():
        return
    previous = previous_checkpoint(checkpoint)
    tmp = temporary_name(previous)
    try:
        os.link(checkpoint, tmp)
    except OSError:
        shutil.copyfile(checkpoint, tmp)
    os.replace(tmp, previous)


def resume(job: Job, epoch: int | None = None) -> None:
    """Load the job's checkpoint if there is one (``train``'s format): weights, momentum, history.

    With ``epoch``, resume at that epoch instead: from the checkpoint or the previous one kept
    beside it, or from the model as built when ``epoch`` is the job's first.
    """
    job.start_epoch = job.first_epoch
    path: Path | None = job.checkpoint
    if epoch is not None:
        path = next((p for p in (job.checkpoint, previous_checkpoint(job.checkpoint)) if checkpoint_epoch(p) == epoch),
                    None)
        if path is None and epoch != job.first_epoch:
            raise ValueError(f"{job.checkpoint}: no checkpoint of epoch {epoch} to resume from")
    if path is None or not path.is_file():
        if job.first_epoch in job.snapshot_epochs:
            job.snapshots[job.first_epoch] = clone_state(job.model)
        return
    device = next(job.model.parameters()).device
    saved = Checkpoint.load(path, map_location=device)
    if saved is None:  # damaged and moved aside: resume as if it had never been written
        return resume(job, epoch)
    optimizer = make_optimizer(job.model, job.schedule, job.hooks)
    saved.restore(job.model, optimizer, job.hooks)
    names = {id(p): n for n, p in job.model.named_parameters()}
    job.momentum = {names[id(p)]: s["momentum_buffer"] for p, s in optimizer.state.items() if "momentum_buffer" in s}
    job.history, job.wall_s = list(saved.history), saved.wall_s
    job.snapshots, job.start_epoch = saved.snapshots, saved.epoch


def resume_together(jobs: list[Job]) -> None:
    """``resume`` every job, those that stack at the latest epoch they all reach.

    A pack writes its jobs' checkpoints one after another, so a kill between two writes leaves
    jobs of one pack an epoch apart. Resumed as they stand they would train apart, in packs of
    another size, whose sums round differently; each job keeps its previous checkpoint, so the
    pack resumes whole at the earlier epoch and ends exactly as it would have uninterrupted. Jobs
    further apart (checkpoints of another packing) resume where they stand.
    """
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(stack_key(job), []).append(job)
    for group in groups.values():
        latest = [checkpoint_epoch(j.checkpoint) for j in group]
        latest = [j.first_epoch if e is None else e for j, e in zip(group, latest)]
        target = min(latest)

        def reaches(job: Job, last: int) -> bool:
            return last == target or (target == job.first_epoch and last == target + 1) or \
                checkpoint_epoch(previous_checkpoint(job.checkpoint)) == target

        common = all(reaches(j, e) for j, e in zip(group, latest))
        for job in group:
            resume(job, target if common else None)


def stack_key(job: Job) -> tuple:
    """What jobs must share to train as one model, their epoch aside."""
    return (job.schedule, job.first_epoch, job.channels_last, structure(job.model), tuple(sorted(decays(job))))


def signature(job: Job) -> tuple:
    """Jobs with equal signatures (after ``resume``) train together."""
    return stack_key(job) + (job.start_epoch,)
