"""Where a record came from, beyond its config: the CPU model (bit-level results compare only on the same
one: oneDNN picks other kernels per CPU) and the source commit (numbers are cited with the commit of
the code that made them). docs/design.md, Reproducibility."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

#: The checkout this package runs from (``benchmark/core/`` is two levels below it).
SOURCE_ROOT = Path(__file__).resolve().parents[2]
#: What counts as the code: a changed record or result file does not make the source "dirty".
CODE_PATHS = ("benchmark", "methods", "pyproject.toml")


@functools.cache
def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``/proc/cpuinfo`` on Linux), else the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip() or "unknown CPU"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def source_commit() -> str | None:
    """The git commit of the code, with ``-dirty`` when tracked code differs from it; None outside a
    checkout (an installed wheel) or without git."""
    if not (SOURCE_ROOT / ".git").exists():
        return None
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return f"{commit}-dirty" if changed else commit
