"""The CUDA paths (issue 15): every test here is marked ``cuda`` and skipped, with the reason, where
no GPU is visible. ``make gpu-check`` runs them on a GPU machine (benchmark/speed/gpu_check.py).

Covered: bf16 autocast in the training step, channels_last for conv nets, factorized layers under
autocast, exact resume on CUDA, ``--jobs-per-gpu`` workers (each on its own GPU, records naming it),
``--compile``, packed training, augmentation on the GPU, ``--deterministic``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmark.engine import data as data_mod
from benchmark.execution import grids
from benchmark.engine import models
from benchmark.execution.cell import Cell, Context, run_cell
from benchmark.execution.packing.run import run_pack
from benchmark.execution.runner import run_grid
from benchmark.engine.devices import check_compile
from benchmark.engine.schedule import Schedule
from benchmark.engine.train import TrainHooks, train, training_step
from conftest import make_data
from methods.dwf import factorize, factors_of

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


def _on_cuda(data):
    return data.to(CUDA)


def test_training_steps_run_under_bf16_autocast_and_keep_float32_weights():
    model = models.build("lenet5", (1, 16, 16), 4, seed=0).to(CUDA)
    data = _on_cuda(make_data(shape=(1, 16, 16)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data.train.take(torch.arange(32, device=CUDA))
    out, loss, total = training_step(model, x, y, optimizer, TrainHooks(), CUDA)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(total)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_conv_models_train_channels_last_on_cuda(tmp_path):
    cell = Cell.make("dense", "lenet5", "fashion-mnist", schedule={"epochs": 1, "batch_size": 32})
    data = _on_cuda(make_data(shape=(1, 28, 28), classes=10))
    ctx = Context(cell, data, CUDA, tmp_path / "w", tmp_path / "c")
    assert ctx.channels_last
    model = ctx.new_model()
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    history, _ = ctx.train(model)
    assert history.epochs[-1]["train_loss"] < 10 and model.conv2.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_factorized_layers_run_under_autocast_with_float32_factor_gradients(depth):
    model = models.build("resnet18", (3, 32, 32), 10, seed=0).to(CUDA).to(memory_format=torch.channels_last)
    factorize(model, depth, seed=0)
    x = torch.randn(4, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
        loss = nn.functional.cross_entropy(out.float(), torch.zeros(4, dtype=torch.long, device=CUDA))
    loss.backward()
    assert out.dtype == torch.bfloat16
    for factor in factors_of(model.conv1):
        assert factor.grad is not None and factor.grad.dtype == torch.float32 and torch.isfinite(factor.grad).all()


def test_a_resumed_cuda_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    class StopAfter(TrainHooks):
        def after_epoch(self, model, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    data = _on_cuda(make_data(shape=(1, 8, 8)))
    schedule = Schedule(epochs=3, lr=0.05, batch_size=32, weight_decay=1e-4)

    def fresh():
        model = models.build("lenet300", (1, 8, 8), 4, seed=1).to(CUDA)
        factorize(model, depth=3, seed=1)
        return model

    straight = fresh()
    train(straight, data, schedule, seed=5, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), data, schedule, seed=5, checkpoint=tmp_path / "run.ckpt", progress=False, hooks=StopAfter())
    resumed = fresh()
    history, _ = train(resumed, data, schedule, seed=5, checkpoint=tmp_path / "run.ckpt", progress=False)
    assert history.resumed_from == 1
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


GRID = """description = "cuda test grid"
seeds = [0, 1]
subset = 512
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, batch_size = 64 }
[[experiment.methods.dwf]]
depth = 2
lam = [1e-4, 1e-3]
"""


@pytest.mark.parametrize("pack", ["off", 4])
def test_jobs_per_gpu_slots_pin_each_cell_or_pack_to_a_gpu(tmp_path, pack):
    try:
        data_mod.locate("fashion-mnist")
    except data_mod.DatasetMissing:
        pytest.skip("Fashion-MNIST is not here (make data)")
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    grid = grids.load_grid(str(path))
    summary = run_grid(grid, grid.cells, results_dir=tmp_path / "r", jobs_per_gpu=2, progress=False, pack=pack)
    assert summary.finished == len(grid.cells) and not summary.failed
    records = [json.loads(p.read_text())["records"][0] for p in (tmp_path / "r" / "g" / "cells").glob("*.json")]
    assert {r["device"].split(":")[0] for r in records} == {"cuda"}
    assert all(r["device"].split(":")[1].isdigit() and r["gpu"] and r["cuda_version"] for r in records)
    assert all(("pack_size" in r) == (pack != "off") for r in records)


def test_compiled_training_runs_on_cuda(tmp_path):
    check_compile(CUDA)
    data = _on_cuda(make_data(shape=(1, 8, 8)))
    cell = Cell.make("dwf", "lenet300", "fashion-mnist", params={"depth": 3}, schedule={"epochs": 1, "batch_size": 32})
    records = run_cell(cell, data=data, device=CUDA, work_root=tmp_path / "w", cache_dir=tmp_path / "c",
                       progress=False, compiled=True)
    assert records[0]["status"] == "ok" and records[0]["compiled"] is True, records[0].get("error")


def test_packed_training_on_cuda_records_what_training_alone_records(tmp_path):
    data = _on_cuda(make_data(shape=(1, 8, 8), n_train=512, n_test=256))
    schedule = {"epochs": 2, "batch_size": 64}
    cells = [Cell.make("dwf", "lenet300", "fashion-mnist", seed=s, params={"depth": 3, "lam": lam}, schedule=schedule)
             for s in (0, 1) for lam in (1e-4, 1e-3)]
    where = {"device": CUDA, "data": data}
    alone = {c.id: run_cell(c, work_root=tmp_path / "a", cache_dir=tmp_path / "ac", **where)[0] for c in cells}
    packed = run_pack(cells, work_root=tmp_path / "p", cache_dir=tmp_path / "pc", **where)
    for cell in cells:
        mine = packed[cell.id][0]
        assert mine["status"] == "ok" and mine["pack_size"] == 4, mine.get("error")
        # bf16 autocast: the pack's batched products round differently from one model's
        assert abs(mine["test_acc"] - alone[cell.id]["test_acc"]) <= 0.02
        assert mine["cr"] == pytest.approx(alone[cell.id]["cr"], rel=0.05)


def test_augmentation_on_the_gpu_draws_what_the_cpu_draws():
    x = torch.randn(64, 3, 32, 32)
    fill = torch.full((1, 3, 1, 1), -0.5)
    cpu = data_mod.augment(x, torch.Generator().manual_seed(3), fill=fill)
    gpu = data_mod.augment(x.to(CUDA), torch.Generator().manual_seed(3), fill=fill.to(CUDA))
    assert torch.equal(gpu.cpu(), cpu)


def test_deterministic_gpu_training_repeats_bit_for_bit(tmp_path):
    cell = Cell.make("dense", "lenet5", "fashion-mnist", schedule={"epochs": 1, "batch_size": 32})
    data = _on_cuda(make_data(shape=(1, 28, 28), classes=10))
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        runs = [run_cell(cell, data=data, device=CUDA, work_root=tmp_path / f"w{i}", cache_dir=tmp_path / f"c{i}",
                         progress=False, deterministic=True)[0] for i in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    assert runs[0]["status"] == "ok" and runs[0]["deterministic"] is True, runs[0].get("error")
    assert [e["train_loss"] for e in runs[0]["history"]] == [e["train_loss"] for e in runs[1]["history"]]
    assert runs[0]["test_loss"] == runs[1]["test_loss"]
