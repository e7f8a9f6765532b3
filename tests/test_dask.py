"""The same grid through a real Dask scheduler and workers on loopback gives the same cells."""

import json

import pytest

from benchmark.execution import worker
from benchmark.__main__ import main
from benchmark.execution.store import Store


pytestmark = pytest.mark.slow  # processes, clusters or whole grids: left out of make test-fast

distributed = pytest.importorskip("distributed")


@pytest.fixture
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, scheduler_port=0) as c:
        yield c


def test_dask_backend_matches_local_backend(tmp_path, cluster, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml")
    local, remote = tmp_path / "local", tmp_path / "dask"
    worker.DATA_CACHE.clear()
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(remote), "--no-progress",
                 "--backend", "dask", "--scheduler", cluster.scheduler_address]) == 0
    # the cells ran in the Dask workers (they loaded the data), not in this process
    assert not worker.DATA_CACHE
    with distributed.Client(cluster.scheduler_address) as client:
        loaded = client.run(lambda: len(__import__("importlib").import_module("benchmark.execution.worker").DATA_CACHE))
    assert sum(loaded.values()) >= 1
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(local), "--no-progress"]) == 0
    local_results = {r["cell_id"]: r for r in Store(local, "g").results()}
    dask_results = {r["cell_id"]: r for r in Store(remote, "g").results()}
    assert set(local_results) == set(dask_results) and len(dask_results) == 5
    assert {r["status"] for r in dask_results.values()} == {"ok"}
    for cell_id, result in dask_results.items():
        assert result["config"] == local_results[cell_id]["config"]
        # same cell and seed on the same kind of device: the same numbers up to the float noise of
        # a different thread count in the worker
        assert result["records"][0]["cr"] == pytest.approx(local_results[cell_id]["records"][0]["cr"], rel=0.01)
        assert result["records"][0]["test_acc"] == pytest.approx(local_results[cell_id]["records"][0]["test_acc"], abs=0.01)
    events = [json.loads(line) for line in (remote / "g" / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "finish" for e in events) == 5


def test_dask_backend_needs_a_scheduler(tmp_path, capsys, tiny_grid):
    grid_file = tiny_grid(tmp_path / "g.toml")
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(tmp_path), "--backend", "dask"]) == 2
    assert "--scheduler" in capsys.readouterr().err


def test_dask_backend_with_pack_n_packs_without_measuring_the_workers_memory(tmp_path, cluster, capsys, tiny_grid):
    """--pack N on Dask: the driver cannot see the workers' devices, so it packs N as asked (it
    used to crash asking the free memory of no device)."""
    grid_file = tiny_grid(tmp_path / "g.toml")
    results = tmp_path / "dask"
    assert main(["run", "--grid", str(grid_file), "--results-dir", str(results), "--no-progress",
                 "--backend", "dask", "--scheduler", cluster.scheduler_address, "--pack", "2"]) == 0
    assert "cannot be measured from here; packs of up to 2" in capsys.readouterr().err
    records = [r["records"][0] for r in Store(results, "g").results()]
    assert len(records) == 5 and {r["status"] for r in records} == {"ok"}
    # the four DWF cells (two per depth) pack in twos; the dense cell runs alone
    assert sorted(r.get("pack_size", 1) for r in records) == [1, 2, 2, 2, 2]
