"""Progress from cells to the driver, frozen processes, the order cells run in, resumed cells' time
(issues 27 and 29; docs/design.md, "Progress and liveness")."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from benchmark.core import cell_progress
from benchmark.core.progress import EpochProgress, SilentBar, eta_seconds
from benchmark.engine.checkpoints import Checkpoint
from benchmark.execution import grids, liveness, runner, todo
from benchmark.execution.cell import dense_key, run_cell

ROOT = Path(__file__).resolve().parents[1]


def test_longest_cells_run_first_within_each_kind():
    cells = grids.parse_grid("""
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 3 }
[experiment.methods.magnitude]
target_cr = 10
[experiment.methods.gmp]
[experiment.methods.lottery]
target_cr = 16
prune_fraction = 0.5
[experiment.methods.dense]
""").cells
    ordered = sorted(cells, key=todo.priority)
    assert ordered[0].method == "dense" and ordered[-1].method == "magnitude"
    middle = ordered[1:-1]
    # a lottery ticket's 4 levels x 3 epochs before gmp's 3 epochs, though it starts from the dense model
    assert [c.method for c in middle] == ["lottery", "gmp"]
    assert todo.estimate_epochs(middle[0]) > todo.estimate_epochs(middle[1]) > todo.estimate_epochs(ordered[-1])


def test_progress_files_round_trip_and_damaged_ones_are_ignored(tmp_path):
    with cell_progress.reporting([tmp_path / "a", tmp_path / "b"]):
        cell_progress.epochs_resumed(2)
        cell_progress.epoch_done(1.5)
    for folder in ("a", "b"):
        report = cell_progress.read_progress(tmp_path / folder / "progress.json")
        assert report["epochs"] == 3 and report["epoch_s"] == 1.5 and report["pid"] == os.getpid()
    bad = tmp_path / "bad.json"
    for text in ("{", "[]", json.dumps({"epochs": -1, "updated": 1, "pid": 1, "host": "h"}), "x" * 10_000,
                 json.dumps({"epochs": 1, "updated": "soon", "pid": 1, "host": "h"})):
        bad.write_text(text)
        assert cell_progress.read_progress(bad) is None
    os.mkfifo(tmp_path / "fifo")
    assert cell_progress.read_progress(tmp_path / "fifo") is None  # does not hang


def test_the_bar_counts_epochs_and_the_eta_waits_for_the_longest_cell_in_flight():
    bar = SilentBar(total=0)
    progress = EpochProgress({"long": 300, "short": 10, "queued": 10, "post": 0}, workers=2, bar=bar)
    assert progress.total == 321  # a post-training cell weighs one epoch
    progress.report("long", 100, 1.0)
    progress.report("short", 4, 1.0)
    progress.show(["long", "short"])
    assert bar.n == 104
    progress.cell_over("short")
    progress.show(["long"])
    assert bar.n == 110
    # near the end, 200 epochs of one cell are left: they take 200 s, whatever the other worker does
    assert progress.eta(["long"]) == pytest.approx(max(200, (200 + 10 + 1) / 2))
    assert eta_seconds([5.0], 0, 2.0, 4) == 10.0
    assert eta_seconds([], 100, 2.0, 4) == 50.0
    assert eta_seconds([1.0], 1, None, 1) is None


def test_a_task_silent_past_its_stall_limit_is_frozen():
    now = 10_000.0
    report = {"updated": now - 100, "pid": 1, "host": "h", "longest_gap_s": 2.0, "epochs": 1}
    in_flight = {"busy": ["c1"], "frozen": ["c2"], "never-reported": ["c3"], "slow-but-steady": ["c4"]}
    handed_out = {"busy": now - 500, "frozen": now - 500, "never-reported": now - 500, "slow-but-steady": now - 500}
    reports = {"busy": report | {"updated": now - 5}, "frozen": report, "never-reported": None,
               "slow-but-steady": report | {"longest_gap_s": 30.0}}  # limit 10 x 30 s = 300 s
    found = {s.future for s in liveness.stalled_tasks(in_flight, handed_out, reports, 60.0, True, now)}
    assert found == {"frozen", "never-reported"}
    # a task not yet reporting gets the start-up grace (its worker process may still be importing)
    handed_out["never-reported"] = now - liveness.STARTUP_GRACE_S + 10
    found = {s.future for s in liveness.stalled_tasks(in_flight, handed_out, reports, 60.0, True, now)}
    assert found == {"frozen"}
    # on Dask a task without a report may still wait in the scheduler's queue
    found = {s.future for s in liveness.stalled_tasks(in_flight, handed_out, reports, 60.0, False, now)}
    assert found == {"frozen"}


def test_the_stall_limit_is_a_checked_run_option(tmp_path):
    from benchmark.__main__ import build_parser
    from benchmark.cli.run import run_options
    from benchmark.execution.run_options import RunOptions, RunOptionsError

    assert RunOptions(results_dir=tmp_path).stall_timeout == cell_progress.DEFAULT_STALL_S
    assert run_options(build_parser().parse_args(["run", "--stall-timeout", "90"])).stall_timeout == 90
    for bad in (0, -1, float("nan"), float("inf"), "soon", True):
        with pytest.raises(RunOptionsError, match="--stall-timeout .*: give a number of seconds above 0"):
            RunOptions(results_dir=tmp_path, stall_timeout=bad)


def test_a_lone_cell_refuses_a_bad_stall_limit_before_it_trains(tmp_path, capsys):
    from benchmark.__main__ import main

    code = main(["cell", "dense", "--arch", "lenet300", "--dataset", "fashion-mnist", "--stall-timeout", "0",
                 "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")])
    assert code != 0 and "--stall-timeout 0.0: give a number of seconds above 0" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # refused before anything was built


def _one_cell_grid(method: str, epochs: int):
    """One cell of ``method`` on 300 Fashion-MNIST examples of LeNet-300-100, seed 0 (seconds)."""
    return grids.parse_grid(f"""
seeds = [0]
subset = 300
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = {{ epochs = {epochs}, batch_size = 64 }}
[experiment.methods.{method}]
""")


def test_a_run_gives_up_a_frozen_dense_lock_after_its_stall_timeout(tmp_path):
    """``stall_timeout`` reaches the cell's dense-model lock (driver -> task -> run_cell -> Context):
    a holder that reports no progress is given up after 1 s here, not the default 600 s. The holder
    lets go after 45 s, so a run that ignored the option would end after that (and fail here)."""
    grid = _one_cell_grid("dense", epochs=1)
    cache = tmp_path / "r" / "cache"
    cache.mkdir(parents=True)
    holder = open(cache / f"dense-{dense_key(grid.cells[0], torch.device('cpu'))}.lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file of the lock: flock excludes this process's waiter too
    release = threading.Timer(45, holder.close)
    release.start()
    try:
        began = time.monotonic()
        with pytest.warns(RuntimeWarning, match="made no progress"):
            summary = runner.run_grid(grid, grid.cells, results_dir=tmp_path / "r", device="cpu", progress=False,
                                      stall_timeout=1.0)
        assert time.monotonic() - began < 45
        assert summary.finished == 1 and summary.failed == 0
    finally:
        release.cancel()
        holder.close()


HOLDER = """
import os, sys, time
from benchmark.core import cell_progress
with cell_progress.watched_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_lock_held_by_a_frozen_process_is_given_up_with_a_message(tmp_path):
    lock = tmp_path / "dense-x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        messages = []
        began = time.monotonic()
        with cell_progress.watched_lock(lock, warn=messages.append, stall_s=2.0) as locked:
            assert not locked
        assert 2.0 <= time.monotonic() - began < 30
        assert len(messages) == 1 and f"process {holder.pid}" in messages[0] and "no progress" in messages[0]
    finally:
        holder.kill()
        holder.wait()
    with cell_progress.watched_lock(lock, stall_s=2.0) as locked:  # freed when its holder died
        assert locked


def test_a_lock_whose_holder_makes_progress_is_waited_for(tmp_path):
    lock = tmp_path / "dense-y.lock"
    script = HOLDER.replace("time.sleep(600)", "for _ in range(8):\n        time.sleep(0.5)\n"
                                                "        cell_progress.epoch_done(0.5)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        messages = []
        with cell_progress.watched_lock(lock, warn=messages.append, stall_s=2.0) as locked:
            assert locked and not messages  # 4 s of a holder that reports every 0.5 s
    finally:
        holder.kill()
        holder.wait()


def test_a_resumed_cell_counts_the_time_before_its_resume(tmp_path):
    cell = _one_cell_grid("gmp", epochs=2).cells[0]
    options = {"work_root": tmp_path / "work", "cache_dir": tmp_path / "cache", "device": "cpu", "progress": False}
    first = run_cell(cell, keep_work=True, **options)
    assert first[0]["status"] == "ok" and first[0]["wall_s"] < 1000
    path = next((tmp_path / "work" / cell.id).glob("*.ckpt"))
    saved = Checkpoint.load(path)
    assert saved.elapsed_s is not None and 0 < saved.elapsed_s <= first[0]["wall_s"]
    saved.elapsed_s = 1000.0  # as if the first run had taken 1000 s before it was killed
    saved.save(path)
    resumed = run_cell(cell, **options)
    assert 1000 <= resumed[0]["wall_s"] < 1000 + first[0]["wall_s"] + 60
    assert resumed[0]["history"] == first[0]["history"]


def test_a_resumed_run_says_what_it_resumes(tmp_path):
    cells = grids.parse_grid("""
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
[experiment.methods.dense]
[experiment.methods.gmp]
""").cells
    assert liveness.resume_note(tmp_path, cells, 0) is None
    folder = tmp_path / cells[0].id
    folder.mkdir()
    (folder / "train.ckpt").write_bytes(b"")
    with cell_progress.reporting([folder]):
        cell_progress.epochs_resumed(7)
    assert liveness.resume_note(tmp_path, cells, 3) == "resuming: 3 cells done, 1 resume from epoch checkpoints (after 7 epochs)"
