"""The shared training loop: exact resume from a checkpoint, divergence status, determinism."""

import pytest
import torch

from benchmark.engine import models
from benchmark.execution.cell import Cell, run_cell
from benchmark.engine.epoch import Diverged
from benchmark.engine.devices import pick_device
from benchmark.engine.schedule import Schedule
from benchmark.engine.train import TrainHooks, train
from methods.dwf import factorize

from conftest import make_data


class StopAfter(TrainHooks):
    """Interrupts training the way a kill would, after ``epoch`` epochs were checkpointed."""

    def __init__(self, epoch):
        self.epoch = epoch

    def after_step(self, model, step):
        self.steps = getattr(self, "steps", 0) + 1

    def after_epoch(self, model, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _model(factorized=False):
    model = models.build("lenet300", (1, 8, 8), 4, seed=1)
    if factorized:
        factorize(model, depth=3, seed=1)
    return model


@pytest.mark.parametrize("factorized", [False, True])
def test_resume_from_checkpoint_gives_identical_weights(tmp_path, factorized):
    data = make_data(augment=True, shape=(1, 8, 8))
    schedule = Schedule(epochs=4, lr=0.05, batch_size=32, weight_decay=1e-4)
    straight = _model(factorized)
    train(straight, data, schedule, seed=5, progress=False)

    ckpt = tmp_path / "run.ckpt"
    interrupted = _model(factorized)
    with pytest.raises(KeyboardInterrupt):
        # after_epoch of the 3rd epoch runs before its checkpoint: the file holds 2 epochs
        train(interrupted, data, schedule, seed=5, checkpoint=ckpt, progress=False, hooks=StopAfter(2))
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2
    resumed = _model(factorized)  # fresh process state: a new model, same construction
    history, _ = train(resumed, data, schedule, seed=5, checkpoint=ckpt, progress=False)
    assert history.resumed_from == 2 and len(history.epochs) == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_joining_the_schedule_at_a_rewind_epoch_continues_it_exactly():
    """Without momentum the optimizer has no state, so a run that starts at epoch 1 from the
    straight run's epoch-1 weights must end with the same weights and learning rates."""
    data = make_data(augment=True)
    schedule = Schedule(epochs=3, lr=0.05, momentum=0.0, batch_size=32, warmup_epochs=1)
    straight = _model()
    full, snaps = train(straight, data, schedule, seed=5, progress=False, snapshot_epochs=(1,))
    joined = _model()
    joined.load_state_dict(snaps[1])
    late, _ = train(joined, data, schedule, seed=5, progress=False, first_epoch=1)
    assert [e["epoch"] for e in late.epochs] == [2, 3]
    assert [e["lr"] for e in late.epochs] == [e["lr"] for e in full.epochs[1:]]
    for (name, a), b in zip(straight.state_dict().items(), joined.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"first_epoch=4 must be in \[0, epochs=3\]"):
        train(_model(), data, schedule, seed=5, progress=False, first_epoch=4)


def _compile_works() -> bool:
    from benchmark.engine.devices import check_compile

    try:
        check_compile(torch.device("cpu"))
    except ValueError:
        return False
    return True


@pytest.mark.slow  # torch.compile
@pytest.mark.skipif(not _compile_works(), reason="torch.compile cannot build CPU code here (no C++ compiler)")
def test_compiled_training_follows_the_eager_run_and_is_recorded(tmp_path):
    data = make_data()
    schedule = Schedule(epochs=2, lr=0.05, batch_size=32)
    eager, compiled = _model(factorized=True), _model(factorized=True)
    from torch._dynamo.utils import counters

    train(eager, data, schedule, seed=3, progress=False)
    counters.clear()
    history, _ = train(compiled, data, schedule, seed=3, progress=False, compiled=True)
    assert len(history.epochs) == 2 and counters["stats"]["unique_graphs"] >= 1  # really went through dynamo
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name  # same training, float order aside
    cell = Cell.make("dwf", "lenet300", "fashion-mnist", params={"depth": 2}, schedule={"epochs": 1, "batch_size": 32})
    records = run_cell(cell, data=data, work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False,
                       compiled=True)
    assert records[0]["status"] == "ok" and records[0]["compiled"] is True


def test_same_seed_same_result_different_seed_different_result():
    data = make_data()
    schedule = Schedule(epochs=2, lr=0.05, batch_size=32)
    runs = []
    for seed in (0, 0, 1):
        model = _model()
        train(model, data, schedule, seed=seed, progress=False)
        runs.append(model.fc1.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_nan_loss_stops_training_with_a_clear_error():
    data = make_data()
    with pytest.raises(Diverged, match="loss became .* at epoch 1"):
        train(_model(), data, Schedule(epochs=3, lr=1e8, momentum=0.9, batch_size=16), seed=0, progress=False)


def test_diverged_cell_is_reported_as_failed(tmp_path):
    cell = Cell.make("dwf", "lenet300", "fashion-mnist", params={"depth": 2, "lam": 0.0, "lr": 1e9},
                     schedule={"epochs": 2, "batch_size": 16})
    [record] = run_cell(cell, data=make_data(), work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False)
    assert record["status"] == "failed"
    assert record["error"].startswith("Diverged: loss became")


def test_snapshots_are_taken_at_requested_epochs():
    data = make_data()
    model = _model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _, snaps = train(model, data, Schedule(epochs=2, batch_size=32), seed=0, progress=False, snapshot_epochs=(0, 1))
    assert sorted(snaps) == [0, 1]
    assert all(torch.equal(init[k], snaps[0][k]) for k in init)
    assert not torch.equal(snaps[1]["fc1.weight"], init["fc1.weight"])


def test_cosine_schedule_reaches_zero_and_bias_is_undecayed():
    data = make_data()
    model = _model()
    history, _ = train(model, data, Schedule(epochs=2, lr=0.1, batch_size=32, weight_decay=0.5), seed=0, progress=False)
    assert history.epochs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    groups = TrainHooks().param_groups(model, Schedule(weight_decay=0.5))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.fc1.weight) in decayed and id(model.fc1.bias) not in decayed


def test_device_selection():
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="lr=-1"):
        Schedule(lr=-1)
    with pytest.raises(ValueError, match="unknown schedule key"):
        Schedule.from_dict({"epochz": 3})


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    from benchmark.engine.schedule import lr_factor

    f = lr_factor(warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)
    data = make_data()
    history, _ = train(_model(), data, Schedule(epochs=3, lr=0.1, batch_size=32, warmup_epochs=1), seed=0,
                       progress=False)
    assert history.epochs[0]["lr"] == pytest.approx(0.1)  # end of warm-up: the peak
    assert history.epochs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


# --- precision and memory layout on the CPU (docs/scaling.md, "CPU speed") ---

def test_bf16_on_a_cpu_without_bf16_matmul_is_refused_naming_the_missing_feature(monkeypatch):
    from benchmark.engine import precision

    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ())
    monkeypatch.setenv(precision.CPU_DTYPE_ENV, "bf16")
    with pytest.raises(ValueError, match="neither AMX nor AVX512-BF16"):
        pick_device("cpu")
    monkeypatch.setenv(precision.CPU_DTYPE_ENV, "fp16")
    with pytest.raises(ValueError, match="not a precision"):
        pick_device("cpu")
    monkeypatch.delenv(precision.CPU_DTYPE_ENV)
    assert pick_device("cpu") == torch.device("cpu")


def test_bf16_on_a_cpu_with_bf16_matmul_trains_under_autocast_and_records_say_so(monkeypatch):
    from benchmark.engine import precision
    from benchmark.engine.train import make_optimizer, training_step
    from benchmark.execution.cell import dense_key, device_columns

    cpu = torch.device("cpu")
    cell = Cell("dense", "lenet300", "mnist", 0, {}, Schedule(epochs=1))
    fp32_key = dense_key(cell, cpu)
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ("avx512_bf16",))
    monkeypatch.setenv(precision.CPU_DTYPE_ENV, "bf16")
    assert precision.training_dtype(cpu) == torch.bfloat16
    assert device_columns(cpu, "lenet300") == {"compute_dtype": "bfloat16", "memory_format": "contiguous"}
    assert dense_key(cell, cpu) != fp32_key  # a bf16 dense model is never reused as a float32 one
    model = _model()
    out, loss, _ = training_step(model, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]),
                                 make_optimizer(model, Schedule()), TrainHooks(), cpu)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_conv_nets_train_channels_last_on_the_cpu_unless_told_contiguous(monkeypatch):
    from benchmark.engine import precision
    from benchmark.execution.cell import device_columns

    cpu = torch.device("cpu")
    monkeypatch.delenv(precision.CPU_MEMORY_FORMAT_ENV, raising=False)
    assert precision.uses_channels_last(cpu, "lenet5") and not precision.uses_channels_last(cpu, "lenet300")
    monkeypatch.setenv(precision.CPU_MEMORY_FORMAT_ENV, "contiguous")  # the path of the older records
    assert device_columns(cpu, "lenet5") == {"compute_dtype": "float32", "memory_format": "contiguous"}
    monkeypatch.setenv(precision.CPU_MEMORY_FORMAT_ENV, "nhwc")
    with pytest.raises(ValueError, match="not a layout"):
        precision.uses_channels_last(cpu, "lenet5")


def test_channels_last_lenet5_predicts_what_the_contiguous_one_does():
    from benchmark.engine.precision import prepare_input

    contiguous = models.build("lenet5", (1, 28, 28), 10, seed=3).eval()
    channels_last = models.build("lenet5", (1, 28, 28), 10, seed=3).to(memory_format=torch.channels_last).eval()
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = contiguous(x), channels_last(prepare_input(x, True))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))


@pytest.mark.parametrize("weights", ["dwf", "masked", "dense"])
def test_a_single_channel_batch_runs_the_whole_net_channels_last(weights):
    """A weight computed each step (DWF's product, mask x weight) has NCHW strides; the first
    convolution must still run channels-last, and give what the NCHW model does."""
    from benchmark.engine.precision import prepare_input
    from benchmark.engine.sparsity import prunable_layers
    from methods.masks import apply_masks

    model = models.build("lenet5", (1, 28, 28), 10, seed=3).to(memory_format=torch.channels_last)
    reference = models.build("lenet5", (1, 28, 28), 10, seed=3)
    if weights == "dwf":
        factorize(model, 3, seed=0)
        factorize(reference, 3, seed=0)
    elif weights == "masked":
        for net in (model, reference):
            apply_masks(net, {name: (torch.arange(m.weight.numel()) % 3 > 0).view_as(m.weight).float()
                              for name, m in prunable_layers(net)})
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prepared = prepare_input(x, True)
    assert prepared.data_ptr() == x.data_ptr() and torch.equal(prepared, x)  # same memory, new strides
    seen = []
    hook = model.conv1.register_forward_hook(lambda module, inputs, out: seen.append(out))
    with torch.no_grad():
        out = model(prepared)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)


def test_cpu_precision_sets_and_restores_the_environment(monkeypatch):
    from benchmark.engine import precision

    monkeypatch.delenv(precision.CPU_DTYPE_ENV, raising=False)
    monkeypatch.setenv(precision.CPU_MEMORY_FORMAT_ENV, "contiguous")
    with precision.cpu_precision("float32", "channels_last"):
        assert precision.cpu_memory_format() == "channels_last" and precision.cpu_compute_dtype() == torch.float32
    assert precision.cpu_memory_format() == "contiguous" and precision.CPU_DTYPE_ENV not in __import__("os").environ


def _denormal_probe(env: dict) -> dict:
    """A fresh process with two intra-op threads: what a training run's CPU arithmetic does with
    subnormal floats, on the calling thread and in a product spread over both threads."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, time, torch\n"
        "from benchmark.engine.devices import flush_cpu_denormals, denormals_flushed\n"
        "flushed = flush_cpu_denormals()\n"
        "torch.set_num_threads(2)\n"
        "x = torch.randn(256, 784); w = torch.randn(600, 784) * 1e-39\n"
        "product = x @ w.T\n"
        "print(json.dumps({'flushed': flushed, 'probe': denormals_flushed(),\n"
        "                  'product_nonzero': int((product != 0).sum())}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_training_flushes_subnormal_floats_in_every_thread():
    """Subnormal floats cost up to 200x per product on some CPUs (docs/scaling.md, "Subnormal floats"):
    a training process flushes them to zero, in the threads a product is spread over too (a product
    of normal inputs and subnormal weights is then exactly zero everywhere), and
    BENCHMARK_KEEP_DENORMALS=1 keeps them."""
    flushed = _denormal_probe({"BENCHMARK_KEEP_DENORMALS": "0"})
    assert flushed == {"flushed": True, "probe": True, "product_nonzero": 0}
    kept = _denormal_probe({"BENCHMARK_KEEP_DENORMALS": "1"})
    assert kept["flushed"] is False and kept["probe"] is False and kept["product_nonzero"] > 0


def test_a_cpu_record_says_whether_subnormals_were_flushed(tmp_path):
    """Records name the setting their training ran under (a bit-identical rerun needs it)."""
    from benchmark.execution.cell import Cell, run_cell

    cell = Cell.from_config({"method": "dense", "arch": "lenet300", "dataset": "fashion-mnist", "seed": 0,
                             "params": {}, "schedule": {"epochs": 1, "batch_size": 64}, "subset": 200})
    records = run_cell(cell, device="cpu", work_root=tmp_path / "work", cache_dir=tmp_path / "cache")
    assert records and all(r["denormals"] == "flushed" for r in records)
