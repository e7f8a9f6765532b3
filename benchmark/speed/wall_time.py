"""The estimate ``run --dry-run`` prints: a Plan's trainings at the speeds of ``benchmark.speed.estimate``
(or, for the kinds the grid has finished here, the pace of its records: ``benchmark.speed.recorded``),
laid out as the run lays them out (cells in the run's order on its workers), with what a run costs
besides training: starting the workers, each cell's hand-off, and cores shared by the workers."""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path

from benchmark.speed import recorded
from benchmark.speed.estimate import Plan, Speeds, Supplied, calibrate, stored

#: Seconds a local worker process takes to start: importing torch and this package, and loading
#: its dataset onto the device (once per worker: workers are reused, docs/design.md). 2-5 s on
#: this project's 2-core machine, more while it is busy. One at a time (``--jobs 1``) runs cells in
#: the driver itself: no worker starts.
WORKER_START_S = 4.0
#: Seconds each cell costs besides its trainings' build, epochs and final measurement (which the
#: speeds already hold): the driver's claim and result file and the hand-off to a worker. The
#: committed LeNet-300-100 records spend a median 0.7 s outside their epochs, most of it the build
#: and final measurement counted in the speeds.
CELL_OVERHEAD_S = 0.3
#: How much slower a cell trains while the run's other workers fill the remaining cores (shared
#: memory bandwidth and caches, the driver, the system): dense LeNet-300-100 epochs took 1.44 s at
#: --jobs 2 on the 2-core machine (the committed reference records, one thread per cell), against
#: about 1.1 s for 469 steps and a test pass timed alone at one thread. Applied where a run's
#: workers use every core.
SHARED_CORES_SLOWDOWN = 1.3


@dataclass
class Lane:
    """One way of running the grid: ``workers`` cells at a time at ``speeds``, ``slowdown`` for
    cores shared among them."""

    label: str
    workers: int
    speeds: Speeds
    note: str = ""
    slowdown: float = 1.0


def hours(seconds: float) -> str:
    """'0.0016 h (5.6 s)', '0.25 h (15 min)', '5.2 h', '96 h (4.0 days)'."""
    h = seconds / 3600
    text = f"{h:.2g} h" if h < 10 else f"{h:.0f} h"
    if seconds < 3600:
        text += f" ({seconds:.3g} s)" if seconds < 120 else f" ({seconds / 60:.0f} min)"
    elif h >= 48:
        text += f" ({h / 24:.1f} days)"
    return text


def makespan(costs: list[float], workers: int, start_s: float = 0.0) -> float:
    """Wall time of items (seconds each, in the order the run starts them) when each goes to the
    first worker that is free, as the runner hands them out: a long cell started last runs alone
    while the other workers idle, which an even share would not show."""
    free = [start_s] * max(1, min(workers, len(costs) or 1))
    for seconds in costs:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free) if costs else 0.0


def lane_seconds(p: Plan, lane: Lane, arch: str | None = None) -> float:
    """The lane's wall time for the plan (or only its ``arch`` cells): trainings at its speeds and
    slowdown (none on a recorded pace: it had the other workers beside it), each cell's overhead,
    one worker start each."""
    costs = [lane.speeds.seconds(t) * (1.0 if lane.speeds.paced(t) else lane.slowdown)
             + (CELL_OVERHEAD_S if is_cell else 0.0)
             for t, is_cell in p.order if arch is None or t.arch == arch]
    return makespan(costs, lane.workers, WORKER_START_S if lane.workers > 1 else 0.0)


def describe(p: Plan, lanes: list[Lane]) -> list[str]:
    """The table: per arch cells, epochs and hours in each lane, then the total."""
    archs = sorted({t.arch for t, _ in p.order})
    label_w = max(8, *(len(a) for a in archs)) if archs else 8
    heads = [lane.label for lane in lanes]
    widths = [max(len(h), 18) for h in heads]
    out = [f"  {'arch':{label_w}s} {'cells':>8s} {'epochs':>10s}   "
           + "   ".join(f"{h:>{w}s}" for h, w in zip(heads, widths))]
    for arch in archs:
        cols = [hours(lane_seconds(p, lane, arch)) for lane in lanes]
        out.append(f"  {arch:{label_w}s} {p.cells[arch]:8d} {p.epochs[arch]:10d}   "
                   + "   ".join(f"{c:>{w}s}" for c, w in zip(cols, widths)))
    cols = [hours(lane_seconds(p, lane)) for lane in lanes]
    out.append(f"  {'total':{label_w}s} {sum(p.cells.values()):8d} {sum(p.epochs.values()):10d}   "
               + "   ".join(f"{c:>{w}s}" for c, w in zip(cols, widths)))
    return out


def lanes(*, device_name: str, backend: str, jobs: int | None, jobs_per_gpu: int | None, speeds_arg: str | None,
          trainings, measure: bool = False, say=print, found: list[recorded.Pace] = ()) -> tuple[list[Lane], list[str]]:
    """The lanes to show (one cell at a time, then the run's parallelism where it has any) and notes.
    ``measure``: time the models the speed cache lacks (else they are rough, from FLOPs). ``found``:
    the grid's finished records (``recorded.paces``); the kinds they cover, trained on this machine
    at a lane's threads per cell, go at their pace there (not for ``--speeds``: another machine)."""
    cores = os.cpu_count() or 1
    notes = []
    if speeds_arg:
        path = Path(speeds_arg).expanduser()
        speeds = Supplied(path) if path.is_file() else stored(speeds_arg)
        serial = Lane("one at a time", 1, speeds)
        if jobs and jobs > 1:
            return [serial, Lane(f"{jobs} at a time (--jobs)", jobs, speeds)], notes
        if jobs_per_gpu:
            notes.append("--jobs-per-gpu: the number of GPUs over there is not known here; divide by it")
        return [serial], notes
    from benchmark.engine.devices import pick_device

    try:
        device = pick_device(device_name)
    except ValueError as exc:
        raise ValueError(f"{exc}. To estimate for a device that is not here give --speeds FILE or the name of "
                         f"a machine measured earlier, or leave the estimate out with --no-estimate") from None
    machine = recorded.lane_machine(device)

    def pace(speeds: Speeds, threads: int) -> Speeds:
        return recorded.paced(speeds, list(found), machine, threads) if found else speeds

    serial = Lane("one at a time", 1, pace(calibrate(trainings, device, cores, say, measure), cores))
    if backend == "dask":
        notes.append(f"--backend dask: speeds of this machine's {device}; for the workers' devices give --speeds")
        if jobs:
            return [serial, Lane(f"{jobs} in flight (--jobs)", jobs, serial.speeds)], notes
        notes.append("the cluster's size decides how many cells run at once; --jobs N shows N at a time")
        return [serial], notes
    if device.type == "cuda":
        import torch

        if jobs_per_gpu:
            gpus = torch.cuda.device_count()
            if jobs_per_gpu > 1:
                notes.append(f"--jobs-per-gpu {jobs_per_gpu}: cells sharing a GPU are counted as no faster than "
                             f"one after another (they gain only where one cell leaves the GPU idle; 'perf grid' "
                             f"measures it)")
            if gpus > 1:
                return [serial, Lane(f"{gpus} GPUs (--jobs-per-gpu)", gpus, serial.speeds)], notes
        elif jobs and jobs > 1:
            notes.append(f"--jobs {jobs} puts every cell on one GPU: counted as one at a time (use --jobs-per-gpu)")
        return [serial], notes
    if jobs and jobs > 1:
        threads = max(1, cores // jobs)
        full = jobs * threads >= cores
        note = f"{threads} thread(s) each" + (f", {SHARED_CORES_SLOWDOWN:g}x slower for sharing the {cores} cores"
                                              if full else "")
        return [serial, Lane(f"{jobs} at a time (--jobs)", jobs,
                             pace(calibrate(trainings, device, threads, say, measure), threads),
                             note, SHARED_CORES_SLOWDOWN if full else 1.0)], notes
    return [serial], notes


def unit_names(keys: list[str]) -> str:
    """'lenet300 dense b128, vgg16 3x32x32 masked b128' from unit keys (arch|shape|variant|batch); the
    input shape only where an architecture has more than one."""
    shapes: dict[str, set] = {}
    for key in keys:
        shapes.setdefault(key.split("|")[0], set()).add(key.split("|")[1])
    names = []
    for key in keys:
        arch, shape, variant_name, batch = key.split("|")
        names.append(" ".join([arch] + ([shape] if len(shapes[arch]) > 1 else []) + [variant_name, batch]))
    return ", ".join(names)


def estimate_lines(p: Plan, *, device_name: str = "auto", backend: str = "local", jobs: int | None = None,
                   jobs_per_gpu: int | None = None, speeds_arg: str | None = None, measure: bool = False,
                   say=print, found: list[recorded.Pace] = ()) -> list[str]:
    """What ``run --dry-run`` prints below its cell count: the machine, the table, the notes, and
    which speeds are the pace of the grid's records (``found``), which rough (from FLOPs) and which
    measured."""
    shown, notes = lanes(device_name=device_name, backend=backend, jobs=jobs, jobs_per_gpu=jobs_per_gpu,
                         speeds_arg=speeds_arg, trainings=list(p.trainings), measure=measure, say=say, found=found)
    speeds = shown[0].speeds
    rough = sorted({k for lane in shown for k in lane.speeds.rough()})
    head = f"{'ROUGH ' if rough else ''}estimated wall time on {speeds.machine}"
    if speeds.load is not None:
        cores = os.cpu_count() or 1
        busy = ": a busy machine, so the estimate holds while it stays as busy" if speeds.load > cores else ""
        head += f" (load average {speeds.load:.1f} on {cores} cores while measured{busy})"
    out = [head + ":"] + describe(p, shown)
    for lane in shown:
        if lane.note:
            out.append(f"  {lane.label}: {lane.note}")
    out += [f"  note: {n}" for n in notes]
    for lane in shown:
        if isinstance(lane.speeds, recorded.Paced):
            pace = lane.speeds
            kinds = ", ".join(f"{unit_names([k])} {s:.3g} s ({pace.counts[k]})"
                              for k, s in sorted(pace.epoch_s.items()))
            out.append(f"  {lane.label}: at the pace of this grid's finished cells trained here at {pace.threads} "
                       f"thread(s) per cell (seconds per epoch: the median over the records of each one's typical "
                       f"epoch, other workers beside them included; cells): {kinds}")
    if rough:
        from benchmark.speed.estimate import ROUGH_EFFICIENCY

        measured = sorted({k for lane in shown for k in getattr(lane.speeds, "units", {})} - set(rough))
        out.append(f"  rough, from FLOPs (torch's FlopCounterMode) at {ROUGH_EFFICIENCY:g}x this device's "
                   f"matrix-product rate, not measured (off by 2x or more): {unit_names(rough)}"
                   + (" (except where a line above gives this grid's pace)" if any(isinstance(lane.speeds, recorded.Paced)
                                                                         for lane in shown) else "")
                   + "; --measure-speeds times them (seconds to minutes, once; then cached)")
        if measured:
            out.append(f"  measured (cached): {unit_names(measured)}")
    out.append(f"  speeds: {speeds.source}" + ("; delete that file to measure again" if "cached in" in speeds.source
                                              and not rough else ""))
    out.append(f"  counted besides training: {WORKER_START_S:g} s to start each worker, {CELL_OVERHEAD_S:g} s per "
               f"cell, cells in the run's order on the first free worker; not counted: scoring passes (SNIP, "
               f"GraSP, SynFlow)")
    return out
