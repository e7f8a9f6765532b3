"""Which cells a run packs together (``run --pack auto|off|N``), and the measurement ``auto`` uses.

- ``off`` (or 1): every cell is its own unit of work, as before packing existed.
- ``N``: cells with equal ``benchmark.execution.pack.pack_key`` go in packs of up to N.
- ``auto`` (the default): per (device, architecture, family), a short calibration times one
  training step of a pack against the same steps one model at a time, through the real code
  (``benchmark.engine.packed_train.TrainingPack`` and ``benchmark.engine.train.training_step``), alternating
  rounds. Cells pack only where the pack measured at least ``AUTO_MIN_SPEEDUP`` times faster, in
  packs of at most ``AUTO_MAX`` cells and of a share of the group per worker, so that ``--jobs``
  workers still have work side by side.
  Measurements are cached in ``<results-dir>/cache/pack-calibration.json``, keyed by the device,
  its thread count, the torch version, the architecture, family, pack size and batch size.

Either way a pack is no larger than the device's free memory allows (``max_pack``): half of the free
memory, shared by the workers on that device, over an estimate of one member's training memory
(on Dask the workers' memory is unknown to the driver: ``N`` is taken as it is).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from benchmark.core.provenance import cpu_model
from benchmark.core.files import atomic_write_text
from benchmark.core.untrusted import is_number, load_json, short
from benchmark.engine import data as data_mod
from benchmark.engine import models
from benchmark.execution.cell import Cell
from benchmark.execution.pack import family, pack_key
from methods import structures
from benchmark.engine.packed_train import Job, TrainingPack
from benchmark.engine.timing import interleave, paired_ratio
from benchmark.engine.train import default_schedule, make_optimizer, prepare_input, training_step, tune_cpu_allocator

#: Largest pack ``auto`` makes per device type; on a CPU larger packs gain little.
AUTO_MAX = {"cpu": 16, "cuda": 64, "mps": 16}
#: ``auto`` packs where the pack measured at least this much faster than one model at a time (the
#: margin keeps noise from choosing packing where it does not pay).
AUTO_MIN_SPEEDUP = 1.1
CALIBRATION_FILE = "pack-calibration.json"
#: Larger than any calibration file this tool writes (a few hundred bytes per measurement).
CALIBRATION_BYTES = 64 * 2 ** 20
CALIBRATION_ROUNDS = 5
#: A calibration whose warm-up round takes longer than this runs at most 3 rounds.
SLOW_ROUND_S = 2.0
#: Share of the device's free memory that packs may take (all workers together).
MEMORY_FRACTION = 0.5


def parse_pack(text: str | int) -> str | int:
    """``auto``, ``off`` or a pack size >= 1 (1 means off), or ValueError saying so."""
    value = str(text).strip().lower()
    if value in ("auto", "off"):
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"--pack {text!r}: use auto, off, or the most cells per pack (an integer >= 1)")
    return "off" if size == 1 else size


Unit = Cell | list[Cell]


def plan(cells: list[Cell], setting: str | int, *, device: torch.device | None, workers: int = 1,
         sharing: int | None = None, cache_dir: Path | None = None,
         say: Callable[[str], None] = lambda line: None) -> list[Unit]:
    """The run's units of work, in the cells' order: single cells and packs (lists of cells).
    ``device`` is where the cells will run (None: unknown here, e.g. Dask workers; ``auto`` then
    packs nothing, and ``N`` packs N without knowing the workers' free memory). ``workers``: all of
    the run's workers (``auto`` leaves each a share of a group); ``sharing``: how many of them share
    one device's memory (default ``workers``; K with ``--jobs-per-gpu`` K on N GPUs)."""
    if setting == "off":
        return list(cells)
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        key = pack_key(cell)
        if key is not None:
            groups.setdefault(key, []).append(cell)
    if setting == "auto" and device is None:
        if any(len(g) > 1 for g in groups.values()):
            say("pack auto: the workers' devices cannot be measured from here, so nothing packs; use --pack N")
        return list(cells)
    if device is None and any(len(g) > 1 for g in groups.values()):
        say(f"pack {setting}: the workers' free memory cannot be measured from here; packs of up to {setting} "
            f"(lower --pack if a worker runs out of memory)")
    chunks: dict[tuple, list[Unit]] = {}
    for key, group in groups.items():
        chunks[key] = _chunks(group, setting, device, workers, sharing or workers, cache_dir, say)
    units: list[Unit] = []
    for cell in cells:
        key = pack_key(cell)
        if key is None:
            units.append(cell)
        elif key in chunks:
            units += chunks.pop(key)  # the whole group where its first cell stood
    return units


def _chunks(group: list[Cell], setting: str | int, device: torch.device | None, workers: int, sharing: int,
            cache_dir: Path | None, say) -> list[Unit]:
    if len(group) < 2:
        return list(group)
    cell = group[0]
    name = f"{cell.arch} {family(cell)}"
    limit = AUTO_MAX.get(device.type, 16) if setting == "auto" else int(setting)
    room = limit if device is None else max_pack(cell, device, sharing)
    # auto leaves every worker a pack of the group rather than one worker the whole group
    share = math.ceil(len(group) / workers) if setting == "auto" else len(group)
    size = min(len(group), limit, room, share)
    if room < min(len(group), limit):
        say(f"pack: {name}: at most {room} per pack fit in {device}'s free memory")
    if size < 2:
        return list(group)
    if setting == "auto":
        ratio, cached = calibrate(cell, size, device, cache_dir)
        decision = f"packs of {size}" if ratio >= AUTO_MIN_SPEEDUP else "one at a time"
        say(f"pack auto: {name} on {device}: {size} packed {ratio:.2f}x the speed of one at a time "
            f"({'cached' if cached else 'measured now'}) -> {decision}")
        if ratio < AUTO_MIN_SPEEDUP:
            return list(group)
    return [group[i:i + size] if len(group[i:i + size]) > 1 else group[i] for i in range(0, len(group), size)]


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------

def _depth(cell: Cell) -> int:
    """Copies of each weight the cell trains (its factors; 1 unless factorized)."""
    return structures.depth_of(family(cell)) or 1


def member_bytes(arch: str, dataset: str, depth: int, batch: int) -> int:
    """Training memory of one member, estimated: every weight held ``4 * depth + 1`` times (factors,
    their gradients and momentum, the product) and every activation three times (saved for the
    backward pass, its gradient, the stacked layout's copy)."""
    spec = data_mod.get_spec(dataset)
    model = models.build(arch, spec.shape, spec.num_classes)  # on the CPU: a first forward on "meta" takes seconds
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *spec.shape))
    for h in hooks:
        h.remove()
    weights = sum(p.numel() for p in model.parameters())
    return 4 * (weights * (4 * depth + 1) + 3 * batch * sum(outputs))


def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: the driver's count; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def max_pack(cell: Cell, device: torch.device, workers: int = 1) -> int:
    """How many members of ``cell``'s kind fit in the device's free memory (at least 1)."""
    free = free_memory(device)
    if free is None:
        return AUTO_MAX.get(device.type, 16)
    per = member_bytes(cell.arch, cell.dataset, _depth(cell), cell.schedule.batch_size)
    return max(1, int(MEMORY_FRACTION * free / max(1, workers) / per))


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    return f"{device.type} {model} x{os.cpu_count()}"


def calibration_key(cell: Cell, size: int, device: torch.device) -> str:
    return (f"{device_name(device)}|threads={torch.get_num_threads()}|torch={torch.__version__}|{cell.arch}|"
            f"{cell.dataset}|{family(cell)}|P={size}|B={cell.schedule.batch_size}")


def calibrate(cell: Cell, size: int, device: torch.device, cache_dir: Path | None) -> tuple[float, bool]:
    """(speed of a pack of ``size`` over one model at a time, whether it came from the cache)."""
    path = Path(cache_dir) / CALIBRATION_FILE if cache_dir is not None else None
    key = calibration_key(cell, size, device)
    cache = _read_cache(path)
    if key in cache:
        return float(cache[key]["ratio"]), True
    spec = data_mod.get_spec(cell.dataset)
    result = measure(cell.arch, spec.shape, spec.num_classes, family(cell), size, cell.schedule.batch_size, device)
    if path is not None:
        cache = _read_cache(path) | {key: result | {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True), durable=False)
    return result["ratio"], False


def calibration_problems(cache) -> list[str]:
    """Why the contents of a calibration file are not measurements (``calibrate`` reads each entry's
    ``ratio``: a positive finite number)."""
    if not isinstance(cache, dict):
        return [f"it holds {type(cache).__name__}, not a table of measurements"]
    return [f"entry {short(key)} has no positive ratio ({short(entry)})" for key, entry in cache.items()
            if not isinstance(entry, dict) or not is_number(entry.get("ratio"), above=0)][:3]


def _read_cache(path: Path | None) -> dict:
    """The calibration cache; empty when missing, and when damaged (then it is set aside: a damaged
    cache only costs a new measurement)."""
    if path is None:
        return {}
    found = load_json(path, calibration_problems, limit=CALIBRATION_BYTES, redo="its packs are measured again")
    return found if found is not None else {}


def calibration_members(arch: str, in_shape, classes: int, kind: str, size: int, device: torch.device) -> list[Job]:
    """``size`` models of ``kind`` (a ``benchmark.execution.pack.family``) as their cells would build them,
    each with its own λ where the family has one."""
    schedule = default_schedule(arch)
    channels_last = device.type == "cuda" and arch in models.CONV_MODELS
    jobs = []
    for i in range(size):
        model = models.build(arch, in_shape, classes, seed=i).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        hooks = structures.stand_in(kind, model, i)
        jobs.append(Job(model, schedule, i, Path(os.devnull), hooks, channels_last=channels_last))
    return jobs


def measure(arch: str, in_shape, classes: int, kind: str, size: int, batch: int, device: torch.device,
            rounds: int = CALIBRATION_ROUNDS) -> dict:
    """Time one step of ``size`` models packed against one step of each alone, in alternating
    rounds; ``ratio`` is the median over rounds of (one at a time) / (packed)."""
    if device.type == "cpu":
        tune_cpu_allocator()
    jobs = calibration_members(arch, in_shape, classes, kind, size, device)
    schedule = jobs[0].schedule
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(size, batch, *in_shape, generator=gen).to(device)
    ys = torch.randint(0, classes, (size, batch), generator=gen).to(device)
    channels_last = jobs[0].channels_last
    alone = [(job, make_optimizer(job.model, schedule, job.hooks)) for job in jobs]
    pack = TrainingPack(jobs, schedule)
    x_all = prepare_input(xs.flatten(0, 1), channels_last)
    y_all = ys.flatten()

    def one_at_a_time():
        for i, (job, optimizer) in enumerate(alone):
            training_step(job.model, prepare_input(xs[i], channels_last), ys[i], optimizer, job.hooks, device)

    def packed():
        pack.step(x_all, y_all, schedule.lr, device)

    contenders = {"sequential": one_at_a_time, "packed": packed}
    for fn in contenders.values():
        fn()
    began = time.perf_counter()
    for fn in contenders.values():
        fn()
    if time.perf_counter() - began > SLOW_ROUND_S:  # big models on a CPU: a few rounds tell enough
        rounds = min(rounds, 3)
    seconds = interleave(contenders, rounds, device)
    ratio = paired_ratio(seconds["sequential"], seconds["packed"])
    return {"ratio": ratio, "sequential_s": statistics.median(seconds["sequential"]),
            "packed_s": statistics.median(seconds["packed"]), "size": size, "batch": batch, "rounds": rounds,
            "sequential_rounds": seconds["sequential"], "packed_rounds": seconds["packed"]}
