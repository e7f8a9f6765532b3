"""``perf grid``: cells per hour of a small grid through ``benchmark.execution.runner.run_grid`` with
1 and 2 jobs, and the peak resident memory of each worker (read from ``/proc`` on Linux).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmark.engine.timing import paired_ratio
from benchmark.speed.perf.rows import Row, make_row

QUICK_GRID = """description = "perf --quick: three one-epoch cells on 200 images"
seeds = [0]
subset = 200
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, batch_size = 64 }
[experiment.methods.dense]
[experiment.methods.dwf]
depth = 3
[experiment.methods.l1]
"""


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children_of(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _memory_kb(pid: int) -> tuple[int, int] | None:
    """(peak resident, current anonymous resident) of a process in kB (Linux), None when unknown.

    The peak (VmHWM) counts the pages of shared libraries too: a CUDA build of torch alone maps
    ~0.7 GB that every worker shares. The anonymous part is the worker's own memory (tensors)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (values["VmHWM"], values["RssAnon"]) if len(values) == 2 else None


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "python" in cmdline and "resource_tracker" not in cmdline and "semaphore_tracker" not in cmdline


def run_grid_child(grid: str, jobs: int, device: str, pack: str = "off") -> dict:
    """Run the grid through ``run_grid`` in a fresh process and a fresh results folder, and watch the
    peak resident memory of that process (the worker when jobs=1) and of each worker it starts.
    ``records`` maps each cell to its records' (test accuracy, CR, pack size)."""
    with tempfile.TemporaryDirectory(prefix="perf-grid-") as tmp:
        code = ("import json, sys, time; from benchmark.execution import grids, runner; "
                "from benchmark.execution.store import Store; "
                "g = grids.load_grid(sys.argv[1]); "
                "t = time.perf_counter(); s = runner.run_grid(g, g.cells, results_dir=sys.argv[2], jobs=int(sys.argv[3]), "
                "device=sys.argv[4], progress=False, pack=sys.argv[5]); seconds = time.perf_counter() - t; "
                "store = Store(sys.argv[2], g.name); "
                "records = {c.id: [(r.get('test_acc'), r.get('cr'), r.get('pack_size', 1)) "
                "for r in (store.read(c.id) or {}).get('records', [])] for c in g.cells}; "
                "print(json.dumps({'seconds': seconds, 'cells': len(g.cells), 'finished': s.finished, "
                "'failed': s.failed, 'blocked': s.blocked, 'records': records}))")
        proc = subprocess.Popen([sys.executable, "-c", code, grid, tmp, str(jobs), device, pack],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peaks: dict[int, tuple[int, int]] = {}  # pid -> (peak resident, largest anonymous seen), kB
        watch = Path("/proc").is_dir()
        while proc.poll() is None:
            if watch:
                for pid in [proc.pid] + _descendants(proc.pid):
                    memory = _memory_kb(pid) if pid == proc.pid or _is_worker(pid) else None
                    if memory is not None:
                        old = peaks.get(pid, (0, 0))
                        peaks[pid] = (max(old[0], memory[0]), max(old[1], memory[1]))
            time.sleep(0.1)
        out, err = proc.communicate()
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"grid run with --jobs {jobs} failed (exit {proc.returncode}):\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    driver = peaks.pop(proc.pid, None)
    workers = list(peaks.values()) if jobs > 1 else ([driver] if driver else [])
    result["worker_peak_mb"] = max(w[0] for w in workers) / 1024 if workers else math.nan
    result["worker_anon_mb"] = max(w[1] for w in workers) / 1024 if workers else math.nan
    result["driver_peak_mb"] = driver[0] / 1024 if driver else math.nan
    result["workers_seen"] = len(workers)
    return result


@contextlib.contextmanager
def grid_to_run(grid: str | None, quick: bool, default: str):
    """(grid argument, loaded grid): the one asked for, else the built-in three-cell grid under
    --quick (written to a temporary file for the child runs), else ``default``."""
    from benchmark.execution import grids

    with tempfile.TemporaryDirectory(prefix="perf-gridfile-") as tmp:
        if grid is None and quick:
            grid = str(Path(tmp) / "perf-quick.toml")
            Path(grid).write_text(QUICK_GRID)
        grid = grid or default
        yield grid, grids.load_grid(grid)


def bench_grid(device: torch.device, rounds: int, quick: bool, grid: str | None) -> list[Row]:
    with grid_to_run(grid, quick, "smoke") as (grid, loaded):
        results: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(rounds):
            for jobs in (1, 2) if r % 2 == 0 else (2, 1):
                results[jobs].append(run_grid_child(grid, jobs, str(device)))
    case = f"grid {loaded.name}, {len(loaded.cells)} cells"
    rows = []
    per_cell = {jobs: [run["seconds"] / max(1, run["cells"]) for run in runs] for jobs, runs in results.items()}
    for jobs in (1, 2):
        runs = results[jobs]
        rate = 3600 / statistics.median(per_cell[jobs])
        bad = sum(run["failed"] + run["blocked"] for run in runs)
        note = f"{bad} failed/blocked cell runs; " if bad else ""
        if jobs > 1:
            note += f"driver peak {statistics.median(run['driver_peak_mb'] for run in runs):.0f} MB; "
        note += f"{'each worker' if jobs > 1 else 'one process'} gets {max(1, (os.cpu_count() or 1) // jobs)} threads"
        rows.append(make_row("grid", case, f"--jobs {jobs}", "s/cell", per_cell[jobs],
                         ratio=paired_ratio(per_cell[1], per_cell[jobs]),
                         ratio_of="cells per hour / --jobs 1", cells_per_hour=rate,
                         peak_rss_mb=max(run["worker_peak_mb"] for run in runs),
                         own_rss_mb=max(run["worker_anon_mb"] for run in runs), device=str(device),
                         threads=max(1, (os.cpu_count() or 1) // jobs), note=note))
    return rows
