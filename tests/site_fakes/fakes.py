"""A fake of ``torch.cuda`` for the code that only chooses devices (no kernel runs on it): CUDA
cannot run on the machines the tests run on, and the device choice is what broke on real GPUs."""

from __future__ import annotations

import threading

import torch


#: The fake installed last in this process.
INSTALLED: list["FakeCuda"] = []


class FakeCuda:
    """N GPUs of compute capability ``capability``: the current device is per thread and 0 until
    ``set_device``, CUDA counts as initialised once a call needs it (as torch's lazy init does),
    and ``set_device`` refuses an index-less device as torch does."""

    NAMES = ("is_available", "device_count", "is_initialized", "current_device", "set_device", "get_device_name",
             "get_device_capability", "get_device_properties")

    def __init__(self, gpus: int, capability: tuple[int, int] = (9, 0)):
        self.gpus = gpus
        self.capability = capability
        self.initialized = False
        self.set_calls: list[int] = []
        self._local = threading.local()

    def install(self, set_attribute) -> "FakeCuda":
        """``set_attribute``: ``setattr``, or pytest's ``monkeypatch.setattr`` (undone after the test)."""
        for name in self.NAMES:
            set_attribute(torch.cuda, name, getattr(self, name))
        INSTALLED[:] = [self]
        return self

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.gpus

    def is_initialized(self) -> bool:
        return self.initialized

    def _index(self, device) -> int:
        if device is None:
            return self.current_device()
        index = device if isinstance(device, int) else torch.device(device).index
        if index is None:  # torch.cuda.set_device(torch.device("cuda")) raises this
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        if not 0 <= index < self.gpus:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} (fake: {self.gpus} GPUs)")
        return index

    def current_device(self) -> int:
        self.initialized = True
        return getattr(self._local, "index", 0)

    def set_device(self, device) -> None:
        index = self._index(device)
        self.initialized = True
        self._local.index = index
        self.set_calls.append(index)

    def get_device_name(self, device=None) -> str:
        return f"Fake GPU {self._index(device)}"

    def get_device_capability(self, device=None) -> tuple[int, int]:
        self._index(device)
        return self.capability

    def get_device_properties(self, device=None):
        import types

        index = self._index(device)
        return types.SimpleNamespace(name=f"Fake GPU {index}", major=self.capability[0], minor=self.capability[1],
                                     total_memory=80 * 2**30)


def worker_identity(pause: float = 0.2) -> dict:
    """What a worker process says about its GPU (run in the worker; ``pause`` keeps it busy so that
    the pool spreads tasks over every worker)."""
    import os
    import time

    from benchmark.execution import worker

    time.sleep(pause)
    return {"pid": os.getpid(), "owned": list(worker.OWNED_GPU), "current": torch.cuda.current_device(),
            "set_calls": list(INSTALLED[0].set_calls), "device": str(worker.worker_device("auto"))}
