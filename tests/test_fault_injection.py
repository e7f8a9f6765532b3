"""Fault injection: kill drivers and workers at random points, many times, and check that nothing
is lost or doubled.

Real `python -m benchmark run` processes, real signals (SIGKILL, SIGTERM, SIGINT, SIGHUP to the
driver alone, SIGKILL to a worker, SIGSTOP to a worker or to a driver), a real Dask scheduler and
workers on loopback, and several drivers on one results folder at once. After each scenario every cell must have exactly one result,
be recorded (a `finish` event) at most once, have no `failed` record, leave no claim behind, and
hold records identical to those of an undisturbed run (same numbers to the last bit: resuming from a
checkpoint must not change them).

Bounded: each kill loop stops killing after FAULT_KILLS kills (default 8; half for the Dask ones)
or FAULT_SECONDS seconds (default 90), whichever comes first, and then lets the grid finish, so
the module takes a few minutes on an idle 2-core machine (on a busy one the time bound keeps it
finite, with fewer kills); FAULT_KILLS=100 FAULT_SECONDS=3600 makes it a soak test. FAULT_SEED
replays a run's random choices (the seed is printed in the summary, with the kill counts).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from benchmark.execution.runner import MAX_WORKER_DEATHS
from procs import alive, assert_every_cell_once, children, cli, events, start, wait_until

pytestmark = pytest.mark.slow

FAULT_SECONDS = float(os.environ.get("FAULT_SECONDS", "90"))
FAULT_KILLS = int(os.environ.get("FAULT_KILLS", "8"))
SEED = int(os.environ.get("FAULT_SEED", str(random.SystemRandom().randrange(1 << 30))))

#: What the terminal summary prints (tests/conftest.py): kills survived and cells checked.
REPORT: list[str] = []

GRID = """
description = "fault injection grid"
seeds = [0]
subset = 600
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 3, batch_size = 64 }
[experiment.methods.dense]
[[experiment.methods.dwf]]
depth = [2, 3]
lam = [1e-5, 1e-3]
[experiment.methods.l1]
lam = 1e-4
[experiment.methods.magnitude]
target_cr = 5
[experiment.methods.lottery]
target_cr = 4
prune_fraction = 0.5
"""

#: Record keys that legitimately differ between runs (timing, where, which run).
VOLATILE = {"wall_s", "host", "prune_wall_s", "dense_wall_s", "threads"}


def comparable(result: dict) -> list[dict]:
    out = []
    for record in result["records"]:
        kept = {k: v for k, v in record.items() if k not in VOLATILE and "wall_s" not in k and "latency" not in k}
        kept["history"] = [{k: v for k, v in e.items() if k != "seconds"} for e in record.get("history") or []]
        out.append(kept)
    return out


def same_as_reference(results_by_id: dict, reference: dict) -> None:
    assert set(results_by_id) == set(reference)
    for cell_id, result in results_by_id.items():
        assert comparable(result) == reference[cell_id], f"cell {cell_id} differs from the undisturbed run"


def grid_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "g.toml"
    path.write_text(GRID)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The grid run once, undisturbed, the way the scenarios run it (--jobs 2: one thread per cell)."""
    base = tmp_path_factory.mktemp("reference")
    g = grid_file(base)
    done = cli("run", "--grid", g, "--results-dir", base / "r", "--no-progress", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    return {cid: comparable(result) for cid, result in assert_every_cell_once(base / "r", g).items()}


def grid_cell_ids(g: Path) -> set[str]:
    from benchmark.execution import grids

    return {c.id for c in grids.load_grid(str(g)).cells}


def _loky_workers(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        try:
            if "LokyProcess" in Path(f"/proc/{child}/cmdline").read_text():
                found.append(child)
        except OSError:
            pass
    return found


def drive_with_kills(g: Path, results: Path, rng: random.Random, seconds: float, max_kills: int, args=(),
                     actions=("SIGKILL", "SIGKILL", "SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "worker")) -> Counter:
    """Run the grid, killing at random points (at most ``max_kills`` times, for at most
    ``seconds``), then let it finish. Each kill lands a random 0-0.8 s after the driver logged 1-3
    more events (a cell started or finished), so kills hit start-up, training, result writing and
    claim handling alike. One driver run sees at most MAX_WORKER_DEATHS - 1 worker kills: the runner
    gives a cell up as failed at MAX_WORKER_DEATHS deaths in one run (as it should for a cell that
    kills its worker every time), and random kills could otherwise land on one cell that often."""
    kills: Counter = Counter()
    deadline = time.monotonic() + seconds
    command = ["run", "--grid", g, "--results-dir", results, "--no-progress", *args]
    while True:
        proc = start(*command)
        if time.monotonic() > deadline or sum(kills.values()) >= max_kills:  # enough: this run must finish
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err
            assert "Traceback" not in err, err
            return kills
        killed, worker_kills = False, 0
        while proc.poll() is None and not killed and sum(kills.values()) < max_kills:
            wanted = len(events(results, g.stem)) + rng.randint(1, 3)
            wait_until(lambda: len(events(results, g.stem)) >= wanted or proc.poll() is not None, 300, every=0.05)
            time.sleep(rng.uniform(0, 0.8))
            if proc.poll() is not None:
                break
            action = rng.choice(actions)
            if action == "worker":
                loky = _loky_workers(proc.pid)
                # a worker dies under a cell (the OOM killer's way); the driver goes on
                if loky and worker_kills < MAX_WORKER_DEATHS - 1:
                    os.kill(rng.choice(loky), signal.SIGKILL)
                    kills["worker SIGKILL"] += 1
                    worker_kills += 1
                continue
            workers = children(proc.pid)
            sig = getattr(signal, action)
            os.kill(proc.pid, sig)
            out, err = proc.communicate(timeout=120)
            killed = True
            kills[f"driver {action}"] += 1
            if action != "SIGKILL" and proc.returncode == -sig:
                # the signal came after the run had ended (handlers restored, interpreter exiting):
                # fine only if it had really finished everything
                assert len(list((results / g.stem / "cells").glob("*.json"))) == len(grid_cell_ids(g)), err
                assert not list((results / g.stem / "claims").glob("*.claim"))
            elif action != "SIGKILL" and proc.returncode != 0:  # (0: it had just finished)
                assert proc.returncode == 128 + sig, err
                assert f"stopped by {action}" in err and "resume with:" in err and "Traceback" not in err, err
                assert not list((results / g.stem / "claims").glob("*.claim")), "claims left after " + action
            assert wait_until(lambda: not any(alive(p) for p in workers), 5), \
                f"workers outlived a driver killed by {action}"
        if not killed:  # it finished the grid by itself (or was left to): a further run must find nothing to do
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err
            done = cli(*command)
            assert done.returncode == 0 and "0 finished now" in done.stdout, done.stdout + done.stderr
            return kills


def _report(name: str, kills: Counter, cells: int) -> None:
    total = sum(kills.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(kills.items()))
    REPORT.append(f"{name}: survived {total} kill(s) ({detail or 'none'}); {cells} cells each finished once, "
                  f"records identical to an undisturbed run (FAULT_SEED={SEED})")


def test_local_drivers_and_workers_killed_at_random_points(reference, tmp_path):
    """Rounds on fresh folders (the grid may finish before FAULT_KILLS kills), each checked."""
    rng = random.Random(SEED)
    kills: Counter = Counter()
    deadline = time.monotonic() + FAULT_SECONDS
    rounds = 0
    while rounds == 0 or (sum(kills.values()) < FAULT_KILLS and time.monotonic() < deadline):
        folder = tmp_path / f"round{rounds}"
        g = grid_file(folder)
        kills += drive_with_kills(g, folder / "r", rng, deadline - time.monotonic(),
                                  FAULT_KILLS - sum(kills.values()), args=("--jobs", "2"))
        same_as_reference(assert_every_cell_once(folder / "r", g), reference)
        rounds += 1
    _report(f"local --jobs 2 ({rounds} round(s))", kills, rounds * len(reference))


def test_several_drivers_on_one_folder_never_train_a_cell_twice(reference, tmp_path):
    """Three drivers at once on one folder: together they run each cell once (no kills: one start
    per cell); then again with drivers killed at random and restarted."""
    g = grid_file(tmp_path)
    command = ["run", "--grid", g, "--results-dir", tmp_path / "r", "--no-progress", "--jobs", "2"]
    procs = [start(*command) for _ in range(3)]
    finished_now = 0
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
        finished_now += int(out.split(" finished now")[0].rsplit(" ", 1)[-1])
    starts = Counter(e["cell_id"] for e in events(tmp_path / "r", "g") if e["event"] == "start")
    assert set(starts.values()) == {1} and len(starts) == len(reference), starts
    assert finished_now == len(reference)
    same_as_reference(assert_every_cell_once(tmp_path / "r", g), reference)

    rng = random.Random(SEED + 1)
    results = tmp_path / "r2"

    def driver():
        return start("run", "--grid", g, "--results-dir", results, "--no-progress", "--jobs", "2")

    kills: Counter = Counter()
    deadline = time.monotonic() + FAULT_SECONDS / 2
    running = [driver() for _ in range(3)]
    while running:
        time.sleep(rng.uniform(0.5, 3.0))
        for proc in [p for p in running if p.poll() is not None]:
            out, err = proc.communicate()
            assert proc.returncode == 0, err
            running.remove(proc)
        if running and time.monotonic() < deadline and sum(kills.values()) < FAULT_KILLS:
            victim = rng.choice(running)
            workers = children(victim.pid)
            os.kill(victim.pid, signal.SIGKILL)
            victim.communicate()
            kills["driver SIGKILL (1 of 3)"] += 1
            assert wait_until(lambda: not any(alive(p) for p in workers), 5)
            running = [p for p in running if p is not victim] + [driver()]
    last = cli("run", "--grid", g, "--results-dir", results, "--no-progress", "--jobs", "2")
    assert last.returncode == 0, last.stderr
    same_as_reference(assert_every_cell_once(results, g), reference)
    _report("3 drivers on one folder", kills, len(reference))


# ------------------------------------------------------------------------------------------------
# Dask
# ------------------------------------------------------------------------------------------------

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, scheduler_port=0) as c:
        yield c


def test_dask_driver_killed_at_random_points(reference, cluster, tmp_path):
    """Killed drivers leave their tasks running on the workers (Dask cannot stop a running task):
    those finish into nowhere, the rerun takes the claims over and records each cell once."""
    rng = random.Random(SEED + 2)
    g = grid_file(tmp_path)
    kills = drive_with_kills(g, tmp_path / "r", rng, FAULT_SECONDS / 2, max(1, FAULT_KILLS // 2),
                             args=("--backend", "dask", "--scheduler", cluster.scheduler_address),
                             actions=("SIGKILL", "SIGKILL", "SIGTERM", "SIGINT"))
    same_as_reference(assert_every_cell_once(tmp_path / "r", g), reference)
    _report("dask driver", kills, len(reference))


def test_dask_worker_killed_in_the_middle_of_a_cell(reference, cluster, tmp_path):
    """A Dask worker SIGKILLed under a cell: the scheduler reruns the task elsewhere (resuming from
    the cell's checkpoint), nothing is recorded failed, the results are those of an undisturbed run."""
    g = grid_file(tmp_path)
    results = tmp_path / "r"
    kills: Counter = Counter()
    with distributed.Client(cluster.scheduler_address) as client:
        proc = start("run", "--grid", g, "--results-dir", results, "--no-progress", "--backend", "dask",
                     "--scheduler", cluster.scheduler_address)

        def busy_workers() -> list[str]:
            return [w for w, tasks in client.processing().items() if tasks]

        for round_ in range(2):
            assert wait_until(lambda: sum(e["event"] == "start" for e in events(results, "g")) > 2 * round_
                              or proc.poll() is not None, 300, every=0.05)
            if proc.poll() is not None:
                break
            # the driver logs "start" just before it submits: wait for the scheduler to place the task
            wait_until(lambda: busy_workers() or proc.poll() is not None, 60, every=0.02)
            busy = busy_workers()
            if busy:
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                kills["worker SIGKILL"] += 1
            time.sleep(1)
        out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert kills, "no worker was busy when the test looked"
    same_as_reference(assert_every_cell_once(results, g), reference)
    _report("dask worker", kills, len(reference))


def test_a_data_dir_missing_on_the_dask_workers_is_an_error_before_anything_trains(cluster, tmp_path, capsys):
    """Found: a --data-dir the workers do not have made every cell 'blocked', one by one. It is
    checked on every worker first (the folder is the workers' path, not the driver's)."""
    from benchmark.__main__ import main

    g = grid_file(tmp_path)
    missing = tmp_path / "not-on-the-workers"
    code = main(["run", "--grid", str(g), "--results-dir", str(tmp_path / "r"), "--no-progress", "--backend", "dask",
                 "--scheduler", cluster.scheduler_address, "--data-dir", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and f"--data-dir {missing}: no such folder on Dask worker(s)" in err, err
    assert not list((tmp_path / "r").glob("*/cells/*.json"))
    assert not list((tmp_path / "r").glob("*/claims/*.claim"))


def test_dask_driver_killed_mid_cell_loses_no_training(cluster, tmp_path):
    """A killed driver's tasks run on in the Dask workers. They used to delete their cell's
    checkpoints when they finished, so the rerun trained those cells again from scratch. Now only a
    driver that wrote a cell's result removes its checkpoints: the orphans leave their last epoch's
    checkpoint, and the rerun resumes from it (no epoch is trained twice)."""
    import torch

    g = tmp_path / "g.toml"
    g.write_text(GRID.split("[experiment.methods.dense]")[0].replace("epochs = 3", "epochs = 4")
                 .replace("subset = 600", "subset = 1500") + "[[experiment.methods.dwf]]\ndepth = [2, 3]\n"
                 "lam = [1e-5, 1e-4, 1e-3]\n")
    results = tmp_path / "r"
    work, cells = results / "g" / "work", results / "g" / "cells"
    proc = start("run", "--grid", g, "--results-dir", results, "--no-progress", "--backend", "dask",
                 "--scheduler", cluster.scheduler_address)

    def training_now():
        return [p.parent.name for p in work.glob("*/train.ckpt") if not (cells / f"{p.parent.name}.json").exists()]

    assert wait_until(lambda: training_now() or proc.poll() is not None, 600, every=0.02)
    in_flight = training_now()
    assert in_flight and proc.poll() is None, "no cell was mid-training when the test looked"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with distributed.Client(cluster.scheduler_address) as client:  # the orphaned tasks run to their end
        # (the scheduler forgets them at once; the workers' threads go on until the task returns)
        assert wait_until(lambda: not any(client.run(_busy_threads).values()), 600, every=0.2)
    for cell_id in in_flight:
        if (cells / f"{cell_id}.json").exists():
            continue
        checkpoint = work / cell_id / "train.ckpt"
        assert checkpoint.is_file(), f"the orphaned task of {cell_id} deleted its checkpoints"
        assert torch.load(checkpoint, weights_only=False)["epoch"] == 4  # all of its training is kept
    done = cli("run", "--grid", g, "--results-dir", results, "--no-progress", "--backend", "dask",
               "--scheduler", cluster.scheduler_address)
    assert done.returncode == 0, done.stderr
    assert_every_cell_once(results, g)
    assert not [p for p in work.iterdir()]  # removed once their results were written


def _busy_threads(dask_worker) -> int:
    """Threads of this Dask worker still running a task (forgotten by the scheduler or not)."""
    return len(dask_worker.active_threads)


# ------------------------------------------------------------------------------------------------
# Frozen processes (issue 27): SIGSTOP, not a kill
# ------------------------------------------------------------------------------------------------

#: The stall limit the frozen-worker scenario runs with (seconds): short, but far above the gaps
#: between a healthy worker's progress reports on a busy machine.
FROZEN_STALL_S = 30


def test_a_frozen_worker_is_killed_and_its_cell_redone(reference, tmp_path):
    """A worker SIGSTOPped mid-cell keeps its driver's claims fresh (the heartbeat is the driver's),
    so only its silence tells: past the stall limit the driver kills it and requeues its cell, which
    resumes from its checkpoint. The run ends, the cell starts twice, records are an undisturbed run's."""
    from benchmark.core import cell_progress

    g = grid_file(tmp_path)
    results = tmp_path / "r"
    work, cells = results / "g" / "work", results / "g" / "cells"
    proc = start("run", "--grid", g, "--results-dir", results, "--no-progress", "--jobs", "2",
                 "--stall-timeout", str(FROZEN_STALL_S))

    def training_now():
        found = []
        for path in work.glob("*/progress.json"):
            report = cell_progress.read_progress(path)
            if report and report["epochs"] >= 1 and not (cells / f"{path.parent.name}.json").exists():
                found.append((path.parent.name, report["pid"]))
        return found

    assert wait_until(lambda: training_now() or proc.poll() is not None, 600, every=0.05)
    frozen_cell, pid = training_now()[0]
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert time.monotonic() - stopped_at < cell_progress.DEFAULT_STALL_S  # --stall-timeout was honoured
    assert "frozen" in err and "Traceback" not in err, err
    starts = Counter(e["cell_id"] for e in events(results, "g") if e["event"] == "start")
    assert starts[frozen_cell] == 2, starts
    same_as_reference(assert_every_cell_once(results, g), reference)
    REPORT.append(f"frozen worker: SIGSTOP mid-cell, killed after {FROZEN_STALL_S} s without progress, its cell "
                  f"redone once; records identical to an undisturbed run")


def test_a_driver_frozen_past_its_claims_expiry_writes_nothing_another_host_took_over(reference, tmp_path):
    """Driver A (claiming as host "frozen-host", the test-only ``claims.HOST_ENV``) is SIGSTOPped
    mid-cell; its claims age past the expiry (their times are set back instead of waiting 10
    minutes); driver B, on this host, takes them over and finishes the grid. Then A is resumed: its
    workers' results arrive, and it writes none of them (the store checks the claim at the write)."""
    from benchmark.execution import claims

    g = grid_file(tmp_path)
    results = tmp_path / "r"
    claims_dir, cells = results / "g" / "claims", results / "g" / "cells"
    a = start("run", "--grid", g, "--results-dir", results, "--no-progress", "--jobs", "2",
              env_extra={claims.HOST_ENV: "frozen-host"})
    assert wait_until(lambda: list(claims_dir.glob("*.claim")) or a.poll() is not None, 600, every=0.05)
    assert a.poll() is None, "driver A ended before it claimed anything"
    os.kill(a.pid, signal.SIGSTOP)
    try:
        held = list(claims_dir.glob("*.claim"))
        expired = time.time() - claims.CLAIM_TIMEOUT_S - 60
        for path in held:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path, (expired, expired))
        b = cli("run", "--grid", g, "--results-dir", results, "--no-progress", "--jobs", "2", timeout=900)
        assert b.returncode == 0, b.stderr
        assert len(list(cells.glob("*.json"))) == len(reference)
        written = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out, err = a.communicate(timeout=900)
    assert a.returncode == 0 and "Traceback" not in err, err
    assert {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")} == written, "driver A wrote a cell again"
    finishes = Counter(e["cell_id"] for e in events(results, "g") if e["event"] == "finish")
    assert set(finishes.values()) == {1}, finishes
    same_as_reference(assert_every_cell_once(results, g), reference)
    REPORT.append(f"frozen driver on another host: SIGSTOPped past its claims' expiry ({len(held)} claim(s)) while "
                  f"another driver took them over, then resumed: no cell written twice")
