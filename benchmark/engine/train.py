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

import ctypes
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from benchmark.engine import data as data_mod
from benchmark.core import cell_progress
from benchmark.core.files import save_atomic
from benchmark.core.validation import coerce
from benchmark.engine.epoch import DIVERGENCE_CHECK_STEPS, EpochTotals, check_finite, epoch_record
from benchmark.engine.precision import autocast, cpu_compute_dtype, current_cuda_index, prepare_input


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


#: What a training checkpoint holds (``train`` writes it; a packed job's too), besides the hooks' state.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "history", "wall_s", "epoch", "snapshots")


@dataclass
class Checkpoint:
    """One training checkpoint, as ``train`` and a packed run (per model) write it after every
    epoch: one format, so either can resume what the other wrote."""

    model: dict
    optimizer: dict
    scheduler: dict
    history: list[dict]
    wall_s: float
    epoch: int  # epochs done
    snapshots: dict
    hooks: dict = field(default_factory=dict)  # TrainHooks.state_dict(); absent from older checkpoints
    # seconds of the whole cell when it was written (earlier runs before a resume included), so that
    # a resumed cell's wall_s is its whole training time; absent from older checkpoints and packs
    elapsed_s: float | None = None

    def save(self, path: Path) -> None:
        extra = ("hooks",) if self.elapsed_s is None else ("hooks", "elapsed_s")
        save_atomic({name: getattr(self, name) for name in CHECKPOINT_KEYS + extra}, path)

    @classmethod
    def load(cls, path: Path, map_location="cpu", mmap: bool = False) -> Checkpoint | None:
        """The checkpoint at ``path``, or None when there is none (or it was damaged: ``load_state``)."""
        state = load_state(path, keys=CHECKPOINT_KEYS, map_location=map_location, mmap=mmap)
        if state is None:
            return None
        return cls(**{name: state[name] for name in CHECKPOINT_KEYS}, hooks=state.get("hooks", {}),
                   elapsed_s=state.get("elapsed_s"))

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, hooks: TrainHooks,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        """Put the saved weights, optimizer (and scheduler) state and hooks' state back in place."""
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(self.scheduler)
        hooks.load_state_dict(self.hooks)


def previous_checkpoint(checkpoint: Path) -> Path:
    """Where the checkpoint of the epoch before is kept beside ``checkpoint``: a packed run keeps it
    (docs/scaling.md, "Packed training"), and whoever removes a checkpoint removes this one too."""
    return checkpoint.with_name(checkpoint.name + ".prev")


def load_state(path: Path, *, keys: tuple[str, ...], map_location="cpu", mmap: bool = False) -> dict | None:
    """A checkpoint or cache file this tool wrote, or None when there is none. A results folder may be
    shared, so its files are input: they load with ``weights_only=True`` (tensors and plain data, no
    code runs), and one that does not load or lacks ``keys`` is named in a warning, moved aside to
    ``<name>.damaged`` and treated as absent, so its work is redone."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        missing = [k for k in keys if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"it lacks {missing}")
        return state
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many ways; each means the same here
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        warnings.warn(f"{path} cannot be loaded as a file of this tool ({type(exc).__name__}: {reason}); moved to "
                      f"{aside.name} beside it and its work is done again", RuntimeWarning, stacklevel=2)
        return None


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


DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(requested: str | None = None) -> torch.device:
    """cuda > mps > cpu unless a device is named; a named device must exist here (ValueError
    naming it and what this machine has otherwise). A CUDA device always has its index (``auto``
    and ``cuda`` give the current one): ``torch.cuda.set_device``, per-device memory queries and
    the records need it."""
    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps "
                             f"(this machine has: {', '.join(available_devices())})") from None
        if device.type not in DEVICE_TYPES:
            raise ValueError(f"--device {requested!r}: {device.type} devices are not supported; use auto, cpu, "
                             f"cuda, cuda:N or mps (this machine has: {', '.join(available_devices())})")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {requested!r}: CUDA is not available here; use --device cpu "
                                 f"(this machine has: {', '.join(available_devices())})")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"--device {requested!r}: there are only {torch.cuda.device_count()} CUDA device(s) "
                                 f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}) visible here")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"--device {requested!r}: MPS (Apple GPU) is not available here; use --device cpu "
                             f"(this machine has: {', '.join(available_devices())})")
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", current_cuda_index())
        return cpu_device() if device.type == "cpu" else device
    if torch.cuda.is_available():
        return torch.device("cuda", current_cuda_index())
    if _mps_available():
        return torch.device("mps")
    return cpu_device()


def cpu_device() -> torch.device:
    """The CPU, once its training precision is known to work here (``cpu_compute_dtype``: bf16 asked
    of a CPU without bf16 matmul is a ValueError naming the missing feature, before any cell starts)."""
    cpu_compute_dtype()
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def available_devices() -> list[str]:
    """Every device a cell can run on here, e.g. ['cuda:0', 'cuda:1', 'cpu']."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        found.append("mps")
    return found + ["cpu"]


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


#: Set to 1 to leave glibc's allocator settings alone (see ``tune_cpu_allocator``).
NO_ALLOCATOR_TUNING_ENV = "BENCHMARK_NO_MALLOC_TUNING"
_ALLOCATOR_TUNED: list[bool] = []


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the OS every step.

    glibc serves large blocks from fresh mmap pages and trims the heap when much is free, with
    thresholds that move with the allocation history; a CPU training step that frees and
    re-allocates megabyte tensors (DWF's factor products and gradients, activations) can then
    page-fault on all of them again every step. On VGG-16 that made a product of 512x512x3x3
    factors take 8 ms instead of 0.9 ms, in some runs and not others. Fixing both thresholds once per
    process (glibc only; a no-op elsewhere) keeps the pages. Returns whether the settings apply.
    """
    if _ALLOCATOR_TUNED:
        return _ALLOCATOR_TUNED[0]
    applied = False
    if os.environ.get(NO_ALLOCATOR_TUNING_ENV, "") in ("", "0") and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
            m_trim_threshold, m_mmap_threshold = -1, -3
            # 32 MiB is glibc's ceiling for the mmap threshold; larger blocks are mapped regardless.
            applied = bool(mallopt(m_mmap_threshold, 32 * 1024**2)) and bool(mallopt(m_trim_threshold, 512 * 1024**2))
        except (OSError, AttributeError):
            applied = False
    _ALLOCATOR_TUNED.append(applied)
    return applied


#: The cuBLAS setting that makes its matmuls reproducible (NVIDIA's documented choice).
CUBLAS_DETERMINISTIC = ":4096:8"


def make_deterministic(device: torch.device) -> bool:
    """``run --deterministic``: cuDNN and cuBLAS pick reproducible kernels (a GPU run then repeats
    bit for bit, at some cost in speed). GPU-only: CPU training here is deterministic already, and
    a CPU device changes nothing (returns False). Operations without a deterministic CUDA kernel
    (e.g. adaptive average pooling's backward) warn instead of failing the cell. cuBLAS reads its
    setting when it starts, so this runs before the cell's first matmul (a worker's first task)."""
    if device.type != "cuda":
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return True


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


def epoch_steps(examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (the last batch may be smaller)."""
    return max(1, math.ceil(examples / batch_size))


def step_key(steps: int) -> str:
    """How a snapshot after ``steps`` optimizer steps is named (OpenLTH's notation)."""
    return f"{steps}it"


def check_compile(device: torch.device) -> None:
    """Fail early, with the reason, when torch.compile cannot build code for ``device`` here (no C++
    compiler for CPU code, no Triton for GPU code, ...)."""
    try:
        probe = torch.compile(lambda a: (a * 2).sum())
        probe(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 - inductor fails in many ways; say which plainly
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--compile: torch.compile does not work on this machine ({type(exc).__name__}: "
                         f"{first[:300]}); run without --compile") from None


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


def lr_factor(warmup_steps: int, total_steps: int):
    """Per-step learning-rate factor: linear warm-up to 1, then cosine annealing to 0 at the end."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def clone_state(model: nn.Module) -> dict:
    """A copy of the model's weights and buffers (a snapshot), detached from training."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

