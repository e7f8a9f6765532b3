"""``python -m benchmark doctor``: what a run on this machine would use, and whether it works.

In under a minute (``DURATION``) it says which device and dtype a run picks, which datasets it finds where,
how many threads each worker gets, which backends are there, whether the results folder takes
writes, and whether a short training step (dense and DWF) works on every device it finds. Exit 1
if something a run needs is broken (a missing dataset is only reported: a grid may not need it).
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import time
from pathlib import Path


#: How long doctor takes (here: 15-20 s on a loaded 2-core CPU); ``--help`` says it, and the README's
#: command table says the same words (tests/test_user_defaults.py).
DURATION = "under a minute"


def add_commands(sub) -> None:
    p = sub.add_parser("doctor", help="check this machine: device, dtype, datasets, threads, backends, a training step",
                       description="Report what 'run' would use here (device, dtype, datasets, threads per worker, "
                                   "backends, results folder) and try a few training steps on every device found. "
                                   f"Takes {DURATION}; exit 1 if something a run needs does not work.")
    p.add_argument("--device", default="auto", help="the --device a run would get (default auto)")
    p.add_argument("--data-dir", help="the --data-dir a run would get")
    p.add_argument("--results-dir", default="results", help="the --results-dir a run would get (default results)")
    p.add_argument("--jobs", type=int, default=None, help="the --jobs a run would get (threads per worker)")
    p.add_argument("--scheduler", help="also check this Dask scheduler (reachable, workers, threads)")
    p.add_argument("--no-workers", action="store_true", help="skip starting a local worker process (saves seconds)")
    p.set_defaults(handler=doctor_command)


class _Report:
    def __init__(self):
        self.problems: list[str] = []

    def line(self, key: str, text: str) -> None:
        print(f"{key:11s} {text}", flush=True)

    def more(self, text: str) -> None:
        print(f"{'':11s} {text}", flush=True)

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{key}: {text}")
        self.line(key, f"PROBLEM: {text}")


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:  # noqa: BLE001 - absent or broken: either way not usable
        return None


def doctor_command(args) -> int:
    began = time.perf_counter()
    r = _Report()
    import torch

    from benchmark.engine import data as data_mod
    from benchmark.execution.run_options import threads_per_job
    from benchmark.engine.devices import available_devices, pick_device

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for module, name in (("numpy", "numpy"), ("joblib", "joblib"), ("torch_pruning", "torch-pruning"),
                         ("distributed", "dask.distributed")):
        v = _version(module)
        versions.append(f"{name} {v}" if v else f"{name} missing")
    r.line("software", ", ".join(versions) + f" on {platform.system()} {platform.machine()}")

    # ---- device and dtype
    found = available_devices()
    try:
        device = pick_device(args.device)
        how = "picked by auto: cuda > mps > cpu" if args.device in (None, "", "auto") else "as asked"
        r.line("device", f"{device} ({how}); devices here: {', '.join(found)}")
    except ValueError as exc:
        device = None
        r.problem("device", str(exc))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            r.more(f"cuda:{i}: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
                   f"{props.major}.{props.minor}, native bf16 {'yes' if props.major >= 8 else 'no (trains in float32)'}")
    if device is not None:
        from benchmark.engine.precision import native_bf16

        if device.type == "cuda" and native_bf16(device):
            r.line("dtype", "float32 weights; training under bf16 autocast; channels_last for conv nets")
        elif device.type == "cuda":
            r.line("dtype", f"float32 throughout on {device} (no native bf16 before compute capability 8.0); "
                            f"channels_last for conv nets")
        else:
            r.line("dtype", f"float32 throughout on {device.type} (bf16 autocast is used on CUDA only)")

    # ---- threads
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    jobs = args.jobs or 1
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    r.line("threads", f"{cores} CPU cores ({usable} usable by this process); torch uses "
                      f"{torch.get_num_threads()} threads here{' (' + ', '.join(f'{k}={v}' for k, v in env.items()) + ')' if env else ''}")
    r.more(f"run --jobs {jobs}: {jobs} worker(s) with {threads_per_job(jobs)} thread(s) each"
           + (" (in this process)" if jobs == 1 else ""))
    if args.jobs is None and cores > 1:
        r.more(f"run --jobs {min(cores, 2)}: {min(cores, 2)} workers with {threads_per_job(min(cores, 2))} thread(s) each")

    # ---- datasets
    if args.data_dir and not Path(args.data_dir).expanduser().is_dir():
        r.problem("datasets", f"--data-dir {args.data_dir}: no such folder")
    env_dir = os.environ.get(data_mod.ENV_VAR)
    if env_dir and not Path(env_dir).expanduser().is_dir():
        r.line("datasets", f"note: ${data_mod.ENV_VAR}={env_dir} is not a folder (searched anyway, finds nothing)")
    first = True
    for name in data_mod.DATASETS:
        try:
            where = str(data_mod.locate(name, args.data_dir))
        except data_mod.DatasetMissing:
            where = f"missing (fetch: {data_mod.fetch_command(name, args.data_dir)})"
        r.line("datasets" if first else "", f"{name:14s} {where}")
        first = False

    # ---- results folder
    _check_results(r, args.results_dir)

    # ---- backends
    r.line("backends", f"local: worker processes through joblib's loky ({_version('joblib') or 'missing'}); "
                       f"--jobs 1 runs cells in the driver process")
    if not args.no_workers:
        _check_worker(r)
    dask_version = _version("distributed")
    if dask_version is None:
        r.more("dask: not installed (pip install -e '.[cluster]' for --backend dask)")
    else:
        r.more(f"dask: distributed {dask_version} installed; run --backend dask --scheduler tcp://HOST:8786")
        if args.scheduler:
            _check_scheduler(r, args.scheduler)
    import shutil

    jobqueue, sbatch = _version("dask_jobqueue"), shutil.which("sbatch")
    r.more(f"slurm: dask-jobqueue {jobqueue or 'not installed'}, sbatch {sbatch or 'not on PATH'}"
           + ("; run --backend slurm" if jobqueue and sbatch else
              "" if jobqueue else " (pip install -e '.[cluster]' for --backend slurm)"))

    # ---- a training step per device
    for name in found:
        _check_step(r, name)

    seconds = time.perf_counter() - began
    if r.problems:
        print(f"\n{len(r.problems)} problem(s) ({seconds:.1f} s):")
        for p in r.problems:
            print(f"  {p}")
        return 1
    print(f"\nall checks passed ({seconds:.1f} s)")
    return 0


def _check_results(r: _Report, results_dir: str) -> None:
    from benchmark.core.errors import StorageError

    path = Path(results_dir)
    if path.exists() and not path.is_dir():
        r.problem("results", f"--results-dir {results_dir} is a file, not a folder")
        return
    probe_dir = path if path.is_dir() else next((p for p in path.absolute().parents if p.is_dir()), Path("/"))
    probe = probe_dir / f".doctor-probe-{os.getpid()}"
    try:
        with open(probe, "w") as fh:
            fh.write("probe\n")
            fh.flush()
            os.fsync(fh.fileno())
        free = shutil.disk_usage(probe_dir).free
        state = "exists" if path.is_dir() else f"will be created (in {probe_dir})"
        r.line("results", f"{path.absolute()} {state}; writable; {free / 2**30:.1f} GiB free")
        if free < 1 * 2**30:
            r.more("note: under 1 GiB free; checkpoints of conv nets take hundreds of MB per cell")
    except OSError as exc:
        r.problem("results", str(StorageError.from_os_error(exc, probe_dir)))
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _check_worker(r: _Report) -> None:
    """Start one local worker process the way run --jobs N does, and time it."""
    from benchmark.execution.pools import LocalPool
    from benchmark.execution.stop_signals import StopSignals

    began = time.perf_counter()
    pool = LocalPool(StopSignals(), 1)
    try:
        pid = pool.submit(os.getpid).result(timeout=120)
        r.more(f"local worker process: started and answered in {time.perf_counter() - began:.1f} s "
               f"(pid {pid}; it exits with its driver)")
    except Exception as exc:  # noqa: BLE001 - report whatever breaks
        r.problem("backends", f"a local worker process did not start: {type(exc).__name__}: {exc}")
    finally:
        pool.stop()


def _check_scheduler(r: _Report, address: str) -> None:
    try:
        from distributed import Client

        with Client(address, timeout=10, set_as_default=False) as client:
            threads = client.nthreads()
            r.more(f"dask scheduler {address}: reachable, {len(threads)} worker(s), "
                   f"{sum(threads.values())} thread(s)")
    except Exception as exc:  # noqa: BLE001
        r.problem("backends", f"Dask scheduler {address} not reachable: {type(exc).__name__}: {exc}")


def _synchronize(device) -> None:
    """Wait for ``device`` to finish what it was given (GPUs run asynchronously to the host)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def step_structures() -> list[str]:
    """What the doctor's training step trains: the structures (``methods.structures``) of the
    reference method and of the method the benchmark studies, at their default parameters, as the
    method registry says (``Method.is_reference``, ``Method.is_subject``, ``Method.Workload.step_variant``)."""
    from benchmark.core.method import all_methods, make_params

    chosen = [m for m in all_methods().values() if m.is_reference] + \
             [m for m in all_methods().values() if m.is_subject and not m.is_reference]
    return list(dict.fromkeys(method(make_params(method)).workload.step_variant() for method in chosen))


def _check_step(r: _Report, device_name: str) -> None:
    """Three SGD steps of LeNet-300-100 of each of ``step_structures`` (dense and DWF D=3 today) on
    random data on ``device_name``: the loss must be finite and the weights must move."""
    import torch

    from benchmark.engine import models
    from benchmark.engine.schedule import Schedule
    from benchmark.engine.train import make_optimizer, training_step
    from methods.structures import stand_in

    device = torch.device(device_name)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(128, 1, 28, 28, generator=gen).to(device)
        y = torch.randint(0, 10, (128,), generator=gen).to(device)
        timings = []
        for kind in step_structures():
            model = models.build("lenet300", (1, 28, 28), 10, seed=0).to(device)
            hooks = stand_in(kind, model, 0)
            optimizer = make_optimizer(model, Schedule(lr=0.05), hooks)
            before = [p.detach().clone() for p in model.parameters()]
            training_step(model, x, y, optimizer, hooks, device)  # warm-up, not timed
            _synchronize(device)
            steps = 3
            began = time.perf_counter()
            for _ in range(steps):
                _, loss, total = training_step(model, x, y, optimizer, hooks, device)
            _synchronize(device)  # the device timed, not the current one (cuda:1 while cuda:0 is current)
            ms = (time.perf_counter() - began) / steps * 1000
            moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
            if not torch.isfinite(total.detach()).item():
                raise RuntimeError(f"{kind}: the loss is {float(total)}")
            if not moved:
                raise RuntimeError(f"{kind}: the weights did not change")
            timings.append(f"{kind} {ms:.1f} ms/step")
        r.line("step", f"{device_name}: ok, LeNet-300-100 batch 128: {', '.join(timings)} (loss finite, weights move)")
    except Exception as exc:  # noqa: BLE001 - report whatever breaks on this device
        r.problem("step", f"{device_name}: a training step failed: {type(exc).__name__}: {str(exc)[:300]}")


