"""Cost before you spend it: `run --dry-run` estimates hours from measured (or supplied) speeds."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from benchmark.speed import estimate, wall_time
from benchmark.__main__ import main
from benchmark.execution.cell import Cell, dense_key


def grid(path: Path, epochs: int = 2, subset: int = 600) -> Path:
    path.write_text(f"""
seeds = [0]
subset = {subset}
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = {{ epochs = {epochs}, batch_size = 64 }}
[experiment.methods.dense]
[[experiment.methods.dwf]]
depth = 3
lam = 1e-3
""")
    return path


def total_seconds(out: str, column: int = 0) -> float:
    """Seconds in the ``total`` row of the printed estimate (column 0: one at a time); under two
    minutes they are printed as seconds too."""
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("total"))
    hours, seconds = re.findall(r"([\d.]+(?:e-?\d+)?) h(?: \(([\d.]+) s\))?", line)[column]
    return float(seconds) if seconds else float(hours) * 3600


def test_each_method_trains_as_factorized_masked_or_dense():
    def v(method, **params):
        return estimate.variant(Cell.make(method, "lenet300", "fashion-mnist", params=params))

    assert v("dwf", depth=4) == "dwf D=4" and v("shallow") == "dwf D=2"
    assert v("snip") == v("magnitude") == v("lottery") == v("rigl") == "masked"
    assert v("dense") == v("l1") == v("structured-magnitude") == "dense"


def test_a_dense_training_shared_by_post_training_methods_counts_once(tmp_path):
    schedule = {"epochs": 5}
    magnitude = [Cell.make("magnitude", "lenet300", "fashion-mnist", params={"target_cr": cr}, schedule=schedule)
                 for cr in (10, 100)]
    dense = Cell.make("dense", "lenet300", "fashion-mnist", schedule=schedule)
    alone = estimate.plan([(c, 0, 1) for c in magnitude], tmp_path)
    assert (alone.dense_trainings, alone.dense_epochs, alone.epochs["lenet300"]) == (1, 5, 5)
    with_dense = estimate.plan([(dense, 5, 1)] + [(c, 0, 1) for c in magnitude], tmp_path)
    assert with_dense.dense_trainings == 0 and with_dense.epochs["lenet300"] == 5  # the dense cell trains it
    (tmp_path / f"dense-{dense_key(magnitude[0])}.pt").write_bytes(b"")
    assert estimate.plan([(c, 0, 1) for c in magnitude], tmp_path).dense_trainings == 0  # cached already


def test_per_epoch_times_from_a_file_give_the_hours_by_hand(tmp_path, capsys):
    """600 of 60,000 examples: an epoch takes 1% of the file's. Dense: 1 + 2 x 0.6 s; DWF D=3 at
    twice dense: 1 + 2 x 1.2 s; each cell 0.3 s more (its hand-off): 2.5 + 3.7 = 6.2 s one at a time
    (in the driver: no worker starts), 4 s to start the workers + 3.7 s (the longer cell) with two."""
    (tmp_path / "a100.toml").write_text('machine = "Test GPU 9000"\ncell_s = 1\n[epoch_s]\nlenet300 = 60\n'
                                        '[slowdown]\n"dwf D=3" = 2\n')
    args = ["run", "--grid", str(grid(tmp_path / "g.toml")), "--results-dir", str(tmp_path / "r"), "--dry-run",
            "--speeds", str(tmp_path / "a100.toml")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 cell(s) to run, 0 done or failed; ~4 training epochs in the cells" in out
    assert "estimated wall time on Test GPU 9000:" in out
    assert total_seconds(out) == pytest.approx(6.2, rel=0.01)
    assert main(args + ["--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 at a time (--jobs)" in out and total_seconds(out, 1) == pytest.approx(7.7, rel=0.01)


@pytest.mark.parametrize("text, says", [
    ("[epoch_s]\nvgg16 = 10\n", "no epoch time for lenet300 on fashion-mnist; add lenet300 = SECONDS"),
    ("[epoch_s]\nlenet300 = -1\n", "epoch_s 'lenet300' = -1 must be a positive number of seconds"),
    ("[epoch_s]\nlenet300 = 1\n[speed]\nx = 1\n", "unknown key(s) ['speed']"),
    ("epoch_s = [\n", "not valid TOML"),
])
def test_a_bad_speeds_file_is_a_message(tmp_path, capsys, text, says):
    (tmp_path / "s.toml").write_text(text)
    assert main(["run", "--grid", str(grid(tmp_path / "g.toml")), "--results-dir", str(tmp_path / "r"), "--dry-run",
                 "--speeds", str(tmp_path / "s.toml")]) == 2
    err = capsys.readouterr().err
    assert says in err and str(tmp_path / "s.toml") in err, err


def test_estimate_flags_without_a_dry_run_are_refused(tmp_path, capsys):
    assert main(["run", "--grid", str(grid(tmp_path / "g.toml")), "--results-dir", str(tmp_path / "r"),
                 "--no-estimate"]) == 2
    assert "--no-estimate is for --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_no_estimate_counts_without_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BENCHMARK_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["run", "--grid", str(grid(tmp_path / "g.toml")), "--results-dir", str(tmp_path / "r"), "--dry-run",
                 "--no-estimate"]) == 0
    out = capsys.readouterr().out
    assert "2 cell(s) to run" in out and "estimated" not in out
    assert not (tmp_path / "cache").exists()


#: Two speed measurements this close (ratio) say the machine's load held during the run between them.
STEADY = 1.5
#: Measure-run-measure at most this often before the load is declared too unsteady to compare.
TRIES = 3


@pytest.mark.slow  # measures speeds and runs the whole grid
def test_the_estimate_is_within_a_factor_3_of_the_run(tmp_path, capsys, monkeypatch):
    """Speeds measured here just before and just after the run it estimates (a shared machine's load
    moves), and the run's wall time within a factor 3 of their mean: not tighter, the machine is
    noisy and worker start-up is not in the estimate. The cells train for seconds, not fractions of one,
    so that start-up and dataset loading (a fixed second or so) do not decide the ratio. Where the two
    measurements differ by more than ``STEADY`` the machine's load moved under the run (another job
    started or stopped: 1.3 s before and 5.0 s after once, beside a niced grid), so the run says
    nothing about the estimate and is tried again. Then the cache and a stored machine's speeds."""
    grid_file = grid(tmp_path / "g.toml", epochs=2, subset=6000)
    machine = estimate.machine_name(__import__("torch").device("cpu"))
    tries = []

    def measure_and_estimate(cache: str) -> float:
        monkeypatch.setenv("BENCHMARK_CACHE_DIR", str(tmp_path / cache))
        assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / cache), "--dry-run",
                     "--measure-speeds"]) == 0
        captured = capsys.readouterr()
        assert "measuring speeds on cpu" in captured.err and f"estimated wall time on {machine}" in captured.out
        return total_seconds(captured.out)

    steady = False
    for attempt in range(TRIES):
        before = measure_and_estimate(f"before{attempt}")
        began = time.perf_counter()
        assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / f"r{attempt}"), "--no-progress"]) == 0
        took = time.perf_counter() - began
        after = measure_and_estimate(f"after{attempt}")
        tries.append((before, after, took))
        steady = max(before, after) <= STEADY * min(before, after)
        if steady:
            break
    if steady:
        estimated = (before + after) / 2
        assert took / 3 <= estimated <= took * 3, f"estimated {before:.2f} and {after:.2f} s, the run took {took:.1f} s"

    grid_again = grid(tmp_path / "g2.toml", epochs=3, subset=1000)
    assert main(["run", "--grid", str(grid_again), "--results-dir", str(tmp_path / "r"), "--dry-run",
                 "--measure-speeds"]) == 0
    captured = capsys.readouterr()
    assert "measuring" not in captured.err and "ROUGH" not in captured.out  # same models, cached
    assert main(["run", "--grid", str(grid_again), "--results-dir", str(tmp_path / "r"), "--dry-run", "--speeds",
                 machine.split(",")[0]]) == 0
    out = capsys.readouterr().out
    assert "measured earlier" in out and f"estimated wall time on {machine}" in out
    if not steady:
        pytest.skip(f"the machine's speed moved by more than {STEADY}x in each of {TRIES} tries "
                    f"(estimates before, after and the run's seconds: {tries}): no run to compare the estimate with")


@pytest.mark.slow  # measures real training speeds twice
def test_a_speed_cached_while_the_machine_was_busy_is_measured_again_once_it_is_not(tmp_path, capsys, monkeypatch):
    """A speed measured under a load above the core count (a grid running) overstates the hours many
    times; once the machine is less than half as busy, the next dry run measures it again. A speed
    measured on a quiet machine stays cached."""
    import json
    import os

    monkeypatch.setenv("BENCHMARK_CACHE_DIR", str(tmp_path / "cache"))
    grid_file = grid(tmp_path / "g.toml")
    args = ["run", "--grid", str(grid_file), "--results-dir", str(tmp_path / "r"), "--dry-run", "--measure-speeds"]
    assert main(args) == 0
    capsys.readouterr()
    cache_path = tmp_path / "cache" / "speeds.json"
    cache = json.loads(cache_path.read_text())
    (entry,) = cache["devices"].values()
    (busy_key, busy), (quiet_key, quiet) = sorted(entry["units"].items())
    cores = os.cpu_count() or 1
    busy.update(step_s=99.0, load=1000.0 * cores)  # as if measured under a huge load
    quiet.update(step_s=77.0, load=0.0)
    cache_path.write_text(json.dumps(cache))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 model(s)" in err and "1 measured again: cached while the machine was busy" in err
    units = next(iter(json.loads(cache_path.read_text())["devices"].values()))["units"]
    assert units[busy_key]["step_s"] < 1.0 and units[busy_key]["load"] == 0.1
    assert units[quiet_key]["step_s"] == 77.0  # quiet measurements are kept
    assert estimate.measured_while_busy({"load": 8.0}, 3.0, 2) and not estimate.measured_while_busy({"load": 8.0}, 5.0, 2)
    assert not estimate.measured_while_busy({"load": 1.5}, 0.1, 2)


def conv_grid(path: Path) -> Path:
    path.write_text("""
seeds = [0]
[[experiment]]
archs = ["vgg16", "resnet18"]
datasets = ["cifar10", "tiny-imagenet"]
schedule = { epochs = 200, batch_size = 128 }
[experiment.methods.dense]
[[experiment.methods.dwf]]
depth = 3
lam = 1e-3
[experiment.methods.magnitude]
target_cr = 10
""")
    return path


def test_a_first_dry_run_measures_no_step_and_says_its_estimate_is_rough(tmp_path, capsys, monkeypatch):
    """An empty speed cache and VGG / ResNet cells on CIFAR and Tiny ImageNet: nothing is built for
    training, nothing timed but the matrix-product rate, nothing cached; the estimate is there,
    labelled rough, with the units it covers and the flag that measures them."""
    from benchmark.speed.perf import step

    monkeypatch.setenv("BENCHMARK_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(estimate, "measure", lambda *a, **k: calls.append(("measure", a)))
    monkeypatch.setattr(step, "build_training", lambda *a, **k: calls.append(("build_training", a)))
    assert main(["run", "--grid", str(conv_grid(tmp_path / "g.toml")), "--results-dir", str(tmp_path / "r"),
                 "--dry-run", "--jobs", "2"]) == 0
    captured = capsys.readouterr()
    assert calls == [] and "measuring" not in captured.err
    assert "12 cell(s) to run" in captured.out and "ROUGH estimated wall time on" in captured.out
    assert "--measure-speeds times them" in captured.out
    for unit in ("vgg16 3x32x32 dense b128", "resnet18 3x64x64 dwf D=3 b128", "vgg16 3x64x64 masked b128"):
        assert unit in captured.out
    assert total_seconds(captured.out, 0) > 0 and total_seconds(captured.out, 1) > 0
    assert not (tmp_path / "cache" / "speeds.json").exists()


def test_cached_units_count_as_measured_the_rest_rough(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("BENCHMARK_CACHE_DIR", str(tmp_path / "cache"))
    args = ["run", "--grid", str(grid(tmp_path / "g.toml")), "--results-dir", str(tmp_path / "r"), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rough, from FLOPs" in out and "lenet300 dense b64, lenet300 dwf D=3 b64" in out
    machine = estimate.machine_name(__import__("torch").device("cpu"))
    key = f"cpu: {machine} | torch {__import__('torch').__version__} | {os_cores()} threads"
    unit = {"step_s": 0.01, "eval_s": 1e-5, "tail_s": 0.01, "setup_s": 0.01, "final_s": 0.1}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "speeds.json").write_text(json.dumps({"devices": {key: {
        "machine": machine, "measured_at": 1.0, "units": {"lenet300|1x28x28|dense|b64": unit}}}}))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "measured (cached): lenet300 dense b64" in out
    rough_line = next(line for line in out.splitlines() if "rough, from FLOPs" in line)
    assert "lenet300 dwf D=3 b64" in rough_line and "dense" not in rough_line


def os_cores() -> int:
    import os

    return os.cpu_count() or 1


def test_cells_go_to_the_first_free_worker_in_the_runs_order():
    """A long cell started last runs alone: 4 cells of 10 s then one of 100 s on 2 workers take
    20 + 100 s, not max(140 / 2, 100); started first, 100 s."""
    assert wall_time.makespan([10, 10, 10, 10, 100], 2) == 120
    assert wall_time.makespan([100, 10, 10, 10, 10], 2) == 100
    assert wall_time.makespan([5, 5], 2, start_s=4) == 9 and wall_time.makespan([], 2) == 0


def test_a_large_batch_is_timed_smaller_and_scaled():
    assert estimate.measured_batch(128, (1, 28, 28)) == 128
    assert estimate.measured_batch(128, (3, 32, 32)) == 42 and estimate.measured_batch(128, (3, 64, 64)) == 10


def test_a_grid_with_cells_finished_here_is_estimated_at_their_pace(tmp_path, capsys, monkeypatch):
    """Seed 0 trains for real; a dry run of seeds 0 and 1 then estimates seed 1's cells at seed 0's
    seconds per epoch (each kind's median: one record each here), as the records say they ran, and
    says so. Records of another CPU model give no pace: the estimate is rough again."""
    import json
    import statistics

    monkeypatch.setenv("BENCHMARK_CACHE_DIR", str(tmp_path / "cache"))
    grid_file = grid(tmp_path / "g.toml")
    results = tmp_path / "r"
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress"]) == 0
    files = sorted((results / "g" / "cells").glob("*.json"))
    paces = {}
    for path in files:
        result = json.loads(path.read_text())
        record = result["records"][0]
        kind = "dense" if result["config"]["method"] == "dense" else "dwf D=3"
        epoch_times = [epoch["seconds"] for epoch in record["history"]]
        assert len(epoch_times) == record["epochs"]
        paces[kind] = statistics.median(epoch_times) + (record["wall_s"] - sum(epoch_times)) / record["epochs"]
    assert len(paces) == 2
    grid_file.write_text(grid_file.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    args = ["run", "--grid", str(grid_file), "--results-dir", str(results), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 cell(s) to run" in out and "ROUGH" not in out
    pace_line = next(line for line in out.splitlines() if "at the pace of this grid's finished cells" in line)
    assert "lenet300 dense b64" in pace_line and "lenet300 dwf D=3 b64" in pace_line
    expected = sum(2 * statistics.median([p]) + wall_time.CELL_OVERHEAD_S for p in paces.values())
    assert total_seconds(out) == pytest.approx(expected, rel=0.01)

    for path in files:  # the same records, from another machine
        result = json.loads(path.read_text())
        result["records"] = [r | {"cpu_model": "Some Other CPU"} for r in result["records"]]
        path.write_text(json.dumps(result))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ROUGH estimated wall time" in out and "at the pace of" not in out


def test_a_pace_is_read_only_from_records_that_say_one():
    """What a cell's pace is taken from, and what is passed over: a method that starts from a shared
    dense model (magnitude, lottery ticket), a failed, a packed cell, and a record with a wall time or
    thread count that is not a number give none."""
    from benchmark.speed import recorded

    def cell(method, seed=0, **params):
        return Cell.make(method, "lenet300", "fashion-mnist", seed=seed, params=params, schedule={"epochs": 3})

    here = {"status": "ok", "device": "cpu", "cpu_model": "CPU X", "threads": 2, "wall_s": 12.0, "epochs": 3}
    lottery = cell("lottery", target_cr=4)
    results = {
        cell("dense").id: {"records": [here]},
        cell("dense", seed=1).id: {"records": [here | {"wall_s": 30.0}]},
        cell("dense", seed=2).id: {"records": [here | {"status": "failed"}]},
        cell("dense", seed=3).id: {"records": [here | {"pack_size": 4}]},
        cell("dense", seed=4).id: {"records": [here | {"wall_s": "12"}]},
        cell("dense", seed=5).id: {"records": [here | {"threads": True}]},
        cell("magnitude", target_cr=10).id: {"records": [here | {"wall_s": 0.5}]},
        lottery.id: {"records": [here | {"wall_s": 24.0}]},
    }
    cells = [cell("dense", seed=s) for s in range(6)] + [cell("magnitude", target_cr=10), lottery]
    needed = {estimate.unit_key("lenet300", "fashion-mnist", kind, 128) for kind in ("dense", "masked")}
    masked_only = {estimate.unit_key("lenet300", "fashion-mnist", "masked", 128)}
    assert recorded.paces([(c, results.get) for c in cells], masked_only) == []  # only the kinds asked for
    found = recorded.paces([(c, results.get) for c in cells], needed)
    assert sorted((p.unit.split("|")[2], p.epoch_s) for p in found) == [("dense", 4.0), ("dense", 10.0)]
    speeds = recorded.paced(estimate.Speeds(), found, "CPU X", 2)
    dense = estimate.Training("lenet300", "fashion-mnist", "dense", 128, 60_000, 10_000, 5, 1)
    assert speeds.paced(dense) and speeds.seconds(dense) == 5 * 7.0  # the median of 4 and 10
    assert recorded.paced(estimate.Speeds(), found, "CPU X", 1) is not speeds  # no records at 1 thread
    assert not isinstance(recorded.paced(estimate.Speeds(), found, "CPU Y", 2), recorded.Paced)


def test_a_records_pace_is_its_typical_epoch_not_a_stretch_slowed_by_other_work():
    """Seconds per epoch from a record's history: the median epoch plus the time outside the epochs,
    so a few epochs slowed by a test run beside the grid do not set the pace; a history that does not
    give every epoch a time falls back to the wall time over the epochs."""
    from benchmark.speed import recorded

    def record(times):
        return {"history": [{"epoch": i + 1, "seconds": s} for i, s in enumerate(times)]}

    steady = [5.0, 5.0, 6.0, 5.0, 5.0]
    slowed = [5.0, 100.0, 150.0, 5.0, 6.0]  # two epochs beside a CI run
    assert recorded.epoch_seconds(record(steady), 5, 31.0) == pytest.approx(5.0 + 5.0 / 5)
    assert recorded.epoch_seconds(record(slowed), 5, 271.0) == pytest.approx(6.0 + 5.0 / 5)
    for bad, wall in ((record(steady[:4]), 31.0),  # an epoch without a time
                      (record([5.0, 5.0, "6", 5.0, 5.0]), 31.0), (record([5.0, 5.0, float("nan"), 5.0, 5.0]), 31.0),
                      (record(steady), 20.0),  # epochs longer than the whole cell
                      ({"history": [5.0] * 5}, 31.0), ({"history": "five epochs"}, 31.0), ({}, 31.0)):
        assert recorded.epoch_seconds(bad, 5, wall) == pytest.approx(wall / 5), bad


def test_a_validation_split_leaves_the_training_set_and_is_evaluated_each_epoch(tmp_path):
    held_out = Cell.make("dense", "lenet300", "fashion-mnist", schedule={"epochs": 2, "validation": 5000})
    (training,) = estimate.plan([(held_out, 2, 1)], tmp_path).trainings
    assert (training.n_train, training.n_test) == (55_000, 15_000)
    (full,) = estimate.plan([(Cell.make("dense", "lenet300", "fashion-mnist", schedule={"epochs": 2}), 2, 1)],
                            tmp_path).trainings
    assert (full.n_train, full.n_test) == (60_000, 10_000)
