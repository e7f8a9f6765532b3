"""What the driver reads from its cells in flight: their progress files, which of them are frozen, and what a run resumes.

Workers report progress in ``<work>/<cell id>/progress.json`` (benchmark.core.cell_progress). A
task whose newest report (or, in a local pool, its hand-out) is older than its stall limit is
frozen: the driver kills its worker and requeues it like a worker that died (docs/design.md,
"Progress and liveness").
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from benchmark.core import cell_progress

#: Least time a task in a local pool may go without any report (a fresh worker process starts first).
STARTUP_GRACE_S = 120.0


@dataclass
class Stalled:
    """A task that made no progress for ``silent_s`` seconds, over its ``limit_s``; ``pid`` and
    ``host`` of its worker where its progress file names them."""

    future: object
    cells: list
    silent_s: float
    limit_s: float
    pid: int | None
    host: str | None
    reported_at: float | None  # when the report naming them was written


def newest_report(work_dir: Path, cells) -> dict | None:
    """The freshest progress report among ``cells`` (a pack's share one worker)."""
    reports = [cell_progress.read_progress(cell_progress.progress_path(work_dir / cell.id)) for cell in cells]
    reports = [r for r in reports if r is not None]
    return max(reports, key=lambda r: r["updated"], default=None)


def stalled_tasks(in_flight: dict, handed_out: dict, reports: dict, floor_s: float, from_hand_out: bool,
                  now: float | None = None) -> list[Stalled]:
    """The tasks of ``in_flight`` (future -> cells) that are frozen. ``reports`` holds each task's
    newest report (or None); ``handed_out`` when each was submitted (epoch seconds). A task with
    no report counts from its hand-out only when ``from_hand_out`` (a local pool, whose tasks start when
    handed out; a Dask task may wait in the scheduler's queue)."""
    now = time.time() if now is None else now
    found = []
    for future, cells in in_flight.items():
        report = reports.get(future)
        if report is None and not from_hand_out:
            continue
        # a requeued cell's old report is older than its new hand-out (or than its last kill: ``handed_out``)
        last = max(handed_out.get(future, now), report["updated"] if report else 0.0)
        # before its first report a worker may still be starting (imports, CUDA): a longer grace
        limit = cell_progress.stall_limit(report, floor_s) if report else max(floor_s, STARTUP_GRACE_S)
        if now - last > limit:
            found.append(Stalled(future, cells, now - last, limit, report["pid"] if report else None,
                                 report["host"] if report else None, report["updated"] if report else None))
    return found


def kill_local(pid: int | None, host: str | None) -> bool:
    """SIGKILL process ``pid`` when it runs on this machine (a stopped process dies of it too)."""
    if pid is None or host != socket.gethostname() or pid == os.getpid():
        return False
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False


def resume_note(work_dir: Path, todo, done: int) -> str | None:
    """"resuming: N cells done, M resume from their checkpoints (epochs ...)", or None for a fresh run."""
    resumed = []
    for cell in todo:
        folder = work_dir / cell.id
        try:
            has_checkpoint = any(name.endswith(".ckpt") for name in os.listdir(folder))
        except OSError:
            continue
        if has_checkpoint:
            report = cell_progress.read_progress(cell_progress.progress_path(folder))
            resumed.append(report["epochs"] if report else None)
    if not done and not resumed:
        return None
    note = f"resuming: {done} cell{'s' * (done != 1)} done"
    if resumed:
        epochs = sorted(e for e in resumed if e)
        at = f" (after {', '.join(map(str, epochs[:8]))}{', ...' if len(epochs) > 8 else ''} epochs)" if epochs else ""
        note += f", {len(resumed)} resume from epoch checkpoints{at}"
    return note
