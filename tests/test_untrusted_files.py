"""Files in a results folder are input (the folder may be shared): a checkpoint or dense cache holding
a pickle payload runs no code, and a damaged one is named, moved aside and its work redone."""

from __future__ import annotations

import os
import re
import pickle
import warnings
from pathlib import Path

import pytest

from benchmark.engine.train import Schedule, load_state, train
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
    from benchmark.__main__ import main
    from benchmark.execution.store import Store

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
