"""Setting up the device and the process that trains on it, before the loop starts.

Which device a cell runs on (``--device``, or the best one here), what this machine offers, and the
process-wide settings a run may need first: glibc's allocator kept from handing memory back every
step on the CPU, reproducible cuDNN/cuBLAS kernels (``--deterministic``) and a check that
``torch.compile`` works here (``--compile``).
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

from benchmark.engine.precision import cpu_compute_dtype, current_cuda_index


DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(requested: str | None = None) -> torch.device:
    """cuda > mps > cpu unless a device is named; a named device must exist here (ValueError
    naming it and what this machine has otherwise). A CUDA device always has its index (``auto``
    and ``cuda`` give the current one): ``torch.cuda.set_device``, per-device memory queries and
    the records need it."""
    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps "
                             f"(this machine has: {', '.join(available_devices())})") from None
        if device.type not in DEVICE_TYPES:
            raise ValueError(f"--device {requested!r}: {device.type} devices are not supported; use auto, cpu, "
                             f"cuda, cuda:N or mps (this machine has: {', '.join(available_devices())})")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {requested!r}: CUDA is not available here; use --device cpu "
                                 f"(this machine has: {', '.join(available_devices())})")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"--device {requested!r}: there are only {torch.cuda.device_count()} CUDA device(s) "
                                 f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}) visible here")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"--device {requested!r}: MPS (Apple GPU) is not available here; use --device cpu "
                             f"(this machine has: {', '.join(available_devices())})")
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", current_cuda_index())
        return cpu_device() if device.type == "cpu" else device
    if torch.cuda.is_available():
        return torch.device("cuda", current_cuda_index())
    if _mps_available():
        return torch.device("mps")
    return cpu_device()


def cpu_device() -> torch.device:
    """The CPU, once its training precision is known to work here (``cpu_compute_dtype``: bf16 asked
    of a CPU without bf16 matmul is a ValueError naming the missing feature, before any cell starts)."""
    cpu_compute_dtype()
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def available_devices() -> list[str]:
    """Every device a cell can run on here, e.g. ['cuda:0', 'cuda:1', 'cpu']."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        found.append("mps")
    return found + ["cpu"]


#: Set to 1 to leave glibc's allocator settings alone (see ``tune_cpu_allocator``).
NO_ALLOCATOR_TUNING_ENV = "BENCHMARK_NO_MALLOC_TUNING"
_ALLOCATOR_TUNED: list[bool] = []


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the OS every step.

    glibc serves large blocks from fresh mmap pages and trims the heap when much is free, with
    thresholds that move with the allocation history; a CPU training step that frees and
    re-allocates megabyte tensors (DWF's factor products and gradients, activations) can then
    page-fault on all of them again every step. On VGG-16 that made a product of 512x512x3x3
    factors take 8 ms instead of 0.9 ms, in some runs and not others. Fixing both thresholds once per
    process (glibc only; a no-op elsewhere) keeps the pages. Returns whether the settings apply.
    """
    if _ALLOCATOR_TUNED:
        return _ALLOCATOR_TUNED[0]
    applied = False
    if os.environ.get(NO_ALLOCATOR_TUNING_ENV, "") in ("", "0") and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
            m_trim_threshold, m_mmap_threshold = -1, -3
            # 32 MiB is glibc's ceiling for the mmap threshold; larger blocks are mapped regardless.
            applied = bool(mallopt(m_mmap_threshold, 32 * 1024**2)) and bool(mallopt(m_trim_threshold, 512 * 1024**2))
        except (OSError, AttributeError):
            applied = False
    _ALLOCATOR_TUNED.append(applied)
    return applied


#: Set to 1 to keep subnormal floats in CPU arithmetic (see ``flush_cpu_denormals``).
KEEP_DENORMALS_ENV = "BENCHMARK_KEEP_DENORMALS"


def flush_cpu_denormals() -> bool:
    """Make CPU arithmetic treat subnormal floats (below 1.2e-38) as zero.

    DWF at a strong lambda drives whole factors toward zero, through the subnormal range, and some
    CPUs compute with subnormals by microcode: on an Intel Xeon a 128x784 by 784x300 product took
    133 ms with subnormal weights against 0.6 ms with normal ones, and a quick-grid DWF cell 50 s per
    epoch instead of under 2 (docs/scaling.md, "Subnormal floats"). The setting (x86 FTZ/DAZ) belongs
    to a thread, and threads inherit it when they are created, so this runs before a process's first
    parallel operation creates the intra-op threads (worker start) and again in each training thread.
    Values that small are zero for every count the suite makes (its zero threshold is 1.19e-7), but the
    last bits of a training that passes through them change. Returns whether this thread flushes."""
    if os.environ.get(KEEP_DENORMALS_ENV, "") in ("", "0"):
        torch.set_flush_denormal(True)
    return denormals_flushed()


def denormals_flushed() -> bool:
    """Whether this thread's CPU arithmetic flushes subnormal floats to zero (what records say)."""
    return float(torch.tensor([1e-39]) * 1.0) == 0.0


#: The cuBLAS setting that makes its matmuls reproducible (NVIDIA's documented choice).
CUBLAS_DETERMINISTIC = ":4096:8"


def make_deterministic(device: torch.device) -> bool:
    """``run --deterministic``: cuDNN and cuBLAS pick reproducible kernels (a GPU run then repeats
    bit for bit, at some cost in speed). GPU-only: CPU training here is deterministic already, and
    a CPU device changes nothing (returns False). Operations without a deterministic CUDA kernel
    (e.g. adaptive average pooling's backward) warn instead of failing the cell. cuBLAS reads its
    setting when it starts, so this runs before the cell's first matmul (a worker's first task)."""
    if device.type != "cuda":
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return True


def check_compile(device: torch.device) -> None:
    """Fail early, with the reason, when torch.compile cannot build code for ``device`` here (no C++
    compiler for CPU code, no Triton for GPU code, ...)."""
    try:
        probe = torch.compile(lambda a: (a * 2).sum())
        probe(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 - inductor fails in many ways; say which plainly
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--compile: torch.compile does not work on this machine ({type(exc).__name__}: "
                         f"{first[:300]}); run without --compile") from None
