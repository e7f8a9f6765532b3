"""The IDX format of MNIST, Fashion-MNIST and KMNIST (plain or gzip), checked against its header.

The three datasets share file names and sizes, so a folder holding the files directly could be
any of them; the first training labels of the official files let discovery refuse to serve one
dataset as another (it never rejects files it does not recognise).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from benchmark.engine.data.errors import REFETCH, DatasetCorrupt

#: split -> (images file, labels file), each found with or without ``.gz``.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# The first training labels of the official files.
_IDX_SIGNATURES = {
    "mnist": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
    "fashion-mnist": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5),
}


def idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (plain first); None if neither."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The (decompressed) bytes of a file, or DatasetCorrupt naming it."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as fh:
                return fh.read() if limit is None else fh.read(limit)
        with open(path, "rb") as fh:
            return fh.read() if limit is None else fh.read(limit)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetCorrupt(f"cannot read {path}: {exc}; {REFETCH}") from exc


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """Decode one unsigned-byte IDX file (plain or gzip), checking its header against its size."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetCorrupt(f"{path} is truncated ({len(raw)} bytes); {REFETCH}")
    zero, dtype_code, dims_count = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or dims_count not in (1, 3) or (ndim and dims_count != ndim):
        raise DatasetCorrupt(f"{path} is not an unsigned-byte IDX file with {ndim or '1 or 3'} "
                             f"dimensions (magic {raw[:4].hex()}); {REFETCH}")
    header = 4 + 4 * dims_count
    if len(raw) < header:
        raise DatasetCorrupt(f"{path} is truncated inside its header; {REFETCH}")
    dims = struct.unpack(f">{dims_count}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DatasetCorrupt(f"{path} is truncated or corrupt: its header says {dims} ({expected} bytes), "
                             f"the file has {len(raw)} bytes; {REFETCH}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_identity(folder: Path) -> str | None:
    """Which known dataset the folder's training labels come from, if recognisable."""
    path = idx_file(folder, IDX_FILES["train"][1])
    if path is None:
        return None
    try:
        head = _read_bytes(path, 8 + 10)
    except DatasetCorrupt:
        return None  # reading reports it properly
    labels = tuple(head[8:])
    return next((name for name, sig in _IDX_SIGNATURES.items() if sig == labels), None)


def idx_missing_for(name: str) -> Callable[[Path], list[str]]:
    """``DatasetSpec.missing`` of the IDX dataset ``name``: absent files, or files of another dataset."""
    def missing(folder: Path) -> list[str]:
        absent = [f"no {stem}[.gz]" for pair in IDX_FILES.values() for stem in pair if not idx_file(folder, stem)]
        if absent:
            return absent
        identity = _idx_identity(folder)
        return [f"holds {identity}, not {name}"] if identity not in (None, name) else []

    return missing


def idx_read(folder: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``DatasetSpec.read`` of the IDX datasets: (uint8 N x 1 x 28 x 28, int64 labels)."""
    image_path, label_path = (idx_file(folder, stem) for stem in IDX_FILES[split])
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if len(images) != len(labels):
        raise DatasetCorrupt(f"{image_path} holds {len(images)} images but {label_path} "
                             f"{len(labels)} labels; {REFETCH}")
    if labels.size and labels.max() > 9:
        raise DatasetCorrupt(f"{label_path} has label {labels.max()}, expected 0..9; {REFETCH}")
    return images[:limit, None], labels[:limit].astype(np.int64)
