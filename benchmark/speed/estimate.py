"""What a run's trainings cost, before it runs (``run --dry-run``; ``benchmark.speed.wall_time`` lays
them out on the run's workers and prints the table).

Speeds per architecture x input shape x batch size x variant (``dense``, ``masked`` for every pruned
model, ``dwf D=k``) come from ``$BENCHMARK_CACHE_DIR/speeds.json`` (default ``~/.cache/dwf-bench``),
under the machine's name, the torch version and the thread count, where measured earlier; the rest
are rough, from the model's FLOPs at a fraction of this device's matrix-product rate (``rough_units``,
in a second), or with ``--measure-speeds`` measured now (``measure``: a model built as a cell builds
it, ``perf.build_training``, and a few training steps, an evaluation pass, the per-epoch extras and
the final measurement timed) and cached. For a device that is not here, ``--speeds`` takes a file
of per-epoch times or the name of a machine measured earlier (a shared home, or a cache file copied
over).

One training (a cell, or a dense training shared through the cache) costs::

    builds x (setup + final) + epochs x (steps x step + test examples x evaluation + epoch extras)
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
import dataclasses
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from benchmark.engine.timing import sync
from benchmark.engine import data as data_mod
from benchmark.execution.cell import Cell, dense_key
from benchmark.core.provenance import cpu_model
from benchmark.core.untrusted import is_number, load_json, short
from benchmark.core.method import get_method
from methods import structures

#: Examples per split of the full datasets (``subset`` keeps the first N of each).
SPLIT_SIZES = {"mnist": (60_000, 10_000), "fashion-mnist": (60_000, 10_000), "kmnist": (60_000, 10_000),
               "cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "tiny-imagenet": (100_000, 10_000)}
#: Families whose trainings carry masks (pruned models); the rest train dense or factorized weights.
#: Timed steps per variant: until they add up to MIN_SECONDS, at least MIN_STEPS, at most MAX_STEPS.
MIN_STEPS, MIN_SECONDS, MAX_STEPS = 2, 2.0, 200
EVAL_BATCH = 1000  # train.evaluate's batch
FORMAT_HELP = ('a TOML or JSON file: machine = "NAME"; [epoch_s] seconds per epoch on the full training set, '
               'test pass included, per arch or arch/dataset (lenet300 = 0.8, "vgg16/cifar100" = 14); optional '
               '[slowdown] per variant ("dwf D=4" = 1.3, masked = 1.05; default 1) and cell_s, fixed seconds per cell')


@dataclass(frozen=True)
class Training:
    """Trainings that cost the same: one cell's (or a shared dense model's), counted in a Plan."""

    arch: str
    dataset: str
    variant: str
    batch: int
    n_train: int
    n_test: int
    epochs: int
    builds: int  # models built and measured (a lottery ticket: one per level)


@dataclass
class Plan:
    trainings: Counter  # Training -> how many
    cells: Counter  # arch -> cells
    epochs: Counter  # arch -> epochs, shared dense trainings included
    dense_trainings: int = 0
    dense_epochs: int = 0
    #: (Training, is a cell) in the order the run starts them: a dense training that post-training
    #: cells share runs in the first cell that needs it (docs/design.md, "Shared dense training").
    order: list = dataclasses.field(default_factory=list)


def variant(cell: Cell) -> str:
    """What a cell trains, as far as speed goes (``Method.Workload.step_variant``): factorized (by depth),
    masked or dense."""
    return get_method(cell.method)(cell.method_params).workload.step_variant()


def _sizes(cell: Cell) -> tuple[int, int]:
    """(examples trained on, examples evaluated each epoch): a validation split leaves the training
    set and is evaluated beside the test split (docs/tuning.md)."""
    full_train, full_test = SPLIT_SIZES.get(cell.dataset, (50_000, 10_000))
    if cell.subset is not None:
        full_train, full_test = min(cell.subset, full_train), min(cell.subset, full_test)
    held_out = min(cell.schedule.validation, full_train - 1)
    return full_train - held_out, full_test + held_out


def plan(todo: list[tuple[Cell, int, int]], cache_dir: Path) -> Plan:
    """Group the cells to run, given as (cell, training epochs, builds), into trainings of equal
    cost, and add one dense training per dense model that post-training methods need and that
    neither a listed ``dense`` cell trains nor ``cache_dir`` holds already."""
    trainings: Counter = Counter()
    cells: Counter = Counter()
    epochs: Counter = Counter()
    order: list = []
    dense_trained, dense_needed = set(), {}
    for cell, cell_epochs, builds in todo:
        n_train, n_test = _sizes(cell)
        training = Training(cell.arch, cell.dataset, variant(cell), cell.schedule.batch_size, n_train, n_test,
                            cell_epochs, builds)
        trainings[training] += 1
        order.append((training, cell))
        cells[cell.arch] += 1
        epochs[cell.arch] += cell_epochs
        if get_method(cell.method).needs_dense:
            same = (cell.arch, cell.dataset, cell.seed, cell.schedule, cell.subset)
            if get_method(cell.method).is_reference:
                dense_trained.add(same)
            else:
                dense_needed.setdefault(same, cell)
    result = Plan(trainings, cells, epochs)
    first_user = {}
    for same, cell in dense_needed.items():
        if same in dense_trained or (Path(cache_dir) / f"dense-{dense_key(cell)}.pt").is_file():
            continue
        n_train, n_test = _sizes(cell)
        dense = Training(cell.arch, cell.dataset, structures.DENSE, cell.schedule.batch_size, n_train, n_test,
                         cell.schedule.epochs, 1)
        trainings[dense] += 1
        first_user[id(cell)] = dense
        epochs[cell.arch] += cell.schedule.epochs
        result.dense_trainings += 1
        result.dense_epochs += cell.schedule.epochs
    for training, cell in order:
        if id(cell) in first_user:
            result.order.append((first_user[id(cell)], False))
        result.order.append((training, True))
    return result


# ------------------------------------------------------------------------------------------------
# Speeds: measured here (cached) or supplied
# ------------------------------------------------------------------------------------------------


def cache_file() -> Path:
    """$BENCHMARK_CACHE_DIR/speeds.json, else in the user's cache folder (XDG)."""
    root = os.environ.get("BENCHMARK_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dwf-bench"
    return Path(root) / "speeds.json"


def machine_name(device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = cpu_model()
    name = f"{cpu}, {os.cpu_count() or 1} cores"
    return f"Apple GPU (mps) on {name}" if device.type == "mps" else name


def unit_key(arch: str, dataset: str, variant_name: str, batch: int) -> str:
    """What one measurement stands for: the input shape counts, the number of classes does not (the
    classifier is a sliver of the work), so CIFAR-10 and CIFAR-100 share their measurements."""
    return f"{arch}|{'x'.join(map(str, data_mod.get_spec(dataset).shape))}|{variant_name}|b{batch}"


class Speeds:
    """Seconds of a Training; ``machine`` and ``source`` say whose speeds they are."""

    machine = ""
    source = ""
    load: float | None = None  # load average while measured, where known

    def rough(self) -> list[str]:
        return []

    def paced(self, t: Training) -> bool:
        """Whether ``seconds(t)`` is a pace a run kept, other workers beside it included
        (``benchmark.speed.recorded``), so no slowdown for shared cores goes on top."""
        return False

    def seconds(self, t: Training) -> float:
        raise NotImplementedError


class Measured(Speeds):
    """Speeds timed by ``calibrate`` (here, now or earlier)."""

    def __init__(self, machine: str, units: dict[str, dict], source: str):
        self.machine, self.units, self.source = machine, units, source
        loads = [u["load"] for u in units.values() if u.get("load") is not None and not u.get("rough")]
        self.load = max(loads) if loads else None

    def rough(self) -> list[str]:
        """The units estimated from FLOPs, not measured."""
        return sorted(k for k, u in self.units.items() if u.get("rough"))

    def seconds(self, t: Training) -> float:
        key = unit_key(t.arch, t.dataset, t.variant, t.batch)
        u = self.units.get(key)
        if u is None:
            raise ValueError(f"the speeds of {self.machine} ({self.source}) have no measurement of {t.arch} "
                             f"{t.variant} at batch {t.batch}; run a dry run of this grid on that machine once, or "
                             f"give --speeds FILE ({FORMAT_HELP})")
        epoch = math.ceil(t.n_train / t.batch) * u["step_s"] + t.n_test * u["eval_s"] + u["tail_s"]
        return t.builds * (u["setup_s"] + u["final_s"]) + t.epochs * epoch


class Supplied(Speeds):
    """Per-epoch times from a file (for a device that is not here)."""

    def __init__(self, path: Path):
        self.source = str(path)
        try:
            text = path.read_text()
            values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--speeds {path}: cannot be read ({exc})") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"--speeds {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({exc}); "
                             f"expected {FORMAT_HELP}") from None
        unknown = sorted(set(values) - {"machine", "epoch_s", "slowdown", "cell_s"})
        if unknown or not isinstance(values.get("epoch_s"), dict) or not values["epoch_s"]:
            problem = f"unknown key(s) {unknown}" if unknown else "no [epoch_s] table"
            raise ValueError(f"--speeds {path}: {problem}; expected {FORMAT_HELP}")
        self.machine = str(values.get("machine") or f"the machine of {path.name}")
        self.epoch_s = {k: _positive(v, f"--speeds {path}: epoch_s {k!r}") for k, v in values["epoch_s"].items()}
        self.slowdown = {k: _positive(v, f"--speeds {path}: slowdown {k!r}")
                         for k, v in (values.get("slowdown") or {}).items()}
        self.cell_s = _positive(values.get("cell_s", 0), f"--speeds {path}: cell_s", zero=True)

    def seconds(self, t: Training) -> float:
        base = self.epoch_s.get(f"{t.arch}/{t.dataset}", self.epoch_s.get(t.arch))
        if base is None:
            raise ValueError(f"--speeds {self.source}: no epoch time for {t.arch} on {t.dataset}; add "
                             f'{t.arch} = SECONDS or "{t.arch}/{t.dataset}" = SECONDS under [epoch_s]')
        full_train = SPLIT_SIZES.get(t.dataset, (t.n_train, 0))[0]
        epoch = base * self.slowdown.get(t.variant, 1.0) * t.n_train / full_train
        return t.builds * self.cell_s + t.epochs * epoch


def _positive(value, where: str, zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{where} = {value!r} must be a {'non-negative' if zero else 'positive'} number of seconds")
    return float(value)


#: What every cached measurement holds (seconds, ``measure``).
UNIT_SECONDS = ("step_s", "eval_s", "tail_s", "setup_s", "final_s")
#: Larger than any speed cache this tool writes (a few hundred bytes per measurement).
CACHE_BYTES = 64 * 2 ** 20


def cache_problems(cache) -> list[str]:
    """Why the contents of a speed cache are not measurements of ``measure`` (at most three reasons)."""
    if not isinstance(cache, dict) or not isinstance(cache.get("devices"), dict):
        return ["it is not a table with a 'devices' table"]
    problems = []
    for key, entry in cache["devices"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("machine", ""), str) \
                or not isinstance(entry.get("units", {}), dict) or not is_number(entry.get("measured_at", 0)):
            problems.append(f"device {short(key)} is not a table with a machine name, a time and units")
            continue
        for unit, values in entry.get("units", {}).items():
            if not isinstance(values, dict):
                problems.append(f"{short(key)} unit {short(unit)} is not a table")
                continue
            bad = [k for k in UNIT_SECONDS if not is_number(values.get(k), at_least=0)]
            if values.get("load") is not None and not is_number(values["load"], at_least=0):
                bad.append("load")
            if bad:
                problems.append(f"{short(key)} unit {short(unit)}: {', '.join(bad)} not a non-negative number")
    return problems[:3]


def _read_cache(path: Path) -> dict:
    """The speed cache; empty when missing, and when damaged (then it is set aside: measuring again
    beats failing a dry run)."""
    found = load_json(path, cache_problems, limit=CACHE_BYTES, redo="the speeds are measured again")
    return found if found is not None else {"devices": {}}


def stored(name: str) -> Measured:
    """Speeds measured earlier on a machine whose name contains ``name`` (the most recent)."""
    path = cache_file()
    devices = _read_cache(path)["devices"]
    matches = [(entry.get("measured_at", 0), key, entry) for key, entry in devices.items()
               if name.lower() in entry.get("machine", "").lower()]
    if not matches:
        known = sorted({e.get("machine", "?") for e in devices.values()})
        raise ValueError(f"--speeds {name}: not a file, and no machine of that name measured in {path} "
                         f"(known: {', '.join(known) or 'none'}); give a file, {FORMAT_HELP}")
    _, key, entry = max(matches, key=lambda m: m[0])
    return Measured(entry["machine"], entry.get("units", {}), f"measured earlier, {key} in {path}")


def measured_while_busy(unit: dict, load_now: float | None, cores: int) -> bool:
    """A cached speed taken while the load average exceeded the cores, on a machine now less than half
    as busy: it would overstate the hours many times over (a 2-core machine running a grid slows a
    2-thread step about tenfold), so it is measured again."""
    then = unit.get("load")
    return then is not None and load_now is not None and then > cores and load_now < then / 2


def calibrate(trainings, device, threads: int, say=print, measure_missing: bool = False) -> Measured:
    """Speeds of this device at ``threads`` torch threads: what the cache has, as measured; the rest
    rough (``rough_units``: FLOPs at this device's matrix-product rate, in a second), or with
    ``measure_missing`` measured now (and added to the cache; a speed cached while the machine was
    busy is then measured again)."""
    import torch

    from benchmark.core.files import atomic_write_text

    machine = machine_name(device)
    key = f"{device.type}: {machine} | torch {torch.__version__} | {threads} threads"
    path = cache_file()
    needed = {unit_key(t.arch, t.dataset, t.variant, t.batch): t for t in trainings}
    entry = _read_cache(path)["devices"].get(key, {})
    units = dict(entry.get("units", {}))
    load_now = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    busy = {k for k, t in needed.items() if k in units and measured_while_busy(units[k], load_now, os.cpu_count() or 1)}
    missing = {k: t for k, t in needed.items() if k not in units or (measure_missing and k in busy)}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if missing and not measure_missing:
            units |= rough_units(missing, device)
            return Measured(machine, {k: units[k] for k in needed}, f"{threads} threads, cached in {path}")
        if missing:
            again = f" ({len(busy & set(missing))} measured again: cached while the machine was busy)" if busy else ""
            say(f"measuring speeds on {device} ({machine}, {threads} threads): {len(missing)} model(s), once; "
                f"cached in {path}{again}")
            for unit, t in missing.items():
                units[unit] = measure(t.arch, t.dataset, t.variant, t.batch, device)
                gc.collect()  # one model's tensors at a time
                say(f"  {t.arch} {t.variant}, batch {t.batch}: {1e3 * units[unit]['step_s']:.1f} ms per step")
    finally:
        torch.set_num_threads(before)
    if missing:
        cache = _read_cache(path)  # again: another dry run may have added to it meanwhile
        merged = cache["devices"].get(key, {}).get("units", {}) | units
        cache["devices"][key] = {"machine": machine, "device": device.type, "torch": torch.__version__,
                                 "threads": threads, "measured_at": time.time(), "units": merged}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True))
        except (OSError, ValueError) as exc:  # a read-only home: the estimate still stands
            say(f"note: cannot cache the speeds in {path} ({exc}); set BENCHMARK_CACHE_DIR to a writable folder")
    return Measured(machine, {k: units[k] for k in needed}, f"{threads} threads, cached in {path}")


#: A training step's FLOPs run at this fraction of the device's large-matmul rate (``rough_units``).
#: On this project's 2-core CPU machine (92 GFLOP/s at one thread): dense LeNet-300-100 steps at
#: batch 128 reached 0.55 in the committed reference records (1.44 s per epoch at --jobs 2); timed
#: while the machine was overloaded (load 13), LeNet-300-100 0.21, VGG-16 0.31, ResNet-18 0.78 and
#: LeNet-5 (small convolutions) 0.07. Rough by nature: off by 2x either way for some models.
ROUGH_EFFICIENCY = 0.5
#: Seconds a step costs besides its FLOPs (the optimizer's update, Python and dispatch; LeNet steps
#: are a few milliseconds, so it matters there), and per epoch / per model built (the checkpoint,
#: the epoch metrics; building, the final measurement), as measured for LeNets on that machine.
ROUGH_STEP_S, ROUGH_TAIL_S, ROUGH_SETUP_S, ROUGH_FINAL_S = 0.5e-3, 0.02, 0.05, 0.3


def rough_units(missing: dict, device) -> dict[str, dict]:
    """Speeds of ``missing`` ({unit key: Training}) from each model's FLOPs per example
    (``arithmetic.example_flops``) at ``ROUGH_EFFICIENCY`` times this device's matrix-product rate
    (timed now, well under a second), marked ``rough``: nothing is built or trained, so a first dry
    run answers in seconds, whatever the models."""
    from benchmark.speed.arithmetic import example_flops, matmul_rate

    rate = matmul_rate(device, rounds=3) * ROUGH_EFFICIENCY
    flops: dict[tuple, tuple[float, float]] = {}
    units = {}
    for key, t in missing.items():
        spec = data_mod.get_spec(t.dataset)
        shape = (tuple(spec.shape), spec.num_classes)
        if shape[0] + (t.arch,) not in flops:
            flops[shape[0] + (t.arch,)] = example_flops(t.arch, *shape)
        train, forward = flops[shape[0] + (t.arch,)]
        units[key] = {"step_s": t.batch * train / rate + ROUGH_STEP_S, "eval_s": forward / rate,
                      "tail_s": ROUGH_TAIL_S, "setup_s": ROUGH_SETUP_S, "final_s": ROUGH_FINAL_S, "rough": True}
    return units


#: Input values in a batch that ``measure`` times at most (2^17: a LeNet batch of 128; CIFAR at 42,
#: Tiny ImageNet at 10 examples): a larger batch is timed at this size and its step scaled up by
#: the batch ratio (a convolution's time grows linearly with the batch on a CPU), so a VGG or
#: ResNet measurement holds a few hundred MB, not gigabytes.
MEASURE_VALUES = 2 ** 17


def measured_batch(batch: int, shape) -> int:
    return max(1, min(batch, MEASURE_VALUES // math.prod(shape)))


def measure(arch: str, dataset: str, variant_name: str, batch: int, device) -> dict:
    """Time one variant: setup (build, factorize or mask, optimizer), a training step (the mean of
    a few), evaluation per test example, the per-epoch extras (epoch metrics, checkpoint) and the
    final measurement."""
    import torch

    from benchmark.engine import models
    from benchmark.speed.perf.step import build_training
    from benchmark.engine import sparsity
    from benchmark.core.files import save_atomic
    from benchmark.engine.devices import tune_cpu_allocator
    from benchmark.engine.train import evaluate
    from methods.dwf import collapse, factorized_modules
    from methods.regularization import FLOAT32_EPS

    if device.type == "cpu":
        tune_cpu_allocator()  # as every CPU training run does
    spec = data_mod.get_spec(dataset)
    depth = structures.depth_of(variant_name)
    timed_batch = measured_batch(batch, spec.shape)
    for _ in range(2):  # the second build is timed: the first pays one-off costs (imports, allocator)
        began = time.perf_counter()
        model, hooks, optimizer, step = build_training(arch, depth, device, timed_batch,
                                                       masked=variant_name == structures.MASKED,
                                                       shape=(spec.shape, spec.num_classes))
        sync(device)
        setup_s = time.perf_counter() - began
    step()  # first-call costs (allocation, kernel selection) stay out
    times: list[float] = []
    while len(times) < MAX_STEPS and (len(times) < MIN_STEPS or sum(times) < MIN_SECONDS):
        sync(device)
        began = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - began)
    n_eval = min(EVAL_BATCH, 2 * timed_batch)
    gen = torch.Generator().manual_seed(0)
    channels = (1, spec.shape[0], 1, 1)
    split = data_mod.Split(torch.randn(n_eval, *spec.shape, generator=gen).to(device),
                           torch.randint(0, spec.num_classes, (n_eval,), generator=gen).to(device),
                           torch.zeros(channels, device=device), torch.ones(channels, device=device))
    channels_last = device.type == "cuda" and arch in models.CONV_MODELS
    began = time.perf_counter()
    evaluate(model, split, channels_last=channels_last)
    sync(device)
    eval_s = (time.perf_counter() - began) / n_eval
    with tempfile.TemporaryDirectory(prefix="dwf-bench-speed-") as tmp:
        began = time.perf_counter()
        hooks.epoch_metrics(model)
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(tmp) / "c.ckpt")
        tail_s = time.perf_counter() - began
    began = time.perf_counter()
    if factorized_modules(model):
        collapse(model)
    sparsity.summarize(model, spec.shape, FLOAT32_EPS if depth else 0.0)
    final_s = time.perf_counter() - began
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    # the mean, not the median: a run's time is the sum of its steps, slow ones (a busy machine) included
    return {"step_s": sum(times) / len(times) * batch / timed_batch, "eval_s": eval_s, "timed_batch": timed_batch, "tail_s": tail_s, "setup_s": setup_s,
            "final_s": final_s, "steps_timed": len(times), "load": load, "measured_at": time.time()}
