"""Run a grid: skip its finished cells, dispatch the rest to workers, write each result as it arrives.

Workers only compute (benchmark.execution.worker): each runs ``run_cell`` and returns its records,
and the driver here (``GridRun``) writes one result file per cell as results arrive (so a cluster
needs no shared disk for results, and a killed run loses only the cells in flight, whose per-epoch
checkpoints survive for the next run). Where the cells run is a pool (benchmark.execution.pools):
the driver process, joblib's local processes (loky), or a Dask cluster (``--backend dask``, or
``--backend slurm``: benchmark.execution.slurm). How is one checked ``RunOptions``
(benchmark.execution.run_options). A failed cell is recorded and the grid goes on.

What the driver guarantees (tests/test_reliability.py and tests/test_fault_injection.py hold it to
them):

- Local workers never outlive it: each watches its driver and exits within a second of the
  driver's death, however it died (SIGKILL included).
- SIGINT, SIGTERM and SIGHUP stop the run in order: workers are stopped, this run's claims
  released, and what finished and how to resume is printed (exit 128 + the signal's number).
- A cell's checkpoints are removed only after its result is written, by the driver that holds its
  claim, so a driver killed after a worker finished loses no training, and no worker ever deletes
  the work of another run.
- A worker that dies (killed, out of memory) does not stop the grid: its cells go back in the
  queue and run again; a cell in flight at MAX_WORKER_DEATHS deaths is recorded as failed.
- A worker that makes no training progress for far longer than its own measured pace (and the
  stall limit, ``run --stall-timeout``) is frozen: it is killed and counts as a worker that died
  (benchmark.execution.liveness; docs/design.md, "Progress and liveness").
- A disk that cannot take a write stops the run with a message that names the file.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.core.console import say
from benchmark.core.errors import Interrupted, RunStopped, StorageError, is_disk_error
from benchmark.execution import grids as grids_mod
from benchmark.execution import liveness
from benchmark.execution.cell import Cell
from benchmark.execution.pools import DaskPool, InlinePool, LocalPool
from benchmark.execution.run_options import RunOptions, local_workers
from benchmark.execution.slurm import SlurmPool
from benchmark.execution.stop_signals import StopSignals, signal_name
from benchmark.execution.claims import HEARTBEAT_S
from benchmark.execution.store import CLAIM_LOST, Store
from benchmark.execution.todo import (dense_keys, estimate_epochs, pending_cells, take_next, work_units,
                                      written_since)
from benchmark.execution.worker import execute_tagged

log = logging.getLogger("benchmark.run")

#: A cell in flight when a worker process dies this many times is recorded as failed (the others
#: go back in the queue). Several cells run at once, so one bad cell costs its neighbours a retry.
MAX_WORKER_DEATHS = 3
#: How often the driver reads the progress of its cells in flight (seconds).
WATCH_S = 2.0


@dataclass
class RunSummary:
    finished: int = 0
    failed: int = 0
    blocked: int = 0
    skipped: int = 0
    busy: int = 0  # claimed by another live driver
    log: Path | None = None
    set_aside: list = field(default_factory=list)  # damaged result files moved to cells/damaged/
    stopped_by: int | None = None  # the signal that stopped the run
    stopped_in_flight: int = 0
    not_started: int = 0
    finished_labels: list = field(default_factory=list)
    worker_deaths: int = 0
    requeued: int = 0
    stalled: int = 0  # workers killed for making no progress (counted in worker_deaths too)


def run_grid(grid: grids_mod.Grid, cells: list[Cell], options: RunOptions | None = None, **keywords) -> RunSummary:
    """Run every unfinished cell of ``cells``; returns counts. Safe to kill and rerun at any point;
    a stop signal ends it in order (``summary.stopped_by``). ``options`` as the CLI builds them, or
    their fields as keywords (checked the same way: ``RunOptions``)."""
    if options is not None and keywords:
        raise TypeError(f"run_grid takes options= or their fields as keywords, not both ({', '.join(keywords)})")
    return GridRun(grid, cells, options if options is not None else RunOptions(**keywords)).run()


class GridRun:
    """The driver of one run: claims each cell, hands it to a pool, writes what comes back, and
    on a stop signal or a broken disk leaves nothing claimed and nothing half-written. A pack is
    claimed cell by cell, and each cell's result is written as it would be alone."""

    def __init__(self, grid: grids_mod.Grid, cells: list[Cell], options: RunOptions):
        self.grid, self.cells, self.options = grid, cells, options
        self.store = Store(options.results_dir, grid.name)
        self.run_id = uuid.uuid4().hex[:12]
        self.summary = RunSummary()
        self.signals = StopSignals()
        self.pool: InlinePool | None = None
        self.bar = None
        self.queue: deque = deque()  # cells and packs (lists of cells) not yet handed out
        self.in_flight: dict = {}  # future -> the cells it runs
        self.deaths: Counter = Counter()  # cell id -> workers that died under it
        self.handed_out: dict = {}  # future -> when it was submitted (or its frozen worker killed)
        self.frozen: dict = {}  # cell id -> why its worker was killed as frozen
        self.unreachable: set = set()  # frozen tasks on another machine, already named in the log
        self.killed_at: dict = {}  # future -> when its frozen worker was last killed
        self.progress = None  # EpochProgress: the bar in epochs
        self.watched_at = 0.0
        self.common: dict = {}  # execute's keywords, the same for every task
        self.cache_dir = Path(options.results_dir) / "cache"  # the shared dense trainings (cache/dense-<key>.pt)
        self.device_kind = "cpu"  # the kind of device the cells train on: it is part of a dense model's key
        self.dense_of: dict = {}  # a unit's cell ids -> the dense models it reads (todo.dense_keys)
        self.started_at = time.time()

    # -- the run, start to end ----------------------------------------------------------------------

    def run(self) -> RunSummary:
        options, store = self.options, self.store
        gpu_slots, threads = ([], None) if options.on_dask else local_workers(options.device, options.jobs,
                                                                               options.jobs_per_gpu)
        store.check_writable()
        set_aside: list = []
        log_path = setup_logging(store, self.run_id)
        todo, skipped = pending_cells(store, self.cells, options.retry_failed, set_aside,
                                       retry_diverged=options.retry_diverged)
        self.summary = RunSummary(skipped=skipped, log=log_path, set_aside=set_aside)
        for moved, reason in set_aside:
            log.warning("damaged result file set aside to %s (%s); its cell runs again", moved, reason)
            say(f"warning: damaged result file set aside to {moved}: {reason}; its cell runs again")
            store.event("damaged", moved.name.split(".")[0], self.run_id, reason=reason, moved_to=str(moved))
        log.info("run %s: grid %s (%s), %d cells, %d to run, %d already done, backend=%s", self.run_id,
                 self.grid.name, self.grid.source, len(self.cells), len(todo), skipped,
                 "dask" if options.on_dask else "local")
        sweep_finished_work(store)
        store.sweep_leftovers()
        note = liveness.resume_note(store.work_dir, todo, skipped)
        if note is not None:
            log.info(note)
            say(note)
        if not todo:
            return self.summary

        from benchmark.core.progress import EPOCH_BAR_FORMAT, EpochProgress, bar_class

        began = time.perf_counter()
        self.signals.install()
        stop_heartbeat = None
        try:
            self.pool = self._start_pool(gpu_slots)
            cache_dir = str(self.cache_dir)
            self.device_kind = _device_kind(options, gpu_slots)
            self.queue.extend(work_units(todo, options.pack, options.on_dask, options.device, gpu_slots, options.jobs,
                                         threads, options.compiled, cache_dir, say=_tell))
            self.common = {"data_dir": options.data_dir, "device": options.device, "work_root": str(store.work_dir),
                           "cache_dir": cache_dir, "threads": threads, "compiled": options.compiled,
                           "keep_work": True, "deterministic": options.deterministic,
                           "stall_s": options.stall_timeout}
            weights = {cell.id: cell_weight(cell) for cell in todo}
            self.bar = bar_class()(total=sum(max(1, w) for w in weights.values()), desc=f"grid {self.grid.name}",
                                   unit="epoch", bar_format=EPOCH_BAR_FORMAT, disable=_no_bar(options.progress),
                                   dynamic_ncols=True)
            self.progress = EpochProgress(weights, self.pool.capacity, self.bar)
            stop_heartbeat = start_heartbeat(store, self.run_id)
            self._dispatch()
        except Interrupted as stop:
            self.summary.stopped_by = stop.signum
            self.summary.not_started = (sum(len(u) if isinstance(u, list) else 1 for u in self.queue)
                                        if self.pool is not None else len(todo))  # stopped while workers started
        finally:
            self._close(stop_heartbeat, began)
        return self.summary

    def _start_pool(self, gpu_slots: list[int]) -> InlinePool:
        options = self.options
        if options.on_dask:
            if options.backend == "slurm":
                pool = SlurmPool(self.signals, options.slurm, options.jobs, options.scheduler_timeout,
                                 self.store.root / "slurm-logs", say)
            else:
                pool = DaskPool(self.signals, options.scheduler, options.jobs, options.scheduler_timeout)
            if options.data_dir:
                pool.check_data_dir(str(options.data_dir))
            return pool
        if gpu_slots:
            return LocalPool(self.signals, len(gpu_slots), gpu_slots)
        if (options.jobs or 1) > 1:
            return LocalPool(self.signals, options.jobs)
        return InlinePool(self.signals)

    def _close(self, stop_heartbeat, began: float) -> None:
        summary = self.summary
        if self.bar is not None:
            self.bar.close()
        if stop_heartbeat is not None:
            stop_heartbeat()
        if self.pool is not None:
            # workers first: nothing of this run may write after its claims are gone
            self.pool.stop(kill=bool(self.in_flight) or summary.stopped_by is not None)
        released = self.store.release_run(self.run_id)  # cells in flight when it stopped: free for the next run
        self.signals.restore()
        if summary.stopped_by is not None:
            summary.stopped_in_flight = released
            log.warning("run %s stopped by %s: %d finished, %d in flight stopped and released, %d not started",
                        self.run_id, signal_name(summary.stopped_by), summary.finished, released, summary.not_started)
        log.info("run %s ended after %.0f s: %s", self.run_id, time.perf_counter() - began, summary)

    # -- handing out work and taking results back ---------------------------------------------------

    def _dispatch(self) -> None:
        """Keep the pool full and record each result as it comes, until nothing is left."""
        while self.queue or self.in_flight:
            if self.signals.received:
                raise Interrupted(self.signals.received)
            while self.queue and len(self.in_flight) < self.pool.capacity:
                self._submit(self._next_unit())
                if self.signals.received:
                    raise Interrupted(self.signals.received)
            if not self.in_flight:
                continue
            for future in self.pool.wait(list(self.in_flight), timeout=0.25):
                self.handed_out.pop(future, None)
                self.killed_at.pop(future, None)
                for cell in self.in_flight.pop(future):  # a pack's cells one by one, each written as alone
                    self._outcome(future, cell)
            if time.monotonic() - self.watched_at >= WATCH_S:
                self._watch()

    def _watch(self) -> None:
        """Read the progress of the cells in flight: move the bar, and kill the workers of frozen
        tasks (their futures then fail as a dead worker's: ``_worker_died``). A cell running in the
        driver itself (``InlinePool``) is not watched: a frozen driver watches nothing."""
        self.watched_at = time.monotonic()
        reports = {future: liveness.newest_report(self.store.work_dir, cells) for future, cells in self.in_flight.items()}
        for future, cells in self.in_flight.items():
            report = reports[future]
            for cell in cells:
                if report is not None:
                    self.progress.report(cell.id, report["epochs"], report.get("epoch_s"))
        self._show()
        if type(self.pool) is InlinePool:
            return
        on_local_pool = isinstance(self.pool, LocalPool)
        for frozen in liveness.stalled_tasks(self.in_flight, self.handed_out, reports, self.options.stall_timeout,
                                             on_local_pool):
            self._kill_frozen(frozen)

    def _kill_frozen(self, frozen: liveness.Stalled) -> None:
        labels = ", ".join(cell.label() for cell in frozen.cells)
        why = (f"its worker made no training progress for {frozen.silent_s:.0f} s (stall limit {frozen.limit_s:.0f} s: "
               f"frozen?) and was killed")
        pid = frozen.pid
        if isinstance(self.pool, LocalPool) and not self.pool.owns(pid):
            pid = None  # an older attempt's report: its process is gone, and its pid may be another's now
        if frozen.reported_at is not None and frozen.reported_at <= self.killed_at.get(frozen.future, 0.0):
            pid = None  # the report is from before this task's last kill (the same reasons)
        self.handed_out[frozen.future] = self.killed_at[frozen.future] = time.time()  # not again before the limit
        killed = liveness.kill_local(pid, frozen.host)
        if not killed and isinstance(self.pool, LocalPool):
            self.pool.kill_all()  # no report names the worker: stop them all, their cells go back in the queue
            killed = True
        if not killed:
            if frozen.future not in self.unreachable:
                self.unreachable.add(frozen.future)
                log.warning("%s: no progress for %.0f s, but its worker (%s) is not on this machine; the driver "
                            "cannot stop it (docs/scaling.md)", labels, frozen.silent_s, frozen.host)
            return
        self.summary.stalled += 1
        for cell in frozen.cells:
            self.frozen[cell.id] = why
        log.warning("%s: %s", labels, why)
        self.bar.write(f"frozen: {labels}: {why}; it goes back in the queue", file=sys.stderr)

    def _show(self) -> None:
        summary = self.summary
        self.progress.show([c.id for cells in self.in_flight.values() for c in cells],
                           failed=summary.failed, blocked=summary.blocked)

    def _next_unit(self):
        """The unit to start on a free worker (``todo.take_next``): not one that would wait on the lock
        of a dense model a task in flight is training now (its cache file not yet written), while
        another can run."""
        being_trained = {key for cells in self.in_flight.values() for key in self._dense_keys(cells)
                         if not (self.cache_dir / f"dense-{key}.pt").is_file()}
        return take_next(self.queue, being_trained, self._dense_keys)

    def _dense_keys(self, unit) -> frozenset[str]:
        """``todo.dense_keys``, computed once per unit (the queue is scanned at every free slot)."""
        ids = tuple(cell.id for cell in (unit if isinstance(unit, list) else [unit]))
        if ids not in self.dense_of:
            self.dense_of[ids] = dense_keys(unit, self.device_kind)
        return self.dense_of[ids]

    def _submit(self, unit) -> None:
        """Claim the unit's cells that are still to do and hand them to the pool as one task."""
        cells = [cell for cell in (unit if isinstance(unit, list) else [unit]) if self._take(cell)]
        if not cells:
            return
        try:
            if len(cells) == 1:
                future = self.pool.submit(execute_tagged, cells[0].id, cells[0].config(), self.common)
            else:
                future = self.pool.submit(execute_tagged, f"{cells[0].id}+{len(cells) - 1}",
                                          [c.config() for c in cells], self.common)
        except Exception as exc:  # noqa: BLE001 - a broken pool refuses work: start a fresh one
            if not self.pool.died(exc):
                raise
            for cell in cells:
                self.store.release(cell.id, self.run_id)
            self.queue.appendleft(cells if len(cells) > 1 else cells[0])
            return
        self.in_flight[future] = cells
        self.handed_out[future] = time.time()

    def _take(self, cell: Cell) -> bool:
        """Claim ``cell`` for this run, unless it is finished or claimed elsewhere."""
        store, summary = self.store, self.summary
        status = store.status(cell.id)
        if status == "ok" or (status in ("failed", "blocked") and written_since(store, cell.id, self.started_at)):
            summary.skipped += 1  # another driver finished it meanwhile
            self._cell_over(cell)
            return False
        if status == "damaged":  # damaged since this run listed the grid
            moved = store.set_aside(cell.id, "damaged while this run was going")
            if moved is not None:
                summary.set_aside.append((moved, "damaged while this run was going"))
        if not store.claim(cell.id, self.run_id):
            summary.busy += 1
            self._cell_over(cell)
            return False
        store.event("start", cell.id, self.run_id, label=cell.label())
        return True

    def _outcome(self, future, cell: Cell) -> None:
        """Record what became of ``cell``'s task: its records, a dead worker's requeue, or a failure."""
        try:
            exc = future.exception()
        except concurrent.futures.CancelledError as cancelled:
            exc = cancelled
        if exc is None:
            _, records = future.result()
            self._finish(cell, records[cell.id] if isinstance(records, dict) else records)
            return
        if is_disk_error(exc):
            raise StorageError.from_os_error(exc) from None
        if isinstance(exc, concurrent.futures.CancelledError):
            raise RunStopped(f"the Dask scheduler at {self.options.scheduler} dropped the run's tasks (was it "
                             f"restarted or lost?); nothing in flight was recorded, rerun the same command to resume")
        if self.pool.died(exc):
            self._worker_died(cell, exc)
            return
        # the worker machinery itself failed for this cell (e.g. it could not be sent): data too
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._finish(cell, failed_record(cell, f"{type(exc).__name__}: {exc}", tb))

    def _worker_died(self, cell: Cell, exc: BaseException) -> None:
        """Requeue ``cell``, or record it as failed after MAX_WORKER_DEATHS (on Dask, whose
        scheduler already retried it, at once)."""
        if self.signals.received:
            return  # stopping anyway: the cell stays unrecorded for the next run
        self.deaths[cell.id] += 1
        self.summary.worker_deaths += 1
        self.store.sweep_leftovers()  # what the dead worker was writing
        first_line = self.frozen.pop(cell.id, None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if self.options.on_dask or self.deaths[cell.id] >= MAX_WORKER_DEATHS:
            times = "several" if self.options.on_dask else self.deaths[cell.id]
            self._finish(cell, failed_record(cell, f"WorkerDied: the worker process running this cell died "
                                                   f"{times} times (killed, or out of memory?): {first_line}"))
            return
        log.warning("a worker died while %s %s ran (%s); it goes back in the queue", cell.id, cell.label(), first_line)
        self.store.release(cell.id, self.run_id)
        self.summary.requeued += 1
        self.queue.appendleft(cell)

    def _finish(self, cell: Cell, records: list[dict]) -> None:
        """Write ``cell``'s result, release its claim, and only then remove its checkpoints."""
        store, summary, bar = self.store, self.summary, self.bar
        holder = store.holder(cell.id)
        if holder != self.run_id and store.status(cell.id) == "ok":
            # another driver took the claim over (it thought this one dead) and finished first
            log.warning("%s %s was finished by run %s meanwhile; not written again", cell.id, cell.label(), holder)
            summary.skipped += 1
            self._cell_over(cell)
            return
        result = store.write(cell.id, cell.config(), records, self.run_id)
        status = result["status"]
        if status == CLAIM_LOST:  # another run owns the cell now; store.write said so and wrote nothing
            summary.skipped += 1
            self._cell_over(cell)
            return
        store.event("finish" if status == "ok" else status, cell.id, self.run_id,
                    wall_s=sum(r.get("wall_s", 0) or 0 for r in records[:1]))
        store.release(cell.id, self.run_id)
        if status == "ok":
            self.pool.after_finish(store.work_dir / cell.id)
            summary.finished += 1
            summary.finished_labels.append(cell.label())
            log.info("finished %s %s", cell.id, cell.label())
        else:
            summary.failed += status == "failed"
            summary.blocked += status == "blocked"
            log.warning("%s %s %s: %s", status, cell.id, cell.label(), records[0].get("error"))
            bar.write(f"{status}: {cell.label()}: {str(records[0].get('error')).splitlines()[0]}", file=sys.stderr)
        self._cell_over(cell)

    def _cell_over(self, cell: Cell) -> None:
        """``cell`` needs no more work from this run: its whole weight counts as done on the bar."""
        self.progress.cell_over(cell.id)
        self._show()


# ------------------------------------------------------------------------------------------------
# What a run keeps beside its results: a log, a heartbeat on its claims, no stale checkpoints
# ------------------------------------------------------------------------------------------------


def cell_weight(cell: Cell) -> int:
    """A cell's weight on the run's bar: its estimated training epochs (``estimate_epochs``)."""
    try:
        return estimate_epochs(cell)
    except Exception:  # noqa: BLE001 - a bar must not stop a run; the cell then weighs one epoch
        return 1


def failed_record(cell: Cell, error: str, tb: str | None = None) -> list[dict]:
    """The one record of a cell that failed outside its method (a dead worker, a task not sent)."""
    from benchmark.execution.cell import cell_columns

    record = cell_columns(cell) | {"status": "failed", "error": error, "config": cell.config(), "wall_s": 0.0}
    if tb:
        record["traceback"] = tb
    return [record]


def _device_kind(options: RunOptions, gpu_slots: list[int]) -> str:
    """The kind of device the cells train on (a dense model's cache key names it), read here without
    starting CUDA in the driver. On a cluster the workers decide: the driver reads only what
    ``--device`` says, and a key that names another kind than theirs only makes ``take_next`` defer
    a unit that need not wait (it never makes one wait)."""
    if gpu_slots:
        return "cuda"
    import torch

    from benchmark.engine.devices import pick_device

    if options.on_dask:
        return "cpu" if options.device == "auto" else torch.device(options.device).type
    return pick_device(options.device).type


def _tell(line: str) -> None:
    log.info(line)
    say(line)


class _QuietFileHandler(logging.FileHandler):
    """A run's log must never stop it: when the disk refuses a log line, say so once on stderr
    instead of printing logging's traceback for every line."""

    _warned = False

    def handleError(self, record):  # noqa: N802 (logging's name)
        if not self._warned:
            self._warned = True
            say(f"warning: cannot write the run's log {self.baseFilename} ({sys.exc_info()[1]}); going on without it")


def setup_logging(store: Store, run_id: str) -> Path:
    """One log file per run, beside the results: logs/<start time>-<run id>.log."""
    path = store.root / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = _QuietFileHandler(path)
    except OSError as exc:
        raise StorageError.from_os_error(exc, path) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for old in log.handlers:
        old.close()
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    log.disabled = False  # a library's logging.config.dictConfig in this process may have disabled it
    return path


def sweep_finished_work(store: Store) -> None:
    """Checkpoints of cells that have a finished result (left by a driver killed between writing
    the result and removing them) are not needed by anyone."""
    try:
        names = os.listdir(store.work_dir)
    except OSError:
        return
    finished = store.finished_ids()
    for name in names:
        if name in finished and store.status(name) == "ok":
            store.remove_work(name)


def start_heartbeat(store: Store, run_id: str, every: float = HEARTBEAT_S):
    """Touch this run's claims every ``every`` seconds from a daemon thread, so drivers on other
    hosts sharing the results folder see them as alive; returns the function that stops it."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            try:
                store.refresh_run(run_id)
            except Exception as exc:  # noqa: BLE001 - a heartbeat must not print tracebacks
                log.warning("heartbeat of run %s failed: %s", run_id, exc)

    thread = threading.Thread(target=beat, name=f"claims-heartbeat-{run_id}", daemon=True)
    thread.start()

    def halt():
        stop.set()
        thread.join()

    return halt


def _no_bar(progress: bool | None) -> bool:
    try:
        return not (sys.stderr.isatty() if progress is None else progress)
    except (OSError, ValueError):
        return True
