"""Packed training (issue 15): cells of one structure trained as one stacked model.

What is held here: a stacked model computes what each member computes; packed training ends, in
float64, with each model's weights equal to training it alone (to 1e-6 relative; it is ~1e-16, the
rest of the gap is float32 summation where the loop itself uses float32); a pack of cells records
what each cell records alone, plus ``pack_size``; a diverging cell fails alone; a killed pack
resumes to the uninterrupted result and its workers die with the driver; ``--pack`` plans and
``auto``'s calibration decide as documented.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmark.engine import models
from benchmark.__main__ import main
from benchmark.execution.cell import Cell, run_cell
from benchmark.execution.packing import calibration
from benchmark.execution.packing import plan as pack_plan
from benchmark.execution.packing.jobs import Job, resume, resume_together, why_not_packable
from benchmark.execution.packing.model import NotStackable, StackedModel
from benchmark.execution.packing.plan import pack_key
from benchmark.execution.packing.run import run_pack
from benchmark.execution.packing.train import train_packed
from benchmark.engine.checkpoints import previous_checkpoint
from benchmark.engine.schedule import Schedule
from benchmark.engine.train import TrainHooks, train
from conftest import make_data
from procs import alive, children, cli, env
from methods.dwf import FactorHooks, factorize
from methods.gmp import GMPHooks
from methods.l1 import L1Hooks
from methods.masks import apply_masks

pytestmark = pytest.mark.slow  # processes, clusters or whole grids: left out of make test-fast

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = Schedule(epochs=2, lr=0.1, batch_size=32, weight_decay=1e-3, warmup_epochs=1)
CELL_SCHEDULE = {"epochs": 2, "lr": 0.1, "batch_size": 32, "weight_decay": 1e-3, "warmup_epochs": 1}
#: Records' keys that measure time or place, not results.
TIMING = {"wall_s", "dense_wall_s", "prune_wall_s", "seconds", "host", "pack_size"}


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) if a.numel() else 0.0


# ------------------------------------------------------------------------------------------------
# The stacked model
# ------------------------------------------------------------------------------------------------

def _masked(model, seed):
    gen = torch.Generator().manual_seed(seed)
    apply_masks(model, {"fc1": torch.rand(model.fc1.weight.shape, generator=gen) < 0.3})


@pytest.mark.parametrize("arch, shape, prepare, training", [
    ("lenet300", (1, 8, 8), None, True),
    ("lenet300", (1, 8, 8), lambda m, s: factorize(m, 3, s), True),
    ("lenet300", (1, 8, 8), _masked, True),
    ("lenet5", (1, 16, 16), lambda m, s: factorize(m, 2, s), True),
    ("vgg16", (3, 32, 32), None, True),  # BatchNorm with batch statistics: each member its own
    ("vgg16", (3, 32, 32), None, False),  # and with its own running statistics
])
def test_a_stacked_model_computes_what_each_member_computes(arch, shape, prepare, training):
    members = [models.build(arch, shape, 4, seed=s) for s in range(3)]
    for s, m in enumerate(members):
        if prepare:
            prepare(m, s)
        m.train(training)
    stacked = StackedModel(members).train(training)
    xs = [torch.randn(2, *shape, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    with torch.no_grad():
        out = stacked(torch.cat(xs)).view(3, 2, -1)
        expected = torch.stack([m(x) for m, x in zip(members, xs)])
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    if training and arch == "vgg16":
        own = torch.stack([m.features[1].running_mean for m in members])
        assert torch.allclose(stacked.tensors["features.1.running_mean"], own, atol=1e-6)


def test_a_layer_without_a_stacked_kernel_is_named():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(NotStackable, match=r"1\.bias, 1\.weight: held by layers that have no stacked kernel"):
        StackedModel([net, net])
    with pytest.raises(NotStackable, match="differs in structure"):
        StackedModel([models.build("lenet300", (1, 8, 8), 4), models.build("lenet300", (1, 8, 8), 5)])


# ------------------------------------------------------------------------------------------------
# Packed training against training alone, float64
# ------------------------------------------------------------------------------------------------

def _member(kind: str, seed: int, lam: float):
    """(model, hooks) of one training as its method builds it."""
    arch, shape = ("lenet5", (1, 16, 16)) if kind.startswith("lenet5") else ("lenet300", (1, 8, 8))
    model = models.build(arch, shape, 4, seed=seed)
    hooks = TrainHooks()
    if kind.startswith("dwf") or kind == "lenet5-dwf":
        depth = int(kind[-1]) if kind[-1].isdigit() else 2
        factorize(model, depth, seed)
        hooks = FactorHooks(lam, depth, "explicit" if kind == "dwf-explicit" else "decay")
    elif kind == "l1":
        hooks = L1Hooks(lam)
    elif kind == "masked":
        _masked(model, seed)
    return model, hooks


@pytest.mark.parametrize("kind", ["dense", "dwf2", "dwf3", "dwf4", "dwf-explicit", "l1", "masked", "lenet5-dwf"])
def test_packed_training_ends_where_training_alone_ends(tmp_path, float64, kind):
    data = make_data(shape=(1, 16, 16) if kind.startswith("lenet5") else (1, 8, 8), n_train=96, n_test=64)
    specs = [(0, 1e-3), (1, 3e-3), (0, 1e-2)]  # two share a seed (and so their batches)
    alone = []
    for i, (seed, lam) in enumerate(specs):
        model, hooks = _member(kind, seed, lam)
        history, _ = train(model, data, SCHEDULE, seed=seed, hooks=hooks, checkpoint=tmp_path / f"alone{i}.ckpt")
        alone.append((model, history))
    jobs = []
    for i, (seed, lam) in enumerate(specs):
        model, hooks = _member(kind, seed, lam)
        jobs.append(Job(model, SCHEDULE, seed, tmp_path / f"packed{i}.ckpt", hooks))
        resume(jobs[-1])
    train_packed(jobs, data)
    for (model, history), job in zip(alone, jobs):
        assert job.error is None
        mine = dict(job.model.named_parameters())
        for name, p in model.named_parameters():
            assert relative_gap(p.detach(), mine[name].detach()) < 1e-6, name
        for theirs, ours in zip(history.epochs, job.history):
            assert theirs.keys() == ours.keys()
            for key in theirs.keys() - {"seconds"}:
                # losses are summed in float32 by both loops, in another order
                assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
    # train() with the same arguments finds the finished checkpoint and trains nothing
    model, hooks = _member(kind, *specs[0])
    history, _ = train(model, data, SCHEDULE, seed=specs[0][0], hooks=hooks, checkpoint=tmp_path / "packed0.ckpt")
    assert history.resumed_from == SCHEDULE.epochs and history.epochs == jobs[0].history


def test_joining_the_schedule_at_a_rewind_epoch_with_snapshots_packs_too(tmp_path, float64):
    data = make_data(n_train=96, n_test=64)
    schedule = SCHEDULE.replace(epochs=3)
    alone = []
    for seed in (0, 1):
        model, _ = _member("masked", seed, 0)
        alone.append((model, *train(model, data, schedule, seed=seed, checkpoint=tmp_path / f"a{seed}.ckpt",
                                    first_epoch=1, snapshot_epochs=(1, 2))))
    jobs = [Job(_member("masked", seed, 0)[0], schedule, seed, tmp_path / f"p{seed}.ckpt", first_epoch=1,
                snapshot_epochs=(1, 2)) for seed in (0, 1)]
    for job in jobs:
        resume(job)
    train_packed(jobs, data)
    for (model, history, snapshots), job in zip(alone, jobs):
        assert [e["epoch"] for e in job.history] == [e["epoch"] for e in history.epochs] == [2, 3]
        assert [e["lr"] for e in job.history] == [e["lr"] for e in history.epochs]
        assert sorted(job.snapshots) == sorted(snapshots) == [1, 2]
        for name, p in model.named_parameters():
            assert relative_gap(p.detach(), dict(job.model.named_parameters())[name].detach()) < 1e-6


def test_packed_training_keeps_the_iteration_snapshots_a_lottery_rewinds_to(tmp_path, float64):
    """The dense model a pack trains is the cache the lottery ticket rewinds into (``rewind = "500it"``):
    it must hold the same mid-epoch snapshots as the dense model trained alone."""
    data = make_data(n_train=96, n_test=64)  # 3 steps per epoch: steps 2 and 4 fall inside epochs 1 and 2
    alone = [train(_member("dense", seed, 0)[0], data, SCHEDULE, seed=seed, checkpoint=tmp_path / f"a{seed}.ckpt",
                   snapshot_steps=(2, 4))[1] for seed in (0, 1)]
    jobs = [Job(_member("dense", seed, 0)[0], SCHEDULE, seed, tmp_path / f"p{seed}.ckpt", snapshot_steps=(2, 4))
            for seed in (0, 1)]
    for job in jobs:
        resume(job)
    train_packed(jobs, data)
    for snapshots, job in zip(alone, jobs):
        assert sorted(job.snapshots) == sorted(snapshots) and len(snapshots) == 2
        for key, state in snapshots.items():
            for name, tensor in state.items():
                assert relative_gap(tensor, job.snapshots[key][name]) < 1e-6, (key, name)
        assert torch.load(job.checkpoint, weights_only=False)["snapshots"].keys() == snapshots.keys()


class _Killed(BaseException):
    """The process dying: nothing after it runs."""


class _DiesAtEpoch(TrainHooks):
    """Dies when its job's epoch ``epoch`` ends, after the jobs before it in the pack saved theirs."""

    def __init__(self, epoch: int):
        self.epoch, self.ended = epoch, 0

    def epoch_metrics(self, model):
        self.ended += 1
        if self.ended == self.epoch:
            raise _Killed
        return {}


@pytest.mark.parametrize("dies_at", [1, 2])
def test_a_pack_killed_between_its_checkpoint_writes_resumes_whole_to_the_uninterrupted_weights(tmp_path, dies_at):
    """A kill between two of a pack's checkpoint writes leaves its jobs an epoch apart (at the first
    epoch, one with a checkpoint and the others without). They resume together at the earlier
    epoch and end bit for bit where the uninterrupted pack ends; apart, in packs of other sizes,
    they would not."""
    data = make_data(n_train=96, n_test=64)
    schedule = SCHEDULE.replace(epochs=3)
    seeds = (0, 1, 2)

    def jobs(folder, hooks=lambda i: TrainHooks()):
        return [Job(_member("dense", s, 0)[0], schedule, s, tmp_path / folder / f"{s}.ckpt", hooks(i))
                for i, s in enumerate(seeds)]

    whole = jobs("whole")
    resume_together(whole)
    train_packed(whole, data)

    with pytest.raises(_Killed):
        killed = jobs("killed", lambda i: _DiesAtEpoch(dies_at) if i == 1 else TrainHooks())
        resume_together(killed)
        train_packed(killed, data)
    epochs = [torch.load(tmp_path / "killed" / f"{s}.ckpt", weights_only=False)["epoch"]
              if (tmp_path / "killed" / f"{s}.ckpt").is_file() else 0 for s in seeds]
    assert epochs == [dies_at, dies_at - 1, dies_at - 1]
    assert previous_checkpoint(tmp_path / "killed" / "0.ckpt").is_file() == (dies_at > 1)

    resumed = jobs("killed")
    resume_together(resumed)
    assert [j.start_epoch for j in resumed] == [dies_at - 1] * 3
    train_packed(resumed, data)
    for theirs, ours in zip(whole, resumed):
        assert [e["epoch"] for e in ours.history] == [1, 2, 3]
        for a, b in zip(theirs.history, ours.history):
            assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
        mine = dict(ours.model.named_parameters())
        for name, p in theirs.model.named_parameters():
            assert torch.equal(p, mine[name]), name


def test_hooks_that_act_between_steps_do_not_pack():
    model, _ = _member("dense", 0, 0)
    reason = why_not_packable(Job(model, SCHEDULE, 0, Path(os.devnull), GMPHooks.__new__(GMPHooks)))
    assert reason and "after_step" in reason


# ------------------------------------------------------------------------------------------------
# Cells in a pack against cells alone
# ------------------------------------------------------------------------------------------------

def _cells(method: str, variants: list[dict], seeds=(0,)) -> list[Cell]:
    return [Cell.make(method, "lenet300", "fashion-mnist", seed=seed, params=params, schedule=CELL_SCHEDULE)
            for params in variants for seed in seeds]


PACKS = {
    "dense": _cells("dense", [{}], seeds=(0, 1)),
    "dwf": _cells("dwf", [{"depth": d, "lam": lam} for d in (2, 3, 4) for lam in (1e-3, 1e-2)]),
    "l1": _cells("l1", [{"lam": 1e-4}, {"lam": 1e-3}]),
    "at-init": _cells("random", [{"target_cr": 10}]) + _cells("snip", [{"target_cr": 10}])
    + _cells("grasp", [{"target_cr": 10}]) + _cells("synflow", [{"target_cr": 10, "rounds": 10}]),
    "magnitude-finetuned": _cells("magnitude", [{"target_cr": 10, "finetune_epochs": 1}], seeds=(0, 1))
    + _cells("global-magnitude", [{"target_cr": 3, "finetune_epochs": 1}]),
    "lottery": _cells("lottery", [{"target_cr": 4, "prune_fraction": 0.5, "rewind": 1}], seeds=(0, 1)),
}


def _final_weights(root: Path, cell: Cell) -> dict[str, dict]:
    """Every checkpoint a cell left in its work folder, and the dense models in the cache."""
    found = {p.name: torch.load(p, weights_only=False)["model"] for p in sorted((root / "work" / cell.id).glob("*.ckpt"))}
    found |= {p.name: torch.load(p, weights_only=False)["model"] for p in sorted((root / "cache").glob("dense-*.pt"))}
    return found


@pytest.mark.parametrize("family", list(PACKS))
def test_a_pack_of_cells_records_what_each_cell_records_alone(tmp_path, float64, family):
    cells = PACKS[family]
    data = make_data(n_train=96, n_test=64)
    dev = torch.device("cpu")
    where = {"device": dev, "data": data, "keep_work": True}
    alone = {c.id: run_cell(c, work_root=tmp_path / "a" / "work", cache_dir=tmp_path / "a" / "cache", **where)
             for c in cells}
    packed = run_pack(cells, work_root=tmp_path / "p" / "work", cache_dir=tmp_path / "p" / "cache", **where)
    for cell in cells:
        assert len(alone[cell.id]) == len(packed[cell.id])
        for theirs, ours in zip(alone[cell.id], packed[cell.id]):
            assert theirs["status"] == ours["status"] == "ok", (ours.get("error"), theirs.get("error"))
            assert ours.keys() - theirs.keys() == {"pack_size"} and ours["pack_size"] == len(cells)
            for key, value in theirs.items():
                if key in TIMING or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (cell.label(), key)
        ours_w, theirs_w = _final_weights(tmp_path / "p", cell), _final_weights(tmp_path / "a", cell)
        assert ours_w.keys() == theirs_w.keys() and ours_w
        for file, state in theirs_w.items():
            for name, tensor in state.items():
                if tensor.is_floating_point():
                    assert relative_gap(tensor, ours_w[file][name]) < 1e-6, (cell.label(), file, name)
    # the shared cache holds what it holds after cells alone: no dense training's progress files
    assert sorted(p.name for p in (tmp_path / "p").glob("cache/*")) == sorted(p.name for p in (tmp_path / "a").glob("cache/*"))


def test_a_diverging_cell_fails_alone_and_the_others_train_as_a_pack_without_it(tmp_path):
    cells = _cells("l1", [{"lam": 1e-4}, {"lam": 1e-4, "lr": 1e6}, {"lam": 1e-3}])
    data = make_data(n_train=96, n_test=64)
    where = {"device": torch.device("cpu"), "data": data, "keep_work": True}
    three = run_pack(cells, work_root=tmp_path / "3" / "work", cache_dir=tmp_path / "3" / "cache", **where)
    kept = [cells[0], cells[2]]
    two = run_pack(kept, work_root=tmp_path / "2" / "work", cache_dir=tmp_path / "2" / "cache", **where)
    diverged = three[cells[1].id][0]
    assert diverged["status"] == "failed" and diverged["error"].startswith("Diverged: loss became nan")
    for cell in kept:
        assert three[cell.id][0]["status"] == "ok"
        assert three[cell.id][0]["test_acc"] == two[cell.id][0]["test_acc"]
        mine = torch.load(tmp_path / "3" / "work" / cell.id / "train.ckpt", weights_only=False)["model"]
        theirs = torch.load(tmp_path / "2" / "work" / cell.id / "train.ckpt", weights_only=False)["model"]
        for name in theirs:
            assert relative_gap(theirs[name], mine[name]) < 1e-6


# ------------------------------------------------------------------------------------------------
# The runner: killed packs, planning, auto
# ------------------------------------------------------------------------------------------------

GRID = """description = "packed-training test grid"
seeds = [0]
subset = 600
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 3, batch_size = 64 }
[[experiment.methods.dwf]]
depth = 2
lam = [1e-4, 1e-3]
[experiment.methods.l1]
lam = [1e-5, 1e-4]
"""


def _records(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text())["records"][0] for p in sorted((results / "g" / "cells").glob("*.json"))}


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three runs of the grid, each starting two worker processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
def test_a_killed_pack_resumes_from_its_checkpoints_to_the_uninterrupted_result(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text(GRID)
    whole = cli("run", "--grid", grid, "--results-dir", tmp_path / "whole", "--no-progress", "--pack", "3", "--jobs", "2")
    assert whole.returncode == 0, whole.stderr
    expected = _records(tmp_path / "whole")
    assert sorted(r["pack_size"] for r in expected.values()) == [2, 2, 2, 2]

    results = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "benchmark", "run", "--grid", str(grid), "--results-dir",
                             str(results), "--no-progress", "--pack", "3", "--jobs", "2"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    work = results / "g" / "work"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(work.glob("*/train.ckpt")):
        time.sleep(0.05)
    assert list(work.glob("*/train.ckpt")), proc.communicate()
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.05)
    assert not any(alive(p) for p in workers), "a pack's worker outlived its driver"
    assert not list((results / "g" / "cells").glob("*.json")), "killed before any cell finished"
    rerun = cli("run", "--grid", grid, "--results-dir", results, "--no-progress", "--pack", "3", "--jobs", "2")
    assert rerun.returncode == 0, rerun.stderr
    resumed = _records(results)
    assert resumed.keys() == expected.keys()
    for cid, record in expected.items():
        for key in ("test_acc", "test_loss", "cr", "train_acc"):
            assert resumed[cid][key] == record[key], (cid, key)


def test_plan_packs_cells_of_one_structure_up_to_the_size_asked(monkeypatch):
    cells = (_cells("dense", [{}], seeds=(0, 1, 2)) + _cells("dwf", [{"depth": 2, "lam": x} for x in (1e-3, 1e-2)])
             + _cells("dwf", [{"depth": 3, "lam": 1e-3}]) + _cells("rigl", [{"target_cr": 10}], seeds=(0, 1))
             + _cells("magnitude", [{"target_cr": 10}], seeds=(0, 1)))
    units = pack_plan.plan(cells, 2, device=torch.device("cpu"))
    assert [[c.id for c in u] if isinstance(u, list) else u.id for u in units] == [
        [cells[0].id, cells[1].id], cells[2].id, [cells[3].id, cells[4].id], cells[5].id, cells[6].id,
        cells[7].id, cells[8].id, cells[9].id]
    assert pack_key(cells[6]) is None and pack_key(cells[8]) is None  # RigL; magnitude without fine-tuning
    assert pack_plan.plan(cells, "off", device=torch.device("cpu")) == cells
    monkeypatch.setattr(pack_plan, "free_memory", lambda device: 3 * pack_plan.member_bytes("lenet300", "fashion-mnist", 1, 32))
    assert pack_plan.plan(cells[:3], 8, device=torch.device("cpu")) == cells[:3]  # 1.5 per pack fit: none


def test_auto_packs_only_where_its_cached_calibration_measured_packing_faster(tmp_path, monkeypatch):
    measured = []

    def fake_measure(arch, shape, classes, kind, size, batch, device, rounds=5):
        measured.append(kind)
        return {"ratio": 1.5 if kind == "l1" else 0.8, "size": size}

    monkeypatch.setattr(pack_plan, "measure", fake_measure)
    cells = _cells("l1", [{"lam": 1e-4}, {"lam": 1e-3}]) + _cells("dwf", [{"depth": 3, "lam": x} for x in (1e-3, 1e-2)])
    said = []
    units = pack_plan.plan(cells, "auto", device=torch.device("cpu"), cache_dir=tmp_path, say=said.append)
    assert units == [cells[:2], cells[2], cells[3]]
    assert sorted(measured) == ["dwf D=3", "l1"] and len(said) == 2
    assert "1.50x" in said[0] and "packs of 2" in said[0] and "one at a time" in said[1]
    cached = json.loads((tmp_path / pack_plan.CALIBRATION_FILE).read_text())
    assert len(cached) == 2 and all(v["ratio"] in (1.5, 0.8) for v in cached.values())
    assert pack_plan.plan(cells, "auto", device=torch.device("cpu"), cache_dir=tmp_path) == units
    assert len(measured) == 2, "the second plan measured again instead of reading the cache"
    assert pack_plan.plan(cells, "auto", device=None) == cells  # Dask: the workers' devices are unknown here


def test_run_pack_auto_packs_where_it_measured_packing_faster(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BENCHMARK_PACK", raising=False)  # the suite's conftest sets off
    monkeypatch.setattr(pack_plan, "measure", lambda *args, **kwargs: {"ratio": 2.0})
    grid = tmp_path / "g.toml"
    grid.write_text(GRID.replace("subset = 600", "subset = 100").replace("epochs = 3", "epochs = 1"))
    assert main(["run", "--grid", str(grid), "--results-dir", str(tmp_path / "r"), "--no-progress",
                 "--pack", "auto"]) == 0
    assert "pack auto: lenet300 dwf D=2 on cpu: 2 packed 2.00x" in capsys.readouterr().err
    assert sorted(r["pack_size"] for r in _records(tmp_path / "r").values()) == [2, 2, 2, 2]


def test_perf_pack_prints_one_ratio_per_case_and_size(tmp_path, capsys):
    out = tmp_path / "pack.csv"
    assert main(["perf", "pack", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith("x") and ", pack of 2: " in line]
    assert [line.split(",")[0] for line in lines] == ["dense LeNet-300-100", "DWF D=3 LeNet-300-100", "SynFlow LeNet-5"]
    assert out.read_text().count("pack of 2") == 3
    assert out.read_text().count("hardware limit") == 3


def test_the_packing_limit_counts_every_weight_layers_three_products():
    from benchmark.speed import perf

    # LeNet-300-100: 784x300 + 300x100 + 100x10 multiply-adds per example, forward + two gradients
    assert perf.step_flops("lenet300", (1, 28, 28), 10, 128) == 6 * 128 * (784 * 300 + 300 * 100 + 100 * 10)
    # LeNet-5: a convolution's weights act once per output position (28x28 for conv1, padding 2; 10x10 for conv2)
    macs = 150 * 28 * 28 + 2400 * 10 * 10 + 400 * 120 + 120 * 84 + 84 * 10
    assert perf.step_flops("lenet5", (1, 28, 28), 10, 1) == 6 * macs
    assert perf.matmul_rate(torch.device("cpu"), rounds=1) > 1e8


def test_calibration_times_a_real_pack_against_real_steps():
    result = calibration.measure("lenet300", (1, 8, 8), 4, "dwf D=2", 2, 8, torch.device("cpu"), rounds=1)
    assert result["ratio"] > 0 and result["sequential_s"] > 0 and result["packed_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--pack", "0"], "--pack '0': use auto, off, or the most cells per pack"),
    (["--pack", "many"], "--pack 'many': use auto, off"),
    (["--pack", "4", "--compile"], "--pack 4 with --compile: packed training does not compile"),
])
def test_bad_pack_flags_are_named(tmp_path, capsys, args, message):
    grid = tmp_path / "g.toml"
    grid.write_text(GRID)
    assert main(["run", "--grid", str(grid), "--results-dir", str(tmp_path / "r"), *args]) == 2
    assert message in capsys.readouterr().err


def test_pack_sizes_are_whole_numbers():
    assert pack_plan.parse_pack("auto") == "auto" and pack_plan.parse_pack("1") == "off"
    assert pack_plan.parse_pack(16) == 16
    assert math.isclose(pack_plan.member_bytes("lenet300", "fashion-mnist", 3, 128) / 1e6, 14.5, rel_tol=0.05)
