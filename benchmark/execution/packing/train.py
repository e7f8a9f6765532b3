"""Train several models at once, each as ``benchmark.engine.train.train`` would train it alone.

``train_packed`` stacks its jobs' models (``benchmark.execution.packing.model``) and runs the
shared loop once for all of them: each model gets its own batches (the seeded permutation its own
run would draw), its own weight decay per tensor and its own penalty from its hooks, its own
evaluation, history, snapshots and divergence check. The epoch's bookkeeping (running totals,
history entry, checkpoint, divergence error) is ``train``'s own, from ``benchmark.engine.epoch``
and ``benchmark.engine.checkpoints``. Every epoch ends with one checkpoint per job in ``train``'s
format at the job's own path, so a killed pack resumes packed or one model at a time, and
``train`` called afterwards with the same arguments finds the finished checkpoint and returns the
job's history without training a step.

Not bit-identical to ``train``: batched matrix products and grouped convolutions sum in another
order than one model's kernels, and a weight decay that differs between models is added to the
gradients before the fused SGD kernel instead of inside it. In float64 the final weights agree with
``train``'s to ~1e-12 relative (tests/test_packed.py).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from benchmark.core import cell_progress
from benchmark.engine import data as data_mod
from benchmark.engine.epoch import DIVERGENCE_CHECK_STEPS, EpochTotals, divergence, epoch_record
from benchmark.engine.precision import autocast, prepare_input
from benchmark.engine.checkpoints import Checkpoint
from benchmark.engine.devices import tune_cpu_allocator
from benchmark.engine.schedule import Schedule, epoch_steps, lr_factor, step_key
from benchmark.engine.train import TrainHooks, clone_state, make_optimizer
from benchmark.execution.packing.jobs import Job, decays, keep_previous, signature
from benchmark.execution.packing.model import NotStackable, StackedModel


class TrainingPack:
    """The stacked model of the jobs still training, its optimizer, and what differs per job."""

    def __init__(self, jobs: list[Job], schedule: Schedule):
        self.jobs = jobs
        self.schedule = schedule
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
            if all(name in j.momentum for j in jobs):
                self.optimizer.state[params[name]]["momentum_buffer"] = torch.stack([j.momentum[name] for j in jobs])
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
                    self.jobs[i].momentum[name] = buffer[i].detach().clone()


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
            if names[id(p)] in job.momentum:
                optimizer.state[p]["momentum_buffer"] = job.momentum[names[id(p)]]
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
    non-finite (checked where ``train`` checks: every ``DIVERGENCE_CHECK_STEPS`` steps and at the
    end of each epoch) gets ``job.error`` (Diverged, with ``train``'s message) and leaves the pack
    with its last checkpoint; the others go on as a pack without it.
    """
    if not jobs:
        return
    if len({signature(j) for j in jobs}) > 1:
        raise NotStackable("jobs of different signatures cannot train as one pack")
    schedule = jobs[0].schedule
    device = data.train.y.device
    if device.type == "cpu":
        tune_cpu_allocator()
    steps_per_epoch = epoch_steps(len(data.train), schedule.batch_size)
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
        totals = EpochTotals(device, size)
        for step, batches in enumerate(_epoch_batches(data.train, schedule, seeds, epoch, data.spec.augment)):
            x = torch.cat([batches[s][0] for s in slot]) if len(seeds) > 1 else batches[0][0].repeat(
                size, *([1] * (batches[0][0].ndim - 1)))
            y = torch.cat([batches[s][1] for s in slot])
            out, ce, total = pack.step(prepare_input(x, channels_last), y, schedule.lr * factor(epoch * steps_per_epoch + step),
                                       device)
            done_steps = epoch * steps_per_epoch + step + 1
            if any(done_steps in j.snapshot_steps for j in alive):
                pack.sync()
                for job in alive:
                    if done_steps in job.snapshot_steps:
                        job.snapshots[step_key(done_steps)] = clone_state(job.model)
            totals.add(out, ce, y.view(size, -1))
            cell_progress.step_done()
            if step % DIVERGENCE_CHECK_STEPS == 0:
                alive, pack = _without_diverged(total.detach(), epoch, step, alive, pack, totals)
                if not alive:
                    return
                size, slot = len(alive), [seeds.index(j.seed) for j in alive]
        alive, pack = _without_diverged(totals.loss_sum, epoch, steps_per_epoch - 1, alive, pack, totals)
        if not alive:
            return
        pack.sync()
        accs, losses = evaluate_packed(pack.model, data.test, channels_last)
        val_accs, val_losses = evaluate_packed(pack.model, data.val, channels_last) if data.val is not None \
            else ([None] * len(alive), None)
        seconds = (time.perf_counter() - began) / len(alive)
        lr = schedule.lr * factor((epoch + 1) * steps_per_epoch)
        cell_progress.epoch_done(seconds * len(alive))
        for i, job in enumerate(alive):
            job.wall_s += seconds
            held_out = {} if val_losses is None else {"val_acc": val_accs[i], "val_loss": val_losses[i]}
            job.history.append(epoch_record(epoch, totals.means(i), accs[i], losses[i], held_out, lr, seconds,
                                            job.hooks.epoch_metrics(job.model)))
            if epoch + 1 in job.snapshot_epochs:
                job.snapshots[epoch + 1] = clone_state(job.model)
            optimizer_state, scheduler_state = _member_optimizer_state(
                job, schedule, (epoch + 1 - first) * steps_per_epoch, first * steps_per_epoch, factor)
            keep_previous(job.checkpoint)
            Checkpoint(job.model.state_dict(), optimizer_state, scheduler_state, job.history, job.wall_s, epoch + 1,
                       job.snapshots, job.hooks.state_dict()).save(job.checkpoint)


def _without_diverged(losses: torch.Tensor, epoch: int, step: int, alive: list[Job], pack: TrainingPack,
                      totals: EpochTotals) -> tuple[list[Job], TrainingPack | None]:
    """The jobs whose loss (one per job) is finite, and their pack: rebuilt without the others,
    their momentum and epoch totals kept, when some diverged (each of those gets its error)."""
    finite = torch.isfinite(losses).tolist()
    keep = [i for i, ok in enumerate(finite) if ok]
    if len(keep) == len(alive):
        return alive, pack
    for i, ok in enumerate(finite):
        if not ok:
            alive[i].error = divergence(epoch, step, float(losses[i]), pack.schedule.lr)
    if not keep:
        return [], None
    pack.sync(keep)
    jobs = [alive[i] for i in keep]
    totals.keep(keep)
    return jobs, TrainingPack(jobs, pack.schedule)
