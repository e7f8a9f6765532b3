"""A run's options as one frozen object, checked once: every bad value named with its fix in one error.

``python -m benchmark run`` builds a ``RunOptions`` from its flags, and ``run_grid`` takes it (or
builds one from keywords); nothing downstream checks an option again. Problems are collected and
raised together as one ``RunOptionsError``, in the style of benchmark.core.validation: each names
the flag, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from benchmark.core.cell_progress import DEFAULT_STALL_S, stall_problem
from benchmark.execution.slurm import SlurmOptions

#: Seconds to wait for a Dask scheduler to answer before giving up with a message.
DASK_CONNECT_TIMEOUT_S = 10.0
#: Environment variable holding the default of ``run --pack``.
PACK_ENV = "BENCHMARK_PACK"
#: ``run --pack`` without the flag or $BENCHMARK_PACK: one cell per process, so records are
#: bit-reproducible; a packed float32 run sums in another order (docs/scaling.md, 'Packed training').
DEFAULT_PACK = "off"
BACKENDS = ("local", "dask", "slurm")


class RunOptionsError(ValueError):
    """Every problem with a run's options; ``problems`` lists each message."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a grid runs (not which cells: that is the grid's). ``backend`` local runs ``jobs``
    worker processes (or K per GPU with ``jobs_per_gpu``), dask sends cells to the cluster at
    ``scheduler``, slurm starts Dask workers in SLURM jobs as ``slurm`` says
    (benchmark.execution.slurm.SlurmOptions; its defaults when None). ``pack``: auto, off or N
    (benchmark.execution.packing.plan), kept as parsed. ``progress`` None: a bar on a terminal only.
    ``deterministic``: reproducible cuDNN/cuBLAS kernels on GPUs (``run_cell``). ``stall_timeout``:
    seconds without training progress after which the driver kills a worker as frozen, and a cell
    stops waiting on a frozen holder of a dense-model lock (docs/design.md, "Progress and liveness");
    the workers get it with every task, so it holds on Dask and SLURM workers too."""

    results_dir: str | Path = "results"
    jobs: int | None = None
    jobs_per_gpu: int | None = None
    backend: str = "local"
    scheduler: str | None = None
    data_dir: str | Path | None = None
    device: str = "auto"
    retry_failed: bool = False
    retry_diverged: bool = False
    progress: bool | None = None
    compiled: bool = False
    scheduler_timeout: float = DASK_CONNECT_TIMEOUT_S
    pack: str | int = DEFAULT_PACK
    slurm: SlurmOptions | None = None
    deterministic: bool = False
    stall_timeout: float = DEFAULT_STALL_S

    def __post_init__(self):
        problems: list[str] = []
        if (stall := stall_problem(self.stall_timeout)) is not None:
            problems.append(stall)
        if self.backend not in BACKENDS:
            problems.append(f"--backend {self.backend!r}: unknown; use {', '.join(BACKENDS)}")
        for flag, value in (("--jobs", self.jobs), ("--jobs-per-gpu", self.jobs_per_gpu)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                problems.append(f"{flag} {value!r}: must be a whole number >= 1")
            elif value is not None and value < 1:
                problems.append(f"{flag} {value}: must be >= 1")
        problems += self._pack_problems()
        path = Path(self.results_dir)
        if path.exists() and not path.is_dir():
            problems.append(f"--results-dir {self.results_dir} is a file, not a folder; give a folder (it is created "
                            f"if missing)")
        if self.backend == "local":
            problems += self._local_problems()
        elif self.backend in BACKENDS:
            problems += self._cluster_problems()
        if problems:
            raise RunOptionsError(problems)

    def _pack_problems(self) -> list[str]:
        from benchmark.execution.packing.plan import parse_pack

        try:
            setting = parse_pack(self.pack)
        except ValueError as exc:
            return [str(exc)]
        object.__setattr__(self, "pack", setting)
        if setting not in ("auto", "off") and self.compiled:
            return [f"--pack {setting} with --compile: packed training does not compile; drop one of them"]
        return []

    def _local_problems(self) -> list[str]:
        problems = []
        if self.scheduler:
            problems.append(f"--scheduler {self.scheduler} is for --backend dask; add --backend dask or leave it out")
        if self.slurm is not None:
            problems.append("SLURM options are for --backend slurm; add --backend slurm or leave them out")
        if self.jobs and self.jobs_per_gpu:
            problems.append("give either --jobs (CPU processes) or --jobs-per-gpu (GPU slots), not both")
        from benchmark.engine.devices import pick_device

        try:
            pick_device(self.device)  # names the device and what this machine has
        except ValueError as exc:
            problems.append(str(exc))
        if self.data_dir and not Path(self.data_dir).expanduser().is_dir():
            problems.append(f"--data-dir {self.data_dir}: no such folder. Datasets are searched there first; fix "
                            f"the path, or leave --data-dir out to search $BENCHMARK_DATA, ./data and system "
                            f"locations ('python -m benchmark data check' lists them)")
        return problems

    def _cluster_problems(self) -> list[str]:
        """Dask and SLURM: the workers' machines are not this one, so only names are checked."""
        problems = []
        if self.backend == "slurm":
            if self.scheduler:
                problems.append(f"--scheduler {self.scheduler} is for --backend dask; --backend slurm starts its own "
                                f"scheduler: leave --scheduler out")
            if self.slurm is None:
                object.__setattr__(self, "slurm", SlurmOptions())
        else:
            if not self.scheduler:
                problems.append("--backend dask needs --scheduler ADDRESS (e.g. tcp://10.0.0.5:8786)")
            if self.slurm is not None:
                problems.append("SLURM options are for --backend slurm; use --backend slurm or leave them out")
        if self.jobs_per_gpu:
            problems.append("--jobs-per-gpu is for the local backend; with --backend dask each worker has its "
                            "devices, and --jobs caps the cells in flight")
        if self.device != "auto":
            import torch

            from benchmark.engine.devices import DEVICE_TYPES

            try:
                kind = torch.device(self.device).type
            except (RuntimeError, TypeError):
                kind = None
            if kind not in DEVICE_TYPES:
                problems.append(f"--device {self.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        if isinstance(self.scheduler_timeout, bool) or not isinstance(self.scheduler_timeout, (int, float)) \
                or not self.scheduler_timeout > 0:
            problems.append(f"--connect-timeout {self.scheduler_timeout}: must be > 0 seconds")
        return problems

    @property
    def on_dask(self) -> bool:
        """Cells run on Dask workers (an existing cluster, or one in SLURM jobs)."""
        return self.backend != "local"


def threads_per_job(jobs: int) -> int:
    """CPU threads of each of ``jobs`` worker processes (GPU workers included: their data handling,
    optimizer bookkeeping and the driver share the cores too)."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def local_workers(device: str, jobs: int | None, jobs_per_gpu: int | None) -> tuple[list[int], int]:
    """(GPU slots, threads per worker) of a local run. ``--jobs-per-gpu`` K on N visible GPUs: K x N
    slots, one per worker, in the order 0..N-1, 0..N-1, ... (so the first N workers to start take
    different GPUs); threads: the cores shared by every worker, GPU workers included. Which GPUs
    are there is this machine's to say when the run starts (a dry run may plan for another)."""
    gpu_slots: list[int] = []
    if jobs_per_gpu:
        n_gpus = visible_gpus() if device in ("auto", "cuda") else 0
        if not n_gpus:
            raise ValueError(f"--jobs-per-gpu {jobs_per_gpu}: no CUDA GPU is visible here (device {device!r}); "
                             f"use --jobs N for CPU worker processes")
        if jobs:
            raise ValueError("give either --jobs (CPU processes) or --jobs-per-gpu (GPU slots), not both")
        gpu_slots = [gpu for _ in range(jobs_per_gpu) for gpu in range(n_gpus)]
    return gpu_slots, threads_per_job(len(gpu_slots) or jobs or 1)


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0
