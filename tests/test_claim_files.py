"""Claim files are input too (issue 27): impossible contents are named, set aside and the cell still
runs; and a driver writes a cell only while its claim is still its own, checked at the rename."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from benchmark.__main__ import main
from benchmark.execution.claims import ClaimFiles
from benchmark.execution.store import CLAIM_LOST, Store

GRID = """description = "two dense cells"
seeds = [0, 1]
subset = 300
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, batch_size = 64 }
[experiment.methods.dense]
"""

HOST = os.uname().nodename
IMPOSSIBLE = {
    "not JSON": '{"host": "' + HOST + '", "pid": ',
    "JSON of the wrong type": "[1, 2, 3]",
    "a negative time": json.dumps({"host": HOST, "pid": os.getpid(), "run_id": "r", "at": -5.0}),
    "a NaN time": '{"host": "' + HOST + '", "pid": 1, "run_id": "r", "at": NaN}',
    "a NaN start": '{"host": "' + HOST + '", "pid": 1, "run_id": "r", "start": NaN}',
    "a pid beyond any": json.dumps({"host": HOST, "pid": 10 ** 30, "run_id": "r"}),
    "a huge string": json.dumps({"host": HOST, "pid": os.getpid(), "run_id": "x" * 10 ** 6}),
    "nested beyond reason": "[" * 4000,
}


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    base = tmp_path_factory.mktemp("finished")
    (base / "g.toml").write_text(GRID)
    assert main(["run", "--grid", str(base / "g.toml"), "--results-dir", str(base / "r"), "--no-progress"]) == 0
    return base


@pytest.mark.parametrize("damage", IMPOSSIBLE)
def test_a_claim_with_impossible_contents_is_named_set_aside_and_the_cell_still_runs(finished_grid, tmp_path,
                                                                                    capsys, damage):
    shutil.copytree(finished_grid, tmp_path / "w")
    store = Store(tmp_path / "w" / "r", "g")
    victim = sorted(store.cells_dir.glob("*.json"))[0]
    victim.unlink()  # the cell is to do again, and someone left a claim on it
    claim = store.claims_dir / f"{victim.stem}.claim"
    args = ["--grid", str(tmp_path / "w" / "g.toml"), "--results-dir", str(tmp_path / "w" / "r")]

    claim.write_text(IMPOSSIBLE[damage])
    with pytest.warns(RuntimeWarning, match=re.escape(str(claim)) + ".*moved to"):
        assert main(["status", *args]) == 0
    assert "Traceback" not in capsys.readouterr().out
    claim.write_text(IMPOSSIBLE[damage])  # again, for the run
    with pytest.warns(RuntimeWarning, match=re.escape(str(claim)) + ".*moved to"):
        assert main(["run", *args, "--no-progress"]) == 0
    assert "1 finished now, 1 already done" in capsys.readouterr().out
    assert (store.claims_dir / f"{victim.stem}.claim.damaged").read_text() == IMPOSSIBLE[damage]
    assert store.read(victim.stem)["status"] == "ok" and not claim.exists()


def test_every_reader_of_claims_survives_a_damaged_one(tmp_path):
    claims = ClaimFiles(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    for reader in (lambda: claims.holder("a"), claims.live, lambda: claims.release_run("r"),
                   lambda: claims.refresh_run("r"), claims.sweep_stale, lambda: claims.take("a", "r")):
        (tmp_path / "a.claim").write_text("[")
        with pytest.warns(RuntimeWarning, match=r"a\.claim is damaged"):
            reader()
        assert (tmp_path / "a.claim.damaged").read_text() == "["


def frozen_elsewhere(store: Store, cell_id: str, run_id: str) -> None:
    """``run_id``'s claim on ``cell_id`` as a driver on another host leaves it when it freezes: no
    longer touched, so past the claim timeout another driver takes it over."""
    path = store.claims_dir / f"{cell_id}.claim"
    path.write_text(json.dumps({"host": "frozen-host", "pid": 4242, "start": 1, "run_id": run_id, "at": 1.0}))
    old = time.time() - 2 * store.claims.timeout
    os.utime(path, (old, old))


def test_a_driver_whose_claim_was_taken_over_does_not_write_the_cell(tmp_path):
    """Found: a driver frozen past its claims' expiry on one host, resumed after another host took
    the claims over, wrote the cell a second time."""
    store = Store(tmp_path, "g")
    store.ensure()
    record = {"status": "ok", "test_acc": 0.5}
    assert store.claim("abc", "first")
    frozen_elsewhere(store, "abc", "first")
    assert store.claim("abc", "second")  # stale: taken over

    with pytest.warns(RuntimeWarning, match="not written by run first, whose claim on it was lost"):
        result = store.write("abc", {"method": "dense"}, [record | {"test_acc": 0.1}], "first")
    assert result["status"] == CLAIM_LOST and not store.path("abc").exists()
    assert not [p for p in store.cells_dir.iterdir() if ".tmp" in p.name]
    events = [json.loads(line) for line in (store.root / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["run_id"]) for e in events] == [(CLAIM_LOST, "first")]
    assert "run second holds its claim" in events[0]["reason"]

    assert store.write("abc", {"method": "dense"}, [record], "second")["status"] == "ok"
    assert store.read("abc")["run_id"] == "second" and store.read("abc")["records"][0]["test_acc"] == 0.5
    store.release("abc", "second")
    # the second driver finished and released: the first, resumed later still, writes nothing either
    with pytest.warns(RuntimeWarning, match="run second wrote it meanwhile"):
        assert store.write("abc", {"method": "dense"}, [record], "first")["status"] == CLAIM_LOST
    assert store.read("abc")["run_id"] == "second"


def test_the_ownership_check_runs_at_the_rename(tmp_path, monkeypatch):
    """The claim is checked after the file is written and right before its rename: a takeover while
    the driver was writing still stops it."""
    from benchmark.core import files

    store = Store(tmp_path, "g")
    store.ensure()
    assert store.claim("abc", "first")
    real_fsync = os.fsync

    def taken_over_while_writing(fd):
        real_fsync(fd)
        frozen_elsewhere(store, "abc", "first")
        (store.claims_dir / "abc.claim").write_text(json.dumps({"host": "other", "pid": 7, "run_id": "second"}))

    monkeypatch.setattr(files.os, "fsync", taken_over_while_writing)
    with pytest.warns(RuntimeWarning, match="claim on it was lost"):
        assert store.write("abc", {}, [{"status": "ok", "test_acc": 0.5}], "first")["status"] == CLAIM_LOST
    assert not store.path("abc").exists()
