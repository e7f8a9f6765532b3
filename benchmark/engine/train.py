"""One training loop for every method: SGD with momentum, cosine annealing, per-epoch evaluation.

Methods never edit this loop; they act through ``TrainHooks`` (parameter groups, an extra loss
term, and calls after each step and epoch, with the step number and the optimizer). Each epoch ends
with an atomic checkpoint that also holds the hooks' own state, and a run that finds its checkpoint
continues from it: batches depend only on (seed, epoch), so a resumed run ends with the same weights
as an uninterrupted one.

Evaluation uses the official test split, and the validation split when the schedule holds one out
(``Schedule.validation``): settings are chosen on it, never on the test split. There is no
early stopping: the reported model is the one after the last epoch.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from benchmark.engine import data as data_mod
from benchmark.core import cell_progress
from benchmark.engine.checkpoints import Checkpoint
from benchmark.engine.devices import flush_cpu_denormals, tune_cpu_allocator
from benchmark.engine.epoch import DIVERGENCE_CHECK_STEPS, EpochTotals, check_finite, epoch_record
from benchmark.engine.precision import autocast, prepare_input
from benchmark.engine.schedule import Schedule, epoch_steps, lr_factor, step_key


class TrainHooks:
    """What a method may change in training. The defaults train a plain dense model.

    Call order in ``train``: ``param_groups`` (building the optimizer), ``bind``, then, when a
    checkpoint is found, ``load_state_dict`` with what ``state_dict`` returned when it was written;
    per step ``penalty`` and ``after_step``; per epoch ``after_epoch``, evaluation, ``epoch_metrics``
    and the checkpoint (which stores ``state_dict()``). A hook whose decisions depend on anything
    besides the model, the optimizer and the step number must keep it in ``state_dict``, or a resumed
    run would differ from an uninterrupted one.
    """

    def bind(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int) -> None:
        """Called once per ``train`` call, after the optimizer is built and before any step or
        checkpoint restore. ``total_steps`` counts the whole schedule (``epochs * steps_per_epoch``),
        also when the run joins it part-way (``first_epoch``)."""

    def param_groups(self, model: nn.Module, schedule: Schedule) -> list[dict]:
        """Weight decay on conv/linear weights only; biases and BatchNorm are undecayed."""
        decay, plain = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            is_weight = name.endswith("weight") or name.endswith("parametrizations.weight.original")  # masked
            (decay if is_weight and p.ndim > 1 else plain).append(p)
        groups = [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term added to the mean cross-entropy of each batch."""
        return None

    def after_step(self, model: nn.Module, step: int | None) -> None:
        """After the optimizer step ``step`` (0-based over the whole schedule: epoch * steps_per_epoch
        + batch index, so a resumed or rewound run counts on where it joined). The parameters still
        hold this step's gradients. ``step`` is None outside ``train`` (the speed benchmarks)."""

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        pass

    def epoch_metrics(self, model: nn.Module) -> dict:
        """Extra numbers for this epoch's history entry (a method's per-epoch trajectory)."""
        return {}

    def state_dict(self) -> dict:
        """The hook's own state, saved in every per-epoch checkpoint (tensors, numbers, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (an empty dict for checkpoints written without it)."""


def make_optimizer(model: nn.Module, schedule: Schedule, hooks: TrainHooks | None = None) -> torch.optim.SGD:
    """SGD over the hooks' parameter groups, on the fused kernel where torch has one.

    On CPU torch's default is the per-tensor loop (its multi-tensor path is CUDA-only); the fused
    kernel updates each tensor in one pass, which matters most for DWF's D copies of every weight.
    Same seed still gives the same weights; only the order of float operations differs from the loop.
    """
    groups = (hooks or TrainHooks()).param_groups(model, schedule)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum,
                           nesterov=schedule.nesterov and schedule.momentum > 0, fused=fused)


@torch.no_grad()
def evaluate(model: nn.Module, split: data_mod.Split, batch_size: int = 1000, channels_last: bool = False) -> tuple[float, float]:
    """(accuracy, mean loss) over a whole split."""
    was_training = model.training
    model.eval()
    device = split.y.device
    correct = torch.zeros((), device=device)
    loss = torch.zeros((), device=device, dtype=torch.float64)
    # cached(): a parametrized (factorized, masked) weight is computed once for the whole split.
    with autocast(device), parametrize.cached():
        for start in range(0, len(split), batch_size):
            x, y = split.take(torch.arange(start, min(start + batch_size, len(split)), device=device))
            out = model(prepare_input(x, channels_last)).float()
            loss += nn.functional.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = max(len(split), 1)
    return float(correct) / n, float(loss) / n


def validation_metrics(model: nn.Module, data: data_mod.Data, channels_last: bool = False) -> dict:
    """``val_acc`` and ``val_loss`` on the held-out split, or nothing when there is none."""
    if data.val is None:
        return {}
    acc, loss = evaluate(model, data.val, channels_last=channels_last)
    return {"val_acc": acc, "val_loss": loss}


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    resumed_from: int = 0

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def progress_bar(total: int, desc: str, enabled: bool | None):
    from benchmark.core.progress import bar_class

    tqdm = bar_class()
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def train(
    model: nn.Module,
    data: data_mod.Data,
    schedule: Schedule,
    *,
    seed: int,
    hooks: TrainHooks | None = None,
    checkpoint: Path | None = None,
    progress: bool | None = None,
    desc: str = "train",
    channels_last: bool = False,
    snapshot_epochs: tuple[int, ...] = (),
    snapshot_steps: tuple[int, ...] = (),
    first_epoch: int = 0,
    first_batch: int = 0,
    constant_lr: bool = False,
    compiled: bool = False,
) -> tuple[History, dict[int | str, dict]]:
    """Train ``model`` in place on ``data`` (already on the model's device).

    Returns the history and the snapshots asked for (used for lottery-ticket rewinding): for each
    epoch in ``snapshot_epochs`` (0 = before training) a copy of the model's state at the end of
    that epoch, under the epoch; for each k in ``snapshot_steps`` the state after k optimizer steps,
    under ``step_key(k)`` (``"500it"``). Taking them only copies, so the trajectory is unchanged.
    ``first_epoch`` > 0 or ``first_batch`` > 0 joins the schedule part-way, after
    ``first_epoch * steps_per_epoch + first_batch`` steps, as a run rewound to that point does: the
    learning rate and the batch order are those of a run that had trained the earlier steps (the
    batches of the joined epoch before ``first_batch`` are drawn and skipped), with a fresh
    optimizer state. ``constant_lr`` keeps the learning rate at ``schedule.lr`` throughout
    (fine-tuning) instead of warm-up and cosine annealing.
    ``compiled`` runs the training forward (and its backward) through ``torch.compile``; evaluation
    stays eager. Same model and parameters, so checkpoints and resume are unchanged.
    """
    steps_per_epoch = epoch_steps(len(data.train), schedule.batch_size)
    if not 0 <= first_epoch <= schedule.epochs:
        raise ValueError(f"first_epoch={first_epoch} must be in [0, epochs={schedule.epochs}]")
    if not 0 <= first_batch < steps_per_epoch or (first_batch and first_epoch == schedule.epochs):
        raise ValueError(f"first_batch={first_batch} must be in [0, {steps_per_epoch}) (the steps of one epoch), "
                         f"and 0 when first_epoch is the end of the schedule")
    hooks = hooks or TrainHooks()
    device = data.train.y.device
    if device.type == "cpu":
        tune_cpu_allocator()
        flush_cpu_denormals()
    optimizer = make_optimizer(model, schedule, hooks)
    hooks.bind(optimizer, steps_per_epoch, schedule.epochs * steps_per_epoch)
    factor = (lambda step: 1.0) if constant_lr else lr_factor(schedule.warmup_epochs * steps_per_epoch,
                                                              schedule.epochs * steps_per_epoch)
    skipped_steps = first_epoch * steps_per_epoch + first_batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step + skipped_steps))
    history = History()
    snapshots: dict[int | str, dict] = {}
    start_epoch = first_epoch
    saved = Checkpoint.load(checkpoint, map_location=device) if checkpoint is not None else None
    if saved is not None:
        saved.restore(model, optimizer, hooks, scheduler)
        history = History(saved.history, saved.wall_s, resumed_from=saved.epoch)
        snapshots = saved.snapshots
        start_epoch = saved.epoch
        cell_progress.note_resumed(saved.elapsed_s)
        cell_progress.epochs_resumed(saved.epoch - first_epoch)
    if start_epoch == first_epoch and first_batch == 0 and first_epoch in snapshot_epochs:
        snapshots[first_epoch] = clone_state(model)

    forward = torch.compile(model) if compiled else None
    model.train()
    bar = progress_bar(schedule.epochs - first_epoch, desc, progress)
    bar.update(start_epoch - first_epoch)
    try:
        for epoch in range(start_epoch, schedule.epochs):
            began = time.perf_counter()
            gen = data_mod.epoch_generator(seed, epoch)
            totals = EpochTotals(device)
            skip = first_batch if epoch == first_epoch else 0
            for step, (x, y) in enumerate(data_mod.batches(
                data.train, schedule.batch_size, gen, augment_batches=data.spec.augment,
            )):
                if step < skip:
                    continue
                global_step = epoch * steps_per_epoch + step
                out, loss, total = training_step(model, prepare_input(x, channels_last), y, optimizer, hooks, device,
                                                 forward, step=global_step)
                scheduler.step()
                if global_step + 1 in snapshot_steps:
                    snapshots[step_key(global_step + 1)] = clone_state(model)
                totals.add(out, loss, y)
                if step % DIVERGENCE_CHECK_STEPS == 0:
                    check_finite(total.detach(), epoch, step, schedule.lr)
                cell_progress.step_done()
            check_finite(totals.loss_sum, epoch, steps_per_epoch - 1, schedule.lr)
            hooks.after_epoch(model, epoch)
            test_acc, test_loss = evaluate(model, data.test, channels_last=channels_last)
            held_out = validation_metrics(model, data, channels_last)
            seconds = time.perf_counter() - began
            history.wall_s += seconds
            history.epochs.append(epoch_record(epoch, totals.means(), test_acc, test_loss, held_out,
                                               optimizer.param_groups[0]["lr"], seconds, hooks.epoch_metrics(model)))
            if epoch + 1 in snapshot_epochs:
                snapshots[epoch + 1] = clone_state(model)
            if checkpoint is not None:
                Checkpoint(model.state_dict(), optimizer.state_dict(), scheduler.state_dict(), history.epochs,
                           history.wall_s, epoch + 1, snapshots, hooks.state_dict(),
                           cell_progress.elapsed_s()).save(checkpoint)
            cell_progress.epoch_done(seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{history.final['train_loss']:.3f}", test_acc=f"{test_acc:.4f}")
    finally:
        bar.close()
    return history, snapshots


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                  hooks: TrainHooks, device: torch.device, forward=None, step: int | None = None):
    """One SGD step (the only place the loss is formed): mean cross-entropy plus the method's
    penalty, under bf16 autocast on CUDA GPUs with native bf16 (``autocast``). ``forward`` may be a compiled model; ``step`` is passed to
    ``hooks.after_step``. Returns (logits, cross-entropy, total loss)."""
    with autocast(device):
        out = (model if forward is None else forward)(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        extra = hooks.penalty(model)
        total = loss if extra is None else loss + extra
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    hooks.after_step(model, step)
    return out, loss, total


def clone_state(model: nn.Module) -> dict:
    """A copy of the model's weights and buffers (a snapshot), detached from training."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
