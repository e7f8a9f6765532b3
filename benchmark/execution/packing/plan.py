"""Which cells a run packs together (``run --pack auto|off|N``), and the cached measurement ``auto`` uses.

- ``off`` (or 1, the default): every cell is its own unit of work, as without packing.
- ``N``: cells with equal ``pack_key`` go in packs of up to N.
- ``auto``: per (device, architecture, family), a short calibration
  (``benchmark.execution.packing.calibration.measure``) times one training step of a pack against
  the same steps one model at a time, through the real code, alternating rounds. Cells pack only
  where the pack measured at least ``AUTO_MIN_SPEEDUP`` times faster, in packs of at most
  ``AUTO_MAX`` cells and of a share of the group per worker, so that ``--jobs`` workers still have
  work side by side.
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
import time
from pathlib import Path
from typing import Callable

import torch

from benchmark.core.files import atomic_write_text
from benchmark.core.method import get_method
from benchmark.core.provenance import cpu_model
from benchmark.core.untrusted import is_number, load_json, short
from benchmark.engine import data as data_mod
from benchmark.engine import models
from benchmark.execution.cell import Cell
from benchmark.execution.packing.calibration import measure
from methods import structures

#: Largest pack ``auto`` makes per device type; on a CPU larger packs gain little.
AUTO_MAX = {"cpu": 16, "cuda": 64, "mps": 16}
#: ``auto`` packs where the pack measured at least this much faster than one model at a time (the
#: margin keeps noise from choosing packing where it does not pay).
AUTO_MIN_SPEEDUP = 1.1
CALIBRATION_FILE = "pack-calibration.json"
#: Larger than any calibration file this tool writes (a few hundred bytes per measurement).
CALIBRATION_BYTES = 64 * 2 ** 20
#: Share of the device's free memory that packs may take (all workers together).
MEMORY_FRACTION = 0.5


def _pack_family(cell: Cell) -> tuple[str, tuple] | None:
    """What the cell's method says about packing (``Method.Workload.pack_family``): (structure, what else
    must be equal), or None. Methods that pack none of their cells: ``gmp``, ``rigl`` and ``set``
    change each cell's mask on their own schedule between steps, structured pruning changes the
    shapes, magnitude pruning without fine-tuning trains nothing but the dense model (which packs
    with the dense cells)."""
    return get_method(cell.method)(cell.method_params).workload.pack_family()


def family(cell: Cell) -> str | None:
    """The structure family a cell trains (what calibration measures), or None if it never packs."""
    found = _pack_family(cell)
    return found[0] if found else None


def pack_key(cell: Cell) -> tuple | None:
    """Cells with equal keys may form one pack; None: the cell runs alone."""
    found = _pack_family(cell)
    if found is None:
        return None
    return (cell.arch, cell.dataset, cell.subset, cell.schedule, found[0], found[1])


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

