"""Run a grid: expand it into cells, skip finished ones, dispatch the rest to workers.

Workers only compute: each runs ``run_cell`` and returns its records, and the driver writes one
result file per cell as results arrive (so a cluster needs no shared disk for results, and a
killed run loses only the cells in flight, whose per-epoch checkpoints survive for the next run).
Local dispatch uses joblib's process pool (loky); ``--backend dask`` sends the same tasks to an
existing Dask cluster. A failed cell is recorded and the grid goes on.

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
- A disk that cannot take a write stops the run with a message that names the file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.core.console import say
from benchmark.execution import grids as grids_mod
from benchmark.execution.cell import Cell, prunable_layer_sizes
from benchmark.core.errors import Interrupted, RunStopped, StorageError, is_disk_error
from benchmark.core.files import pid_alive
from benchmark.execution.claims import HEARTBEAT_S
from benchmark.execution.records import DamagedResult
from benchmark.execution.store import Store
from benchmark.core.method import get_method

log = logging.getLogger("benchmark.run")

#: A cell in flight when a worker process dies this many times is recorded as failed (the others
#: go back in the queue). Several cells run at once, so one bad cell costs its neighbours a retry.
MAX_WORKER_DEATHS = 3
#: How often a worker checks that its driver is alive (seconds).
WATCH_DRIVER_S = 0.5
#: Exit status of a worker that found its driver gone.
ORPHAN_EXIT = 75
#: Seconds to wait for a Dask scheduler to answer before giving up with a message.
DASK_CONNECT_TIMEOUT_S = 10.0
#: How to install what --backend dask needs (an optional dependency: only that backend imports it).
DASK_INSTALL = "pip install 'dask>=2024.1' 'distributed>=2024.1'  (or pip install -e '.[cluster]')"
#: Environment variable holding the default of ``run --pack`` (auto when unset).
PACK_ENV = "BENCHMARK_PACK"

# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------

_DATA_CACHE: dict = {}


def _cached_data(cell: Cell, data_dir, device):
    """Workers are reused across cells: keep the last dataset on its device instead of reloading."""
    from benchmark.engine import data as data_mod

    key = (cell.dataset, str(data_dir), str(device), cell.subset, cell.schedule.validation)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = data_mod.load(cell.dataset, data_dir, device, limit=cell.subset,
                                         validation=cell.schedule.validation)
    return _DATA_CACHE[key]


def execute(config: dict | list[dict], *, data_dir, device, work_root, cache_dir, threads: int | None,
            compiled: bool = False, keep_work: bool = False, deterministic: bool = False) -> list[dict] | dict[str, list[dict]]:
    """Run one cell in a worker process and return its records (never raises for the cell; a full
    or read-only disk raises StorageError). A worker that owns a GPU (``--jobs-per-gpu``: its slot,
    ``claim_gpu``) runs every cell on that GPU, whatever ``device`` says; elsewhere ``device`` is
    picked here, on the worker's machine. A list of configs is a pack (benchmark.execution.pack): it
    returns the records of each cell by its id."""
    import torch

    from benchmark.engine import data as data_mod
    from benchmark.execution.cell import run_cell

    if threads:
        torch.set_num_threads(threads)
    cells = [Cell.from_config(c) for c in config] if isinstance(config, list) else [Cell.from_config(config)]
    cell = cells[0]
    dev = worker_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        data = _cached_data(cell, data_dir, dev)
    except data_mod.DatasetMissing:
        data = None  # run_cell reports the cell as blocked
    if isinstance(config, list):
        from benchmark.execution.packing.run import run_pack

        return run_pack(cells, data_dir=data_dir, device=dev, work_root=work_root, cache_dir=cache_dir,
                        data=data, compiled=compiled, keep_work=keep_work, deterministic=deterministic)
    return run_cell(cell, data_dir=data_dir, device=dev, work_root=work_root, cache_dir=cache_dir,
                    progress=False, data=data, compiled=compiled, keep_work=keep_work, deterministic=deterministic)


def worker_device(device: str | None):
    """The device this process runs cells on: its own GPU where it owns one (``claim_gpu``), else
    ``device`` as ``pick_device`` reads it here (a CUDA device always with its index)."""
    import torch

    from benchmark.engine.train import pick_device

    return torch.device("cuda", _WORKER_GPU[0]) if _WORKER_GPU else pick_device(device)


#: The GPU this worker process owns for its whole life (``claim_gpu``), and the open slot file whose
#: lock says so; empty in a process that owns none.
_WORKER_GPU: list[int] = []
_SLOT_FILE: list = []
#: How long a starting worker waits for a free GPU slot (one whose last owner is still exiting).
SLOT_WAIT_S = 30.0


def claim_gpu(slots_dir: str, slots: list[int], wait_s: float = SLOT_WAIT_S) -> int:
    """Take a free slot of ``slots`` (one GPU index per worker: K per GPU x N GPUs) for this process,
    for good, and return its GPU. A slot is a lock on ``slots_dir/slot-<i>``: the kernel frees it
    when its process ends however it ended, so a worker that replaces a dead one takes the dead
    one's GPU. Runs before anything touches CUDA in the process (the pool's initializer), so the
    worker builds a CUDA context on its own GPU only."""
    import fcntl

    deadline = time.monotonic() + wait_s
    while True:
        for i, gpu in enumerate(slots):
            fh = open(Path(slots_dir) / f"slot-{i}", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            _SLOT_FILE[:] = [fh]
            _WORKER_GPU[:] = [gpu]
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            return gpu
        if time.monotonic() > deadline:
            raise RuntimeError(f"no free GPU slot among {len(slots)} in {slots_dir} after {wait_s:g} s: more "
                               f"worker processes than --jobs-per-gpu x GPUs are alive")
        time.sleep(0.05)


def _pin_gpu(gpu: int) -> None:
    import torch

    torch.cuda.set_device(gpu)


def _execute_tagged(cell_id: str, config: dict, common: dict) -> tuple[str, list[dict]]:
    return cell_id, execute(config, **common)


def _worker_init(driver_pid: int, slots_dir: str | None = None, slots: list[int] | None = None) -> None:
    """Runs first in every local worker process: Ctrl-C and a closing terminal are the driver's to
    handle (it stops the workers in order), and the worker exits as soon as its driver is gone.
    With GPU ``slots`` the worker takes one (``claim_gpu``) and makes its GPU current."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent()
    watch_driver(driver_pid)
    if slots:
        _pin_gpu(claim_gpu(slots_dir, slots))


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when the thread that started it ends (the
    driver's), so even a SIGKILLed driver takes its workers along at once. The watcher thread of
    ``watch_driver`` covers other systems and the moment before this call."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def watch_driver(driver_pid: int, every: float = WATCH_DRIVER_S) -> threading.Thread:
    """A daemon thread that ends this process (exit ORPHAN_EXIT) once its parent is no longer
    ``driver_pid``: an orphaned worker would go on training for minutes and then race the next
    run for the same cells."""
    def watch():
        while True:
            if os.getppid() != driver_pid:
                os._exit(ORPHAN_EXIT)
            time.sleep(every)

    thread = threading.Thread(target=watch, name="watch-driver", daemon=True)
    thread.start()
    return thread


def _remove_dirs(paths: list[str]) -> int:
    """Remove work folders on a Dask worker's disk (finished cells' checkpoints)."""
    import shutil

    removed = 0
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------


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


def priority(cell: Cell) -> int:
    """Dense trainings first (they feed the shared cache), post-training methods last."""
    method = get_method(cell.method)
    if method.is_reference:
        return 0
    return 2 if method.needs_dense else 1


def pending_cells(store: Store, cells: list[Cell], retry_failed: bool,
                  set_aside: list | None = None) -> tuple[list[Cell], int]:
    """(cells to run, how many are done or failed). A damaged result file counts as not done; with
    ``set_aside`` (a list) it is also moved to cells/damaged/ and listed there as (path, reason)."""
    todo, skipped = [], 0
    existing = store.finished_ids()
    for cell in cells:
        status = "todo"
        if cell.id in existing:
            try:
                result = store.read(cell.id)
                status = result["status"] if result else "todo"
            except DamagedResult as exc:
                status = "todo"
                if set_aside is not None:
                    moved = store.set_aside(cell.id, exc.reason)
                    if moved is not None:
                        set_aside.append((moved, exc.reason))
        if status == "ok" or (status == "failed" and not retry_failed):
            skipped += 1
        else:
            todo.append(cell)
    return sorted(todo, key=priority), skipped


def _method(cell: Cell):
    return get_method(cell.method)(cell.method_params)


def trainings(cell: Cell) -> int:
    """Models a cell trains and measures (``Method.trainings``: a lottery ticket one per level)."""
    return _method(cell).workload.trainings(prunable_layer_sizes(cell.arch, cell.dataset))


def estimate_epochs(cell: Cell) -> int:
    """Training epochs a cell costs (``Method.Workload.training_epochs``; post-training methods reuse the
    cached dense training)."""
    return math.ceil(_method(cell).workload.training_epochs(cell.schedule, prunable_layer_sizes(cell.arch, cell.dataset)))


def threads_per_job(jobs: int) -> int:
    """CPU threads of each of ``jobs`` worker processes (GPU workers included: their data handling,
    optimizer bookkeeping and the driver share the cores too)."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


class _QuietFileHandler(logging.FileHandler):
    """A run's log must never stop it: when the disk refuses a log line, say so once on stderr
    instead of printing logging's traceback for every line."""

    _warned = False

    def handleError(self, record):  # noqa: N802 (logging's name)
        if not self._warned:
            self._warned = True
            say(f"warning: cannot write the run's log {self.baseFilename} ({sys.exc_info()[1]}); going on without it")


def _setup_logging(store: Store, run_id: str) -> Path:
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


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP, turned into an orderly stop of the run.

    The first signal only sets ``received`` (the driver's loop checks it between steps, so no
    result file or claim is left half-done), except while a cell trains in this very process
    (``interruptible``), where it raises Interrupted at once. A second signal raises at once
    wherever the driver is: a user pressing Ctrl-C twice means it.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                                getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self):
        self.received: int | None = None
        self._raise = False
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        again = self.received is not None
        if not again:
            self.received = signum
        if again or self._raise:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def interruptible(self):
        if self.received is not None:
            raise Interrupted(self.received)
        self._raise = True
        try:
            yield
        finally:
            self._raise = False


class _WorkerDied(Exception):
    """A worker process ended while a cell ran in it (killed, out of memory, crashed)."""


class _InlinePool:
    """--jobs 1: cells run in the driver process itself, one at a time."""

    capacity = 1

    def __init__(self, signals: StopSignals):
        self.signals = signals

    def submit(self, fn, *args):
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.signals.interruptible():
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed to the driver like a worker's error
                future.set_exception(exc)
        return future

    def wait(self, futures, timeout):
        return [f for f in futures if f.done()]

    def died(self, exc) -> bool:
        return False

    def after_finish(self, work_dir: Path) -> None:
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)

    def stop(self, kill: bool = True) -> None:
        pass


class LocalPool(_InlinePool):
    """Local worker processes (joblib's loky executor) that watch their driver. With ``gpu_slots``
    (one GPU index per worker) each worker owns one GPU for its whole life (``claim_gpu``)."""

    def __init__(self, signals: StopSignals, jobs: int, gpu_slots: list[int] | None = None):
        super().__init__(signals)
        self.gpu_slots = list(gpu_slots or [])
        self.capacity = len(self.gpu_slots) or jobs
        self.executor = None
        self.pids: set[int] = set()
        self.slots_dir: str | None = None

    def _executor(self):
        if self.executor is None:
            import tempfile

            from joblib.externals.loky.process_executor import ProcessPoolExecutor

            _quiet_semaphore_warning()
            if self.gpu_slots and self.slots_dir is None:
                self.slots_dir = tempfile.mkdtemp(prefix="dwf-bench-gpu-slots-")
            self.executor = ProcessPoolExecutor(max_workers=self.capacity, initializer=_worker_init,
                                                initargs=(os.getpid(), self.slots_dir, self.gpu_slots))
        return self.executor

    def submit(self, fn, *args):
        future = self._executor().submit(fn, *args)
        self._note_pids()
        return future

    def _note_pids(self) -> None:
        """Remember the workers' pids (loky's own table, read while its thread may change it)."""
        for _ in range(3):
            try:
                self.pids |= set(list(getattr(self.executor, "_processes", None) or {}))
                return
            except RuntimeError:  # changed size during iteration
                time.sleep(0.01)

    def wait(self, futures, timeout):
        done, _ = concurrent.futures.wait(futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return list(done)

    def died(self, exc) -> bool:
        from concurrent.futures.process import BrokenProcessPool

        from joblib.externals.loky.process_executor import BrokenProcessPool as LokyBroken

        if isinstance(exc, (BrokenProcessPool, LokyBroken)):
            self._discard()  # a broken pool takes no more work: the next submit starts a fresh one
            return True
        return False

    def _discard(self, kill: bool = True) -> None:
        if self.executor is not None:
            executor, self.executor = self.executor, None
            with contextlib.suppress(Exception):
                if kill:
                    executor.shutdown(wait=True, kill_workers=True)
                else:
                    executor.shutdown(wait=True)

    def stop(self, kill: bool = True) -> None:
        """Stop the workers (at once with ``kill``: they are training cells that are being
        abandoned; otherwise they are idle and leave in order), and make sure they are gone."""
        self._note_pids()
        self._discard(kill)
        deadline = time.monotonic() + 5
        alive = set(self.pids)
        while alive and time.monotonic() < deadline:
            alive = {pid for pid in alive if _child_alive(pid)}
            if alive:
                time.sleep(0.05)
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.slots_dir is not None:
            import shutil

            shutil.rmtree(self.slots_dir, ignore_errors=True)
            self.slots_dir = None


def _quiet_semaphore_warning() -> None:
    """Workers stopped mid-cell leave their pool's semaphores to multiprocessing's resource
    tracker, which cleans them up and then warns about "leaked semaphore objects" on stderr: noise
    right under the stop message. The tracker is a child started with this environment."""
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    current = os.environ.get("PYTHONWARNINGS", "")
    if quiet not in current:
        os.environ["PYTHONWARNINGS"] = f"{current},{quiet}" if current else quiet


def _child_alive(pid: int) -> bool:
    try:  # reap it if it is our child and has exited
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child (or already reaped): ask the kernel
    return pid_alive(pid)


class _DaskPool(_InlinePool):
    """An existing Dask cluster; results come back to the driver."""

    def __init__(self, signals: StopSignals, scheduler: str, jobs: int | None, timeout: float):
        super().__init__(signals)
        try:
            from distributed import Client
        except ImportError:
            raise ValueError(f"--backend dask needs dask.distributed, which is not installed here: {DASK_INSTALL}") from None

        try:
            self.client = Client(scheduler, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ValueError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there within {timeout:g} s "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); start the "
                             f"cluster first and check the address (tcp://HOST:PORT), or run without --backend "
                             f"dask") from None
        self.scheduler = scheduler
        self.jobs = jobs
        self._capacity, self._checked = 1, 0.0
        self._cleanup: list[str] = []
        self._cleaned_at = time.monotonic()

    @property
    def capacity(self) -> int:  # type: ignore[override]
        if self.jobs:
            return self.jobs
        if time.monotonic() - self._checked > 5:
            with contextlib.suppress(Exception):
                self._capacity = max(1, sum(self.client.nthreads().values()))
            self._checked = time.monotonic()
        return self._capacity

    def check_data_dir(self, data_dir: str) -> None:
        """--data-dir must exist on every worker (it is their path, not the driver's)."""
        found = self.client.run(os.path.isdir, data_dir)
        missing = sorted(worker for worker, ok in found.items() if not ok)
        if missing:
            raise ValueError(f"--data-dir {data_dir}: no such folder on Dask worker(s) {', '.join(missing)}; "
                             f"it must be valid on the workers' machines")

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False, key=f"cell-{args[0]}-{uuid.uuid4().hex[:8]}")

    def wait(self, futures, timeout):
        deadline = time.monotonic() + timeout
        while True:
            done = [f for f in futures if f.done()]
            if done or time.monotonic() >= deadline:
                return done
            time.sleep(0.02)

    def died(self, exc) -> bool:
        from distributed import KilledWorker

        return isinstance(exc, KilledWorker)

    def after_finish(self, work_dir: Path) -> None:
        super().after_finish(work_dir)  # a shared or loopback disk
        self._cleanup.append(str(work_dir))
        if time.monotonic() - self._cleaned_at > 10:
            self._flush_cleanup()

    def _flush_cleanup(self) -> None:
        paths, self._cleanup = self._cleanup, []
        self._cleaned_at = time.monotonic()
        if paths:
            with contextlib.suppress(Exception):
                self.client.run(_remove_dirs, paths)  # the workers' own disks

    def stop(self, kill: bool = True) -> None:
        with contextlib.suppress(Exception):
            self._flush_cleanup()
        with contextlib.suppress(Exception):
            self.client.close(timeout=5)


def _failed_record(cell: Cell, error: str, tb: str | None = None) -> list[dict]:
    from benchmark.execution.cell import cell_columns

    record = cell_columns(cell) | {"status": "failed", "error": error, "config": cell.config(), "wall_s": 0.0}
    if tb:
        record["traceback"] = tb
    return [record]


def run_grid(grid: grids_mod.Grid, cells: list[Cell], *, results_dir="results", jobs: int | None = None,
             jobs_per_gpu: int | None = None, backend: str = "local", scheduler: str | None = None,
             data_dir=None, device: str = "auto", retry_failed: bool = False, progress: bool | None = None,
             compiled: bool = False, scheduler_timeout: float = DASK_CONNECT_TIMEOUT_S,
             pack: str | int = "off", slurm=None, deterministic: bool = False) -> RunSummary:
    """Run every unfinished cell; returns counts. Safe to kill and rerun at any point; a stop
    signal ends it in order (``summary.stopped_by``). ``pack``: auto, off or N (benchmark.execution.pack_plan);
    a pack is claimed cell by cell, and each cell's result is written as it would be alone. ``slurm``
    (benchmark.execution.slurm.SlurmOptions, with backend dask): the Dask workers run in SLURM jobs it starts.
    ``jobs_per_gpu`` K: K worker processes per visible GPU, each owning one GPU for its life.
    ``deterministic``: reproducible cuDNN/cuBLAS kernels on GPUs (``run_cell``)."""
    from benchmark.core.progress import bar_class

    tqdm = bar_class()
    if backend not in ("local", "dask"):
        raise ValueError(f"unknown backend {backend!r}; use local or dask")
    if backend == "dask" and not scheduler and slurm is None:
        raise ValueError("--backend dask needs --scheduler ADDRESS (e.g. tcp://10.0.0.5:8786)")
    gpu_slots: list[int] = []
    threads = None
    if backend == "local":
        gpu_slots, threads = local_workers(device, jobs, jobs_per_gpu)

    store = Store(results_dir, grid.name)
    store.check_writable()
    run_id = uuid.uuid4().hex[:12]
    log_path = _setup_logging(store, run_id)
    set_aside: list = []
    todo, skipped = pending_cells(store, cells, retry_failed, set_aside)
    summary = RunSummary(skipped=skipped, log=log_path, set_aside=set_aside)
    for moved, reason in set_aside:
        log.warning("damaged result file set aside to %s (%s); its cell runs again", moved, reason)
        say(f"warning: damaged result file set aside to {moved}: {reason}; its cell runs again")
        store.event("damaged", moved.name.split(".")[0], run_id, reason=reason, moved_to=str(moved))
    log.info("run %s: grid %s (%s), %d cells, %d to run, %d already done, backend=%s",
             run_id, grid.name, grid.source, len(cells), len(todo), skipped, backend)
    _sweep_finished_work(store)
    store.sweep_leftovers()
    if not todo:
        return summary

    signals = StopSignals().install()
    pool: _InlinePool | None = None
    bar = None
    stop_heartbeat = None
    began = time.perf_counter()
    started_at = time.time()
    in_flight: dict = {}
    queue: deque = deque()
    deaths: Counter = Counter()
    try:
        if backend == "dask" and slurm is not None:
            from benchmark.execution import slurm as slurm_mod

            pool = slurm_mod.pool(signals, slurm, jobs, scheduler_timeout, store.root / "slurm-logs", say)
            threads = None
            if data_dir:
                pool.check_data_dir(str(data_dir))
        elif backend == "dask":
            pool = _DaskPool(signals, scheduler, jobs, scheduler_timeout)
            threads = None
            if data_dir:
                pool.check_data_dir(str(data_dir))
        elif gpu_slots:
            pool = LocalPool(signals, len(gpu_slots), gpu_slots)
        elif (jobs or 1) > 1:
            pool = LocalPool(signals, jobs)
        else:
            pool = _InlinePool(signals)
        queue.extend(_plan(todo, pack, backend, device, gpu_slots, jobs, threads, compiled, results_dir))
        common = {"data_dir": data_dir, "device": device, "work_root": str(store.work_dir),
                  "cache_dir": str(Path(results_dir) / "cache"), "threads": threads, "compiled": compiled,
                  "keep_work": True, "deterministic": deterministic}
        bar = tqdm(total=len(todo), desc=f"grid {grid.name}", unit="cell", disable=_no_bar(progress),
                   dynamic_ncols=True)
        stop_heartbeat = start_heartbeat(store, run_id)

        def finish(cell: Cell, records: list[dict]) -> None:
            holder = store.holder(cell.id)
            if holder != run_id and store.status(cell.id) == "ok":
                # another driver took the claim over (it thought this one dead) and finished first
                log.warning("%s %s was finished by run %s meanwhile; not written again", cell.id, cell.label(), holder)
                summary.skipped += 1
                bar.update(1)
                return
            result = store.write(cell.id, cell.config(), records, run_id)
            status = result["status"]
            store.event("finish" if status == "ok" else status, cell.id, run_id,
                        wall_s=sum(r.get("wall_s", 0) or 0 for r in records[:1]))
            store.release(cell.id, run_id)
            if status == "ok":
                pool.after_finish(store.work_dir / cell.id)
                summary.finished += 1
                summary.finished_labels.append(cell.label())
                log.info("finished %s %s", cell.id, cell.label())
            else:
                summary.failed += status == "failed"
                summary.blocked += status == "blocked"
                log.warning("%s %s %s: %s", status, cell.id, cell.label(), records[0].get("error"))
                tqdm.write(f"{status}: {cell.label()}: {str(records[0].get('error')).splitlines()[0]}", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(done=summary.finished, failed=summary.failed, blocked=summary.blocked,
                            left=bar.total - bar.n)

        def outcome(future, cell: Cell) -> None:
            try:
                exc = future.exception()
            except concurrent.futures.CancelledError as cancelled:
                exc = cancelled
            if exc is None:
                _, records = future.result()
                finish(cell, records[cell.id] if isinstance(records, dict) else records)
                return
            if is_disk_error(exc):
                raise StorageError.from_os_error(exc) from None
            if isinstance(exc, concurrent.futures.CancelledError):
                raise RunStopped(f"the Dask scheduler at {scheduler} dropped the run's tasks (was it restarted "
                                   f"or lost?); nothing in flight was recorded, rerun the same command to resume")
            if pool.died(exc):
                if signals.received:
                    return  # stopping anyway: the cell stays unrecorded for the next run
                deaths[cell.id] += 1
                summary.worker_deaths += 1
                store.sweep_leftovers()  # what the dead worker was writing
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if backend == "dask" or deaths[cell.id] >= MAX_WORKER_DEATHS:
                    times = deaths[cell.id] if backend == "local" else "several"
                    finish(cell, _failed_record(cell, f"WorkerDied: the worker process running this cell died "
                                                      f"{times} times (killed, or out of memory?): {first_line}"))
                    return
                log.warning("a worker died while %s %s ran (%s); it goes back in the queue", cell.id, cell.label(),
                            first_line)
                store.release(cell.id, run_id)
                summary.requeued += 1
                queue.appendleft(cell)
                return
            # the worker machinery itself failed for this cell (e.g. it could not be sent): data too
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            finish(cell, _failed_record(cell, f"{type(exc).__name__}: {exc}", tb))

        def take(cell: Cell) -> bool:
            """Claim ``cell`` for this run, unless it is finished or claimed elsewhere."""
            status = store.status(cell.id)
            if status == "ok" or (status in ("failed", "blocked") and _written_since(store, cell.id, started_at)):
                summary.skipped += 1  # another driver finished it meanwhile
                bar.update(1)
                return False
            if status == "damaged":  # damaged since this run listed the grid
                moved = store.set_aside(cell.id, "damaged while this run was going")
                if moved is not None:
                    summary.set_aside.append((moved, "damaged while this run was going"))
            if not store.claim(cell.id, run_id):
                summary.busy += 1
                bar.update(1)
                return False
            store.event("start", cell.id, run_id, label=cell.label())
            return True

        while queue or in_flight:
            if signals.received:
                raise Interrupted(signals.received)
            while queue and len(in_flight) < pool.capacity:
                unit = queue.popleft()
                cells = [cell for cell in (unit if isinstance(unit, list) else [unit]) if take(cell)]
                if not cells:
                    continue
                try:
                    if len(cells) == 1:
                        future = pool.submit(_execute_tagged, cells[0].id, cells[0].config(), common)
                    else:
                        future = pool.submit(_execute_tagged, f"{cells[0].id}+{len(cells) - 1}",
                                             [c.config() for c in cells], common)
                except Exception as exc:  # noqa: BLE001 - a broken pool refuses work: start a fresh one
                    if not pool.died(exc):
                        raise
                    for cell in cells:
                        store.release(cell.id, run_id)
                    queue.appendleft(cells if len(cells) > 1 else cells[0])
                    continue
                in_flight[future] = cells
                if signals.received:
                    raise Interrupted(signals.received)
            if not in_flight:
                continue
            for future in pool.wait(list(in_flight), timeout=0.25):
                cells = in_flight.pop(future)
                for cell in cells:  # a pack's cells one by one, each written as it would be alone
                    outcome(future, cell)
    except Interrupted as stop:
        summary.stopped_by = stop.signum
        summary.not_started = (sum(len(unit) if isinstance(unit, list) else 1 for unit in queue) if pool is not None
                               else len(todo))  # stopped while the workers started (--backend slurm)
    finally:
        if bar is not None:
            bar.close()
        if stop_heartbeat is not None:
            stop_heartbeat()
        if pool is not None:
            pool.stop(kill=bool(in_flight) or summary.stopped_by is not None)  # workers first: nothing of
            # this run may write after its claims are gone
        released = store.release_run(run_id)  # cells in flight when it stopped: free them for the next run
        signals.restore()
        if summary.stopped_by is not None:
            summary.stopped_in_flight = released
            log.warning("run %s stopped by %s: %d finished, %d in flight stopped and released, %d not started",
                        run_id, signal_name(summary.stopped_by), summary.finished, released, summary.not_started)
        log.info("run %s ended after %.0f s: %s", run_id, time.perf_counter() - began, summary)
    return summary


def local_workers(device: str, jobs: int | None, jobs_per_gpu: int | None) -> tuple[list[int], int]:
    """(GPU slots, threads per worker) of a local run. ``--jobs-per-gpu`` K on N visible GPUs: K x N
    slots, one per worker, in the order 0..N-1, 0..N-1, ... (so the first N workers to start take
    different GPUs); threads: the cores shared by every worker, GPU workers included."""
    gpu_slots: list[int] = []
    if jobs_per_gpu:
        n_gpus = _visible_gpus() if device in ("auto", "cuda") else 0
        if not n_gpus:
            raise ValueError(f"--jobs-per-gpu {jobs_per_gpu}: no CUDA GPU is visible here (device {device!r}); "
                             f"use --jobs N for CPU worker processes")
        if jobs:
            raise ValueError("give either --jobs (CPU processes) or --jobs-per-gpu (GPU slots), not both")
        gpu_slots = [gpu for _ in range(jobs_per_gpu) for gpu in range(n_gpus)]
    return gpu_slots, threads_per_job(len(gpu_slots) or jobs or 1)


def _plan(todo: list[Cell], pack, backend: str, device: str, gpu_slots: list[int], jobs: int | None,
          threads: int | None, compiled: bool, results_dir) -> list:
    """The run's units of work (benchmark.execution.pack_plan): cells, and packs of cells. ``auto`` measures
    here, on the device and with the threads a local worker gets; on Dask it packs nothing. Groups
    are shared out over every worker (K per GPU x N GPUs), and a pack's memory over the K workers
    of one GPU. On a GPU the planning runs in a child process, so that the driver holds no CUDA
    context and no calibration memory while the run goes on."""
    from benchmark.execution.packing import plan as pack_plan

    setting = pack_plan.parse_pack(pack)
    if setting == "off" or compiled:  # packed training does not compile (check_run_inputs refuses --pack N)
        return list(todo)
    from benchmark.engine.train import pick_device

    dev = None if backend == "dask" else pick_device(f"cuda:{gpu_slots[0]}" if gpu_slots else device)
    workers = len(gpu_slots) or (jobs or 1)
    sharing = gpu_slots.count(gpu_slots[0]) if gpu_slots else workers
    def tell(line: str) -> None:
        log.info(line)
        say(line)

    args = (todo, setting, dev, workers, sharing, threads, str(Path(results_dir) / "cache"))
    if dev is None or dev.type != "cuda":
        return _plan_units(*args, say=tell)[0]
    units, lines = plan_in_child(*args)
    for line in lines:
        tell(line)
    return units


def _plan_units(todo: list[Cell], setting, dev, workers: int, sharing: int, threads: int | None, cache_dir: str,
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
    """``_plan_units`` in a child process: the units as positions in ``todo`` (cheap to send back)."""
    units, lines = _plan_units(todo, *args)
    where = {cell.id: i for i, cell in enumerate(todo)}
    return [[where[c.id] for c in u] if isinstance(u, list) else where[u.id] for u in units], lines


def plan_in_child(todo: list[Cell], *args) -> tuple[list, list[str]]:
    """Plan in a short-lived child process (spawned: CUDA is never forked), which takes its CUDA
    context and calibration memory with it when it ends."""
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        indices, lines = child.submit(_plan_indices, todo, *args).result()
    return [[todo[i] for i in u] if isinstance(u, list) else todo[u] for u in indices], lines


def _written_since(store: Store, cell_id: str, since: float) -> bool:
    try:
        result = store.read(cell_id)
    except DamagedResult:
        return False
    return bool(result) and (result.get("finished_at") or 0) >= since


def _sweep_finished_work(store: Store) -> None:
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


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return f"signal {signum}"


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def _no_bar(progress: bool | None) -> bool:
    try:
        return not (sys.stderr.isatty() if progress is None else progress)
    except (OSError, ValueError):
        return True
