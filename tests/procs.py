"""Helpers for tests that drive real ``python -m benchmark`` processes: start them, find and check
their children through /proc (Linux), wait, and read what a run left behind (events, claims)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmark.execution import grids
from benchmark.execution.store import Store

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    """The environment of a child process that imports this checkout's packages."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m benchmark ARGS`` to its end, output captured."""
    return subprocess.run([sys.executable, "-m", "benchmark", *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def start(*args, cwd=None, env_extra: dict | None = None) -> subprocess.Popen:
    """A driver in its own session: signals below go to it alone, not to its workers, so a test
    sees what the driver does for them. ``env_extra`` adds to its environment."""
    return subprocess.Popen([sys.executable, "-m", "benchmark", *map(str, args)], cwd=cwd, env=env() | (env_extra or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def children(pid: int) -> set[int]:
    """Direct children of ``pid``."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (exited, not yet reaped) counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(condition, timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def events(results: Path, grid: str) -> list[dict]:
    """The grid's event log (``events.jsonl``), torn lines skipped."""
    path = results / grid / "events.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def nothing_trained(results: Path) -> bool:
    return not list(results.glob("*/cells/*.json")) and not any(
        e["event"] == "start" for p in results.glob("*/events.jsonl") for e in map(json.loads, p.read_text().splitlines()))


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


def assert_every_cell_once(results: Path, grid_file: Path) -> dict:
    """Every cell has one ok result file, was finished (recorded) at most once, and no record says
    failed; nothing is left claimed or half-written. Returns {cell id: result}."""
    grid = grids.load_grid(str(grid_file))
    store = Store(results, grid.name)
    out = {}
    for cell in grid.cells:
        result = json.loads(store.path(cell.id).read_text())
        assert result["status"] == "ok", (cell.label(), result["records"][0].get("error"))
        out[cell.id] = result
    finishes = Counter(e["cell_id"] for e in events(results, grid.name) if e["event"] == "finish")
    assert max(finishes.values(), default=0) <= 1, f"a cell was recorded twice: {finishes.most_common(3)}"
    assert not [e for e in events(results, grid.name) if e["event"] in ("failed", "blocked")]
    assert not list(store.claims_dir.glob("*.claim"))
    assert not list(store.cells_dir.glob(".*tmp*"))
    return out
