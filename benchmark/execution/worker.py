"""The worker side of a run: run one cell (or pack) and hand its records back, on its own GPU where it owns one.

A local worker process starts with ``init_worker``: it leaves stop signals to its driver, dies with
it (``die_with_parent``, ``watch_driver``) and, with ``--jobs-per-gpu``, takes a GPU slot for its
whole life (``claim_gpu``). A Dask worker runs the same ``execute``. Why workers never outlive their
driver: docs/design.md, the runner's guarantees.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from benchmark.core import cell_progress
from benchmark.execution.cell import Cell

#: How often a worker checks that its driver is alive (seconds).
WATCH_DRIVER_S = 0.5
#: Exit status of a worker that found its driver gone.
ORPHAN_EXIT = 75
#: How long a starting worker waits for a free GPU slot (one whose last owner is still exiting).
SLOT_WAIT_S = 30.0
#: The signals a driver turns into an orderly stop (``StopSignals``): its workers leave them to it.
DRIVER_HANDLES = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGHUP", None)) if s is not None)

#: The last dataset this worker loaded, on its device: workers are reused across cells.
DATA_CACHE: dict = {}
#: The GPU this worker process owns for its whole life (``claim_gpu``); empty in a process that owns
#: none. A list so that it can be filled in place (and faked in tests).
OWNED_GPU: list[int] = []
#: The open slot file whose lock says this process owns ``OWNED_GPU``.
_SLOT_FILE: list = []


def cached_data(cell: Cell, data_dir, device):
    """The cell's dataset on ``device``, from ``DATA_CACHE`` when the last cell used the same."""
    from benchmark.engine import data as data_mod

    key = (cell.dataset, str(data_dir), str(device), cell.subset, cell.schedule.validation)
    if key not in DATA_CACHE:
        DATA_CACHE.clear()
        DATA_CACHE[key] = data_mod.load(cell.dataset, data_dir, device, limit=cell.subset,
                                        validation=cell.schedule.validation)
    return DATA_CACHE[key]


def execute(config: dict | list[dict], *, data_dir, device, work_root, cache_dir, threads: int | None,
            compiled: bool = False, keep_work: bool = False, deterministic: bool = False,
            stall_s: float = cell_progress.DEFAULT_STALL_S) -> list[dict] | dict[str, list[dict]]:
    """Run one cell in a worker process and return its records (never raises for the cell; a full
    or read-only disk raises StorageError). A worker that owns a GPU (``--jobs-per-gpu``: its slot,
    ``claim_gpu``) runs every cell on that GPU, whatever ``device`` says; elsewhere ``device`` is
    picked here, on the worker's machine. A list of configs is a pack (benchmark.execution.packing): it
    returns the records of each cell by its id. ``stall_s``: the run's stall limit, for the dense-model
    lock (``Context.dense``)."""
    import torch

    from benchmark.engine import data as data_mod
    from benchmark.engine.devices import flush_cpu_denormals
    from benchmark.execution.cell import run_cell

    flush_cpu_denormals()  # before the first parallel operation, so the intra-op threads inherit it
    if threads:
        torch.set_num_threads(threads)
    cells = [Cell.from_config(c) for c in config] if isinstance(config, list) else [Cell.from_config(config)]
    cell = cells[0]
    dev = worker_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        data = cached_data(cell, data_dir, dev)
    except data_mod.DatasetMissing:
        data = None  # run_cell reports the cell as blocked
    if isinstance(config, list):
        from benchmark.execution.packing.run import run_pack

        return run_pack(cells, data_dir=data_dir, device=dev, work_root=work_root, cache_dir=cache_dir,
                        data=data, compiled=compiled, keep_work=keep_work, deterministic=deterministic,
                        stall_s=stall_s)
    return run_cell(cell, data_dir=data_dir, device=dev, work_root=work_root, cache_dir=cache_dir,
                    progress=False, data=data, compiled=compiled, keep_work=keep_work, deterministic=deterministic,
                    stall_s=stall_s)


def execute_tagged(task_id: str, config: dict | list[dict], common: dict) -> tuple[str, list[dict] | dict]:
    """``execute`` as a pool task: (the task's id, its records); the id names the task on Dask. The
    task reports its progress in each of its cells' work folders, where its driver reads it
    (benchmark.core.cell_progress)."""
    configs = config if isinstance(config, list) else [config]
    work_dirs = [Path(common["work_root"]) / Cell.from_config(c).id for c in configs]
    with cell_progress.reporting(work_dirs):
        return task_id, execute(config, **common)


def worker_device(device: str | None):
    """The device this process runs cells on: its own GPU where it owns one (``claim_gpu``), else
    ``device`` as ``pick_device`` reads it here (a CUDA device always with its index)."""
    import torch

    from benchmark.engine.devices import pick_device

    return torch.device("cuda", OWNED_GPU[0]) if OWNED_GPU else pick_device(device)


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
            OWNED_GPU[:] = [gpu]
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            return gpu
        if time.monotonic() > deadline:
            raise RuntimeError(f"no free GPU slot among {len(slots)} in {slots_dir} after {wait_s:g} s: more "
                               f"worker processes than --jobs-per-gpu x GPUs are alive")
        time.sleep(0.05)


def pin_gpu(gpu: int) -> None:
    import torch

    torch.cuda.set_device(gpu)


def init_worker(driver_pid: int, slots_dir: str | None = None, slots: list[int] | None = None) -> None:
    """Runs first in every local worker process. Ctrl-C and a closing terminal (SIGINT, SIGHUP,
    often sent to the whole process group) are the driver's to handle: it stops the workers in
    order, so a worker ignores them and prints nothing; SIGTERM ends it at once, quietly (the
    kernel's default, as loky's terminate expects). The pool starts workers with these signals
    blocked (``pools.stops_blocked``), so one that arrives before this runs is dropped here, not
    turned into a KeyboardInterrupt traceback. The worker exits as soon as its driver is gone.
    With GPU ``slots`` the worker takes one (``claim_gpu``) and makes its GPU current."""
    for sig in DRIVER_HANDLES:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, DRIVER_HANDLES)
    die_with_parent()
    watch_driver(driver_pid)
    if slots:
        pin_gpu(claim_gpu(slots_dir, slots))


def die_with_parent() -> None:
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


def remove_dirs(paths: list[str]) -> int:
    """Remove work folders on a Dask worker's disk (finished cells' checkpoints)."""
    import shutil

    removed = 0
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
