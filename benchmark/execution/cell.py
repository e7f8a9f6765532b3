"""A cell: one method x architecture x dataset x parameters x seed, and everything it needs to run.

``Cell`` is the canonical, hashable config; ``Context`` gives a method data, models, the shared
training loop, a dense-training cache and the metrics; ``run_cell`` turns a cell into result
records. The runner, the CLI's ``cell`` command and the tests all go through ``run_cell``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import socket
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmark.engine import data as data_mod
from benchmark.engine import models, sparsity
from benchmark.core.errors import StorageError, is_disk_error
from benchmark.core.provenance import cpu_model, source_commit
from benchmark.core import cell_progress
from benchmark.core.files import save_atomic
from benchmark.core.validation import coerce
from benchmark.engine import precision
from benchmark.engine import schedule as schedule_mod
from benchmark.engine.epoch import Diverged
from benchmark.engine.checkpoints import load_state, previous_checkpoint
from benchmark.engine.devices import flush_cpu_denormals, make_deterministic, pick_device
from benchmark.engine.schedule import Schedule, default_schedule, epoch_steps
from benchmark.engine.train import History, TrainHooks, evaluate, train, validation_metrics
from benchmark.core import method as method_base

#: Seeds go to torch and numpy generators; numpy's take 32 bits.
MAX_SEED = 2**32 - 1


@functools.lru_cache(maxsize=None)
def prunable_layer_sizes(arch: str, dataset: str) -> tuple[int, ...]:
    """Weights of each conv / linear layer of ``arch`` on ``dataset``, in model order, the output
    layer last (built on the meta device: no memory, ~ms)."""
    spec = data_mod.get_spec(dataset)
    with torch.device("meta"):
        model = models.build(arch, spec.shape, spec.num_classes)
    return tuple(module.weight.numel() for _, module in sparsity.prunable_layers(model))


def prunable_weights(arch: str, dataset: str) -> int:
    """Conv + linear weights of ``arch`` on ``dataset``."""
    return sum(prunable_layer_sizes(arch, dataset))


def capacity_problems(method: str, params, arch: str, dataset: str, schedule: Schedule | None = None) -> list[str]:
    """Settings the model cannot hold: a target compression beyond its number of prunable weights
    (it would keep less than one weight), and what the method's own ``capacity_problems(layer
    sizes)`` finds, if it has one."""
    own_schedule = getattr(params, "schedule_problems", None)
    timing = [f"{method}.{problem}" for problem in own_schedule(schedule)] if own_schedule and schedule else []
    target = getattr(params, "target_cr", None)
    if target is None or arch not in models.MODELS or dataset not in data_mod.DATASETS:
        return timing
    n = prunable_weights(arch, dataset)
    if target > n:
        return timing + [f"{method}.target_cr={target:g} is beyond what {arch} on {dataset} can be compressed to: it has "
                f"{n:,} prunable weights, so target_cr must be <= {n} (keeping at least one weight)"]
    own = getattr(params, "capacity_problems", None)
    return timing + ([f"{method}.{problem} ({arch} on {dataset})" for problem in own(prunable_layer_sizes(arch, dataset))]
                     if own else [])


def check_seed(seed, where: str = "seed") -> int:
    """A seed as an integer in [0, 2^32 - 1], or ValueError naming it."""
    value = coerce(seed, int, where)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{where}={value} is out of range: seeds are integers in [0, {MAX_SEED}] (2^32 - 1)")
    return value


def check_subset(subset, where: str = "subset") -> int | None:
    if subset is None:
        return None
    value = coerce(subset, int, where)
    if value < 1:
        raise ValueError(f"{where}={subset!r} must be a positive number of examples")
    return value


@dataclass(frozen=True)
class Cell:
    method: str
    arch: str
    dataset: str
    seed: int = 0
    params: dict = field(default_factory=dict)  # the method's parameters that differ from defaults
    schedule: Schedule = field(default_factory=Schedule)
    subset: int | None = None  # keep the first N examples of each split (tiny grids, tests)

    @classmethod
    def make(cls, method: str, arch: str, dataset: str, seed: int = 0, params: dict | None = None,
             schedule: Schedule | dict | None = None, subset: int | None = None) -> "Cell":
        """Validate everything and build the canonical cell (one ValueError naming every problem)."""
        method_cls = method_base.get_method(method)
        problems = []
        if arch not in models.MODELS:
            problems.append(f"unknown architecture {arch!r}; choose one of: {', '.join(models.MODELS)}")
        try:
            data_mod.get_spec(dataset)
        except ValueError as exc:
            problems.append(str(exc))
        checked = None
        try:
            checked = method_base.make_params(method_cls, params or {})
        except ValueError as exc:
            problems.append(str(exc))
        if schedule is None:
            schedule = default_schedule(arch)
        elif isinstance(schedule, dict):
            try:
                schedule = Schedule.from_dict({**asdict(default_schedule(arch)), **schedule})
            except ValueError as exc:
                problems.append(str(exc))
        for check, value, name in ((check_seed, seed, "seed"), (check_subset, subset, "subset")):
            try:
                check(value, name)
            except ValueError as exc:
                problems.append(str(exc))
        if checked is not None:
            problems += capacity_problems(method, checked, arch, dataset,
                                          schedule if isinstance(schedule, Schedule) else None)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(method, arch, dataset, check_seed(seed), method_base.non_default(checked), schedule,
                   check_subset(subset))

    @classmethod
    def trusted(cls, method: str, arch: str, dataset: str, seed: int, params: dict, schedule: Schedule,
                subset: int | None, checked_params, cell_id_: str) -> "Cell":
        """A cell from parts that were validated already (a grid builds 100,000 of them): no checks,
        and the dataclass's per-field frozen assignment skipped."""
        cell = object.__new__(cls)
        cell.__dict__.update(method=method, arch=arch, dataset=dataset, seed=seed, params=params, schedule=schedule,
                             subset=subset, method_params=checked_params, id=cell_id_)
        return cell

    @functools.cached_property
    def method_params(self) -> method_base.Method.Params:
        return method_base.make_params(self.method, self.params)

    def config(self) -> dict:
        return {"method": self.method, "arch": self.arch, "dataset": self.dataset, "seed": self.seed,
                "params": dict(sorted(self.params.items())), "schedule": dict(_schedule_config(self.schedule)),
                "subset": self.subset}

    @functools.cached_property
    def id(self) -> str:
        return cell_id(self.method, self.arch, self.dataset, canonical_json(self.params), self.schedule, self.seed,
                       self.subset)

    @classmethod
    def from_config(cls, config: dict) -> "Cell":
        return cls.make(config["method"], config["arch"], config["dataset"], config.get("seed", 0),
                        config.get("params"), config.get("schedule"), config.get("subset"))

    def label(self) -> str:
        """Human-readable name for logs and listings, e.g. ``dwf D=3 [lam=0.001] lenet300/fashion-mnist seed=0``:
        the parameters the cell sets and its place on the curve (``method_base.SWEEP_PARAMETERS``) even
        where that is the default (``snip [target_cr=10.0]``, not ``snip []``)."""
        values = asdict(self.method_params)
        name = method_base.get_method(self.method).curve_label(values)
        shown = {k: v for k, v in values.items() if k in method_base.SWEEP_PARAMETERS} | dict(self.params)
        extra = ",".join(f"{k}={v}" for k, v in sorted(shown.items()) if str(v) not in name)
        return f"{name} [{extra}] {self.arch}/{self.dataset} seed={self.seed}" if extra else \
            f"{name} {self.arch}/{self.dataset} seed={self.seed}"


@functools.lru_cache(maxsize=1024)
def _schedule_config(schedule: Schedule) -> dict:
    return schedule.config()


@functools.lru_cache(maxsize=1024)
def _schedule_json(schedule: Schedule) -> str:
    return canonical_json(_schedule_config(schedule))


@functools.lru_cache(maxsize=1024)
def _canonical_name(name: str) -> str:
    return canonical_json(name)


def _scalar_json(value) -> str:
    if value is None:
        return "null"
    if type(value) is int:
        return str(value)
    return canonical_json(value)


def cell_id(method: str, arch: str, dataset: str, params_json: str, schedule: Schedule | str, seed: int,
            subset: int | None) -> str:
    """``config_hash(cell.config())``, built from canonical pieces (a grid's cells share their
    schedule's, and its seeds share their parameters'), so a 100,000-cell grid lists in seconds.
    ``schedule`` may be given as its canonical JSON already. Same string, same id:
    tests/test_reliability.py checks it against ``config_hash``."""
    schedule_json = schedule if isinstance(schedule, str) else _schedule_json(schedule)
    text = (f'{{"arch":{_canonical_name(arch)},"dataset":{_canonical_name(dataset)},'
            f'"method":{_canonical_name(method)},"params":{params_json},'
            f'"schedule":{schedule_json},"seed":{_scalar_json(seed)},"subset":{_scalar_json(subset)}}}')
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def dense_key(cell: Cell, device: torch.device | str | None = None) -> str:
    """Name of the cached dense training a cell shares (``<cache>/dense-<key>.pt``). A GPU's dense
    training (bf16, other kernels) is not the CPU's, so the key names the device kind, except for
    the CPU (and no device), whose keys stay what they were before GPUs were told apart."""
    kind = torch.device(device).type if device is not None else "cpu"
    config = {"arch": cell.arch, "dataset": cell.dataset, "seed": cell.seed,
              "schedule": cell.schedule.config(), "subset": cell.subset, "v": 1}
    if kind == "cpu" and precision.cpu_compute_dtype() != torch.float32:  # a bf16 CPU run ($BENCHMARK_CPU_DTYPE)
        config |= {"dtype": str(precision.cpu_compute_dtype()).removeprefix("torch.")}
    return config_hash(config if kind == "cpu" else config | {"device": kind})


def uses_channels_last(device: torch.device, arch: str) -> bool:
    """Convolutional models train channels-last on CUDA and, unless $BENCHMARK_CPU_MEMORY_FORMAT says
    contiguous, on the CPU (``benchmark.engine.precision.uses_channels_last``)."""
    return precision.uses_channels_last(device, arch)


def device_columns(device: torch.device, arch: str) -> dict:
    """What a record says about how it was computed: the precision and memory layout of its training
    (``compute_dtype``, ``memory_format``: the rules of benchmark.engine.precision, as they held in
    the process that trained it) and, on a GPU, its name and CUDA and cuDNN versions."""
    layout = {"compute_dtype": str(precision.training_dtype(device)).removeprefix("torch."),
              "memory_format": precision.memory_format_name(device, arch)}
    if device.type != "cuda":
        return layout
    index = device.index if device.index is not None else precision.current_cuda_index()
    return layout | {"gpu": torch.cuda.get_device_name(index), "cuda_version": torch.version.cuda,
                     "cudnn_version": torch.backends.cudnn.version()}


#: What a dense-cache file holds (``Context._train_dense``).
DENSE_KEYS = ("model", "history", "wall_s", "snapshots", "test_acc")


@dataclass
class DenseModel:
    model: nn.Module
    history: list[dict]
    wall_s: float
    snapshots: dict[int | str, dict]  # by epoch, or by step as "500it" (CPU)
    test_acc: float


class Context:
    """What a method may use: it provides every member of ``benchmark.core.context.MethodContext``,
    the contract methods are written against (tests/test_plugins.py checks it). Everything here is
    deterministic given the cell's seed."""

    def __init__(self, cell: Cell, data: data_mod.Data, device: torch.device, work_dir: Path,
                 cache_dir: Path, progress: bool | None = None, compiled: bool = False,
                 stall_s: float = cell_progress.DEFAULT_STALL_S):
        self.cell = cell
        self.data = data
        self.device = device
        self.work_dir = Path(work_dir)
        self.cache_dir = Path(cache_dir)
        self.progress = progress
        self.compiled = compiled  # torch.compile the training forward (a speed option, not part of the cell)
        self.stall_s = stall_s  # how long ``dense`` waits on a lock holder that makes no progress
        self.channels_last = uses_channels_last(device, cell.arch)
        self.trained_epochs = 0

    @property
    def schedule(self) -> Schedule:
        return self.cell.schedule

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.data.spec.shape

    def new_model(self, seed: int | None = None) -> nn.Module:
        model = models.build(self.cell.arch, self.input_shape, self.data.spec.num_classes,
                             self.cell.seed if seed is None else seed).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def train(self, model: nn.Module, hooks: TrainHooks | None = None, phase: str = "train",
              schedule: Schedule | None = None, snapshot_epochs: tuple[int, ...] = (),
              first_epoch: int = 0, first_batch: int = 0, constant_lr: bool = False) -> tuple[History, dict]:
        """The shared loop, checkpointed under this cell's work dir as ``<phase>.ckpt``."""
        schedule = schedule or self.schedule
        self.work_dir.mkdir(parents=True, exist_ok=True)
        history, snaps = train(model, self.data, schedule, seed=self.cell.seed, hooks=hooks,
                               checkpoint=self.work_dir / f"{phase}.ckpt", progress=self.progress,
                               desc=f"{self.cell.method}:{phase}", channels_last=self.channels_last,
                               snapshot_epochs=snapshot_epochs, first_epoch=first_epoch, first_batch=first_batch,
                               constant_lr=constant_lr, compiled=self.compiled)
        self.trained_epochs += schedule.epochs - first_epoch
        if first_batch:  # joined mid-epoch: a fraction of an epoch less
            self.trained_epochs -= first_batch / self.steps_per_epoch(schedule)
        return history, snaps

    def steps_per_epoch(self, schedule: Schedule | None = None) -> int:
        return epoch_steps(len(self.data.train), (schedule or self.schedule).batch_size)

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.data.test, channels_last=self.channels_last)

    def dense_key(self) -> str:
        return dense_key(self.cell, self.device)

    def dense(self, snapshot: int | str | None = None) -> DenseModel:
        """The dense model of this arch x dataset x schedule x seed, trained once and cached, with its
        snapshots at the ``schedule_mod.REWIND_POINTS`` the run reached (memory-mapped on the CPU: a
        cell reads only the one it rewinds to).

        Concurrent cells on one machine wait on a file lock instead of training it twice. A cache
        file written before ``snapshot`` was one of the points kept (older versions kept epochs 0-2
        only) is trained again and replaced, once the new run has reproduced its final weights bit
        for bit: the cells that used the old file and the ones that rewind into the new one then
        share one dense run.
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        key = self.dense_key()
        final = self.cache_dir / f"dense-{key}.pt"
        # a frozen holder of the lock does not block this cell for ever: past the stall limit it trains
        # the (deterministic, atomically written) dense model itself (docs/design.md, "Progress and liveness")
        with cell_progress.watched_lock(self.cache_dir / f"dense-{key}.lock", warn=_warn, stall_s=self.stall_s):
            cached = load_state(final, keys=DENSE_KEYS, mmap=True)
            kept = cached.get("snapshot_points", schedule_mod.REWIND_EPOCHS) if cached is not None else ()
            if cached is None or (snapshot is not None and snapshot not in kept):
                fresh = self._train_dense(key)
                if cached is not None and not _same_state(cached["model"], fresh["model"]):
                    raise RuntimeError(
                        f"the dense cache {final} keeps no snapshot at {snapshot!r} (an older version wrote it), and "
                        f"training it again here did not reproduce its weights (another torch build, thread count or "
                        f"device?). Delete it to train the dense model afresh for every cell that uses it")
                save_atomic(fresh, final)
                progress_file = self.cache_dir / f"dense-{key}.ckpt"
                progress_file.unlink(missing_ok=True)
                previous_checkpoint(progress_file).unlink(missing_ok=True)  # kept there when a pack trained it
                cached = load_state(final, keys=DENSE_KEYS, mmap=True)
                if cached is None:
                    raise RuntimeError(f"the dense cache {final} just written cannot be read back")
        model = self.new_model()
        model.load_state_dict(cached["model"])
        return DenseModel(model, cached["history"], cached["wall_s"], cached["snapshots"], cached["test_acc"])

    def _train_dense(self, key: str) -> dict:
        model = self.new_model()
        history, snaps = train(model, self.data, self.schedule, seed=self.cell.seed,
                               checkpoint=self.cache_dir / f"dense-{key}.ckpt", progress=self.progress,
                               desc="dense", channels_last=self.channels_last, snapshot_epochs=schedule_mod.REWIND_EPOCHS,
                               snapshot_steps=schedule_mod.REWIND_ITERATIONS, compiled=self.compiled)
        acc, _ = self.evaluate(model)
        return {"model": model.state_dict(), "history": history.epochs, "wall_s": history.wall_s,
                "snapshots": snaps, "snapshot_points": list(schedule_mod.REWIND_POINTS), "test_acc": acc,
                "config": self.cell.config()}

    def measure(self, model: nn.Module, threshold: float = 0.0, history: History | list | None = None,
                **extra) -> dict:
        """Evaluate and measure ``model`` as it stands; ``extra`` is added to the record."""
        acc, loss = self.evaluate(model)
        record = {"test_acc": acc, "test_loss": loss} | validation_metrics(model, self.data, self.channels_last)
        record.update(sparsity.summarize(model, self.input_shape, threshold))
        epochs = history.epochs if isinstance(history, History) else (history or [])
        record["history"] = epochs
        record["train_acc"] = epochs[-1]["train_acc"] if epochs else None
        record.update(extra)
        return record


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def cell_columns(cell: Cell) -> dict:
    """Columns every record of a cell carries (the method's parameters with their defaults)."""
    params = dataclass_dict(cell.method_params)
    return {"cell_id": cell.id, "method": cell.method, "family": method_base.get_method(cell.method).family,
            "arch": cell.arch, "dataset": cell.dataset, "seed": cell.seed, **params,
            "epochs_schedule": cell.schedule.epochs, "lr_schedule": cell.schedule.lr,
            "batch_size": cell.schedule.batch_size, "subset": cell.subset}


def dataclass_dict(obj) -> dict:
    return asdict(obj) if obj is not None else {}


def run_cell(cell: Cell, *, data_dir=None, device: str | torch.device | None = None,
             work_root: Path | str = "results/work", cache_dir: Path | str = "results/cache",
             progress: bool | None = None, data: data_mod.Data | None = None, keep_work: bool = False,
             compiled: bool = False, context=Context, deterministic: bool = False,
             stall_s: float = cell_progress.DEFAULT_STALL_S) -> list[dict]:
    """Run one cell and return its records. Never raises for a failure of the cell itself: a
    diverged or crashed cell returns one record with ``status`` 'failed' (and the error), a cell
    whose dataset is missing one with status 'blocked' (and the fetch command). A disk that cannot
    take a checkpoint (full, read-only) is not the cell's failure: that raises StorageError.

    The per-epoch checkpoints live in ``work_root/<cell id>/``; they are removed when the cell ends
    unless ``keep_work`` (the grid runner keeps them until the driver has written the cell's result,
    so a driver killed in between loses no training: the rerun finds the last epoch's checkpoint).
    ``context`` builds the Context (benchmark.execution.packing.run passes one whose trainings wait for the pack).
    ``deterministic`` (``run --deterministic``, GPU-only): reproducible cuDNN/cuBLAS kernels
    (``benchmark.engine.devices.make_deterministic``); records on a GPU then say ``deterministic``.
    ``stall_s`` (``run --stall-timeout``): how long the cell waits on a frozen holder of the lock of
    its dense model before it trains that itself."""
    began = time.perf_counter()
    cell_progress.start_cell()
    dev = device if isinstance(device, torch.device) else pick_device(device)
    # What a bit-identical rerun needs besides the config (docs/design.md, Reproducibility).
    common = cell_columns(cell) | {"device": str(dev), "compiled": compiled, "host": socket.gethostname(),
                                   "torch_version": torch.__version__, "threads": torch.get_num_threads(),
                                   "cpu_model": cpu_model(), "commit": source_commit(), "config": cell.config()} | device_columns(dev, cell.arch)
    if dev.type == "cpu":  # subnormal floats flushed to zero, or kept (BENCHMARK_KEEP_DENORMALS=1)
        common["denormals"] = "flushed" if flush_cpu_denormals() else "kept"
    if deterministic and make_deterministic(dev):
        common["deterministic"] = True
    try:
        if data is None:
            data = data_mod.load(cell.dataset, data_dir, dev, limit=cell.subset, validation=cell.schedule.validation)
        elif (data.val is None) != (cell.schedule.validation == 0):
            raise ValueError(f"the data passed to run_cell {'lacks' if data.val is None else 'has'} a validation split, "
                             f"but the cell's schedule says validation={cell.schedule.validation}")
        work_dir = Path(work_root) / cell.id
        ctx = context(cell, data, dev, work_dir, Path(cache_dir), progress, compiled, stall_s=stall_s)
        method = method_base.get_method(cell.method)(cell.method_params)
        records = method.run(ctx)
    except data_mod.DatasetMissing as exc:
        return [common | {"status": "blocked", "error": str(exc), "wall_s": time.perf_counter() - began}]
    except OSError as exc:
        if is_disk_error(exc):  # a full or read-only disk is not the cell's failure: stop, rerun later
            raise StorageError.from_os_error(exc) from None
        return [common | {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(), "wall_s": time.perf_counter() - began}]
    except Diverged as exc:
        return [common | {"status": "failed", "error": f"Diverged: {exc}", "wall_s": time.perf_counter() - began}]
    except Exception as exc:  # noqa: BLE001 - a cell's failure is data, the grid goes on
        return [common | {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(), "wall_s": time.perf_counter() - began}]
    # a cell resumed from checkpoints costs the seconds of its earlier runs too (to its last checkpoint)
    wall = time.perf_counter() - began + cell_progress.resumed_seconds()
    if not keep_work:
        shutil.rmtree(Path(work_root) / cell.id, ignore_errors=True)
    return [common | {"status": "ok", "epochs": ctx.trained_epochs, "wall_s": wall} | r for r in records]
