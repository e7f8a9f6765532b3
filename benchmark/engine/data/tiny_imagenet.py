"""Tiny ImageNet's official folder of JPEGs, decoded once into a cached array.

Layout: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images`` with
``val/val_annotations.txt`` (val serves as the test split). Decoding 110k JPEGs takes minutes, so
the decoded arrays of a whole split are cached in a ``.npz`` in the dataset folder (or under
``$BENCHMARK_DATA_CACHE``); a subset decodes only its own images unless the whole split is cached.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from benchmark.core.files import atomic_write
from benchmark.engine.data.errors import REFETCH, DatasetCorrupt

#: Where the decoded arrays go instead of the dataset folder (a read-only or shared one).
CACHE_ENV_VAR = "BENCHMARK_DATA_CACHE"


def tiny_missing(folder: Path) -> list[str]:
    """``DatasetSpec.missing`` of Tiny ImageNet."""
    needed = [("wnids.txt", (folder / "wnids.txt").is_file()),
              ("train/", (folder / "train").is_dir()),
              ("val/val_annotations.txt", (folder / "val" / "val_annotations.txt").is_file())]
    return [f"no {name}" for name, present in needed if not present]


def _decode_image(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise DatasetCorrupt(f"{path} is missing (listed by the dataset's index); {REFETCH}")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, DecompressionBombError...
        raise DatasetCorrupt(f"cannot decode image {path}: {exc}; {REFETCH}") from exc
    if arr.shape != (64, 64, 3):
        raise DatasetCorrupt(f"{path} is {arr.shape[1]}x{arr.shape[0]}, Tiny ImageNet images are 64x64")
    return arr.transpose(2, 0, 1)


def _tiny_items(folder: Path, split: str) -> list[tuple[Path, int]]:
    """(image, label) pairs. Train interleaves the classes (one image of each class in turn) so that
    the first N examples of a subset cover every class, as they do for MNIST and CIFAR."""
    wnids = [line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip()]
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    if split == "train":
        ranked = []
        for label, wnid in enumerate(wnids):
            image_dir = folder / "train" / wnid / "images"
            if not image_dir.is_dir():
                raise DatasetCorrupt(f"{image_dir} is missing (class {wnid} is listed in wnids.txt); {REFETCH}")
            files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
            ranked += [(rank, label, path) for rank, path in enumerate(files)]
        return [(path, label) for _, label, path in sorted(ranked, key=lambda item: item[:2])]
    annotations = folder / "val" / "val_annotations.txt"
    items = []
    for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise DatasetCorrupt(f"{annotations}:{lineno}: expected '<file>\\t<wnid listed in wnids.txt>...', "
                                 f"got {line!r}")
        items.append((folder / "val" / "images" / fields[0], label_of[fields[1]]))
    return items


def _tiny_cache_path(folder: Path, split: str, items: list[tuple[Path, int]]) -> Path:
    """A cache file keyed by the folder and every image's name, label, size and time: replacing,
    adding or removing an image decodes again."""
    digest = hashlib.sha1(str(folder.resolve()).encode())
    for path, label in items:
        try:
            stat = path.stat()
            digest.update(f"{path.name}:{label}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path.name}:{label}:missing\n".encode())
    name = f".decoded-{split}-{digest.hexdigest()[:16]}.npz"
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root) / name if root else folder / name


def _load_cache(cache: Path, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(cache) as npz:
            x, y = npz["x"], npz["y"]
    except Exception:  # noqa: BLE001 - a broken cache is only slower: decode again
        return None
    return (x, y) if x.shape == (count, 3, 64, 64) and y.shape == (count,) else None


def _save_cache(cache: Path, x: np.ndarray, y: np.ndarray) -> None:
    try:
        atomic_write(cache, lambda fh: np.savez(fh, x=x, y=y), binary=True, durable=False, make_parents=True)
    except OSError:  # read-only dataset folder: decode again next time
        pass


def tiny_read(folder: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``DatasetSpec.read`` of Tiny ImageNet (val = test), through the decoded cache."""
    items = _tiny_items(folder, split)
    cache = _tiny_cache_path(folder, split, items)
    cached = _load_cache(cache, len(items)) if cache.is_file() else None
    if cached is not None:
        return cached[0][:limit], cached[1][:limit]
    chosen = items[:limit]
    x = np.empty((len(chosen), 3, 64, 64), dtype=np.uint8)
    for i, (path, _) in enumerate(chosen):
        x[i] = _decode_image(path)
    y = np.asarray([label for _, label in chosen], dtype=np.int64)
    if len(chosen) == len(items):
        _save_cache(cache, x, y)
    return x, y
