"""Writing files safely: the one atomic write, the one inter-process file lock, and telling a dead writer's leftovers.

Every file this project writes for another process (results, checkpoints, caches, CSVs, pages)
goes through ``atomic_write``: a temporary file beside the target, then a rename, so a reader sees
the old file or the new one, never a torn one. The temporary file is named after its writer
(host and pid), so a later run can remove one whose writer was killed mid-write at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Callable, IO

from benchmark.core.errors import StorageError

HOST_TAG = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# ``.<name>.tmp-<host>-<pid>-<6 hex>``: who wrote a leftover temporary file, so that one whose
# writer is gone (a SIGKILL mid-write) is removed at once instead of after an hour
TMP_WRITER = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{6}(\.new)?$")


def temporary_name(path: Path, suffix: str = "") -> Path:
    """A temporary file beside ``path``, unique per write and naming its writer (``TMP_WRITER``)."""
    return path.with_name(f".{path.name}.tmp-{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:6]}{suffix}")


def atomic_write(path: Path | str, write: Callable[[IO], None], *, binary: bool = False, durable: bool = True,
                 make_parents: bool = False, commit_if: Callable[[], bool] | None = None) -> bool:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it onto ``path``; returns
    whether it did.

    ``durable`` flushes to the disk before the rename (results: a crash right after must not leave
    an empty file); ``make_parents`` creates the folder (a finished copy of a cell may have removed
    its work folder); ``commit_if`` is asked right before the rename, and when it says no the file
    is not written (a driver that lost its claim on a cell while it wrote, docs/design.md). Whatever
    stops the write, the temporary file is removed; a disk that refuses it (full, read-only, no
    permission) raises StorageError naming ``path`` and what to do.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb" if binary else "w") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if commit_if is not None and not commit_if():
            tmp.unlink()
            return False
        os.replace(tmp, path)
        return True
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # a writer (torch.save) may wrap the OSError of the file object's write in a RuntimeError
        cause = exc.__context__ if isinstance(exc, RuntimeError) and isinstance(exc.__context__, OSError) else exc
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            raise StorageError.from_os_error(cause, path) from None
        raise


def atomic_write_text(path: Path | str, text: str, **options) -> bool:
    """``atomic_write`` of a text."""
    return atomic_write(path, lambda fh: fh.write(text), **options)


def save_atomic(obj, path: Path | str) -> None:
    """``torch.save`` through ``atomic_write`` (checkpoints, caches; the folder is created)."""
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh), binary=True, durable=False, make_parents=True)


@contextlib.contextmanager
def file_lock(path: Path | str):
    """Hold an exclusive lock on ``path`` (created if missing) between processes of this machine.

    flock: the kernel releases it when its holder dies, so a killed process cannot leave it held.
    Where there is no fcntl (Windows) it does not lock; callers only lose work there (a dense model
    trained twice), never correctness.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, dead but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a live driver from an
    unrelated process that reuses its pid; None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def writer_gone(path: Path) -> bool:
    """True if ``path`` is a temporary file written on this host by a process that no longer runs."""
    match = TMP_WRITER.search(path.name)
    return bool(match) and match["host"] == HOST_TAG and not pid_alive(int(match["pid"]))
