"""Claim files: which driver runs which cell, so that drivers sharing a results folder never train
one cell twice (docs/design.md, "Resumable, whatever stops it").

``claims/<cell_id>.claim`` holds the owner's host, pid, process start time and run id. It is
created whole with link(2), which fails if one exists; the driver touches its claims every
``HEARTBEAT_S``; a claim whose process is gone (same host: pid and start time) or that has not been
touched for ``timeout`` seconds (another host) is stale and taken over, one driver at a time (a
lock file in claims/). A claim file is input like any file of a shared folder: ``load`` is its one
loader, and one with impossible contents is named, set aside (``<name>.damaged``) and counts as no
claim, so its cell still runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from benchmark.core.errors import StorageError
from benchmark.core.files import file_lock, pid_alive, process_start, temporary_name
from benchmark.core.untrusted import DamagedFile, checked_json, is_number, set_aside, short

#: How often a running driver touches its claims, and how old another host's claim may get
#: before it counts as abandoned (ten missed heartbeats: generous for clock skew on shared disks).
HEARTBEAT_S = 60.0
CLAIM_TIMEOUT_S = 600.0

#: A claim is a line of JSON; anything longer was not written by a driver.
CLAIM_BYTES = 4096
#: Longest host name (POSIX HOST_NAME_MAX) and run id a claim may carry; pids above Linux's
#: largest pid_max cannot be real.
NAME_CHARS, MAX_PID = 255, 2 ** 22
LOCK_NAME = ".takeover.lock"
#: Test-only: the host name a driver writes in its claims and judges them by, in place of the
#: machine's (tests/test_fault_injection.py plays a driver on another host with it).
HOST_ENV = "DWF_BENCH_CLAIM_HOST"


def host_name() -> str:
    """This driver's host name in claims: the machine's, or ``HOST_ENV`` where a test sets it."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


@dataclass(frozen=True)
class Claim:
    """The contents of a claim file (``start`` and ``run_id`` are missing in older claims)."""

    host: str
    pid: int
    start: int | None = None
    run_id: str | None = None
    at: float | None = None


def claim_problems(info) -> list[str]:
    """Why parsed claim contents are impossible (empty when they are a claim)."""
    if not isinstance(info, dict):
        return [f"it holds {type(info).__name__}, not a claim table"]
    problems = []
    if not isinstance(info.get("host"), str) or not 0 < len(info["host"]) <= NAME_CHARS:
        problems.append(f"host={short(info.get('host'))} is not a host name")
    pid = info.get("pid")
    if not is_number(pid, at_least=1) or isinstance(pid, float) or pid > MAX_PID:
        problems.append(f"pid={short(pid)} is not a process id")
    start = info.get("start")
    if start is not None and (not is_number(start, at_least=0) or isinstance(start, float)):
        problems.append(f"start={short(start)} is not a process start time")
    run_id = info.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not 0 < len(run_id) <= NAME_CHARS):
        problems.append(f"run_id={short(run_id)} is not a run id")
    if info.get("at") is not None and not is_number(info["at"], at_least=0):
        problems.append(f"at={short(info['at'])} is not a time")
    return problems


def parse_claim(path: Path) -> Claim | None:
    """The claim in ``path``; None when there is none. DamagedFile when it is not a claim; nothing is
    moved (``ClaimFiles.load`` does that)."""
    info = checked_json(path, claim_problems, CLAIM_BYTES)
    if info is None:
        return None
    return Claim(info["host"], info["pid"], info.get("start"), info.get("run_id"), info.get("at"))


class ClaimFiles:
    """The claims folder of one grid."""

    def __init__(self, claims_dir: Path, timeout: float = CLAIM_TIMEOUT_S):
        self.claims_dir = Path(claims_dir)
        self.timeout = timeout

    def path(self, cell_id: str) -> Path:
        return self.claims_dir / f"{cell_id}.claim"

    def deciding(self):
        """The takeover lock: one driver at a time decides about and replaces claims that are not its
        own, and a driver writes a cell while holding it (flock: released by the kernel when its holder
        dies, so a killed driver cannot leave it held). Not reentrant: never nest it."""
        if not self.claims_dir.is_dir():  # no claims folder, no claim to race for
            return contextlib.nullcontext()
        return file_lock(self.claims_dir / LOCK_NAME)

    # ---- reading ----------------------------------------------------------------------------
    def load(self, path: Path) -> Claim | None:
        """The claim in ``path``, None without one. A damaged one is set aside (under the takeover
        lock, after reading it again: a fresh claim linked in meanwhile is kept) and counts as none."""
        try:
            return parse_claim(path)
        except DamagedFile:
            with self.deciding():
                return self.load_deciding(path)

    def load_deciding(self, path: Path) -> Claim | None:
        """``load`` for a caller that holds the takeover lock."""
        try:
            return parse_claim(path)
        except DamagedFile as exc:
            set_aside(path, exc.reason, "the cell counts as unclaimed")
            return None

    def holder(self, cell_id: str) -> str | None:
        """The run id holding the cell's claim (None if unclaimed or damaged)."""
        claim = self.load(self.path(cell_id))
        return claim.run_id if claim is not None else None

    def held_by(self, run_id: str) -> list[Path]:
        """The claim files ``run_id`` holds."""
        if not self.claims_dir.is_dir():
            return []
        held = []
        for path in self.claims_dir.glob("*.claim"):
            claim = self.load(path)
            if claim is not None and claim.run_id == run_id:
                held.append(path)
        return held

    def judge(self, path: Path, claim: Claim | None) -> bool:
        """Whether ``claim`` (read from ``path``) is stale: none, its process gone (this host), or
        not touched for ``timeout`` seconds (another host)."""
        if claim is None:
            return True
        if claim.host == host_name():
            if not pid_alive(claim.pid):
                return True
            # a live pid that started at another time is a reused pid
            return claim.start is not None and process_start(claim.pid) not in (None, claim.start)
        try:  # another machine's claim: alive as long as its driver keeps touching it
            return time.time() - path.stat().st_mtime > self.timeout
        except FileNotFoundError:
            return True

    def stale(self, path: Path) -> bool:
        """``judge`` of the claim in ``path``, for a caller that holds the takeover lock."""
        return self.judge(path, self.load_deciding(path))

    def live(self) -> set[str]:
        """Ids of the cells whose claims are not stale."""
        if not self.claims_dir.is_dir():
            return set()
        return {p.stem for p in self.claims_dir.glob("*.claim") if not self.judge(p, self.load(p))}

    # ---- taking and dropping ----------------------------------------------------------------
    def _payload(self, run_id: str) -> str:
        pid = os.getpid()
        return json.dumps({"host": host_name(), "pid": pid, "start": process_start(pid),
                           "run_id": run_id, "at": time.time()})

    def take(self, cell_id: str, run_id: str) -> bool:
        """Claim the cell for ``run_id``; False if a live driver holds it."""
        path = self.path(cell_id)
        tmp = temporary_name(self.claims_dir / cell_id, ".new")  # linked into place, not renamed
        try:
            self.claims_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as fh:
                fh.write(self._payload(run_id))
            try:  # link(2) creates the claim whole or fails if one exists: never an empty claim
                os.link(tmp, path)
                return True
            except FileExistsError:
                return self._take_over(path, tmp)
        except OSError as exc:
            raise StorageError.from_os_error(exc, path) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _take_over(self, path: Path, tmp: Path) -> bool:
        """Replace ``path`` by our claim ``tmp`` if the claim there is stale. Under the takeover lock
        the claim is read again, so two drivers that both saw a dead driver's claim cannot both
        take it: the second finds the first one's fresh claim."""
        with self.deciding():
            if not path.exists():
                try:
                    os.link(tmp, path)
                    return True
                except FileExistsError:
                    pass
            if not self.stale(path):
                return False
            os.replace(tmp, path)  # atomic: readers see the dead claim or ours
            return True

    def release(self, cell_id: str, run_id: str | None = None) -> None:
        """Drop the cell's claim; with ``run_id`` only if that run still holds it (a claim taken
        over by another driver is left alone)."""
        path = self.path(cell_id)
        try:
            if run_id is not None and self.holder(cell_id) != run_id:
                return
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError.from_os_error(exc, path) from None

    def release_run(self, run_id: str) -> int:
        """Drop every claim still held by ``run_id`` (cells that were in flight when it stopped);
        returns how many. Never raises (it runs while a run is stopping for whatever reason)."""
        released = 0
        with contextlib.suppress(OSError):
            for path in self.held_by(run_id):
                with contextlib.suppress(OSError):
                    path.unlink()
                    released += 1
        return released

    def refresh_run(self, run_id: str) -> int:
        """Touch every claim ``run_id`` holds (the heartbeat other hosts read); returns how many."""
        touched = 0
        for path in self.held_by(run_id):
            try:
                os.utime(path)
                touched += 1
            except OSError:  # released between listing and touching, or the disk refuses
                pass
        return touched

    def sweep_stale(self) -> int:
        """Remove the stale claims (their driver is dead, or on another host stopped touching them),
        also on cells no run will reach soon; returns how many."""
        removed = 0
        if not self.claims_dir.is_dir():
            return removed
        for path in self.claims_dir.glob("*.claim"):
            with contextlib.suppress(OSError), self.deciding():
                if self.stale(path):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed
