"""Where a run's cells execute: in the driver (``InlinePool``), in local worker processes (``LocalPool``) or on a Dask cluster (``DaskPool``).

The driver (benchmark.execution.runner) speaks to all three alike: ``submit`` a task, ``wait`` for
some, ask whether an error means the worker ``died``, ``after_finish`` a cell, ``stop``. How local
workers stay tied to their driver and quiet when it stops: docs/design.md, the runner's guarantees.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from benchmark.core.files import pid_alive
from benchmark.execution.stop_signals import StopSignals
from benchmark.execution.worker import DRIVER_HANDLES, init_worker, remove_dirs

#: How to install what --backend dask needs (an optional dependency: only that backend imports it).
DASK_INSTALL = "pip install 'dask>=2024.1' 'distributed>=2024.1'  (or pip install -e '.[cluster]')"
#: How long ``LocalPool.stop`` waits for its workers to leave before it kills them (seconds).
STOP_WAIT_S = 5.0


class InlinePool:
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


@contextlib.contextmanager
def stops_blocked():
    """Block SIGINT and SIGHUP in this thread while it starts processes, which inherit the mask:
    a worker then meets them only once ``init_worker`` ignores them, and loky's resource tracker,
    which unblocks SIGINT and SIGTERM but not SIGHUP, never meets SIGHUP. Without this, closing the
    terminal (SIGHUP to the whole process group) killed the tracker, and its replacement printed a
    traceback for every semaphore the pool released. The driver gets a signal that arrives
    meanwhile once the mask is lifted (another thread may take it sooner): none is lost."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, DRIVER_HANDLES)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class LocalPool(InlinePool):
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

            from joblib.externals.loky.backend import resource_tracker
            from joblib.externals.loky.process_executor import ProcessPoolExecutor

            quiet_semaphore_warning()
            if self.gpu_slots and self.slots_dir is None:
                self.slots_dir = tempfile.mkdtemp(prefix="dwf-bench-gpu-slots-")
            with stops_blocked():
                resource_tracker.ensure_running()
                self.executor = ProcessPoolExecutor(max_workers=self.capacity, initializer=init_worker,
                                                    initargs=(os.getpid(), self.slots_dir, self.gpu_slots))
        return self.executor

    def submit(self, fn, *args):
        executor = self._executor()
        with stops_blocked():  # loky starts its workers here
            future = executor.submit(fn, *args)
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

    def owns(self, pid: int | None) -> bool:
        """Whether ``pid`` is one of this pool's live worker processes."""
        self._note_pids()
        return pid is not None and pid in self.pids and child_alive(pid)

    def kill_all(self) -> None:
        """SIGKILL every worker (one is frozen, and no progress report says which): the pool breaks,
        and its tasks fail as a dead worker's."""
        self._note_pids()
        for pid in self.pids:
            if child_alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def stop(self, kill: bool = True) -> None:
        """Stop the workers (at once with ``kill``: they are training cells that are being
        abandoned; otherwise they are idle and leave in order), and make sure they are gone."""
        self._note_pids()
        self._discard(kill)
        deadline = time.monotonic() + STOP_WAIT_S
        alive = set(self.pids)
        while alive and time.monotonic() < deadline:
            alive = {pid for pid in alive if child_alive(pid)}
            if alive:
                time.sleep(0.05)
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.slots_dir is not None:
            import shutil

            shutil.rmtree(self.slots_dir, ignore_errors=True)
            self.slots_dir = None


def quiet_semaphore_warning() -> None:
    """Workers stopped mid-cell leave their pool's semaphores to multiprocessing's resource
    tracker, which cleans them up and then warns about "leaked semaphore objects" on stderr: noise
    right under the stop message. The tracker is a child started with this environment."""
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    current = os.environ.get("PYTHONWARNINGS", "")
    if quiet not in current:
        os.environ["PYTHONWARNINGS"] = f"{current},{quiet}" if current else quiet


def child_alive(pid: int) -> bool:
    """Whether ``pid`` still runs; reaps it first if it is an exited child of this process."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child (or already reaped): ask the kernel
    return pid_alive(pid)


class DaskPool(InlinePool):
    """An existing Dask cluster; results come back to the driver. Dask is imported only here,
    when such a pool is made: the module imports without it."""

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
                self.client.run(remove_dirs, paths)  # the workers' own disks

    def stop(self, kill: bool = True) -> None:
        with contextlib.suppress(Exception):
            self._flush_cleanup()
        with contextlib.suppress(Exception):
            self.client.close(timeout=5)
