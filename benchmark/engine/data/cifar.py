"""CIFAR-10 and CIFAR-100 in their python pickle batches, unpickled without running any code.

A dataset folder may be shared or downloaded from anywhere, so the unpickler accepts only the
numpy pieces a batch is made of (docs/design.md, "Resumable, whatever stops it": planted pickles
run no code).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from benchmark.engine.data.errors import REFETCH, DatasetCorrupt


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of numpy arrays and lists) and nothing that could run code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - a broken pickle raises almost any type
        raise DatasetCorrupt(f"cannot read {path}: {type(exc).__name__}: {exc}; {REFETCH}") from exc
    if not isinstance(batch, dict):
        raise DatasetCorrupt(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict; {REFETCH}")
    return batch


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        raise DatasetCorrupt(f"{path} lacks the keys b'data' and {label_key!r} of a CIFAR batch; {REFETCH}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetCorrupt(f"{path}: data is {data.dtype} {data.shape}, expected uint8 rows of 3072; {REFETCH}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetCorrupt(f"{path}: {len(data)} images but labels {labels.dtype} {labels.shape}; {REFETCH}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetCorrupt(f"{path}: labels outside 0..{num_classes - 1}; {REFETCH}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar_format(files: dict[str, list[str]], label_key: bytes, num_classes: int
                 ) -> tuple[Callable[[Path], list[str]], Callable[[Path, str, int | None], tuple[np.ndarray, np.ndarray]]]:
    """(``DatasetSpec.missing``, ``DatasetSpec.read``) of a CIFAR variant: ``files`` per split, the
    labels under ``label_key``."""
    def missing(folder: Path) -> list[str]:
        return [f"no {n}" for names in files.values() for n in names if not (folder / n).is_file()]

    def read(folder: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        xs, ys, count = [], [], 0
        for name in files[split]:
            if limit is not None and count >= limit:
                break
            x, y = _cifar_batch(folder / name, label_key, num_classes)
            xs.append(x)
            ys.append(y)
            count += len(y)
        return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]

    return missing, read
