"""A cell: one method x architecture x dataset x parameters x seed, and everything it needs to run.

``Cell`` is the canonical, hashable config; ``Context`` gives a method data, models, the shared
training loop, a dense-training cache and the metrics; ``run_cell`` turns a cell into result
records. The runner, the CLI's ``cell`` command and the tests all go through ``run_cell``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmark import data as data_mod
from benchmark import models, sparsity
from benchmark.train import Diverged, History, Schedule, TrainHooks, default_schedule, evaluate, pick_device, train
from methods import base as method_base

#: Epochs at which the dense cache keeps a copy of the weights (lottery-ticket rewind points).
REWIND_EPOCHS = (0, 1, 2)


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
        """Validate everything and build the canonical cell (raises ValueError naming the problem)."""
        method_cls = method_base.get_method(method)
        if arch not in models.MODELS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(models.MODELS)}")
        data_mod.get_spec(dataset)
        checked = method_base.make_params(method_cls, params or {})
        if schedule is None:
            schedule = default_schedule(arch)
        elif isinstance(schedule, dict):
            schedule = Schedule.from_dict({**asdict(default_schedule(arch)), **schedule})
        if subset is not None and int(subset) < 1:
            raise ValueError(f"subset={subset} must be a positive number of examples")
        return cls(method, arch, dataset, int(seed), method_base.non_default(checked), schedule,
                   None if subset is None else int(subset))

    @property
    def method_params(self) -> method_base.Method.Params:
        return method_base.make_params(self.method, self.params)

    def config(self) -> dict:
        return {"method": self.method, "arch": self.arch, "dataset": self.dataset, "seed": self.seed,
                "params": dict(sorted(self.params.items())), "schedule": asdict(self.schedule),
                "subset": self.subset}

    @property
    def id(self) -> str:
        return config_hash(self.config())

    @classmethod
    def from_config(cls, config: dict) -> "Cell":
        return cls.make(config["method"], config["arch"], config["dataset"], config.get("seed", 0),
                        config.get("params"), config.get("schedule"), config.get("subset"))

    def label(self) -> str:
        """Human-readable name for logs and listings, e.g. ``dwf D=3 [lam=0.001] lenet300/fashion-mnist seed=0``."""
        name = f"dwf D={self.method_params.depth}" if self.method == "dwf" else self.method
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()) if k != "depth")
        return f"{name} [{extra}] {self.arch}/{self.dataset} seed={self.seed}"


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


@dataclass
class DenseModel:
    model: nn.Module
    history: list[dict]
    wall_s: float
    snapshots: dict[int, dict]
    test_acc: float


class Context:
    """What a method may use. Everything here is deterministic given the cell's seed."""

    def __init__(self, cell: Cell, data: data_mod.Data, device: torch.device, work_dir: Path,
                 cache_dir: Path, progress: bool | None = None, compiled: bool = False):
        self.cell = cell
        self.data = data
        self.device = device
        self.work_dir = Path(work_dir)
        self.cache_dir = Path(cache_dir)
        self.progress = progress
        self.compiled = compiled  # torch.compile the training forward (a speed option, not part of the cell)
        self.channels_last = device.type == "cuda" and cell.arch in models.CONV_MODELS
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
              first_epoch: int = 0) -> tuple[History, dict]:
        """The shared loop, checkpointed under this cell's work dir as ``<phase>.ckpt``."""
        schedule = schedule or self.schedule
        self.work_dir.mkdir(parents=True, exist_ok=True)
        history, snaps = train(model, self.data, schedule, seed=self.cell.seed, hooks=hooks,
                               checkpoint=self.work_dir / f"{phase}.ckpt", progress=self.progress,
                               desc=f"{self.cell.method}:{phase}", channels_last=self.channels_last,
                               snapshot_epochs=snapshot_epochs, first_epoch=first_epoch, compiled=self.compiled)
        self.trained_epochs += schedule.epochs - first_epoch
        return history, snaps

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.data.test, channels_last=self.channels_last)

    def dense_key(self) -> str:
        c = self.cell
        return config_hash({"arch": c.arch, "dataset": c.dataset, "seed": c.seed,
                            "schedule": asdict(c.schedule), "subset": c.subset, "v": 1})

    def dense(self) -> DenseModel:
        """The dense model of this arch x dataset x schedule x seed, trained once and cached.

        Concurrent cells on one machine wait on a file lock instead of training it twice.
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        key = self.dense_key()
        final = self.cache_dir / f"dense-{key}.pt"
        with _file_lock(self.cache_dir / f"dense-{key}.lock"):
            if not final.is_file():
                model = self.new_model()
                history, snaps = train(model, self.data, self.schedule, seed=self.cell.seed,
                                       checkpoint=self.cache_dir / f"dense-{key}.ckpt", progress=self.progress,
                                       desc="dense", channels_last=self.channels_last,
                                       snapshot_epochs=REWIND_EPOCHS, compiled=self.compiled)
                acc, _ = self.evaluate(model)
                tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
                torch.save({"model": model.state_dict(), "history": history.epochs, "wall_s": history.wall_s,
                            "snapshots": snaps, "test_acc": acc, "config": self.cell.config()}, tmp)
                os.replace(tmp, final)
                (self.cache_dir / f"dense-{key}.ckpt").unlink(missing_ok=True)
            state = torch.load(final, map_location=self.device, weights_only=False)
        model = self.new_model()
        model.load_state_dict(state["model"])
        return DenseModel(model, state["history"], state["wall_s"], state["snapshots"], state["test_acc"])

    def measure(self, model: nn.Module, threshold: float = 0.0, history: History | list | None = None,
                **extra) -> dict:
        """Evaluate and measure ``model`` as it stands; ``extra`` is added to the record."""
        acc, loss = self.evaluate(model)
        record = {"test_acc": acc, "test_loss": loss}
        record.update(sparsity.summarize(model, self.input_shape, threshold))
        epochs = history.epochs if isinstance(history, History) else (history or [])
        record["history"] = epochs
        record["train_acc"] = epochs[-1]["train_acc"] if epochs else None
        record.update(extra)
        return record


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no lock, at worst a dense model is trained twice
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
             compiled: bool = False) -> list[dict]:
    """Run one cell and return its records. Never raises for a failure of the cell itself: a
    diverged or crashed cell returns one record with ``status`` 'failed' (and the error), a cell
    whose dataset is missing one with status 'blocked' (and the fetch command)."""
    began = time.perf_counter()
    dev = device if isinstance(device, torch.device) else pick_device(device)
    # What a bit-identical rerun needs besides the config (DESIGN.md section 9).
    common = cell_columns(cell) | {"device": str(dev), "compiled": compiled, "host": socket.gethostname(),
                                   "torch_version": torch.__version__, "threads": torch.get_num_threads(),
                                   "config": cell.config()}
    try:
        if data is None:
            data = data_mod.load(cell.dataset, data_dir, dev, limit=cell.subset)
        work_dir = Path(work_root) / cell.id
        ctx = Context(cell, data, dev, work_dir, Path(cache_dir), progress, compiled)
        method = method_base.get_method(cell.method)(cell.method_params)
        records = method.run(ctx)
    except data_mod.DatasetMissing as exc:
        return [common | {"status": "blocked", "error": str(exc), "wall_s": time.perf_counter() - began}]
    except Diverged as exc:
        return [common | {"status": "failed", "error": f"Diverged: {exc}", "wall_s": time.perf_counter() - began}]
    except Exception as exc:  # noqa: BLE001 - a cell's failure is data, the grid goes on
        return [common | {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(), "wall_s": time.perf_counter() - began}]
    wall = time.perf_counter() - began
    if not keep_work:
        shutil.rmtree(Path(work_root) / cell.id, ignore_errors=True)
    return [common | {"status": "ok", "epochs": ctx.trained_epochs, "wall_s": wall} | r for r in records]
