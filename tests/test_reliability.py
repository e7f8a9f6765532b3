"""Issue 13: every attack on the runner's promises ends in a clear message or a correct result.

Real processes, real signals, real files (and, as root, real full and read-only file systems on a
small tmpfs). Each test names the attack it covers; the closing ones are attacks found beyond the
issue's list. The random, repeated version of the kills is tests/test_fault_injection.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmark.execution import grids
from benchmark.__main__ import main
from benchmark.execution.cell import Cell, config_hash
from benchmark.execution.store import Store
from procs import (alive, assert_every_cell_once, children, cli, env, events, no_traceback, nothing_trained, start,
                   wait_until)

pytestmark = pytest.mark.slow  # processes, clusters or whole grids: left out of make test-fast


ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def write_grid(path: Path, *, epochs=1, subset=300, lams=(1e-4, 1e-3), depths=(2,), dense=True,
               seeds="[0]", schedule_extra="", extra="") -> Path:
    lam_list = ", ".join(repr(x) for x in lams)
    depth_list = ", ".join(str(d) for d in depths)
    path.write_text(f"""
description = "reliability test grid"
seeds = {seeds}
subset = {subset}
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = {{ epochs = {epochs}, batch_size = 64{schedule_extra} }}
{"[experiment.methods.dense]" if dense else ""}
[[experiment.methods.dwf]]
depth = [{depth_list}]
lam = [{lam_list}]
{extra}
""")
    return path


def finished_cells(results: Path, grid: str) -> int:
    return sum(e["event"] == "finish" for e in events(results, grid))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished grid (3 cells), trained once for the tests that damage its files."""
    base = tmp_path_factory.mktemp("finished")
    grid_file = write_grid(base / "g.toml")
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(base / "r"), "--no-progress"]) == 0
    return base


@pytest.fixture
def copy_of(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "w")
    return tmp_path / "w"


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_kb, read_only=False) -> a folder on its own small tmpfs (root only)."""
    mounted = []

    def mount(size_kb: int, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs")
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ------------------------------------------------------------------------------------------------
# Kills and signals
# ------------------------------------------------------------------------------------------------


def _driver_mid_grid(grid_file: Path, results: Path, *extra) -> tuple[subprocess.Popen, set[int]]:
    """Start ``run --jobs 2`` and return once it has finished a cell and has workers busy."""
    proc = start("run", "--grid", grid_file, "--results-dir", results, "--no-progress", "--jobs", "2", *extra)
    assert wait_until(lambda: finished_cells(results, grid_file.stem) >= 1 or proc.poll() is not None, 300)
    assert proc.poll() is None, proc.communicate()
    workers = children(proc.pid)
    assert len(workers) >= 2
    return proc, workers


def test_sigkill_of_a_jobs2_driver_takes_its_workers_along_and_the_rerun_records_each_cell_once(tmp_path):
    """Attack: `kill -9` of the driver of `run --jobs 2` left its loky workers training for
    minutes; a rerun then lost cells to the orphans ("Parent directory ... does not exist")."""
    grid_file = write_grid(tmp_path / "g.toml", epochs=3, subset=1500, lams=(1e-5, 1e-4, 1e-3), depths=(2, 3))
    results = tmp_path / "r"
    proc, workers = _driver_mid_grid(grid_file, results)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_until(lambda: not any(alive(p) for p in workers), 5), \
        f"workers outlived their driver: {[p for p in workers if alive(p)]}"
    rerun = cli("run", "--grid", grid_file, "--results-dir", results, "--no-progress", "--jobs", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert_every_cell_once(results, grid_file)


@pytest.mark.parametrize("sig, jobs", [(signal.SIGTERM, 2), (signal.SIGINT, 1), (signal.SIGHUP, 2)])
def test_a_stop_signal_releases_claims_stops_workers_and_says_how_to_resume(tmp_path, sig, jobs):
    """Attack: SIGTERM to the driver exited 143 with no message, claims left behind, workers still
    running. SIGINT (Ctrl-C) and SIGHUP (the terminal closing) likewise."""
    grid_file = write_grid(tmp_path / "g.toml", epochs=3, subset=1500, lams=(1e-5, 1e-4, 1e-3), depths=(2, 3))
    results = tmp_path / "r"
    args = ["run", "--grid", grid_file, "--results-dir", results, "--no-progress", "--jobs", str(jobs)]
    proc = start(*args)
    assert wait_until(lambda: finished_cells(results, "g") >= 1 or proc.poll() is not None, 300)
    assert proc.poll() is None, proc.communicate()
    workers = children(proc.pid)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name}" in err and no_traceback(err), err
    assert "finished and recorded in this run" in err
    assert f"resume with: python -m benchmark run --grid {grid_file}" in err
    store = Store(results, "g")
    assert not list(store.claims_dir.glob("*.claim")), "claims were left behind"
    assert wait_until(lambda: not any(alive(p) for p in workers), 5)
    first_run = {p.stem: json.loads(p.read_text())["run_id"] for p in store.cells_dir.glob("*.json")}
    assert first_run  # what was finished stays finished: the rerun does not run it again
    assert len(pd.read_csv(results / "g" / "results.csv")) == len(first_run)  # and is in the CSV already
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    results_now = assert_every_cell_once(results, grid_file)
    assert all(results_now[cid]["run_id"] == run_id for cid, run_id in first_run.items())


def test_sighup_to_the_whole_process_group_stops_in_order_quietly_and_loses_nothing(tmp_path):
    """Issue 27: closing the terminal sends SIGHUP to the driver and its workers at once. The run
    stopped in order, but loky's resource tracker (a child of the driver) died of the signal, and
    its replacement printed a traceback for each semaphore the stopped pool gave back."""
    grid_file = write_grid(tmp_path / "g.toml", epochs=3, subset=1500, lams=(1e-5, 1e-4, 1e-3), depths=(2, 3))
    results = tmp_path / "r"
    proc, workers = _driver_mid_grid(grid_file, results)
    os.killpg(proc.pid, signal.SIGHUP)  # start() gives the driver a session of its own: the group is the run
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "stopped by SIGHUP" in err and no_traceback(err), err
    assert "died unexpectedly" not in err, err  # the resource tracker's warning when it is relaunched
    assert wait_until(lambda: not any(alive(p) for p in workers), 5)
    store = Store(results, "g")
    assert not list(store.claims_dir.glob("*.claim")), "claims were left behind"
    first_run = {p.stem: json.loads(p.read_text())["run_id"] for p in store.cells_dir.glob("*.json")}
    assert first_run
    rerun = cli("run", "--grid", grid_file, "--results-dir", results, "--no-progress", "--jobs", "2")
    assert rerun.returncode == 0 and no_traceback(rerun.stderr), rerun.stderr
    results_now = assert_every_cell_once(results, grid_file)
    assert all(results_now[cid]["run_id"] == run_id for cid, run_id in first_run.items())  # none trained again


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _busy(pids: list[int], within: float = 20.0) -> int:
    """A worker that is computing (its CPU time advances), not one waiting between two cells."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = {p: _cpu_ticks(p) for p in pids}
        time.sleep(0.3)
        for p in pids:
            if _cpu_ticks(p) - before[p] >= 5:  # >= 50 ms of CPU in 300 ms
                return p
    raise AssertionError(f"no worker of {pids} was busy within {within} s")


def test_a_killed_local_worker_does_not_stop_the_grid(tmp_path):
    """Beyond the issue: SIGKILL of one worker (the OOM killer's way) broke the whole joblib
    pool and ended the run with a traceback. Its cells go back in the queue now."""
    # cells long enough (~10 s each on an idle 2-core machine) that a worker is killed mid-cell
    grid_file = write_grid(tmp_path / "g.toml", epochs=8, subset=4000, lams=(1e-5, 1e-4, 1e-3), depths=(2, 3))
    results = tmp_path / "r"
    proc, workers = _driver_mid_grid(grid_file, results)
    loky = [p for p in workers if "LokyProcess" in Path(f"/proc/{p}/cmdline").read_text()]
    os.kill(_busy(loky), signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert no_traceback(err), err
    assert "a worker process died under a cell" in out
    assert_every_cell_once(results, grid_file)


def test_a_write_cut_by_sigkill_leaves_nothing_after_the_next_run(finished_run, tmp_path):
    """Found by the fault injection: a worker or driver SIGKILLed inside a result or claim write left
    its temporary file for an hour. The next run removes it at once when the writer is dead on this
    host, and leaves a live writer's and another host's young files alone."""
    results = shutil.copytree(finished_run / "r", tmp_path / "r")
    store = Store(results, "g")
    # a real writer, killed in the middle of an atomic write (it stops before the rename)
    code = ("import os, signal, benchmark.core.files as f\n"
            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"f.atomic_write_text(f.Path({str(store.cells_dir / 'x.json')!r}), '{{}}')\n")
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    dead = list(store.cells_dir.glob(".x.json.tmp*"))
    assert len(dead) == 1
    host = dead[0].name.split(".tmp-")[1].rsplit("-", 2)[0]
    live = store.cells_dir / f".y.json.tmp-{host}-{os.getpid()}-abcdef"
    other_host = store.cells_dir / f".z.json.tmp-elsewhere-{os.getpid()}-abcdef"
    claim_of_dead = store.claims_dir / dead[0].name.replace(".x.json.", ".x.").__add__(".new")
    store.claims_dir.mkdir(exist_ok=True)
    for path in (live, other_host, claim_of_dead):
        path.write_text("{}")
    # and a SIGKILLed driver's claim on a cell no run reaches (not in this grid): stale, so it goes
    stale_claim = store.claims_dir / "notacell.claim"
    stale_claim.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead[0].name.rsplit("-", 2)[1]),
                                       "run_id": "killed"}))
    assert main(["run", "--grid", str(finished_run / "g.toml"), "--results-dir", str(results), "--no-progress"]) == 0
    assert not dead[0].exists() and not claim_of_dead.exists() and not stale_claim.exists()
    assert live.exists() and other_host.exists()


# ------------------------------------------------------------------------------------------------
# Tracebacks instead of messages
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, says", [
    ("bogus", "--device 'bogus' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    pytest.param("mps", "MPS (Apple GPU) is not available here",
                 marks=pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="has MPS")),
    pytest.param("cuda:7", "cuda:7", marks=pytest.mark.skipif(__import__("torch").cuda.device_count() > 7,
                                                             reason="has 8 GPUs")),
])
def test_a_device_that_is_not_there_is_a_message(tmp_path, capsys, device, says):
    """Attack: `--device bogus` and `--device mps` without one ended in tracebacks."""
    grid_file = write_grid(tmp_path / "g.toml")
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / "r"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert says in err and no_traceback(err), err
    assert nothing_trained(tmp_path / "r")
    assert main(["cell", "dense", "--arch", "lenet300", "--dataset", "fashion-mnist", "--device", device]) == 2
    assert says in capsys.readouterr().err


def test_an_unreachable_dask_scheduler_is_a_message(tmp_path, capsys):
    """Attack: a scheduler address nobody listens on ended in a traceback (after 30 s)."""
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grid_file = write_grid(tmp_path / "g.toml")
    began = time.monotonic()
    code = main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / "r"), "--backend", "dask",
                 "--scheduler", f"tcp://127.0.0.1:{port}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"--scheduler tcp://127.0.0.1:{port}: cannot reach a Dask scheduler there" in err, err
    assert time.monotonic() - began < 60
    assert not list((tmp_path / "r").glob("*/cells/*.json"))
    assert not list((tmp_path / "r").glob("*/claims/*.claim"))


@pytest.mark.parametrize("text, says", [
    ("experiment = [1, 2]\n", "g.toml:1: experiment must be a list of [[experiment]] tables, got [1, 2]"),
    ('[[experiment]]\narchs = ["lenet300"]\ndatasets = ["fashion-mnist"]\nschedule = "fast"\n'
     '[experiment.methods.dense]\n',
     "g.toml:4: schedule must be a table of settings (e.g. schedule = { epochs = 20 }), got 'fast'"),
    ('include = ["g.toml"]\n', "include 'g.toml' makes a cycle"),
])
def test_a_malformed_grid_is_a_message(tmp_path, capsys, monkeypatch, text, says):
    """Attack: `experiment = [1, 2]`, `schedule = "fast"` and a grid that includes itself
    (RecursionError) ended in tracebacks."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.toml").write_text(text)
    assert main(["run", "--grid", "g.toml", "--results-dir", "r", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert says in err and no_traceback(err), err


def test_an_include_cycle_through_another_grid_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.toml").write_text('include = ["b.toml"]\n')
    (tmp_path / "b.toml").write_text('include = ["a.toml"]\n')
    with pytest.raises(grids.GridError, match=r"makes a cycle \(.*a\.toml -> .*b\.toml -> .*a\.toml\)"):
        grids.load_grid("a.toml")


def test_a_results_dir_that_is_a_file_is_a_message(tmp_path, capsys):
    """Attack: `--results-dir` naming a file ended in a traceback."""
    grid_file = write_grid(tmp_path / "g.toml")
    (tmp_path / "afile").write_text("not a folder")
    for command in (["run", "--no-progress"], ["status"], ["collect"]):
        assert main([command[0], "--grid", str(grid_file), "--results-dir", str(tmp_path / "afile"), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert f"--results-dir {tmp_path / 'afile'} is a file, not a folder" in err, err
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_read_only_results_folder_stops_the_run_before_anything_trains(tmp_path, capsys, small_disk):
    """Attack: a read-only results folder ended in a traceback."""
    disk = small_disk(1024, read_only=True)
    grid_file = write_grid(tmp_path / "g.toml")
    began = time.monotonic()
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(disk / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "point --results-dir at a writable folder" in err, err
    assert time.monotonic() - began < 30
    assert not list(disk.iterdir())


def test_a_full_disk_stops_the_run_with_a_message_and_leaves_no_partial_files(tmp_path, small_disk, capsys):
    """Attack: ENOSPC recorded cells as failed, went on, and left `.tmp` files behind."""
    disk = small_disk(512)  # room for logs and result files, not for one LeNet-300-100 checkpoint
    grid_file = write_grid(tmp_path / "g.toml", dense=False, epochs=2)
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(disk / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot write " + str(disk / "r" / "g" / "work") in err, err
    assert "No space left on device" in err and "the disk is full" in err, err
    assert "resume with: python -m benchmark run" in err and no_traceback(err)
    left = [p for p in disk.rglob("*") if ".tmp" in p.name or "probe" in p.name]
    assert not left, f"partial files left: {left}"
    assert not list(disk.glob("r/g/cells/*.json")), "a disk problem was recorded as a failed cell"
    assert not list(disk.glob("r/g/claims/*.claim"))


def test_a_full_disk_while_writing_a_result_raises_a_clear_error_and_leaves_no_tmp(small_disk):
    from benchmark.core.errors import StorageError

    disk = small_disk(64)
    store = Store(disk, "g")
    store.ensure()
    with open(disk / "filler", "wb", buffering=0) as fh:  # fill the disk to the last block
        with pytest.raises(OSError):
            while True:
                fh.write(b"x" * 4096)
    with pytest.raises(StorageError, match=r"cannot write .*abc\.json: No space left on device"):
        store.write("abc", {"method": "dense"}, [{"status": "ok", "test_acc": 0.5, "blob": "y" * 100_000}], "run1")
    assert not [p for p in disk.rglob("*") if ".tmp" in p.name]
    assert not store.path("abc").exists()


@pytest.mark.parametrize("damage", ["torn", "lacks fields", "another cell's file", "impossible accuracy"])
def test_a_damaged_cell_file_is_named_set_aside_and_its_cell_rerun(copy_of, capsys, damage):
    """Attack: a torn cell file stopped the whole grid without naming the file; one that parses
    but lacks fields (`{"cell_id": "x"}`) ended in a traceback."""
    grid_file, results = copy_of / "g.toml", copy_of / "r"
    store = Store(results, "g")
    victims = sorted(store.cells_dir.glob("*.json"))
    victim, other = victims[0], victims[1]
    original = json.loads(victim.read_text())
    text = {"torn": victim.read_text()[: len(victim.read_text()) // 2],
            "lacks fields": json.dumps({"cell_id": "x"}),
            "another cell's file": other.read_text(),
            "impossible accuracy": json.dumps(original | {"records": [original["records"][0] | {"test_acc": -5}]}),
            }[damage]
    victim.write_text(text)
    untouched = {p.name: p.stat().st_mtime_ns for p in victims if p != victim}

    assert main(["status", "--grid", str(grid_file), "--results-dir", str(results)]) == 0
    assert str(victim) in capsys.readouterr().out  # named, not a crash

    assert main(["run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "damaged result file set aside" in captured.err and victim.stem in captured.err
    assert "1 finished now, 2 already done" in captured.out
    kept = list((store.cells_dir / "damaged").glob(f"{victim.stem}.*.json"))
    assert len(kept) == 1 and kept[0].read_text() == text  # kept for inspection, as it was
    assert store.read(victim.stem)["status"] == "ok"  # rerun
    assert {p.name: p.stat().st_mtime_ns for p in victims if p != victim} == untouched  # the rest untouched


# ------------------------------------------------------------------------------------------------
# Nonsense accepted in silence
# ------------------------------------------------------------------------------------------------

NONSENSE = [
    # (what goes in the grid, the message's words) - each must name the value, the place, what is allowed
    ({"extra": "threshold = nan"}, ["g.toml:13", "dwf.threshold=nan", "must be a finite number"]),
    ({"extra": "threshold = inf"}, ["g.toml:13", "dwf.threshold=inf", "must be a finite number"]),
    ({"extra": "[experiment.methods.grasp]\ntemperature = inf"},
     ["g.toml:14", "grasp.temperature=inf", "must be a finite number"]),
    ({"extra": "[experiment.methods.synflow]\ntarget_cr = 1e30"},
     ["g.toml:14", "synflow.target_cr=1e+30", "266,200 prunable weights", "target_cr must be <= 266200"]),
    ({"depths": (1_000_000,)}, ["g.toml:11", "dwf.depth=1000000 must be <= 32"]),
    ({"lams": ()}, ["g.toml:12", "dwf.lam = [] is an empty list", "give at least one value"]),
    ({"epochs": 2.7}, ["g.toml:8", "schedule epochs=2.7 is not an integer"]),
    ({"epochs": "true"}, ["g.toml:8", "schedule epochs=True is not an integer"]),
    ({"seeds": "[4294967296]"}, ["g.toml:3", "seed=4294967296 is out of range", "[0, 4294967295]"]),
    ({"seeds": "[1.5]"}, ["g.toml:3", "seed=1.5 is not an integer"]),
    ({"subset": 2.7}, ["g.toml:4", "subset=2.7 is not an integer"]),
    ({"schedule_extra": ", lr = inf"}, ["g.toml:8", "schedule lr=inf", "must be a finite number"]),
]


@pytest.mark.parametrize("change, says", NONSENSE, ids=[s[1] for _, s in NONSENSE])
def test_nonsense_in_a_grid_is_refused_naming_value_place_and_what_is_allowed(tmp_path, capsys, monkeypatch,
                                                                              change, says):
    """Attack: threshold = nan / inf, GraSP temperature = inf, target_cr = 1e30, depth = 1e6
    (hung), lam = [] (0 cells), epochs = 2.7 -> 2 and true -> 1, a seed beyond 2^32 - 1 were
    accepted in silence."""
    monkeypatch.chdir(tmp_path)
    write_grid(tmp_path / "g.toml", **change)
    assert main(["run", "--grid", "g.toml", "--results-dir", "r", "--no-progress"]) == 2
    err = capsys.readouterr().err
    for words in says:
        assert words in err, err
    assert nothing_trained(tmp_path / "r")


def test_only_that_selects_nothing_is_an_error(tmp_path, capsys):
    """Attack: `--only method=dwff` ran 0 cells and exited 0."""
    grid_file = write_grid(tmp_path / "g.toml")
    args = ["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / "r"), "--dry-run"]
    assert main(args + ["--only", "method=dwff"]) == 2
    assert "--only method=dwff: no cell of this grid has method=dwff (its values: dense, dwf)" in capsys.readouterr().err
    assert main(args + ["--only", "lam=0.0002"]) == 2
    assert "no cell of this grid has lam=0.0002" in capsys.readouterr().err
    assert main(args + ["--only", "method=dense", "--only", "depth=2"]) == 2
    assert "no cell matches all of them together" in capsys.readouterr().err
    assert main(args + ["--only", "method=dwf"]) == 0


def test_a_seed_flag_beyond_32_bits_is_an_error(tmp_path, capsys):
    grid_file = write_grid(tmp_path / "g.toml")
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / "r"), "--dry-run",
                 "--seeds", "0,4294967296"]) == 2
    assert "--seeds=4294967296 is out of range" in capsys.readouterr().err
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / "r"), "--dry-run",
                 "--seeds", "0,x"]) == 2
    assert "--seeds='x' is not an integer" in capsys.readouterr().err


def test_a_data_dir_that_does_not_exist_is_an_error(tmp_path, capsys):
    """Attack: `--data-dir` naming nothing silently searched elsewhere."""
    grid_file = write_grid(tmp_path / "g.toml")
    missing = tmp_path / "no-such-folder"
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / "r"), "--data-dir", str(missing),
                 "--no-progress"]) == 2
    assert f"--data-dir {missing}: no such folder" in capsys.readouterr().err
    assert nothing_trained(tmp_path / "r")
    assert main(["cell", "dense", "--arch", "lenet300", "--dataset", "fashion-mnist", "--data-dir", str(missing)]) == 2
    assert f"--data-dir {missing}: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, says", [
    ("test_acc", -5, "test_acc=-5 is outside [0, 1]"),
    ("cr", 0.5, "cr=0.5 is below 1"),
    ("test_loss", float("nan"), "test_loss=nan is not a number"),
    ("wall_s", float("inf"), "wall_s=inf is not a finite number"),
])
def test_collect_refuses_impossible_values_and_names_the_file(copy_of, capsys, field, value, says):
    """Attack: a results row with test_acc = -5 was collected as is."""
    results = copy_of / "r"
    store = Store(results, "g")
    path = sorted(store.cells_dir.glob("*.json"))[0]
    result = json.loads(path.read_text())
    result["records"][0][field] = value
    path.write_text(json.dumps(result))
    written_by_run = (results / "g" / "results.csv").read_text()
    assert main(["collect", "--grid", str(copy_of / "g.toml"), "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and says in err, err
    assert (results / "g" / "results.csv").read_text() == written_by_run  # the bad value reached no CSV


def test_collect_keeps_an_infinite_cr_where_nothing_is_kept(copy_of):
    """+inf CR (every weight zero) and nan balance (no factor left) are real outcomes, not damage."""
    store = Store(copy_of / "r", "g")
    path = sorted(store.cells_dir.glob("*.json"))[0]
    result = json.loads(path.read_text())
    result["records"][0] |= {"cr": math.inf, "cr_effective": math.inf, "balance_error": math.nan}
    path.write_text(json.dumps(result))
    assert main(["collect", "--grid", str(copy_of / "g.toml"), "--results-dir", str(copy_of / "r")]) == 0


def test_four_problems_in_two_experiments_are_all_named():
    """Attack: a grid with four problems in two experiments was rejected naming three (a bad
    schedule was reported alone, but not beside other problems)."""
    text = """[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = -1 }
[experiment.methods.dwf]
lam = -3

[[experiment]]
archs = ["lenet300", "alexnet"]
datasets = ["fashion-mnist"]
[experiment.methods.dwf]
depth = 1
"""
    with pytest.raises(grids.GridError) as err:
        grids.parse_grid(text, "four", "four.toml")
    message = str(err.value)
    assert "has 4 problem(s)" in message
    assert "four.toml:4: bad schedule: epochs=-1 must be >= 0" in message
    assert "four.toml:6: dwf.lam=-3.0 must be >= 0" in message
    assert "four.toml:9: unknown architecture 'alexnet'" in message
    assert "four.toml:12: dwf.depth=1 must be >= 2" in message


def test_cell_ids_do_not_change():
    """Existing results must stay valid: the ids of these configurations were computed by the code
    before this change."""
    cell = Cell.make("dwf", "lenet300", "fashion-mnist", 0, {"lam": 1e-3}, {"epochs": 5})
    assert cell.id == "f6545f22b85d3598" == config_hash(cell.config())
    for name in grids.preset_names():
        for c in grids.load_grid(name).cells:
            assert c.id == config_hash(c.config()) == Cell.from_config(c.config()).id


# ------------------------------------------------------------------------------------------------
# Scale and doctor
# ------------------------------------------------------------------------------------------------


def test_a_dry_run_of_100000_cells_takes_seconds(tmp_path, capsys):
    """Attack: `run --dry-run` on a 100,000-cell grid took 45 s and 710 MB (type hints resolved per
    cell). Timed in-process: interpreter start-up and imports (~2-3 s, mostly torch) come on top."""
    lams = ", ".join(f"{1e-6 * (1 + i):.6g}" for i in range(1000))
    (tmp_path / "big.toml").write_text(f"""seeds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
[[experiment.methods.dwf]]
depth = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
lam = [{lams}]
""")
    # the estimate from per-epoch times (measuring speeds takes seconds of its own, once per machine)
    (tmp_path / "speeds.toml").write_text("[epoch_s]\nlenet300 = 2.0\n")
    began, cpu = time.perf_counter(), time.process_time()
    assert main(["run", "--grid", str(tmp_path / "big.toml"), "--results-dir", str(tmp_path / "r"), "--dry-run",
                 "--speeds", str(tmp_path / "speeds.toml")]) == 0
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    out = capsys.readouterr().out
    assert "100000 cell(s) to run" in out and "estimated wall time" in out
    # CPU seconds: on a machine busy with other work the wall time says more about the others. The
    # bound is 3x under the 45 s of the regression it guards: 5.03 CPU s once on this project's Intel
    # Xeon (beside two other test and training runs), where the 5 s bound it had failed.
    assert cpu < 15, f"dry run of 100,000 cells took {cpu:.1f} CPU s ({seconds:.1f} s wall)"


def test_doctor_says_what_a_run_would_use_and_that_training_works(tmp_path):
    import resource

    def cpu_of_children():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    began = cpu_of_children()
    done = cli("doctor", "--results-dir", tmp_path / "r", cwd=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for words in ["device ", "dtype ", "threads ", "run --jobs 1:", "datasets ", "fashion-mnist",
                  "results ", "writable", "backends ", "local worker process: started", "dask",
                  "step        cpu: ok", "all checks passed"]:
        assert words in out, out
    assert cpu_of_children() - began < 60  # CPU seconds of doctor and its worker (wall time: the machine's load)
    assert not (tmp_path / "r").exists()  # looking changes nothing

    bad = cli("doctor", "--device", "bogus", "--results-dir", tmp_path / "r", "--no-workers", cwd=tmp_path, timeout=1200)
    assert bad.returncode == 1 and "PROBLEM: --device 'bogus' is not a device" in bad.stdout


# ------------------------------------------------------------------------------------------------
# Beyond the list
# ------------------------------------------------------------------------------------------------


RACER = r"""
import os, sys, time
from pathlib import Path
from benchmark.execution.claims import ClaimFiles
from benchmark.execution.store import Store



class SlowClaims(ClaimFiles):
    # A driver paused (swapped out, descheduled) between judging a claim stale and acting on it.
    def stale(self, path):
        verdict = super().stale(path)
        time.sleep(0.3)
        return verdict


root, rounds = Path(sys.argv[1]), int(sys.argv[2])
store = Store(root, "g")
store.claims = SlowClaims(store.claims_dir)
for r in range(rounds):
    go = root / f"go-{r}"
    while not go.exists():
        time.sleep(0.0005)
    won = store.claim("abc", f"run-{os.getpid()}")
    (root / f"res-{r}-{os.getpid()}").write_text("1" if won else "0")
while not (root / "stop").exists():  # a driver that has exited is dead: its claim may be taken over
    time.sleep(0.01)
"""


def test_racing_drivers_take_over_a_dead_drivers_claim_once(tmp_path):
    """Found: two drivers that both saw a dead driver's claim could both 'take it over' (the
    second renamed away the first one's fresh claim), and both trained the cell."""
    store = Store(tmp_path, "g")
    store.ensure()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "run_id": "dead"})
    racers, rounds = 4, 4
    (store.claims_dir / "abc.claim").write_text(stale)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(rounds)], env=env())
             for _ in range(racers)]
    try:
        for r in range(rounds):
            (store.claims_dir / "abc.claim").write_text(stale)
            (tmp_path / f"go-{r}").touch()
            assert wait_until(lambda: len(list(tmp_path.glob(f"res-{r}-*"))) == racers, 120, every=0.01)
            wins = sum(p.read_text() == "1" for p in tmp_path.glob(f"res-{r}-*"))
            assert wins == 1, f"round {r}: {wins} drivers hold one cell"
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_claim_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path):
    """Found: a same-host claim counted as alive while *any* process had its pid, so a pid reused
    after a crash held the cell forever. The claim records its process's start time now."""
    def process_start(pid):  # /proc/PID/stat field 22: start time in clock ticks since boot
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])

    store = Store(tmp_path, "g")
    store.ensure()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert wait_until(lambda: Path(f"/proc/{other.pid}/stat").exists(), 10)
        (store.claims_dir / "abc.claim").write_text(json.dumps({
            "host": socket.gethostname(), "pid": other.pid, "start": process_start(other.pid) - 1, "run_id": "old"}))
        assert store.claim("abc", "new")
        (store.claims_dir / "def.claim").write_text(json.dumps({
            "host": socket.gethostname(), "pid": other.pid, "start": process_start(other.pid), "run_id": "live"}))
        assert not store.claim("def", "new")  # that process is the claim's: alive
    finally:
        other.kill()
        other.wait()


def test_two_threads_checkpointing_one_cell_never_tear_the_file(tmp_path):
    """Found: two tasks of one cell in one process (a Dask worker with two threads, after a driver
    was killed and rerun) shared the checkpoint's temporary file name: one renamed the other's
    half-written file into place, or failed because it was gone."""
    import torch

    from benchmark.core.files import save_atomic

    path = tmp_path / "work" / "train.ckpt"
    path.parent.mkdir()
    errors = []

    def save(value):
        try:
            for _ in range(30):
                save_atomic({"x": torch.full((50_000,), float(value))}, path)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    x = torch.load(path)["x"]
    assert bool((x == x[0]).all()) and float(x[0]) in (1.0, 2.0)
    assert [p.name for p in path.parent.iterdir()] == ["train.ckpt"]


def test_scheduler_without_the_dask_backend_is_an_error_not_ignored(tmp_path, capsys):
    """Found: `--scheduler ADDR` without `--backend dask` ran everything locally in silence."""
    grid_file = write_grid(tmp_path / "g.toml")
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / "r"), "--scheduler",
                 "tcp://127.0.0.1:8786", "--no-progress"]) == 2
    assert "--scheduler tcp://127.0.0.1:8786 is for --backend dask" in capsys.readouterr().err
    assert nothing_trained(tmp_path / "r")
