"""Errors that stop a run instead of being recorded as a cell's failure.

A cell that raises is data (recorded as ``failed``); a disk that is full or read-only is not the
cell's fault, so it stops the run with a message and the cell is left for the next run.
"""

from __future__ import annotations

import errno as errno_mod
import os

#: errno values that say "this disk cannot take the write", not "this cell is broken".
DISK_ERRNOS = {errno_mod.ENOSPC, errno_mod.EDQUOT, errno_mod.EROFS, errno_mod.EACCES, errno_mod.EPERM,
               errno_mod.EFBIG, errno_mod.EIO}


class StorageError(OSError):
    """A write under the results folder (or a work folder) failed; the message says which file,
    why and what to do. Picklable (it crosses from worker processes to the driver)."""

    def __init__(self, errno: int, message: str):
        super().__init__(errno, message)

    def __str__(self) -> str:
        return self.strerror or ""

    def __reduce__(self):
        return (type(self), (self.errno, self.strerror))

    @classmethod
    def from_os_error(cls, exc: OSError, path: str | os.PathLike | None = None) -> "StorageError":
        if isinstance(exc, StorageError):
            return exc
        where = path or exc.filename or "a file under the results folder"
        code = exc.errno or errno_mod.EIO
        reason = os.strerror(code)
        hint = {
            errno_mod.ENOSPC: "the disk is full: free some space or point --results-dir at another disk",
            errno_mod.EDQUOT: "the disk quota is used up: free some space or point --results-dir at another disk",
            errno_mod.EROFS: "the file system is read-only: point --results-dir at a writable folder",
            errno_mod.EACCES: "no permission to write there: fix the permissions or point --results-dir elsewhere",
            errno_mod.EPERM: "no permission to write there: fix the permissions or point --results-dir elsewhere",
            errno_mod.EFBIG: "the file is larger than this file system or process allows",
        }.get(code, "check the disk and the folder's permissions")
        return cls(code, f"cannot write {where}: {reason} ({hint}); nothing partial was left behind")


def is_disk_error(exc: BaseException) -> bool:
    """An OSError that means the disk refused a write (full, read-only, no permission, quota)."""
    return isinstance(exc, OSError) and (isinstance(exc, StorageError) or exc.errno in DISK_ERRNOS)


class Interrupted(BaseException):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) reached the driver. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` in a cell turns it into a failed cell."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class RunStopped(RuntimeError):
    """The run cannot go on for a reason outside any cell (e.g. the Dask scheduler went away); the
    message says what happened and that rerunning the same command resumes."""
