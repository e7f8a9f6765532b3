"""What a run has to do: its unfinished cells in the order they run, what each costs, and the units of work (cells and packs) they go out as."""

from __future__ import annotations

import concurrent.futures
import math
from collections import deque
from pathlib import Path

from benchmark.core.method import get_method
from benchmark.execution.cell import Cell, dense_key, prunable_layer_sizes
from benchmark.execution.records import DamagedResult, state
from benchmark.execution.store import Store


def priority(cell: Cell) -> tuple[int, int, int]:
    """Dense trainings first (they feed the shared cache); then the cells of most estimated training
    epochs first, so that a long cell (a lottery ticket's levels) does not run alone at the end;
    post-training methods, which train nothing of their own, last."""
    method = get_method(cell.method)
    try:
        epochs = estimate_epochs(cell)
    except Exception:  # noqa: BLE001 - an estimate only orders the cells; validation names bad values
        epochs = 0
    return 0 if method.is_reference else 1, -epochs, 1 if method.needs_dense else 0


def dense_keys(unit: Cell | list[Cell], device_kind: str) -> frozenset[str]:
    """Keys of the cached dense trainings a unit's cells read (``Method.needs_dense``,
    ``cache/dense-<key>.pt``): cells that share one and start together wait on its lock while the
    first of them trains it."""
    cells = unit if isinstance(unit, list) else [unit]
    return frozenset(dense_key(cell, device_kind) for cell in cells if get_method(cell.method).needs_dense)


def take_next(queue: deque, being_trained: set[str], keys_of):
    """Pop the unit to start now: the queue's first, unless it reads a dense model that a unit in
    flight is training at this moment (``being_trained``) and a later unit does not; then the first
    such unit, and the deferred ones keep their places. A free worker then trains instead of waiting
    on the dense lock; a deferred unit is first again once the model is cached (so it is late by at
    most the units started in its place meanwhile), and with nothing else to run it is taken and
    waits on the lock, as every unit did before."""
    if being_trained:
        for index, unit in enumerate(queue):
            if not keys_of(unit) & being_trained:
                del queue[index]
                return unit
    return queue.popleft()


def pending_cells(store: Store, cells: list[Cell], retry_failed: bool,
                  set_aside: list | None = None, retry_diverged: bool = False) -> tuple[list[Cell], int]:
    """(cells to run, how many are done or failed). A failed cell runs again with ``retry_failed``, one
    whose training diverged only with ``retry_diverged`` (``records.diverged``). A damaged result file
    counts as not done; with ``set_aside`` (a list) it is also moved to cells/damaged/ and listed
    there as (path, reason)."""
    todo, skipped = [], 0
    existing = store.finished_ids()
    for cell in cells:
        status = "todo"
        if cell.id in existing:
            try:
                status = state(store.read(cell.id))
            except DamagedResult as exc:
                status = "todo"
                if set_aside is not None:
                    moved = store.set_aside(cell.id, exc.reason)
                    if moved is not None:
                        set_aside.append((moved, exc.reason))
        if status == "ok" or (status == "failed" and not retry_failed) or (
                status == "diverged" and not retry_diverged):
            skipped += 1
        else:
            todo.append(cell)
    return sorted(todo, key=priority), skipped


def written_since(store: Store, cell_id: str, since: float) -> bool:
    """The cell's result file was written at or after ``since`` (by another driver, meanwhile)."""
    try:
        result = store.read(cell_id)
    except DamagedResult:
        return False
    return bool(result) and (result.get("finished_at") or 0) >= since


def _method(cell: Cell):
    return get_method(cell.method)(cell.method_params)


def trainings(cell: Cell) -> int:
    """Models a cell trains and measures (``Method.trainings``: a lottery ticket one per level)."""
    return _method(cell).workload.trainings(prunable_layer_sizes(cell.arch, cell.dataset))


def estimate_epochs(cell: Cell) -> int:
    """Training epochs a cell costs (``Method.Workload.training_epochs``; post-training methods reuse the
    cached dense training)."""
    return math.ceil(_method(cell).workload.training_epochs(cell.schedule, prunable_layer_sizes(cell.arch, cell.dataset)))


def work_units(todo: list[Cell], pack, on_dask: bool, device: str, gpu_slots: list[int], jobs: int | None,
               threads: int | None, compiled: bool, cache_dir: str, say) -> list:
    """The run's units of work (benchmark.execution.packing.plan): cells, and packs of cells. ``auto``
    measures here, on the device and with the threads a local worker gets; on Dask it packs
    nothing. Groups are shared out over every worker (K per GPU x N GPUs), and a pack's memory over
    the K workers of one GPU. On a GPU the planning runs in a child process, so that the driver
    holds no CUDA context and no calibration memory while the run goes on. ``say`` gets each
    decision."""
    from benchmark.execution.packing import plan as pack_plan

    setting = pack_plan.parse_pack(pack)
    if setting == "off" or compiled:  # packed training does not compile (RunOptions refuses --pack N)
        return list(todo)
    from benchmark.engine.devices import pick_device

    dev = None if on_dask else pick_device(f"cuda:{gpu_slots[0]}" if gpu_slots else device)
    workers = len(gpu_slots) or (jobs or 1)
    sharing = gpu_slots.count(gpu_slots[0]) if gpu_slots else workers
    args = (todo, setting, dev, workers, sharing, threads, cache_dir)
    if dev is None or dev.type != "cuda":
        return plan_units(*args, say=say)[0]
    units, lines = plan_in_child(*args)
    for line in lines:
        say(line)
    return units


def plan_units(todo: list[Cell], setting, dev, workers: int, sharing: int, threads: int | None, cache_dir: str,
               say=None) -> tuple[list, list[str]]:
    """``pack_plan.plan`` with the threads a worker gets; returns the units and the lines it said."""
    import torch

    from benchmark.execution.packing import plan as pack_plan

    lines: list[str] = []

    def note(line: str) -> None:
        lines.append(line)
        if say is not None:
            say(line)

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        units = pack_plan.plan(todo, setting, device=dev, workers=workers, sharing=sharing,
                               cache_dir=Path(cache_dir), say=note)
    finally:
        torch.set_num_threads(before)
    return units, lines


def _plan_indices(todo: list[Cell], *args) -> tuple[list, list[str]]:
    """``plan_units`` in a child process: the units as positions in ``todo`` (cheap to send back)."""
    units, lines = plan_units(todo, *args)
    where = {cell.id: i for i, cell in enumerate(todo)}
    return [[where[c.id] for c in u] if isinstance(u, list) else where[u.id] for u in units], lines


def plan_in_child(todo: list[Cell], *args) -> tuple[list, list[str]]:
    """Plan in a short-lived child process (spawned: CUDA is never forked), which takes its CUDA
    context and calibration memory with it when it ends."""
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        indices, lines = child.submit(_plan_indices, todo, *args).result()
    return [[todo[i] for i in u] if isinstance(u, list) else todo[u] for u in indices], lines
