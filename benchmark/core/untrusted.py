"""Reading files of a shared results or cache folder: they are input, whoever wrote them.

Another driver, an older version of this tool or a person may have left a file torn, of another
format or of another kind (a FIFO, a directory). Each kind of file has one loader, and every loader
ends the same way (docs/design.md, "Resumable, whatever stops it"): a file that does not load, or
whose contents are not what the code expects, is named in a warning, moved aside to
``<name>.damaged`` and treated as absent, so its work is redone. Only regular files are opened (a
FIFO would block its reader for ever) and no more than a loader expects is read.
"""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Callable

#: Longest reason a warning quotes (a planted file may hold a huge string).
REASON_CHARS = 300


class DamagedFile(ValueError):
    """A file that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path | str, reason: str):
        reason = reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS] + "..."
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def read_text(path: Path | str, limit: int | None = None) -> str | None:
    """The UTF-8 text of ``path``; None when there is none. DamagedFile when it is not a regular file,
    longer than ``limit`` bytes, not UTF-8 or unreadable. Opened without blocking and checked on the
    open descriptor, so a FIFO swapped in after a look at the name cannot hang the reader."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DamagedFile(path, f"cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise DamagedFile(path, "is not a regular file (a FIFO, device or folder where a file belongs)")
        try:
            data = handle.read() if limit is None else handle.read(limit + 1)
        except OSError as exc:
            raise DamagedFile(path, f"cannot be read ({exc.strerror or exc})") from None
    if limit is not None and len(data) > limit:
        raise DamagedFile(path, f"is larger than the {limit} bytes a file of this kind has")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DamagedFile(path, f"is not UTF-8 text ({exc})") from None


def parse_json(path: Path | str, text: str):
    """``text`` as JSON; DamagedFile naming ``path`` when it is not (torn, or nested beyond reason)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedFile(path, f"is not valid JSON ({exc}; torn by a crash or edited by hand)") from None
    except RecursionError:
        raise DamagedFile(path, "is JSON nested too deep to be a file of this tool") from None


def set_aside(path: Path | str, reason: str, redo: str) -> Path | None:
    """Move a damaged ``path`` to ``<name>.damaged`` beside it (kept for inspection) and warn naming it,
    its fault and what happens instead (``redo``); None when it was gone already or cannot be moved."""
    path = Path(path)
    aside = path.with_name(path.name + ".damaged")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None  # another process set it aside first
    except OSError as exc:
        warnings.warn(f"{path} is damaged ({reason}) and cannot be moved aside ({exc.strerror or exc}); "
                      f"{redo}", RuntimeWarning, stacklevel=3)
        return None
    warnings.warn(f"{path} is damaged ({reason}); moved to {aside.name} beside it and {redo}", RuntimeWarning,
                  stacklevel=3)
    return aside


def checked_json(path: Path | str, problems: Callable[[object], list[str]], limit: int):
    """The JSON of ``path`` when ``problems`` finds none in it; None when there is no such file;
    DamagedFile otherwise (nothing is moved)."""
    text = read_text(path, limit)
    if text is None:
        return None
    value = parse_json(path, text)
    found = problems(value)
    if found:
        raise DamagedFile(path, "; ".join(found))
    return value


def load_json(path: Path | str, problems: Callable[[object], list[str]], *, limit: int, redo: str):
    """``checked_json``, with a damaged file set aside (``set_aside``) and None for it."""
    try:
        return checked_json(path, problems, limit)
    except DamagedFile as exc:
        set_aside(path, exc.reason, redo)
        return None


def is_number(value, *, at_least: float | None = None, above: float | None = None) -> bool:
    """A finite int or float (not a bool), at least ``at_least`` and above ``above`` where given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):  # (an int of any size is finite)
        return False
    return (at_least is None or value >= at_least) and (above is None or value > above)


def short(value) -> str:
    """``repr`` of a planted value, cut to a length a message can carry."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
