"""The GPU path (issue 25), checked here without a GPU: ``torch.cuda`` is faked (tests/site_fakes)
where only the choice of device is tested, in this process or, through a start-up hook, in real
worker processes. What needs a GPU to run is in tests/test_cuda.py (``make gpu-check``)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.execution import pools, run_options, stop_signals, todo, worker
from benchmark.execution.packing import plan as pack_plan
from benchmark.execution.cell import Cell, dense_key, device_columns
from benchmark.engine import precision
from benchmark.engine import devices

SITE_FAKES = Path(__file__).resolve().parent / "site_fakes"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SITE_FAKES))
import fakes  # noqa: E402


@pytest.fixture
def gpus(monkeypatch):
    """Two fake GPUs in this process; a fresh bf16 table (it caches per GPU index)."""
    monkeypatch.setattr(precision, "_BF16_BY_INDEX", {})
    return fakes.FakeCuda(2).install(monkeypatch.setattr)


def test_auto_and_cuda_name_a_gpu_with_its_index_without_initialising_cuda(gpus):
    assert devices.pick_device("auto") == torch.device("cuda", 0)
    assert devices.pick_device("cuda") == torch.device("cuda", 0)
    assert not torch.cuda.is_initialized()  # a driver that only hands out cells holds no CUDA context
    torch.cuda.set_device(1)
    assert devices.pick_device("auto") == torch.device("cuda", 1) == devices.pick_device("cuda")
    assert devices.pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        devices.pick_device("cuda:2")
    torch.cuda.set_device(devices.pick_device("auto"))  # what worker.execute does: no ValueError


def test_a_worker_that_owns_a_gpu_runs_every_cell_there(gpus, monkeypatch):
    monkeypatch.setattr(worker, "OWNED_GPU", [1])
    for asked in ("auto", "cuda", "cuda:0"):
        assert worker.worker_device(asked) == torch.device("cuda", 1)
    monkeypatch.setattr(worker, "OWNED_GPU", [])
    assert worker.worker_device("cuda") == torch.device("cuda", 0)


def test_k_workers_per_gpu_on_n_gpus_and_threads_from_the_cores_per_worker(monkeypatch):
    fakes.FakeCuda(3).install(monkeypatch.setattr)
    monkeypatch.setattr(os, "cpu_count", lambda: 24)
    slots, threads = run_options.local_workers("auto", None, 2)
    assert slots == [0, 1, 2, 0, 1, 2] and threads == 4  # 24 cores over 6 workers, not 24 each
    assert run_options.local_workers("cuda", 3, None) == ([], 8)
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        run_options.local_workers("cpu", None, 2)
    with pytest.raises(ValueError, match="not both"):
        run_options.local_workers("auto", 2, 2)


@pytest.mark.slow  # a pool of worker processes
def test_each_worker_process_owns_one_gpu_for_its_life(monkeypatch):
    """Real worker processes (the run's pool), two per GPU on two fake GPUs: each takes a GPU when
    it starts, before any CUDA call, and sets no other device however many cells it runs."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SITE_FAKES), str(ROOT)]))
    monkeypatch.setenv("DWF_TEST_FAKE_GPUS", "2")
    pool = pools.LocalPool(stop_signals.StopSignals(), 4, gpu_slots=[0, 1, 0, 1])
    try:
        seen = [f.result(timeout=300) for f in [pool.submit(fakes.worker_identity, 0.3) for _ in range(16)]]
        slots_dir = pool.slots_dir
    finally:
        pool.stop(kill=False)
    by_pid = collections.defaultdict(set)
    for s in seen:
        assert len(s["owned"]) == 1 and s["current"] == s["owned"][0] and set(s["set_calls"]) == set(s["owned"])
        assert s["device"] == f"cuda:{s['owned'][0]}"
        by_pid[s["pid"]].add(s["owned"][0])
    assert all(len(g) == 1 for g in by_pid.values())  # never two GPUs in one process
    per_gpu = collections.Counter(next(iter(g)) for g in by_pid.values())
    assert len(by_pid) == 4 and per_gpu == {0: 2, 1: 2}
    assert not Path(slots_dir).exists()  # the run's slot files go with its pool


@pytest.mark.slow  # worker processes killed and replaced
def test_a_slot_freed_by_a_dead_worker_is_taken_by_its_replacement(tmp_path):
    """Slots are kernel locks: a worker that dies frees its GPU for the next one, and a worker
    beyond K x N finds none (the message says why)."""
    code = ("import sys; from benchmark.execution import worker; "
            "print(worker.claim_gpu(sys.argv[1], [0, 1], wait_s=float(sys.argv[2])), flush=True); sys.stdin.read()")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "5"], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    second = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "5"], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        taken = {first.stdout.readline().strip(), second.stdout.readline().strip()}
        assert taken == {"0", "1"}
        third = subprocess.run([sys.executable, "-c", code, str(tmp_path), "0.2"], env=env, input="",
                               capture_output=True, text=True, timeout=120)
        assert third.returncode != 0 and "no free GPU slot" in third.stderr
        first.kill()
        first.wait()
        again = subprocess.run([sys.executable, "-c", code, str(tmp_path), "5"], env=env, input="",
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and again.stdout.strip() in taken
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


def _cells(n: int) -> list[Cell]:
    return [Cell.make("dwf", "lenet300", "fashion-mnist", seed=s, params={"depth": 3, "lam": 1e-4},
                      schedule={"epochs": 1, "batch_size": 64}, subset=128) for s in range(n)]


def test_pack_memory_is_shared_by_the_workers_of_one_device_not_by_all(monkeypatch):
    cells = _cells(8)
    per = pack_plan.member_bytes("lenet300", "fashion-mnist", 3, 64)
    # room for 3 members per worker when 2 workers share the device
    monkeypatch.setattr(pack_plan, "free_memory", lambda device: int(2 * 3 * per / pack_plan.MEMORY_FRACTION) + 1)
    units = pack_plan.plan(cells, 8, device=torch.device("cpu"), workers=8, sharing=2)
    assert [len(u) if isinstance(u, list) else 1 for u in units] == [3, 3, 2]


def test_pack_n_plans_for_workers_whose_memory_is_unknown_here():
    lines = []
    units = pack_plan.plan(_cells(5), 2, device=None, say=lines.append)
    assert [len(u) if isinstance(u, list) else 1 for u in units] == [2, 2, 1]
    assert "cannot be measured from here" in lines[0]


@pytest.mark.slow  # a child process
def test_planning_in_a_child_process_gives_the_units_of_planning_here(tmp_path):
    cells = _cells(5)
    args = (cells, 2, torch.device("cpu"), 2, 2, 1, str(tmp_path))
    here, _ = todo.plan_units(*args)
    there, lines = todo.plan_in_child(*args)
    ids = lambda units: [[c.id for c in u] if isinstance(u, list) else u.id for u in units]  # noqa: E731
    assert ids(there) == ids(here) and [len(u) for u in there if isinstance(u, list)] == [2, 2]


def test_the_dense_cache_key_names_the_device_kind_only_off_the_cpu():
    cell = _cells(1)[0]
    cpu = dense_key(cell)
    assert cpu == dense_key(cell, "cpu") == dense_key(cell, torch.device("cpu"))
    assert cpu == "8d52274445e3bae6"  # the key this cell had before GPUs were told apart
    assert dense_key(cell, "cuda:1") == dense_key(cell, torch.device("cuda", 0)) != cpu
    assert dense_key(cell, "mps") not in (cpu, dense_key(cell, "cuda:0"))


def test_records_on_a_gpu_name_it_and_its_cuda_and_cudnn(gpus):
    columns = device_columns(torch.device("cuda", 1), "lenet5")
    assert columns["gpu"] == "Fake GPU 1" and columns["compute_dtype"] == "bfloat16"
    assert columns["memory_format"] == "channels_last"
    assert {"cuda_version", "cudnn_version"} <= set(columns)
    assert device_columns(torch.device("cuda", 1), "lenet300")["memory_format"] == "contiguous"
    # every record says how it was computed, on the CPU too
    assert device_columns(torch.device("cpu"), "lenet5") == {"compute_dtype": "float32", "memory_format": "channels_last"}
    assert device_columns(torch.device("cpu"), "lenet300") == {"compute_dtype": "float32", "memory_format": "contiguous"}


def test_gpus_without_native_bf16_train_in_float32(monkeypatch):
    monkeypatch.setattr(precision, "_BF16_BY_INDEX", {})
    fakes.FakeCuda(1, capability=(7, 0)).install(monkeypatch.setattr)  # a V100
    v100 = torch.device("cuda", 0)
    assert not precision.native_bf16(v100) and precision.training_dtype(v100) == torch.float32
    assert not isinstance(precision.autocast(v100), torch.autocast)
    monkeypatch.setattr(precision, "_BF16_BY_INDEX", {})
    fakes.FakeCuda(1, capability=(8, 0)).install(monkeypatch.setattr)  # an A100
    assert precision.training_dtype(v100) == torch.bfloat16 and isinstance(precision.autocast(v100), torch.autocast)
    assert precision.training_dtype(torch.device("cpu")) == torch.float32


def test_scoring_runs_without_tf32_and_restores_the_settings():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with precision.exact_float32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_deterministic_is_gpu_only(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert devices.make_deterministic(torch.device("cpu")) is False
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        assert devices.make_deterministic(torch.device("cuda", 0)) is True
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _blocked(code: str, *blocked: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE_FAKES), str(ROOT), str(ROOT / "tests")]),
           "DWF_TEST_BLOCK": ",".join(blocked)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a CLI subprocess
def test_methods_import_without_torch_pruning_and_a_structured_cell_says_how_to_install_it(tmp_path):
    code = f"""
import methods
from benchmark.execution.cell import Cell, run_cell
from conftest import make_data
try:
    import torch_pruning
    raise SystemExit("torch_pruning was not hidden")
except ImportError:
    pass
cell = Cell.make("structured-magnitude", "lenet300", "fashion-mnist", schedule={{"epochs": 1, "batch_size": 32}})
[record] = run_cell(cell, data=make_data(shape=(1, 28, 28), classes=10), device="cpu", work_root={str(tmp_path)!r},
                    cache_dir={str(tmp_path / 'c')!r}, progress=False)
print(record["status"], "|", record["error"])
"""
    done = _blocked(code, "torch_pruning")
    assert done.returncode == 0, done.stderr
    status, error = done.stdout.strip().splitlines()[-1].split(" | ")
    assert status == "failed" and "torch-pruning" in error and "pip install torch-pruning" in error


@pytest.mark.slow  # CLI subprocesses
def test_the_dask_backends_without_dask_say_what_to_install(tmp_path):
    code = f"""
from benchmark.__main__ import main
raise SystemExit(main(["run", "--grid", "smoke", "--results-dir", {str(tmp_path)!r}, "--backend", "dask",
                       "--scheduler", "tcp://127.0.0.1:9"]))
"""
    done = _blocked(code, "dask", "distributed")
    assert done.returncode == 2 and "needs dask.distributed" in done.stderr and "pip install" in done.stderr
    code = f"""
from benchmark.__main__ import main
raise SystemExit(main(["run", "--grid", "smoke", "--results-dir", {str(tmp_path)!r}, "--backend", "slurm",
                       "--dry-run"]))
"""
    done = _blocked(code, "dask", "distributed", "dask_jobqueue")
    assert done.returncode == 2 and "needs dask" in done.stderr and "pip install" in done.stderr
