"""What training computes in and how its tensors are laid out, per device (docs/scaling.md, "CPU speed").

One place decides both, because a record states both (``compute_dtype``, ``memory_format``) and must
say what actually trained it:

- GPUs with native bf16 train under bf16 autocast; a CPU trains in float32 unless
  ``$BENCHMARK_CPU_DTYPE=bf16`` asks for the same autocast there, which needs a CPU that multiplies
  bf16 in hardware (AMX or AVX512-BF16): elsewhere it is refused with the missing feature named.
- Convolutional models train channels-last on CUDA and on the CPU (max-pooling and oneDNN's
  convolutions are faster so); ``$BENCHMARK_CPU_MEMORY_FORMAT=contiguous`` trains a CPU cell the way
  records written before channels-last were, bit for bit.

Both are environment variables, not schedule settings: they say how a cell is computed, not what it
is (a GPU's bf16 cell has the same id as the CPU's float32 one), so a worker process, a SLURM job
and a resumed run all inherit them, and cell ids do not change.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from benchmark.engine.models import CONV_MODELS

#: Environment variable choosing what CPU training computes in: ``float32`` (default) or ``bf16``.
CPU_DTYPE_ENV = "BENCHMARK_CPU_DTYPE"
CPU_DTYPE_NAMES = {"": torch.float32, "float32": torch.float32, "fp32": torch.float32,
                   "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
#: Environment variable choosing the CPU memory layout of convolutional models: ``channels_last``
#: (default) or ``contiguous`` (the layout of the records written before 2026-12-04).
CPU_MEMORY_FORMAT_ENV = "BENCHMARK_CPU_MEMORY_FORMAT"
CPU_MEMORY_FORMATS = ("channels_last", "contiguous")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a GPU with bf16 tensor cores (compute capability 8.0, Ampere, and
    later). Older GPUs (V100, T4) would emulate bf16 at a fraction of their float32 speed."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else current_cuda_index()
    if index not in _BF16_BY_INDEX:
        _BF16_BY_INDEX[index] = torch.cuda.get_device_capability(index)[0] >= 8
    return _BF16_BY_INDEX[index]


_BF16_BY_INDEX: dict[int, bool] = {}


def current_cuda_index() -> int:
    """This thread's current CUDA device, without initialising CUDA in a process that has not
    (a driver that only hands cells to workers must not hold a context on GPU 0): 0 until then."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


@functools.cache
def cpu_bf16_features() -> tuple[str, ...]:
    """This CPU's instructions that multiply bf16 in hardware (``amx_bf16``, ``avx512_bf16``), as
    torch's own CPU dispatch sees them; empty when it has none (bf16 would then be emulated, slower
    than float32)."""
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return tuple(name for name, probe in checks.items() if getattr(torch.cpu, probe, lambda: False)())


def cpu_compute_dtype() -> torch.dtype:
    """What CPU training computes in, from ``$BENCHMARK_CPU_DTYPE``: a ValueError names a value that
    is not one, or bf16 asked of a CPU without bf16 matmul (and the feature it lacks)."""
    value = os.environ.get(CPU_DTYPE_ENV, "").strip().lower()
    if value not in CPU_DTYPE_NAMES:
        raise ValueError(f"${CPU_DTYPE_ENV}={value!r} is not a precision; use float32 (the default) or bf16")
    dtype = CPU_DTYPE_NAMES[value]
    if dtype == torch.bfloat16 and not cpu_bf16_features():
        raise ValueError(f"${CPU_DTYPE_ENV}=bf16: this CPU has no bf16 matrix multiply (neither AMX nor "
                         f"AVX512-BF16: cpuinfo flags amx_bf16 / avx512_bf16), so bf16 would be emulated, slower "
                         f"than float32; unset {CPU_DTYPE_ENV} to train in float32")
    return dtype


def training_dtype(device: torch.device) -> torch.dtype:
    """What training computes in on ``device``: bf16 (autocast) on GPUs with native bf16 and on a CPU
    asked for it (``cpu_compute_dtype``), float32 everywhere else."""
    if native_bf16(device):
        return torch.bfloat16
    if device.type == "cpu":
        return cpu_compute_dtype()
    return torch.float32


def autocast(device: torch.device):
    """bf16 autocast where ``training_dtype`` is bf16; nothing elsewhere."""
    if training_dtype(device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_memory_format() -> str:
    """The CPU layout of convolutional models, from ``$BENCHMARK_CPU_MEMORY_FORMAT``."""
    value = os.environ.get(CPU_MEMORY_FORMAT_ENV, "").strip().lower() or "channels_last"
    if value not in CPU_MEMORY_FORMATS:
        raise ValueError(f"${CPU_MEMORY_FORMAT_ENV}={value!r} is not a layout; use one of {list(CPU_MEMORY_FORMATS)}")
    return value


def uses_channels_last(device: torch.device, arch: str) -> bool:
    """Whether ``arch`` trains channels-last on ``device``: convolutional models on CUDA, and on the
    CPU unless ``$BENCHMARK_CPU_MEMORY_FORMAT=contiguous`` (LeNet-5's step: 14-15 ms against
    16-23 ms contiguous on an EPYC thread, max-pooling most of the gap; docs/scaling.md)."""
    if arch not in CONV_MODELS:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_memory_format() == "channels_last"


def memory_format_name(device: torch.device, arch: str) -> str:
    """The record's ``memory_format``: ``channels_last`` or ``contiguous``."""
    return "channels_last" if uses_channels_last(device, arch) else "contiguous"


def prepare_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch laid out as the model trains: channels-last for conv nets where ``channels_last``.

    A single-channel batch (Fashion-MNIST, MNIST) is contiguous and channels-last at once, and
    ``contiguous(channels_last)`` leaves its strides as they are, which torch reads as NCHW. A
    convolution then takes its layout from the weight alone, and a weight computed each step (DWF's
    factor product, a mask times the weight) comes out NCHW: the first convolution and max-pooling
    ran NCHW for every DWF and masked LeNet-5 cell (until 2026-12-05). The strides channels-last
    gives a new tensor are set here instead, on the same memory."""
    if not (channels_last and x.ndim == 4):
        return x
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1:
        _, _, height, width = x.shape
        x = x.as_strided(x.shape, (height * width, 1, width, 1))
    return x


@contextlib.contextmanager
def exact_float32():
    """Convolutions and matmuls in full float32 (no TF32) while inside: scores that rank weights
    one by one (SNIP, GraSP) must not depend on TF32's 10-bit mantissa. No effect on a CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def cpu_precision(dtype: str | None = None, memory_format: str | None = None):
    """CPU training in ``dtype`` (float32, bf16) and ``memory_format`` while inside (None: as the
    environment says), by setting the two environment variables and restoring them after: the speed
    benchmarks time the variants side by side in one process. Models and steps built inside must
    also run inside, since autocast reads the setting at every step."""
    wanted = {CPU_DTYPE_ENV: dtype, CPU_MEMORY_FORMAT_ENV: memory_format}
    saved = {name: os.environ.get(name) for name in wanted}
    try:
        for name, value in wanted.items():
            if value is not None:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
