"""The pace a grid's cells kept on this machine, from its finished records (``run --dry-run``).

Speeds timed once, or estimated from FLOPs, miss what a long run meets: other workers on the same
cores, subnormal floats at strong regularization, the real steps of a model with its hooks
(LeNet-5's DWF cells on the 2-core Xeon at --jobs 2 took 2.2x their rough estimate). A results
folder that already holds finished cells of a kind (architecture, input shape, batch size, and
dense, masked or DWF depth) trained here, on the same CPU model or GPU at the lane's thread count,
says it directly: that kind is estimated at the median seconds per epoch of those records.

A record's seconds per epoch are its typical epoch (the median of its epochs' times) plus its time
outside the epochs (building, the final measurement) spread over them: an epoch slowed for a while by
other work on the machine (a test run beside a niced grid slowed single epochs of the LeNet-5 tuning
grid 10-20x) then does not count. Without per-epoch times, its wall time over its epochs."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from benchmark.core.method import get_method
from benchmark.core.untrusted import is_number
from benchmark.execution.cell import Cell
from benchmark.speed.estimate import Speeds, Training, unit_key, variant

#: Records read per kind at the most: a median of a few hundred is as good as one of thousands, and
#: a large results folder is read in seconds.
MOST_PER_UNIT = 200


@dataclass(frozen=True)
class Pace:
    """One finished cell as the estimate reads it."""

    unit: str  # estimate.unit_key
    epoch_s: float  # ``epoch_seconds``: building and the final measurement included
    threads: int
    machine: str  # the GPU's name on a GPU, else the CPU's model


def epoch_seconds(record: dict, epochs: float, wall: float) -> float:
    """A record's typical seconds per epoch: the median of its epochs' ``seconds`` (history) plus its
    wall time outside them over its epochs; its wall time over its epochs where the history does not
    give each of its epochs a time that is a number, within the wall time (records are untrusted)."""
    history = record.get("history")
    if not isinstance(history, list) or len(history) != epochs or not all(isinstance(e, dict) for e in history):
        return wall / epochs
    times = [e.get("seconds") for e in history]
    if not all(is_number(s, at_least=0) for s in times) or sum(times) > wall:
        return wall / epochs
    return statistics.median(times) + (wall - sum(times)) / epochs


def shares_dense(cell: Cell) -> bool:
    """Whether the cell prunes a dense model trained once for several cells (``estimate.plan``)."""
    method = get_method(cell.method)
    return method.needs_dense and not method.is_reference


def record_machine(record: dict) -> str | None:
    """What a record was trained on, in ``lane_machine``'s terms; None for anything else (mps)."""
    device = str(record.get("device", ""))
    if device.startswith("cuda"):
        return str(record.get("gpu") or "")
    return str(record.get("cpu_model") or "") if device == "cpu" else None


def lane_machine(device) -> str:
    """This machine's name as records give it: the GPU's, or the CPU's model."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    from benchmark.core.provenance import cpu_model

    return cpu_model() if device.type == "cpu" else ""


def paces(finished: Iterable[tuple[Cell, Callable[[str], dict | None]]], needed: set[str]) -> list[Pace]:
    """The usable records among ``finished`` ((cell, reader of its result) pairs) of the kinds in
    ``needed``: finished ``ok``, at least one epoch trained, not trained in a pack (a pack shares its
    time among its members), a positive wall time, and not of a method that starts from a shared
    dense model (magnitude, lottery ticket, structured: whether its wall time holds that training
    depends on which cell came first). Results are untrusted input: anything else is passed over."""
    taken: Counter = Counter()
    out = []
    for cell, read in finished:
        key = unit_key(cell.arch, cell.dataset, variant(cell), cell.schedule.batch_size)
        if key not in needed or taken[key] >= MOST_PER_UNIT:
            continue
        if shares_dense(cell):
            continue
        result = read(cell.id)
        records = result.get("records") if isinstance(result, dict) else None
        record = records[0] if isinstance(records, list) and records and isinstance(records[0], dict) else {}
        epochs, wall, threads = record.get("epochs"), record.get("wall_s"), record.get("threads")
        machine = record_machine(record)
        if (record.get("status") != "ok" or not is_number(epochs, at_least=1) or not is_number(wall, above=0)
                or not (is_number(threads, at_least=1) and isinstance(threads, int)) or not machine
                or record.get("pack_size", 1) != 1):
            continue
        taken[key] += 1
        out.append(Pace(key, epoch_seconds(record, epochs, wall), threads, machine))
    return out


class Paced(Speeds):
    """``base``'s speeds, except the kinds in ``epoch_s``: their trainings take their epochs times the
    recorded median seconds per epoch."""

    def __init__(self, base: Speeds, epoch_s: dict[str, float], counts: dict[str, int], threads: int):
        self.base, self.epoch_s, self.counts, self.threads = base, epoch_s, counts, threads
        self.machine, self.source, self.load = base.machine, base.source, base.load

    @property
    def units(self) -> dict:
        """The base's measurements of the kinds not paced (what the estimate lists as measured)."""
        return {k: u for k, u in getattr(self.base, "units", {}).items() if k not in self.epoch_s}

    def rough(self) -> list[str]:
        return [k for k in self.base.rough() if k not in self.epoch_s]

    def paced(self, t: Training) -> bool:
        return t.epochs > 0 and unit_key(t.arch, t.dataset, t.variant, t.batch) in self.epoch_s

    def seconds(self, t: Training) -> float:
        if self.paced(t):
            return t.epochs * self.epoch_s[unit_key(t.arch, t.dataset, t.variant, t.batch)]
        return self.base.seconds(t)


def paced(base: Speeds, found: list[Pace], machine: str, threads: int) -> Speeds:
    """``base``, paced where ``found`` has records of ``machine`` at ``threads`` threads per cell (on a
    GPU too: cells sharing one, ``--jobs-per-gpu``, have fewer threads each)."""
    per_unit: dict[str, list[float]] = {}
    for p in found:
        if p.machine == machine and p.threads == threads:
            per_unit.setdefault(p.unit, []).append(p.epoch_s)
    if not per_unit:
        return base
    return Paced(base, {k: statistics.median(v) for k, v in per_unit.items()},
                 {k: len(v) for k, v in per_unit.items()}, threads)
