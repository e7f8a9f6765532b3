"""Files in a results folder are input (the folder may be shared): a checkpoint or dense cache holding
a pickle payload runs no code, and a damaged one is named, moved aside and its work redone."""

from __future__ import annotations

import json
import os
import re
import pickle
import shutil
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from benchmark.__main__ import main
from benchmark.execution.packing import plan as pack_plan
from benchmark.execution.records import DamagedResult
from benchmark.execution.store import Store

from benchmark.engine.checkpoints import load_state
from benchmark.engine.schedule import Schedule
from benchmark.engine.train import train
from benchmark.engine import models
from benchmark.execution.cell import Cell, dense_key, run_cell

from conftest import make_data


class Payload:
    """Unpickling this (with the full pickle machinery) creates the file named in ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump({"model": Payload(marker), "epoch": 1}, handle)


def test_a_planted_pickle_is_never_run_and_is_set_aside(tmp_path):
    marker, path = tmp_path / "code-ran", tmp_path / "x.ckpt"
    plant(path, marker)
    with pytest.warns(RuntimeWarning, match=r"x\.ckpt cannot be loaded as a file of this tool.*moved to x\.ckpt\.damaged"):
        assert load_state(path, keys=("model",)) is None
    assert not marker.exists() and not path.exists() and (tmp_path / "x.ckpt.damaged").is_file()
    # the same bytes unpickled the unsafe way do run code: the planted file is a real attack
    pickle.loads((tmp_path / "x.ckpt.damaged").read_bytes())
    assert marker.exists()


def test_a_training_checkpoint_with_a_payload_or_truncated_is_redone_from_the_start(tmp_path):
    data = make_data()
    schedule = Schedule(epochs=2, batch_size=64)
    clean, _ = train(models.build("lenet300", (1, 8, 8), 4, 0), data, schedule, seed=0)
    for damage in ("payload", "truncated"):
        checkpoint = tmp_path / damage / "train.ckpt"
        marker = tmp_path / f"{damage}-ran"
        if damage == "payload":
            plant(checkpoint, marker)
        else:
            train(models.build("lenet300", (1, 8, 8), 4, 0), data, schedule.replace(epochs=1), seed=0,
                  checkpoint=checkpoint)
            checkpoint.write_bytes(checkpoint.read_bytes()[:200])
        with pytest.warns(RuntimeWarning, match="cannot be loaded as a file of this tool"):
            history, _ = train(models.build("lenet300", (1, 8, 8), 4, 0), data, schedule, seed=0,
                               checkpoint=checkpoint)
        assert not marker.exists()
        assert [e["test_acc"] for e in history.epochs] == [e["test_acc"] for e in clean.epochs]  # trained afresh
        assert (checkpoint.parent / "train.ckpt.damaged").is_file()


def test_a_dense_cache_with_a_payload_is_retrained_and_the_cell_succeeds(tmp_path):
    cell = Cell.make("magnitude", "lenet300", "fashion-mnist", schedule={"epochs": 1, "batch_size": 64})
    marker = tmp_path / "code-ran"
    cache = tmp_path / "cache"
    plant(cache / f"dense-{dense_key(cell)}.pt", marker)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [record] = run_cell(cell, data=make_data(), work_root=tmp_path / "w", cache_dir=cache, progress=False)
    assert record["status"] == "ok", record.get("traceback")
    assert not marker.exists()
    assert any("cannot be loaded as a file of this tool" in str(w.message) for w in caught)
    assert (cache / f"dense-{dense_key(cell)}.pt").is_file()  # trained again and cached
    assert (cache / f"dense-{dense_key(cell)}.pt.damaged").is_file()


def test_a_grid_name_that_would_leave_the_results_folder_is_refused(tmp_path, capsys):
    for name in ("..", ".", "../x", "a/b", ""):
        with pytest.raises(ValueError, match="cannot name a results folder"):
            Store(tmp_path / "results", name)
    dots = tmp_path / "...toml"  # a grid file whose name without .toml is ".."
    dots.write_text('[[experiment]]\narchs = ["lenet300"]\ndatasets = ["fashion-mnist"]\n[experiment.methods.dense]\n')
    assert main(["run", "--grid", str(dots), "--results-dir", str(tmp_path / "results"), "--dry-run",
                 "--no-estimate"]) == 2
    assert "cannot name a results folder" in capsys.readouterr().err
    (tmp_path / "results").mkdir(exist_ok=True)
    (tmp_path / "results" / "last-run.json").write_text('{"grid": "../elsewhere"}')
    assert main(["report", "--results-dir", str(tmp_path / "results")]) == 2
    assert "cannot name a results folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["...toml", "results"]


def test_an_include_resolves_from_the_including_file_not_the_working_directory(tmp_path, monkeypatch):
    from benchmark.execution import grids

    folder = tmp_path / "grids"
    folder.mkdir()
    (folder / "base.toml").write_text('[[experiment]]\narchs = ["lenet300"]\ndatasets = ["fashion-mnist"]\n'
                                      '[experiment.methods.snip]\ntarget_cr = 10\n')
    (folder / "top.toml").write_text('include = ["base.toml"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "base.toml").write_text('[[experiment]]\narchs = ["lenet5"]\ndatasets = ["fashion-mnist"]\n'
                                         '[experiment.methods.dense]\n')
    monkeypatch.chdir(elsewhere)  # a base.toml here too: the include must not pick it
    cells = grids.load_grid(str(folder / "top.toml")).cells
    assert [(c.method, c.arch) for c in cells] == [("snip", "lenet300")]


@pytest.mark.parametrize("entry, says", [
    ("[experiment.methods.lottery]\ntarget_cr = 1000\nprune_fraction = 1e-9\n", "more than 1000"),
    ("[experiment.methods.lottery]\ntarget_cr = 10\nrewind = 2\nretrain = \"lr_rewind\"\n",
     "rewind=2 is at or past the end of the schedule (2 epochs)"),
    ("[experiment.methods.dense]\n[experiment.schedule]\nbatch_size = 10000000000\n", "batch_size=10000000000 must be in"),
])
def test_values_whose_cost_is_absurd_are_refused_before_anything_is_built(entry, says):
    from benchmark.execution import grids

    text = ('[[experiment]]\narchs = ["lenet300"]\ndatasets = ["fashion-mnist"]\nschedule = { epochs = 2 }\n'
            + entry)
    if "[experiment.schedule]" in entry:
        text = text.replace("schedule = { epochs = 2 }\n", "").replace("[experiment.schedule]\n",
                                                                        "[experiment.schedule]\nepochs = 2\n")
    with pytest.raises(grids.GridError, match=re.escape(says)):
        grids.parse_grid(text, "absurd")


# ------------------------------------------------------------------------------------------------
# Result files, caches and special files planted in a results folder (issue 27)
# ------------------------------------------------------------------------------------------------

GRID = """description = "two dense cells"
seeds = [0, 1]
subset = 300
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, batch_size = 64 }
[experiment.methods.dense]
"""


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    base = tmp_path_factory.mktemp("finished")
    (base / "g.toml").write_text(GRID)
    assert main(["run", "--grid", str(base / "g.toml"), "--results-dir", str(base / "r"), "--no-progress"]) == 0
    return base


@pytest.fixture
def grid_copy(finished_grid, tmp_path):
    """(grid file, results folder, the store, the first cell's result file) of a copy of the finished grid."""
    shutil.copytree(finished_grid, tmp_path / "w")
    store = Store(tmp_path / "w" / "r", "g")
    return tmp_path / "w" / "g.toml", tmp_path / "w" / "r", store, sorted(store.cells_dir.glob("*.json"))[0]


@contextmanager
def deadline(seconds: int):
    """Turn a hang (an open() that blocks on a FIFO) into a failure."""
    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    before = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


OLDER_FORMATS = {
    "a layer without numel": lambda r: r["layers"][0].pop("numel"),
    "layers that are not a list": lambda r: r.update(layers={"conv1": 150}),
    "a history that is not a list": lambda r: r.update(history={"epoch": 1, "test_acc": 0.5}),
    "history entries that are not tables": lambda r: r.update(history=[0.5, 0.6]),
    "a seed that is not a number": lambda r: r.update(seed="0"),
}


@pytest.mark.parametrize("damage", OLDER_FORMATS)
def test_a_record_of_an_older_format_is_named_then_set_aside_and_redone_and_collect_finishes(grid_copy, capsys, damage):
    """Found: such records passed the damage check, then `collect` ended in a KeyError or TypeError."""
    grid_file, results, store, victim = grid_copy
    result = json.loads(victim.read_text())
    OLDER_FORMATS[damage](result["records"][0])
    victim.write_text(json.dumps(result))
    args = ["--grid", str(grid_file), "--results-dir", str(results)]

    written_by_run = (store.root / "results.csv").read_text()
    assert main(["status", *args]) == 0
    assert str(victim) in capsys.readouterr().out  # named, counted as to do
    assert main(["collect", *args]) == 2  # a message naming it, not a traceback
    assert str(victim) in capsys.readouterr().err
    assert (store.root / "results.csv").read_text() == written_by_run
    assert main(["run", *args, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "damaged result file set aside" in captured.err and victim.stem in captured.err
    assert "1 finished now, 1 already done" in captured.out  # the cell redone
    assert len(list((store.cells_dir / "damaged").glob(f"{victim.stem}.*.json"))) == 1
    assert main(["collect", *args]) == 0
    assert "2 rows" in capsys.readouterr().out


def test_a_fifo_where_a_record_belongs_hangs_neither_status_nor_collect(grid_copy, capsys):
    grid_file, results, store, victim = grid_copy
    victim.unlink()
    os.mkfifo(victim)
    args = ["--grid", str(grid_file), "--results-dir", str(results)]
    with deadline(120):
        assert main(["status", *args]) == 0
        out = capsys.readouterr().out
        assert str(victim) in out and "not a regular file" in out
        with pytest.warns(RuntimeWarning, match=re.escape(str(victim)) + " is not a regular file"):
            assert main(["collect", *args]) == 0  # named and skipped
        assert "1 rows" in capsys.readouterr().out
        assert main(["run", *args, "--no-progress"]) == 0
    assert "1 finished now, 1 already done" in capsys.readouterr().out
    assert victim.is_file() and len(list((store.cells_dir / "damaged").glob(f"{victim.stem}.*.json"))) == 1


def test_readers_that_only_ask_whether_a_cell_is_done_take_a_damaged_record_for_a_missing_one(grid_copy):
    """Picks, ``match`` and ``status`` read with ``read_or_none``: a torn record means "to do"
    (``run`` sets it aside), never a crash and never a result."""
    _, _, store, victim = grid_copy
    assert store.read_or_none(victim.stem)["status"] == "ok"
    victim.write_text(victim.read_text()[:40])
    with pytest.raises(DamagedResult):
        store.read(victim.stem)
    assert store.read_or_none(victim.stem) is None
    assert store.read_or_none("0" * 16) is None  # no file at all


SPEEDS_DAMAGE = {
    "truncated": lambda text: text[: len(text) // 2],
    "of the wrong type": lambda text: "[1, 2, 3]",
    "with NaN speeds": lambda text: re.sub(r'"step_s": [0-9.e-]+', '"step_s": NaN', text),
    "with a unit that is not a table": lambda text: re.sub(r'"units": \{', '"units": {"x": 5, ', text, count=1),
}


@pytest.mark.slow  # measures real training speeds twice per case
@pytest.mark.parametrize("damage", SPEEDS_DAMAGE)
def test_a_damaged_speed_cache_is_named_set_aside_and_measured_again(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("BENCHMARK_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "g.toml").write_text(GRID)
    args = ["run", "--grid", str(tmp_path / "g.toml"), "--results-dir", str(tmp_path / "r"), "--dry-run",
            "--measure-speeds"]
    assert main(args) == 0
    speeds = tmp_path / "cache" / "speeds.json"
    good = speeds.read_text()
    planted = SPEEDS_DAMAGE[damage](good)
    assert planted != good
    speeds.write_text(planted)
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match=re.escape(str(speeds)) + ".*speeds are measured again"):
        assert main(args) == 0
    assert "measuring speeds" in capsys.readouterr().err  # measured again
    assert (tmp_path / "cache" / "speeds.json.damaged").read_text() == planted
    assert json.loads(speeds.read_text())["devices"]


@pytest.mark.parametrize("planted", ['{"key": {"ratio": 1.', '[1, 2]', '{"k": {"ratio": NaN}}', '{"k": 3}', "\xff"])
def test_a_damaged_pack_calibration_is_named_set_aside_and_measured_again(tmp_path, monkeypatch, planted):
    measured = []
    monkeypatch.setattr(pack_plan, "measure", lambda *a, **k: measured.append(a) or {"ratio": 1.5})
    cells = [Cell.make("l1", "lenet300", "fashion-mnist", params={"lam": lam}) for lam in (1e-4, 1e-3)]
    path = tmp_path / pack_plan.CALIBRATION_FILE
    path.write_bytes(planted.encode("latin-1"))
    with pytest.warns(RuntimeWarning, match=re.escape(str(path)) + ".*measured again"):
        units = pack_plan.plan(cells, "auto", device=torch.device("cpu"), cache_dir=tmp_path, say=lambda text: None)
    assert units == [cells] and len(measured) == 1
    assert (tmp_path / (pack_plan.CALIBRATION_FILE + ".damaged")).read_bytes() == planted.encode("latin-1")
    assert all(v["ratio"] == 1.5 for v in json.loads(path.read_text()).values())
