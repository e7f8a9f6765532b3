"""Running a pack: its cells' methods, each in a thread of its own, their trainings as one stacked model.

A pack is a unit of work of the runner: a list of cells that share architecture, dataset, subset,
schedule and the structure of what they train (``benchmark.execution.packing.plan.pack_key``).
``run_pack`` runs every cell's own method, unchanged, each in a thread of its own, one thread at a
time: when a method asks its context to train (``Context.train``, or ``Context.dense`` for the
cached dense model), its thread waits; once every cell waits or has finished, the waiting
trainings that can stack (``benchmark.execution.packing.jobs.signature``) train together as one
model, each into its own checkpoint, and every method goes on. Its own ``train`` call then finds
the finished checkpoint and returns the history without training, so a method sees what it would
see alone. A lottery ticket's levels are successive trainings: each level of the cells of a pack
trains together.

What the records gain: ``pack_size`` (cells in the pack), and ``wall_s`` is the cell's share of
the pack's time. Cell ids do not change.

A training that cannot stack (hooks that act between steps, ``torch.compile``, a layer without a
stacked kernel) runs alone in its thread, as it would without packing; a training that fails in
the pack for another reason than divergence (out of memory, say) is logged and each of its cells
trains alone from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmark.core import cell_progress
from benchmark.engine.schedule import REWIND_EPOCHS, REWIND_ITERATIONS
from benchmark.engine.train import TrainHooks
from benchmark.execution.cell import Cell, Context, run_cell
from benchmark.execution.packing.jobs import Job, resume_together, signature, why_not_packable
from benchmark.execution.packing.model import NotStackable
from benchmark.execution.packing.train import train_packed

log = logging.getLogger("benchmark.run")


class PackAborted(BaseException):
    """The pack stopped (a signal, a full disk): a waiting method ends without a record."""


@dataclass
class _Request:
    job: Job
    lock: Path | None = None  # held while a shared (dense) training runs, as Context.dense holds it
    done: Path | None = None  # if this file exists once the lock is held, there is nothing to train


@dataclass
class _Member:
    cell: Cell
    request: _Request | None = None
    records: list[dict] | None = None
    error: BaseException | None = None
    done: bool = False
    abort: bool = False
    resume: threading.Event = field(default_factory=threading.Event)
    yielded: threading.Event = field(default_factory=threading.Event)

    def wait_for(self, request: _Request) -> None:
        """Hand the turn back to the pack until it has trained ``request``."""
        self.request = request
        self.yielded.set()
        self.resume.wait()
        self.resume.clear()
        if self.abort:
            raise PackAborted()
        if request.job.error is not None:
            raise request.job.error


class PackContext(Context):
    """A cell's context inside a pack: trainings wait for the pack, then read their checkpoint."""

    def __init__(self, *args, member: _Member, **kwargs):
        super().__init__(*args, **kwargs)
        self.member = member

    def train(self, model, hooks=None, phase="train", schedule=None, snapshot_epochs=(), first_epoch=0, **options):
        if not options and not self.compiled:
            self.member.wait_for(_Request(Job(model, schedule or self.schedule, self.cell.seed,
                                              self.work_dir / f"{phase}.ckpt", hooks or TrainHooks(),
                                              tuple(snapshot_epochs), first_epoch, self.channels_last)))
        return super().train(model, hooks, phase, schedule, snapshot_epochs, first_epoch, **options)

    def dense(self, snapshot: int | str | None = None):
        key = self.dense_key()
        final = self.cache_dir / f"dense-{key}.pt"
        if not final.is_file() and not self.compiled:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            job = Job(self.new_model(), self.schedule, self.cell.seed, self.cache_dir / f"dense-{key}.ckpt",
                      TrainHooks(), REWIND_EPOCHS, 0, self.channels_last, snapshot_steps=REWIND_ITERATIONS)
            self.member.wait_for(_Request(job, lock=self.cache_dir / f"dense-{key}.lock", done=final))
        return super().dense(snapshot)  # reads the packed run's checkpoint: every REWIND_POINTS snapshot


def run_pack(cells: list[Cell], *, data, device, work_root, cache_dir, keep_work: bool = False,
             data_dir=None, compiled: bool = False, deterministic: bool = False,
             stall_s: float = cell_progress.DEFAULT_STALL_S) -> dict[str, list[dict]]:
    """Run the cells as one pack; returns each cell's records (as ``run_cell`` makes them, with
    ``pack_size`` and the cell's share of the pack's ``wall_s``). Raises StorageError like
    ``run_cell``. ``stall_s``: the run's stall limit, for the dense-model locks."""
    began = time.perf_counter()
    members = [_Member(cell) for cell in cells]
    threads = [threading.Thread(target=_member_body, name=f"pack-{cell.id}", daemon=True,
                                args=(m, dict(data=data, device=device, work_root=work_root, cache_dir=cache_dir,
                                              keep_work=keep_work, data_dir=data_dir, compiled=compiled,
                                              deterministic=deterministic, stall_s=stall_s)))
               for m, cell in zip(members, cells)]
    for thread in threads:
        thread.start()
    try:
        while True:
            for m in members:
                if not m.done and m.request is None:
                    _turn(m)
            failed = next((m.error for m in members if m.error is not None), None)
            if failed is not None:
                raise failed
            waiting = [m for m in members if m.request is not None]
            if not waiting:
                break
            _train_waiting(waiting, data, stall_s)
            for m in waiting:
                m.request = None
    except BaseException:
        for m in members:
            m.abort = True
            m.resume.set()
        for thread in threads:
            thread.join(timeout=5)
        raise
    share = (time.perf_counter() - began) / len(cells)
    return {m.cell.id: [r | {"pack_size": len(cells), "wall_s": share} for r in m.records] for m in members}


def _member_body(member: _Member, options: dict) -> None:
    member.resume.wait()
    member.resume.clear()
    try:
        device = options["device"]
        if isinstance(device, torch.device) and device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # the current device is per thread; the worker chose this one
        if not member.abort:
            member.records = run_cell(member.cell, progress=False,
                                      context=functools.partial(PackContext, member=member), **options)
    except PackAborted:
        pass
    except BaseException as exc:  # noqa: BLE001 - StorageError and the like: the pack re-raises it
        member.error = exc
    finally:
        member.done = True
        member.yielded.set()


def _turn(member: _Member) -> None:
    """Let one member run until it waits for a training or ends (one thread at a time: the
    methods' model building draws from torch's global generator)."""
    member.yielded.clear()
    member.resume.set()
    while not member.yielded.wait(0.5):
        pass


def _train_waiting(waiting: list[_Member], data, stall_s: float) -> None:
    """Train the waiting requests: each shared checkpoint once, under its lock (given up on a holder
    silent for ``stall_s``); stackable ones together."""
    unique: dict[Path, _Request] = {}
    for m in waiting:
        unique.setdefault(m.request.job.checkpoint, m.request)
    with contextlib.ExitStack() as locks:
        jobs = []
        for request in sorted(unique.values(), key=lambda r: str(r.job.checkpoint)):
            if request.lock is not None:
                locks.enter_context(cell_progress.watched_lock(request.lock, warn=log.warning, stall_s=stall_s))
                if request.done is not None and request.done.is_file():
                    continue
            if why_not_packable(request.job) is None:
                jobs.append(request.job)
        resume_together(jobs)
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(signature(job), []).append(job)
        for group in groups.values():
            if len(group) < 2:
                continue  # trains alone in its own thread, as without packing
            log.info("packed training: %d models as one (%s)", len(group), group[0].checkpoint.name)
            try:
                train_packed(group, data)
            except (NotStackable, RuntimeError) as exc:  # a full disk (StorageError, an OSError) stops the run
                log.warning("a pack of %d trainings failed (%s: %s); each goes on alone from its last checkpoint",
                            len(group), type(exc).__name__, exc)
    for m in waiting:
        shared = unique[m.request.job.checkpoint].job
        m.request.job.error = shared.error
