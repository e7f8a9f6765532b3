"""The grid runner: resumable, kill-safe, safe under concurrent drivers, failures isolated."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from pathlib import Path

import pandas as pd
import pytest

from benchmark.execution import grids, runner, todo
from benchmark.__main__ import main
from benchmark.execution.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, wait=True):
    cmd = [sys.executable, "-m", "benchmark", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if wait:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _events(results: Path, grid: str) -> list[dict]:
    path = results / grid / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_run_collect_and_second_run_trains_nothing(tmp_path, capsys, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml")
    results = tmp_path / "results"
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress"]) == 0
    grid = grids.load_grid(str(grid_file))
    store = Store(results, "g")
    assert {store.status(c.id) for c in grid.cells} == {"ok"}
    first = {c.id: store.path(c.id).stat().st_mtime_ns for c in grid.cells}

    assert main(["run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress"]) == 0
    assert "0 finished now, 5 already done" in capsys.readouterr().out
    assert {c.id: store.path(c.id).stat().st_mtime_ns for c in grid.cells} == first
    assert Counter(e["event"] for e in _events(results, "g")) == {"start": 5, "finish": 5}

    assert main(["collect", "--grid", str(grid_file), "--results-dir", str(results)]) == 0
    table = pd.read_csv(results / "g" / "results.csv")
    assert len(table) == 5 and set(table["status"]) == {"ok"}
    assert set(table["variant"]) == {"dense", "dwf D=2", "dwf D=3"}
    for column in ["grid", "cell_id", "method", "arch", "dataset", "seed", "depth", "lam", "target_cr", "level",
                   "test_acc", "cr", "cr_total", "cr_effective", "speedup", "epochs", "wall_s", "device", "status"]:
        assert column in table.columns
    layers = pd.read_csv(results / "g" / "layers.csv")
    assert len(layers) == 5 * 3 and set(layers["layer"]) == {"fc1", "fc2", "fc3"}


def test_a_diverged_cell_is_recorded_the_grid_goes_on_and_only_retry_diverged_reruns_it(tmp_path, capsys, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml", lams=(1e-4,), extra="""
[experiment.methods.l1]
lam = 1e-5
lr = 1e12
""")
    results = tmp_path / "r"
    run = ["run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress"]
    assert main(run) == 1
    store = Store(results, "g")
    statuses = Counter(r["status"] for r in store.results())
    assert statuses == {"ok": 3, "failed": 1}
    failed = next(r for r in store.results() if r["status"] == "failed")
    assert "Diverged" in failed["records"][0]["error"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 diverged" in last and "--retry-diverged" in last and "--retry-failed" not in last
    main(run)
    assert "0 finished now, 4 already done" in capsys.readouterr().out  # failed cells wait for a flag
    starts = lambda: Counter(e["cell_id"] for e in _events(results, "g") if e["event"] == "start")
    main(run + ["--retry-failed"])  # a divergence is a result of its settings, not an error to retry
    assert starts()[failed["cell_id"]] == 1
    main(run + ["--retry-diverged"])
    assert starts()[failed["cell_id"]] == 2
    assert sum(starts().values()) == 5  # the 4 cells once, the diverged one again
    capsys.readouterr()
    assert main(["status", "--grid", str(grid_file), "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "--retry-diverged" in out and "--retry-failed" not in out
    header, l1 = out.splitlines()[1].split(), next(line for line in out.splitlines() if line.startswith("l1")).split()
    assert header[1:4] == ["finished", "diverged", "failed"] and l1[1:4] == ["0", "1", "0"]


def test_retry_failed_reruns_a_cell_that_failed_for_another_reason(tmp_path, capsys, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml", lams=(1e-4,))
    results = tmp_path / "r"
    run = ["run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress"]
    assert main(run) == 0
    store = Store(results, "g")
    # the result file a cell leaves when its worker raised (out of memory, a bug): failed, not diverged
    path = sorted(store.cells_dir.glob("*.json"))[0]
    result = json.loads(path.read_text())
    result["status"] = "failed"
    result["records"] = [result["records"][0] | {"status": "failed", "error": "RuntimeError: worker lost its memory"}]
    path.write_text(json.dumps(result))
    capsys.readouterr()
    assert main(["status", "--grid", str(grid_file), "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "--retry-failed" in out and "--retry-diverged" not in out
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert total[2:4] == ["0", "1"]  # not diverged: failed
    starts = lambda: Counter(e["cell_id"] for e in _events(results, "g") if e["event"] == "start")
    before = starts()[result["cell_id"]]
    main(run + ["--retry-diverged"])
    assert starts()[result["cell_id"]] == before
    assert main(run + ["--retry-failed"]) == 0
    assert starts()[result["cell_id"]] == before + 1
    assert store.read(result["cell_id"])["status"] == "ok"


def test_missing_dataset_blocks_only_its_cells(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BENCHMARK_DATA", raising=False)
    grid_file = tmp_path / "g.toml"
    grid_file.write_text("""
description = "blocked"
subset = 300
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist", "kmnist"]
schedule = { epochs = 1 }
[experiment.methods.dense]
""")
    (tmp_path / "nodata").mkdir()  # an empty folder: searched first, then the system locations
    assert main(["run", "--grid", str(grid_file), "--results-dir", "r", "--no-progress",
                 "--data-dir", str(tmp_path / "nodata")]) == 1
    results = {r["config"]["dataset"]: r for r in Store("r", "g").results()}
    assert results["fashion-mnist"]["status"] == "ok"
    assert results["kmnist"]["status"] == "blocked"
    assert "python -m benchmark data fetch kmnist" in results["kmnist"]["records"][0]["error"]


def test_dry_run_lists_cells_and_trains_nothing(tmp_path, capsys, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml")
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / "r"), "--dry-run",
                 "--only", "method=dwf", "--only", "depth=3"]) == 0
    out = capsys.readouterr().out
    assert "2 cell(s) to run" in out and out.count("dwf D=3 [") == 2
    assert not (tmp_path / "r" / "g" / "cells").exists() or not list((tmp_path / "r" / "g" / "cells").iterdir())


@pytest.mark.slow  # driver subprocesses SIGKILLed and rerun
def test_sigkill_then_rerun_finishes_every_cell_exactly_once(tmp_path, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml", lams=(1e-5, 1e-4, 3e-4, 1e-3), epochs=3)
    results = tmp_path / "r"
    grid = grids.load_grid(str(grid_file))
    store = Store(results, "g")
    proc = _cli("run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(store.cells_dir.glob("*.json"))) < 2:
        time.sleep(0.2)  # glob of a folder that does not exist yet is empty
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_first = {p.stem for p in store.cells_dir.glob("*.json")}
    assert 2 <= len(done_first) < len(grid.cells), "the kill should land mid-grid"
    first_run = {cid: store.read(cid)["run_id"] for cid in done_first}

    rerun = _cli("run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    for cell in grid.cells:
        result = json.loads(store.path(cell.id).read_text())  # every file parses: none is torn
        assert result["status"] == "ok"
        if cell.id in first_run:
            assert result["run_id"] == first_run[cell.id]  # finished cells were not run again
    finishes = Counter(e["cell_id"] for e in _events(results, "g") if e["event"] == "finish")
    # the result files are the truth; the event log may miss the line of a cell whose driver was
    # killed between writing its file and appending the line, but never logs a finish twice
    assert set(finishes.values()) == {1}
    assert {c.id for c in grid.cells} - set(first_run) <= set(finishes)
    assert not list(store.cells_dir.glob(".*tmp*")) and not list(store.claims_dir.glob("*.claim"))


@pytest.mark.slow  # two driver subprocesses on one grid
def test_two_concurrent_runs_never_train_a_cell_twice(tmp_path, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml", lams=(1e-5, 1e-4, 3e-4, 1e-3), epochs=1)
    results = tmp_path / "r"
    procs = [_cli("run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress", wait=False)
             for _ in range(2)]
    finished_now = 0
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        finished_now += int(re.search(r"(\d+) finished now", out).group(1))
    grid = grids.load_grid(str(grid_file))
    starts = Counter(e["cell_id"] for e in _events(results, "g") if e["event"] == "start")
    assert set(starts) == {c.id for c in grid.cells} and set(starts.values()) == {1}
    assert finished_now == len(grid.cells)  # the two drivers' shares add up to the grid, no overlap
    store = Store(results, "g")
    assert all(store.status(c.id) == "ok" for c in grid.cells)


def test_claims_of_dead_processes_are_taken_over(tmp_path):
    store = Store(tmp_path, "g")
    store.ensure()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (store.claims_dir / "abc.claim").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    assert store.claim("abc", "run2")
    assert not store.claim("abc", "run3")  # now held by this live process


def test_another_hosts_claim_is_respected_while_touched_and_taken_over_once_abandoned(tmp_path):
    store = Store(tmp_path, "g", claim_timeout=600)
    store.ensure()
    claim = store.claims_dir / "abc.claim"
    claim.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "run_id": "remote"}))
    assert not store.claim("abc", "run2") and store.claimed() == {"abc"}  # fresh: its driver is alive
    old = time.time() - 601
    os.utime(claim, (old, old))  # its driver stopped touching it ten minutes ago
    assert store.claimed() == set()
    assert store.claim("abc", "run2")
    assert json.loads(claim.read_text())["run_id"] == "run2"


def test_the_heartbeat_keeps_this_runs_claims_fresh_and_only_those(tmp_path):
    store = Store(tmp_path, "g")
    store.ensure()
    assert store.claim("mine", "run1") and store.claim("theirs", "run2")
    old = time.time() - 3600
    for name in ("mine", "theirs"):
        os.utime(store.claims_dir / f"{name}.claim", (old, old))
    stop = runner.start_heartbeat(store, "run1", every=0.05)
    try:
        deadline = time.time() + 30
        while (store.claims_dir / "mine.claim").stat().st_mtime == old and time.time() < deadline:
            time.sleep(0.05)
    finally:
        stop()
    assert (store.claims_dir / "mine.claim").stat().st_mtime > old + 3000
    assert (store.claims_dir / "theirs.claim").stat().st_mtime == old


def test_priority_puts_dense_first_and_post_training_last():
    cells = grids.parse_grid("""
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
[experiment.methods.magnitude]
target_cr = 10
[experiment.methods.dwf]
[experiment.methods.dense]
""").cells
    ordered = sorted(cells, key=todo.priority)
    assert [c.method for c in ordered] == ["dense", "dwf", "magnitude"]


SHARED_DENSE = """
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
seeds = [0, 1]
[experiment.methods.lottery]
target_cr = 4
[experiment.methods.magnitude]
target_cr = 10
[experiment.methods.dwf]
"""


def test_a_unit_that_would_wait_for_a_dense_model_being_trained_lets_another_go_first():
    cells = grids.parse_grid(SHARED_DENSE).cells
    by = {(c.method, c.seed): c for c in cells}
    queue = deque([by["lottery", 0], by["magnitude", 0], by["dwf", 0], by["magnitude", 1], by["lottery", 1]])
    seed0 = todo.dense_keys(by["lottery", 0], "cpu")
    assert seed0 == todo.dense_keys(by["magnitude", 0], "cpu") != todo.dense_keys(by["magnitude", 1], "cpu")
    assert todo.dense_keys(by["dwf", 0], "cpu") == frozenset()  # trains its own model

    def keys(unit):
        return todo.dense_keys(unit, "cpu")

    assert todo.take_next(queue, set(seed0), keys) is by["dwf", 0]
    assert todo.take_next(queue, set(seed0), keys) is by["magnitude", 1]
    assert todo.take_next(queue, set(), keys) is by["lottery", 0]  # nothing being trained: the queue's order
    assert todo.take_next(queue, set(seed0) | keys(by["lottery", 1]), keys) is by["magnitude", 0]  # no other: waits
    assert list(queue) == [by["lottery", 1]]


@pytest.mark.slow  # a grid run on two worker processes
def test_a_free_worker_trains_another_cell_instead_of_waiting_for_a_shared_dense_model(tmp_path):
    """Two lottery tickets of one seed share its dense training, and go out first (most epochs):
    the second worker starts the DWF cell rather than wait on the dense lock, and the second lottery
    ticket follows once the dense model is cached."""
    grid_file = tmp_path / "shared.toml"
    grid_file.write_text("""
seeds = [0]
subset = 600
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 2, batch_size = 64 }
[experiment.methods.lottery]
target_cr = 4
retrain = ["rewind", "lr_rewind"]
[experiment.methods.dwf]
lam = 1e-4
""")
    results = tmp_path / "results"
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(results), "--jobs", "2",
                 "--no-progress"]) == 0
    cells = grids.load_grid(str(grid_file)).cells
    assert [c.method for c in sorted(cells, key=todo.priority)] == ["lottery", "lottery", "dwf"]  # the queue
    method = {c.id: c.method for c in cells}
    starts = [method[e["cell_id"]] for e in _events(results, "shared") if e["event"] == "start"]
    assert starts == ["lottery", "dwf", "lottery"]
    assert {e["event"] for e in _events(results, "shared")} == {"start", "finish"}


@pytest.mark.slow  # two whole grid runs
def test_each_run_writes_its_own_log(tmp_path, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml", lams=(1e-4,))
    for _ in range(2):
        main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path), "--no-progress"])
    logs = [p.read_text() for p in (tmp_path / "g" / "logs").glob("*.log")]
    assert len(logs) == 2  # names carry the start time and the run id, so runs in one second differ
    assert sum("3 to run, 0 already done" in text and "finished" in text for text in logs) == 1
    assert sum("0 to run, 3 already done" in text for text in logs) == 1


@pytest.mark.slow  # a whole grid run
def test_the_log_survives_a_library_that_reconfigures_logging(tmp_path, tiny_grid):
    """logging.config.dictConfig (import-linter, distributed and others call it) disables every logger
    that exists already; a run in that process must still write its log."""
    import logging.config

    grid_file = tiny_grid(tmp_path / "g.toml", lams=(1e-4,))
    logging.getLogger("benchmark.run")  # exists before the reconfiguration, as after any earlier run
    logging.config.dictConfig({"version": 1})
    main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path), "--no-progress"])
    (log_file,) = (tmp_path / "g" / "logs").glob("*.log")
    assert "3 to run, 0 already done" in log_file.read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_jobs_per_gpu_without_a_gpu_is_an_error_not_ignored(tmp_path, capsys, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml")
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path), "--jobs-per-gpu", "2"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert not list((tmp_path / "g" / "cells").glob("*.json"))


def test_the_dry_run_estimate_counts_the_epochs_each_method_trains():
    from benchmark.execution.cell import Cell

    schedule = {"epochs": 10}
    lottery = Cell.make("lottery", "lenet300", "fashion-mnist", params={"target_cr": 4.0, "prune_fraction": 0.5},
                        schedule=schedule)
    rewound = Cell.make("lottery", "lenet300", "fashion-mnist",
                        params={"target_cr": 4.0, "prune_fraction": 0.5, "rewind": 2}, schedule=schedule)
    magnitude = Cell.make("magnitude", "lenet300", "fashion-mnist", params={"finetune_epochs": 3}, schedule=schedule)
    dwf = Cell.make("dwf", "lenet300", "fashion-mnist", schedule=schedule)
    assert todo.estimate_epochs(lottery) == 2 * 10  # two levels (1/2, 1/4), each a full schedule
    assert todo.estimate_epochs(rewound) == 2 * 8  # each level trains epochs 2..9 only
    assert todo.estimate_epochs(magnitude) == 3  # the dense training is shared, only fine-tuning counts
    assert todo.estimate_epochs(dwf) == 10


def test_the_dry_run_counts_the_lottery_levels_the_method_trains():
    """0.8^-3 is 1.953125 but computes as 1.9531249999999998: three levels of 20% reach it, and the
    estimate must say three, as the method does (a formula of its own said four)."""
    from benchmark.execution.cell import Cell
    from methods.lottery import level_keep_counts

    cell = Cell.make("lottery", "lenet300", "fashion-mnist", params={"target_cr": 0.8 ** -3},
                     schedule={"epochs": 10})
    assert len(level_keep_counts(266_200, 0.8 ** -3, 0.2)) == 3
    assert todo.estimate_epochs(cell) == 3 * 10
    gmp = Cell.make("gmp", "lenet300", "fashion-mnist", schedule={"epochs": 10})
    assert todo.estimate_epochs(gmp) == 10  # pruning during training costs one schedule


def test_run_options_name_every_bad_value_with_its_fix_in_one_error(tmp_path):
    from benchmark.execution.run_options import RunOptions, RunOptionsError

    (tmp_path / "file").write_text("x")
    with pytest.raises(RunOptionsError) as caught:
        RunOptions(results_dir=tmp_path / "file", jobs=0, pack="many", backend="dask", jobs_per_gpu=2,
                   scheduler_timeout=0)
    said = str(caught.value)
    assert len(caught.value.problems) == 6, caught.value.problems
    for words in ["--jobs 0: must be >= 1", "--pack 'many': use auto, off", "is a file, not a folder",
                  "--backend dask needs --scheduler ADDRESS", "--jobs-per-gpu is for the local backend",
                  "--connect-timeout 0: must be > 0 seconds"]:
        assert words in said, said
    options = RunOptions(results_dir=tmp_path / "r", pack="4")
    assert options.pack == 4 and not options.on_dask  # kept as parsed: nothing downstream parses it again
    with pytest.raises(AttributeError):
        options.jobs = 3  # frozen: checked once, changed never
    with pytest.raises(RunOptionsError, match="--pack 4 with --compile"):
        RunOptions(pack=4, compiled=True)


def test_run_grid_takes_options_or_their_fields_as_keywords_not_both(tmp_path, tiny_grid):
    from benchmark.execution.run_options import RunOptions

    grid = grids.load_grid(str(tiny_grid(tmp_path / "g.toml")))
    with pytest.raises(TypeError, match="not both"):
        runner.run_grid(grid, grid.cells, RunOptions(), jobs=2)
    with pytest.raises(ValueError, match="--jobs 0: must be >= 1"):
        runner.run_grid(grid, grid.cells, results_dir=tmp_path / "r", jobs=0)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_run_packs_nothing_unless_asked_and_help_says_why(monkeypatch, capsys):
    from benchmark.__main__ import build_parser

    monkeypatch.delenv("BENCHMARK_PACK", raising=False)
    args = build_parser().parse_args(["run"])
    assert args.pack == "off"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "bit-reproducible" in text and "--pack auto packs where it measures faster" in text
