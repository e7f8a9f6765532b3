"""Train several models at once, each as ``benchmark.engine.train.train`` would train it alone.

A ``Job`` holds the arguments of one ``train`` call. ``train_packed`` stacks the jobs' models
(``benchmark.engine.packed_model``) and runs the shared loop once for all of them: each model gets its own
batches (the seeded permutation its own run would draw), its own weight decay per tensor and its
own penalty from its hooks, its own evaluation, history, snapshots and divergence check. Every
epoch ends with one checkpoint per job in ``train``'s own format at the job's own path, so a killed
pack resumes packed or one model at a time, and ``train`` called afterwards with the same arguments
finds the finished checkpoint and returns the job's history without training a step.

Not bit-identical to ``train``: batched matrix products and grouped convolutions sum in another
order than one model's kernels, and a weight decay that differs between models is added to the
gradients before the fused SGD kernel instead of inside it. In float64 the final weights agree with
``train``'s to ~1e-12 relative (tests/test_packed.py).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from benchmark.core.files import save_atomic, temporary_name
from benchmark.engine import data as data_mod
from benchmark.engine.packed_model import NotStackable, StackedModel, structure
from benchmark.engine.train import (CHECKPOINT_KEYS, Diverged, Schedule, TrainHooks, clone_state, diverged_message,
                                    autocast, load_state, lr_factor, make_optimizer, prepare_input, step_key,
                                    tune_cpu_allocator)

#: Hook methods a packed job's hooks must leave as ``TrainHooks`` has them: they act on one model
#: between steps or keep state, which a stacked model cannot give them.
_FIXED_HOOKS = ("bind", "after_step", "after_epoch", "state_dict", "load_state_dict")


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
    # filled in by train_packed
    error: Exception | None = None  # Diverged: this model left the pack, the others went on
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    snapshots: dict[int, dict] = field(default_factory=dict)
    start_epoch: int | None = None
    _momentum: dict[str, torch.Tensor] = field(default_factory=dict)


def why_not_packable(job: Job) -> str | None:
    """Why this job must train alone, or None."""
    hooks = type(job.hooks)
    changed = [name for name in _FIXED_HOOKS if getattr(hooks, name) is not getattr(TrainHooks, name)]
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


def previous_checkpoint(checkpoint: Path) -> Path:
    """Where a packed job keeps its checkpoint of the epoch before (see ``resume_together``)."""
    return checkpoint.with_name(checkpoint.name + ".prev")


def _checkpoint_epoch(path: Path) -> int | None:
    state = load_state(path, keys=CHECKPOINT_KEYS, mmap=True)
    return None if state is None else state["epoch"]


def _keep_previous(checkpoint: Path) -> None:
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
        path = next((p for p in (job.checkpoint, previous_checkpoint(job.checkpoint)) if _checkpoint_epoch(p) == epoch),
                    None)
        if path is None and epoch != job.first_epoch:
            raise ValueError(f"{job.checkpoint}: no checkpoint of epoch {epoch} to resume from")
    if path is None or not path.is_file():
        if job.first_epoch in job.snapshot_epochs:
            job.snapshots[job.first_epoch] = clone_state(job.model)
        return
    device = next(job.model.parameters()).device
    state = load_state(path, keys=CHECKPOINT_KEYS, map_location=device)
    if state is None:  # damaged and moved aside: resume as if it had never been written
        return resume(job, epoch)
    job.model.load_state_dict(state["model"])
    optimizer = make_optimizer(job.model, job.schedule, job.hooks)
    optimizer.load_state_dict(state["optimizer"])
    names = {id(p): n for n, p in job.model.named_parameters()}
    job._momentum = {names[id(p)]: s["momentum_buffer"] for p, s in optimizer.state.items() if "momentum_buffer" in s}
    job.history, job.wall_s = list(state["history"]), state["wall_s"]
    job.snapshots, job.start_epoch = state["snapshots"], state["epoch"]
    job.hooks.load_state_dict(state.get("hooks", {}))


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
        groups.setdefault(_stack_key(job), []).append(job)
    for group in groups.values():
        latest = [_checkpoint_epoch(j.checkpoint) for j in group]
        latest = [j.first_epoch if e is None else e for j, e in zip(group, latest)]
        target = min(latest)

        def reaches(job: Job, last: int) -> bool:
            return last == target or (target == job.first_epoch and last == target + 1) or \
                _checkpoint_epoch(previous_checkpoint(job.checkpoint)) == target

        common = all(reaches(j, e) for j, e in zip(group, latest))
        for job in group:
            resume(job, target if common else None)


def _stack_key(job: Job) -> tuple:
    """What jobs must share to train as one model, their epoch aside."""
    return (job.schedule, job.first_epoch, job.channels_last, structure(job.model), tuple(sorted(decays(job))))


def signature(job: Job) -> tuple:
    """Jobs with equal signatures (after ``resume``) train together."""
    return _stack_key(job) + (job.start_epoch,)


class TrainingPack:
    """The stacked model of the jobs still training, its optimizer, and what differs per job."""

    def __init__(self, jobs: list[Job], schedule: Schedule):
        self.jobs = jobs
        self.model = StackedModel([j.model for j in jobs])
        self.model.train()
        params = self.model.parameters_by_name()
        decay = [decays(j) for j in jobs]
        trained = sorted(decay[0])
        self.varying: dict[str, torch.Tensor] = {}  # weight decay that differs per job, added before the step
        by_decay: dict[float, list[nn.Parameter]] = {}
        for name in trained:
            values = [d[name] for d in decay]
            if len(set(values)) == 1:
                by_decay.setdefault(values[0], []).append(params[name])
            else:
                shape = (len(jobs),) + (1,) * (params[name].ndim - 1)
                self.varying[name] = torch.tensor(values, dtype=params[name].dtype, device=params[name].device).view(shape)
                by_decay.setdefault(0.0, []).append(params[name])
        for name, p in params.items():
            if name not in decay[0]:
                p.requires_grad_(False)
        groups = [{"params": ps, "weight_decay": wd} for wd, ps in by_decay.items()]
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params.values())
        self.optimizer = torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum,
                                         nesterov=schedule.nesterov and schedule.momentum > 0, fused=fused)
        for name in trained:
            if all(name in j._momentum for j in jobs):
                self.optimizer.state[params[name]]["momentum_buffer"] = torch.stack([j._momentum[name] for j in jobs])
        self.params = params
        # A job's penalty runs on its own model with the stacked tensors' slices swapped in.
        with torch.no_grad():
            self.penalized = [i for i, j in enumerate(jobs) if j.hooks.penalty(j.model) is not None]
        self.penalties = {i: _Penalty(jobs[i].model, jobs[i].hooks) for i in self.penalized}

    def penalty(self, zero: torch.Tensor) -> torch.Tensor | None:
        """Each job's penalty (``zero`` for jobs without one), or None when no job has one."""
        if not self.penalized:
            return None
        # unbind, not t[i]: its backward stacks the slices' gradients once, where indexing would add
        # a full-size zero tensor per job
        slices = {n: t.unbind(0) for n, t in self.model.tensors.items()}
        values = []
        for i in range(len(self.jobs)):
            if i in self.penalties:
                swapped = {f"model.{n}": t[i] for n, t in slices.items()}
                values.append(torch.func.functional_call(self.penalties[i], swapped, ()))
            else:
                values.append(zero)
        return torch.stack(values)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, device: torch.device):
        """One SGD step of every job. Returns (logits (P, B, C), cross-entropy (P,), total loss (P,))."""
        size = len(self.jobs)
        with autocast(device):
            out = self.model(x)
            ce = F.cross_entropy(out.float(), y, reduction="none").view(size, -1).mean(1)
            extra = self.penalty(ce.new_zeros(()))
            total = ce if extra is None else ce + extra
        self.optimizer.zero_grad(set_to_none=True)
        total.sum().backward()
        with torch.no_grad():
            for name, decay in self.varying.items():
                p = self.params[name]
                if p.grad is not None:
                    p.grad.addcmul_(p, decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return out.view(size, -1, out.shape[-1]), ce, total

    def sync(self, keep: list[int] | None = None) -> None:
        """Each job's model and momentum (of the jobs at ``keep``, default all) take its slice of
        the stacked ones."""
        keep = list(range(len(self.jobs))) if keep is None else keep
        self.model.copy_to({i: self.jobs[i].model for i in keep})
        for name, p in self.params.items():
            buffer = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                for i in keep:
                    self.jobs[i]._momentum[name] = buffer[i].detach().clone()


class _Penalty(nn.Module):
    """``hooks.penalty(model)`` as a module, so ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, hooks: TrainHooks):
        super().__init__()
        self.model = model
        self.hooks = hooks

    def forward(self):
        return self.hooks.penalty(self.model)


@torch.no_grad()
def evaluate_packed(model: StackedModel, split: data_mod.Split, channels_last: bool = False,
                    batch_size: int = 1000) -> tuple[list[float], list[float]]:
    """Per job (accuracy, mean loss) over a whole split, as ``benchmark.engine.train.evaluate`` computes
    them; the split is read in chunks of ``batch_size / P`` examples, so memory stays that of one
    model's evaluation."""
    size = model.size
    was_training = model.training
    model.eval()
    device = split.y.device
    correct = torch.zeros(size, device=device)
    loss = torch.zeros(size, device=device, dtype=torch.float64)
    chunk = max(1, batch_size // size)
    with autocast(device), parametrize.cached():
        for start in range(0, len(split), chunk):
            x, y = split.take(torch.arange(start, min(start + chunk, len(split)), device=device))
            out = model(prepare_input(x.repeat(size, *([1] * (x.ndim - 1))), channels_last)).float()
            out = out.view(size, len(y), -1)
            ce = F.cross_entropy(out.flatten(0, 1), y.repeat(size), reduction="none").view(size, -1)
            loss += ce.sum(1).double()
            correct += (out.argmax(2) == y).sum(1)
    model.train(was_training)
    n = max(len(split), 1)
    return (correct / n).tolist(), (loss / n).tolist()


def _member_optimizer_state(job: Job, schedule: Schedule, steps_done: int, skipped: int, factor) -> tuple[dict, dict]:
    """The optimizer and LR scheduler state dicts ``train`` would have saved for this job."""
    optimizer = make_optimizer(job.model, schedule, job.hooks)
    names = {id(p): n for n, p in job.model.named_parameters()}
    for group in optimizer.param_groups:
        group["initial_lr"] = schedule.lr
        for p in group["params"]:
            if names[id(p)] in job._momentum:
                optimizer.state[p]["momentum_buffer"] = job._momentum[names[id(p)]]
    # Built at step ``steps_done``, the scheduler holds what ``steps_done`` calls of step() leave.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step + skipped),
                                                  last_epoch=steps_done - 1)
    return optimizer.state_dict(), scheduler.state_dict()


def _epoch_batches(split: data_mod.Split, schedule: Schedule, seeds: list[int], epoch: int, augment: bool):
    """Per step, the batches of every distinct seed (each seed's own seeded order, as ``train``)."""
    iterators = [data_mod.batches(split, schedule.batch_size, data_mod.epoch_generator(seed, epoch),
                                  augment_batches=augment) for seed in seeds]
    return zip(*iterators)


def train_packed(jobs: list[Job], data: data_mod.Data) -> None:
    """Train every job's model in place, as ``train`` would with the job's arguments.

    Jobs must have been ``resume``-d and share one ``signature``. A job whose loss becomes
    non-finite (checked where ``train`` checks: every 50 steps and at the end of each epoch) gets
    ``job.error`` (Diverged, with ``train``'s message) and leaves the pack with its last
    checkpoint; the others go on as a pack without it.
    """
    if not jobs:
        return
    if len({signature(j) for j in jobs}) > 1:
        raise NotStackable("jobs of different signatures cannot train as one pack")
    schedule = jobs[0].schedule
    device = data.train.y.device
    if device.type == "cpu":
        tune_cpu_allocator()
    steps_per_epoch = max(1, math.ceil(len(data.train) / schedule.batch_size))
    factor = lr_factor(schedule.warmup_epochs * steps_per_epoch, schedule.epochs * steps_per_epoch)
    first, start = jobs[0].first_epoch, jobs[0].start_epoch
    channels_last = jobs[0].channels_last
    alive = list(jobs)
    pack = TrainingPack(alive, schedule)
    for epoch in range(start, schedule.epochs):
        began = time.perf_counter()
        seeds = sorted({j.seed for j in alive})
        slot = [seeds.index(j.seed) for j in alive]
        size = len(alive)
        loss_sum = torch.zeros(size, device=device)
        correct = torch.zeros(size, device=device)
        seen = 0
        for step, batches in enumerate(_epoch_batches(data.train, schedule, seeds, epoch, data.spec.augment)):
            x = torch.cat([batches[s][0] for s in slot]) if len(seeds) > 1 else batches[0][0].repeat(
                size, *([1] * (batches[0][0].ndim - 1)))
            y = torch.cat([batches[s][1] for s in slot])
            n = len(batches[0][1])
            out, ce, total = pack.step(prepare_input(x, channels_last), y, schedule.lr * factor(epoch * steps_per_epoch + step),
                                       device)
            done_steps = epoch * steps_per_epoch + step + 1
            if any(done_steps in j.snapshot_steps for j in alive):
                pack.sync()
                for job in alive:
                    if done_steps in job.snapshot_steps:
                        job.snapshots[step_key(done_steps)] = clone_state(job.model)
            loss_sum += ce.detach() * n
            correct += (out.detach().argmax(2) == y.view(size, -1)).sum(1)
            seen += n
            if step % 50 == 0:
                bad = _diverged(total.detach(), alive, lambda v: diverged_message(epoch, step, v, schedule))
                if bad:
                    alive, pack, loss_sum, correct = _without(bad, alive, pack, schedule, loss_sum, correct)
                    if not alive:
                        return
                    size, slot = len(alive), [seeds.index(j.seed) for j in alive]
        bad = _diverged(loss_sum, alive, lambda v: diverged_message(epoch, steps_per_epoch - 1, v, schedule))
        if bad:
            alive, pack, loss_sum, correct = _without(bad, alive, pack, schedule, loss_sum, correct)
            if not alive:
                return
        pack.sync()
        accs, losses = evaluate_packed(pack.model, data.test, channels_last)
        val_accs, val_losses = evaluate_packed(pack.model, data.val, channels_last) if data.val is not None \
            else ([None] * len(alive), None)
        seconds = (time.perf_counter() - began) / len(alive)
        lr = schedule.lr * factor((epoch + 1) * steps_per_epoch)
        for i, job in enumerate(alive):
            job.wall_s += seconds
            job.history.append({
                "epoch": epoch + 1, "train_loss": float(loss_sum[i]) / max(seen, 1),
                "train_acc": float(correct[i]) / max(seen, 1), "test_loss": losses[i], "test_acc": accs[i],
                **({} if val_losses is None else {"val_acc": val_accs[i], "val_loss": val_losses[i]}),
                "lr": lr, "seconds": seconds,
            } | job.hooks.epoch_metrics(job.model))
            if epoch + 1 in job.snapshot_epochs:
                job.snapshots[epoch + 1] = clone_state(job.model)
            optimizer_state, scheduler_state = _member_optimizer_state(
                job, schedule, (epoch + 1 - first) * steps_per_epoch, first * steps_per_epoch, factor)
            _keep_previous(job.checkpoint)
            save_atomic({
                "model": job.model.state_dict(), "optimizer": optimizer_state, "scheduler": scheduler_state,
                "history": job.history, "wall_s": job.wall_s, "epoch": epoch + 1, "snapshots": job.snapshots,
                "hooks": job.hooks.state_dict(),
            }, job.checkpoint)


def _diverged(values: torch.Tensor, alive: list[Job], message) -> list[int]:
    """Indices of the jobs whose value is not finite; each gets its Diverged error."""
    finite = torch.isfinite(values).tolist()
    bad = [i for i, ok in enumerate(finite) if not ok]
    for i in bad:
        alive[i].error = Diverged(message(float(values[i])))
    return bad


def _without(bad: list[int], alive: list[Job], pack: TrainingPack, schedule: Schedule, loss_sum, correct):
    """The pack rebuilt from the jobs that did not diverge, their momentum and epoch sums kept."""
    keep = [i for i in range(len(alive)) if i not in bad]
    if not keep:
        return [], None, loss_sum, correct
    pack.sync(keep)
    jobs = [alive[i] for i in keep]
    index = torch.tensor(keep, device=loss_sum.device)
    return jobs, TrainingPack(jobs, schedule), loss_sum[index], correct[index]
