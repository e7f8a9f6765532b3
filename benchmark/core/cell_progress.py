"""The progress channel from a training process to its driver: a small JSON file per cell in flight.

A worker (local process or Dask worker on the driver's machine) writes ``progress.json`` in each of
its cells' work folders: at the start of a task, after every epoch and at least every
``STEP_REPORT_S`` seconds of steps. The driver reads these files to move its bar per epoch and to
tell a worker that trains from one that is frozen (docs/design.md, "Progress and liveness"). The
file is input like any other in a shared folder: ``read_progress`` checks it and ignores a damaged
one (liveness then falls back to the time the task was handed out).

Besides, the module keeps the seconds a cell spent before it was resumed from a checkpoint, so that
a resumed cell's ``wall_s`` is its whole training time (``elapsed_s``, ``note_resumed``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from benchmark.core.files import atomic_write_text
from benchmark.core.untrusted import DamagedFile, is_number, parse_json, read_text

#: The progress file's name in a cell's work folder.
PROGRESS_FILE = "progress.json"
#: Longest time between two progress writes while steps run (seconds).
STEP_REPORT_S = 10.0
#: Largest progress file the driver reads (bytes).
PROGRESS_LIMIT = 4096

_lock = threading.Lock()
#: What this process reports now: the progress files it writes and what they say.
REPORT: dict = {"paths": [], "epochs": 0, "epoch_s": [], "written": 0.0, "longest_gap_s": 0.0}
#: When the current cell started in this process, and the seconds it had run before a resume.
CELL_CLOCK: dict = {"started": None, "before_s": 0.0}


def progress_path(work_dir: Path | str) -> Path:
    return Path(work_dir) / PROGRESS_FILE


def _write(now: float) -> None:
    """Write the report to every path (``REPORT``'s lock held); a disk that refuses it is ignored:
    progress is advisory, the cell must not fail for it."""
    if REPORT["written"]:
        REPORT["longest_gap_s"] = max(REPORT["longest_gap_s"], now - REPORT["written"])
    REPORT["written"] = now
    times = REPORT["epoch_s"]
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "epochs": REPORT["epochs"],
                       "epoch_s": sum(times) / len(times) if times else None,
                       "longest_gap_s": REPORT["longest_gap_s"], "updated": time.time()})
    for path in REPORT["paths"]:
        with contextlib.suppress(Exception):
            atomic_write_text(path, text, durable=False, make_parents=True)


@contextlib.contextmanager
def reporting(work_dirs: list[Path | str]):
    """Report this process's training progress to the progress files of ``work_dirs`` while inside."""
    with _lock:
        REPORT.update(paths=[progress_path(d) for d in work_dirs], epochs=0, epoch_s=[], written=0.0,
                      longest_gap_s=0.0)
        _write(time.monotonic())
    try:
        yield
    finally:
        with _lock:
            REPORT["paths"] = []


def epochs_resumed(epochs: int) -> None:
    """``epochs`` were found done in a checkpoint: they count as progress."""
    with _lock:
        REPORT["epochs"] += epochs
        if REPORT["paths"]:
            _write(time.monotonic())


def epoch_done(seconds: float) -> None:
    """One epoch ended after ``seconds`` of training and evaluation."""
    with _lock:
        REPORT["epochs"] += 1
        REPORT["epoch_s"].append(seconds)
        if REPORT["paths"]:
            _write(time.monotonic())


def step_done() -> None:
    """One optimizer step ended: reported at most every ``STEP_REPORT_S`` seconds (cheap otherwise)."""
    if REPORT["paths"] and time.monotonic() - REPORT["written"] >= STEP_REPORT_S:
        with _lock:
            _write(time.monotonic())


def still_working() -> None:
    """Alive and making progress without training steps (waiting on a lock whose holder trains)."""
    step_done()


def read_progress(path: Path | str) -> dict | None:
    """The progress file at ``path`` when it is one (an untrusted file); None otherwise."""
    try:
        text = read_text(path, PROGRESS_LIMIT)
        value = parse_json(path, text) if text is not None else None
    except (DamagedFile, OSError):
        return None
    if not isinstance(value, dict):
        return None
    if not (is_number(value.get("updated")) and isinstance(value.get("epochs"), int) and value["epochs"] >= 0
            and isinstance(value.get("pid"), int) and isinstance(value.get("host"), str)):
        return None
    for key in ("epoch_s", "longest_gap_s"):
        if value.get(key) is not None and not is_number(value[key], at_least=0):
            value[key] = None
    return value


# -- the cell's clock across resumes -------------------------------------------------------------


def start_cell() -> None:
    """A cell starts in this process (``run_cell``): nothing resumed yet."""
    CELL_CLOCK.update(started=time.perf_counter(), before_s=0.0)


def note_resumed(elapsed_s) -> None:
    """A checkpoint written after ``elapsed_s`` seconds of this cell was loaded: the cell had run
    that long before this process took it up (the largest such, over the cell's phases)."""
    if is_number(elapsed_s, at_least=0):
        CELL_CLOCK["before_s"] = max(CELL_CLOCK["before_s"], float(elapsed_s))


def resumed_seconds() -> float:
    """Seconds the current cell ran before it was resumed here (0 for an uninterrupted cell)."""
    return CELL_CLOCK["before_s"]


def elapsed_s() -> float:
    """Seconds of the current cell so far, earlier runs before a resume included (stored in checkpoints)."""
    started = CELL_CLOCK["started"]
    return CELL_CLOCK["before_s"] + (time.perf_counter() - started if started is not None else 0.0)


# -- how long no progress means frozen -------------------------------------------------------------

#: Seconds without progress after which a training process counts as frozen, unless the run says
#: otherwise (``run --stall-timeout``, ``RunOptions.stall_timeout``, passed down to the workers): long
#: beside any step or evaluation, short beside hours of a frozen run.
DEFAULT_STALL_S = 600.0
#: How many of its own longest gaps between progress reports a process may stay silent.
STALL_FACTOR = 10.0
#: How often a lock waiter looks at the lock and its holder's progress (seconds).
LOCK_POLL_S = 0.5


def stall_problem(seconds, flag: str = "--stall-timeout") -> str | None:
    """What is wrong with ``seconds`` as a stall limit (a number of seconds above 0, finite), as a
    message naming ``flag``, the value and the fix; None when it is fine."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
        return (f"{flag} {seconds!r}: give a number of seconds above 0 (default {DEFAULT_STALL_S:g}), "
                f"e.g. {flag} 300")
    return None


def stall_limit(progress: dict | None, floor: float) -> float:
    """Seconds without a report after which the process behind ``progress`` counts as frozen: much
    longer than its own longest measured gap between reports, and never under ``floor``."""
    gap = (progress or {}).get("longest_gap_s") or 0.0
    return max(floor, STALL_FACTOR * gap)


class LockGivenUp(RuntimeError):
    """A lock's holder made no progress for the stall limit; the waiter went on without the lock."""


@contextlib.contextmanager
def watched_lock(path: Path | str, warn=None, stall_s: float = DEFAULT_STALL_S):
    """An exclusive lock on ``path`` between processes of this machine (flock: freed when its holder
    dies) whose waiters do not wait for ever on a frozen holder. The holder reports its progress in
    ``<path>.progress.json`` (each epoch and step it trains meanwhile); a waiter that sees no
    progress for ``stall_s`` seconds (the run's stall limit) calls ``warn`` with a message naming the
    holder and goes on without the lock. A waiter stays alive for its driver meanwhile
    (``still_working``). Where there is no fcntl it does not lock (docs/design.md, "Progress and
    liveness")."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    holder_report = Path(f"{path}.progress.json")
    with open(path, "a+") as fh:
        waiting_since = time.time()
        locked = False
        while not locked:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except OSError:
                pass
            seen = read_progress(holder_report)
            last = max(waiting_since, seen["updated"] if seen else 0.0)
            if time.time() - last > stall_s:
                holder = f"process {seen['pid']} on {seen['host']}" if seen else "another process"
                if warn is not None:
                    warn(f"the lock {path} is held by {holder}, which made no progress for {time.time() - last:.0f} s "
                         f"(frozen?); going on without it (the work it guards is deterministic and written "
                         f"atomically, so at worst it is done twice)")
                break
            still_working()
            time.sleep(LOCK_POLL_S)
        with _lock:
            REPORT["paths"].append(holder_report)
            _write(time.monotonic())
        try:
            yield locked
        finally:
            with _lock, contextlib.suppress(ValueError):
                REPORT["paths"].remove(holder_report)
            if locked:
                fcntl.flock(fh, fcntl.LOCK_UN)
