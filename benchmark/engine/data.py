"""Datasets: registry, discovery on disk, and tensor-resident loaders.

Every split is decoded once into one tensor that lives on the training device; an epoch is a
seeded permutation whose index slices are the batches, and augmentation runs on whole batches.
This removes the per-sample Python work of a ``DataLoader`` (see ``python -m benchmark perf data``).

Discovery order for a dataset: ``--data-dir``, then ``$BENCHMARK_DATA`` (each either holding the
files directly or torchvision's layout below it), the project's ``./data`` folder, then known
system locations such as Debian's ``/usr/share/datasets/fashion-mnist``. Downloading is a
separate, explicit step (``python -m benchmark data fetch NAME``), never done inside a training
worker.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shlex
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from benchmark.core.files import atomic_write

ENV_VAR = "BENCHMARK_DATA"
CACHE_ENV_VAR = "BENCHMARK_DATA_CACHE"
DEFAULT_DATA_DIR = Path("data")
REFETCH = "delete it and fetch the dataset again"


class DatasetMissing(FileNotFoundError):
    """The dataset's files were found nowhere; the message lists the places and the fix."""


class DatasetCorrupt(ValueError):
    """A dataset file exists but cannot be decoded; the message names the file."""


class FetchFailed(RuntimeError):
    """An explicit download did not work; the message says why (often: no internet)."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop (padding 4) + horizontal flip during training
    folder_names: tuple[str, ...]  # sub-folders of a data root that may hold the files ("" = the root)
    system_dirs: tuple[str, ...]
    missing: Callable[[Path], list[str]]  # why this folder does not hold the dataset ([] = it does)
    read: Callable[[Path, str, int | None], tuple[np.ndarray, np.ndarray]]  # -> (uint8 NCHW, int64 labels)
    fetch: Callable[[Path], None]
    system_package: str = ""  # a Debian package that installs the dataset, if any

    @property
    def splits(self) -> tuple[str, str]:
        return ("train", "test")

    def holds(self, folder: Path) -> bool:
        return folder.is_dir() and not self.missing(folder)


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST, KMNIST)
# --------------------------------------------------------------------------------------------

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# The first training labels of the official files. The three datasets share file names and
# sizes, so a folder holding the files directly could be any of them; these let discovery refuse
# to serve one dataset as another (it never rejects files it does not recognise).
_IDX_SIGNATURES = {
    "mnist": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
    "fashion-mnist": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5),
}


def _existing(folder: Path, stem: str) -> Path | None:
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
    path = _existing(folder, _IDX_FILES["train"][1])
    if path is None:
        return None
    try:
        head = _read_bytes(path, 8 + 10)
    except DatasetCorrupt:
        return None  # reading reports it properly
    labels = tuple(head[8:])
    return next((name for name, sig in _IDX_SIGNATURES.items() if sig == labels), None)


def _idx_missing_for(name: str) -> Callable[[Path], list[str]]:
    def missing(folder: Path) -> list[str]:
        absent = [f"no {stem}[.gz]" for pair in _IDX_FILES.values() for stem in pair if not _existing(folder, stem)]
        if absent:
            return absent
        identity = _idx_identity(folder)
        return [f"holds {identity}, not {name}"] if identity not in (None, name) else []

    return missing


def _idx_read(folder: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    image_path, label_path = (_existing(folder, stem) for stem in _IDX_FILES[split])
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if len(images) != len(labels):
        raise DatasetCorrupt(f"{image_path} holds {len(images)} images but {label_path} "
                             f"{len(labels)} labels; {REFETCH}")
    if labels.size and labels.max() > 9:
        raise DatasetCorrupt(f"{label_path} has label {labels.max()}, expected 0..9; {REFETCH}")
    return images[:limit, None], labels[:limit].astype(np.int64)


# --------------------------------------------------------------------------------------------
# CIFAR python batches
# --------------------------------------------------------------------------------------------

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


def _cifar_format(files: dict[str, list[str]], label_key: bytes, num_classes: int):
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


# --------------------------------------------------------------------------------------------
# Tiny ImageNet (official folder layout, decoded once into a cache)
# --------------------------------------------------------------------------------------------

def _tiny_missing(folder: Path) -> list[str]:
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


def _tiny_read(folder: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Official layout: train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt (val = test).

    Decoding 110k JPEGs takes minutes, so the decoded arrays of a whole split are cached in a
    ``.npz`` in the dataset folder (or under ``$BENCHMARK_DATA_CACHE``); a subset decodes only its
    own images unless the whole split is cached already.
    """
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


# --------------------------------------------------------------------------------------------
# Fetching (explicit, through torchvision or the official archive)
# --------------------------------------------------------------------------------------------

def _fetch_torchvision(cls_name: str) -> Callable[[Path], None]:
    def fetch(root: Path) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        for train in (True, False):
            cls(str(root), train=train, download=True)

    return fetch


TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _fetch_tiny(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(TINY_IMAGENET_URL, str(root))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

def _mnist_like(name: str, tv: str, mean: float, std: float, system: tuple[str, ...] = (),
                package: str = "") -> DatasetSpec:
    return DatasetSpec(
        name=name, shape=(1, 28, 28), num_classes=10, mean=(mean,), std=(std,), augment=False,
        folder_names=(f"{tv}/raw", name, ""), system_dirs=system,
        missing=_idx_missing_for(name), read=_idx_read, fetch=_fetch_torchvision(tv), system_package=package,
    )


_c10_missing, _c10_read = _cifar_format(
    {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels", 10)
_c100_missing, _c100_read = _cifar_format({"train": ["train"], "test": ["test"]}, b"fine_labels", 100)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        _mnist_like("mnist", "MNIST", 0.1307, 0.3081),
        _mnist_like("fashion-mnist", "FashionMNIST", 0.2860, 0.3530,
                    ("/usr/share/datasets/fashion-mnist",), "dataset-fashion-mnist"),
        _mnist_like("kmnist", "KMNIST", 0.1918, 0.3483),
        DatasetSpec(
            "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True,
            ("cifar-10-batches-py", "cifar10", ""), (), _c10_missing, _c10_read, _fetch_torchvision("CIFAR10"),
        ),
        DatasetSpec(
            "cifar100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
            ("cifar-100-python", "cifar100", ""), (), _c100_missing, _c100_read, _fetch_torchvision("CIFAR100"),
        ),
        DatasetSpec(
            "tiny-imagenet", (3, 64, 64), 200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), True,
            ("tiny-imagenet-200", "tiny-imagenet", ""), (), _tiny_missing, _tiny_read, _fetch_tiny,
        ),
    ]
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------

def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Data roots searched, in order: the explicit one, $BENCHMARK_DATA, ./data (absolute, so the
    messages say exactly where)."""
    roots: list[Path] = []
    for candidate in (data_dir, os.environ.get(ENV_VAR), DEFAULT_DATA_DIR):
        if candidate:
            path = Path(candidate).expanduser().absolute()
            if path not in roots:
                roots.append(path)
    return roots


def _folders_under(spec: DatasetSpec, root: Path) -> list[Path]:
    return [root / sub if sub else root for sub in spec.folder_names]


def candidate_folders(name: str, data_dir=None) -> list[Path]:
    spec = get_spec(name)
    folders = [f for root in search_roots(data_dir) for f in _folders_under(spec, root)]
    return folders + [Path(d) for d in spec.system_dirs]


def _default_target(data_dir=None) -> Path:
    return Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR).expanduser()


def fetch_command(name: str, data_dir=None) -> str:
    return f"python -m benchmark data fetch {name} --data-dir {shlex.quote(str(_default_target(data_dir)))}"


def locate(name: str, data_dir=None) -> Path:
    """The folder that holds ``name``'s files, or DatasetMissing naming every place searched."""
    spec = get_spec(name)
    folders = candidate_folders(name, data_dir)
    lines = []
    for folder in folders:
        if not folder.is_dir():
            lines.append(f"{folder}  (no such folder)")
            continue
        lacking = spec.missing(folder)
        if not lacking:
            return folder
        lines.append(f"{folder}  ({'; '.join(lacking) if len(lacking) < 4 else f'no {name} files'})")
    hints = [f"Fetch it with:  {fetch_command(name, data_dir)}"]
    if spec.system_package:
        hints.append(f"or install it:  apt-get install {spec.system_package}")
    hints.append(f"or point --data-dir / ${ENV_VAR} at a folder that holds the files (directly or in "
                 f"torchvision's layout below it).")
    searched = "\n  ".join(lines)
    raise DatasetMissing(f"dataset {name!r} not found. Searched, in order:\n  {searched}\n" + "\n".join(hints))


def _looks_offline(exc: BaseException) -> bool:
    import socket
    import urllib.error

    seen = exc
    while seen is not None:
        if isinstance(seen, (urllib.error.URLError, socket.gaierror, ConnectionError, TimeoutError)):
            return True
        if "urlopen error" in str(seen) or "Name or service not known" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fetch(name: str, data_dir=None) -> Path:
    """Download ``name`` into ``data_dir`` ($BENCHMARK_DATA, ./data) unless discovery finds it already."""
    spec = get_spec(name)
    root = _default_target(data_dir)
    try:
        return locate(name, data_dir)
    except DatasetMissing:
        pass
    try:
        root.mkdir(parents=True, exist_ok=True)
        spec.fetch(root)
    except Exception as exc:  # noqa: BLE001 - downloads fail in many ways; say which plainly
        if _looks_offline(exc):
            why = "could not reach the download server (this machine looks offline)"
        else:
            why = f"{type(exc).__name__}: {exc}"
        alternatives = [f"fetch it on a machine with internet ({fetch_command(name, data_dir)}), copy the "
                        f"folder here and point --data-dir / ${ENV_VAR} at it"]
        if spec.system_package:
            alternatives.insert(0, f"apt-get install {spec.system_package}")
        raise FetchFailed(f"downloading {name} failed: {why}.\nInstead: " + "; or ".join(alternatives)) from exc
    found = next((f for f in _folders_under(spec, root.absolute()) if spec.holds(f)), None)
    if found is None:
        raise FetchFailed(f"downloading {name} finished but its files are not under {root}")
    return found


# --------------------------------------------------------------------------------------------
# Tensor-resident splits and batching
# --------------------------------------------------------------------------------------------

@dataclass
class Split:
    """One split as device tensors: ``x`` normalized float32 (or uint8 for very large sets)."""

    x: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor  # (1, C, 1, 1), used only when x is stored as uint8
    std: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select gathers whole rows; on CPU it is 2-3x faster than x[index] (advanced indexing).
        x = self.x.index_select(0, index)
        if x.dtype == torch.uint8:
            x = (x.float().div_(255) - self.mean) / self.std
        return x, self.y.index_select(0, index)

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device), self.mean.to(device), self.std.to(device))


@dataclass
class Data:
    spec: DatasetSpec
    train: Split
    test: Split
    source: Path
    val: Split | None = None  # held out of the training set (Schedule.validation), or None

    def to(self, device) -> "Data":
        return Data(self.spec, self.train.to(device), self.test.to(device), self.source,
                    None if self.val is None else self.val.to(device))


# Splits above this many bytes as float32 are kept as uint8 and normalized per batch
# (Tiny ImageNet's train split: 4.9 GB as float32, 1.2 GB as uint8).
UINT8_ABOVE_BYTES = 2 * 1024**3


def _to_split(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec, device, source: Path) -> Split:
    if tuple(images.shape[1:]) != spec.shape:
        raise DatasetCorrupt(f"{source}: {spec.name} images have shape {tuple(images.shape[1:])}, "
                             f"expected {spec.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DatasetCorrupt(f"{source}: {spec.name} labels outside 0..{spec.num_classes - 1}")
    device = torch.device(device)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    # Move the uint8 pixels (a quarter of the bytes) and normalize once, on the device.
    x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"])).to(device)
    y = torch.from_numpy(np.require(labels, np.int64, ["C", "W"])).to(device)
    if x.numel() * 4 <= UINT8_ABOVE_BYTES:
        x = x.float().div_(255).sub_(mean).div_(std)  # in place: one float copy at peak
    return Split(x, y, mean, std)


def load(name: str, data_dir=None, device="cpu", limit: int | None = None, validation: int = 0) -> Data:
    """Load both splits of ``name`` onto ``device``. ``limit`` keeps the first N of each (tests, perf,
    subset cells); Tiny ImageNet's train order interleaves classes so the first N cover all.
    ``validation`` > 0 moves that many training examples (``validation_indices``) into ``Data.val``."""
    spec = get_spec(name)
    folder = locate(name, data_dir)
    arrays = {split: spec.read(folder, split, limit) for split in spec.splits}
    val = None
    if validation:
        images, labels = arrays["train"]
        held = np.zeros(len(labels), dtype=bool)
        held[validation_indices(labels, validation)] = True
        arrays["train"] = images[~held], labels[~held]
        val = _to_split(images[held], labels[held], spec, device, folder)
    splits = {split: _to_split(images, labels, spec, device, folder) for split, (images, labels) in arrays.items()}
    return Data(spec, splits["train"], splits["test"], folder, val)


#: Seed of the validation draw. Fixed, not the cell's seed: every cell of a dataset (every seed,
#: method and setting) holds out the same examples, so their validation scores compare.
VALIDATION_SEED = 2_502_024_960


def validation_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of ``count`` training examples to hold out, stratified by class: each class
    gives its share of ``count`` (rounded by largest remainder, ties to the lower class), drawn
    uniformly within the class by ``VALIDATION_SEED``. Depends only on the labels and ``count``."""
    labels = np.asarray(labels)
    total = len(labels)
    if not 0 < count < total:
        raise ValueError(f"schedule validation={count} must be between 1 and {total - 1}: it holds out that many "
                         f"of the {total} training examples (lower it, or 0 for no validation split)")
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / total
    quota = np.floor(exact).astype(np.int64)
    by_remainder = np.lexsort((classes, -(exact - quota)))
    quota[by_remainder[:count - int(quota.sum())]] += 1
    rng = np.random.Generator(np.random.PCG64(VALIDATION_SEED))
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch): resuming at any epoch replays the same
    batches, and every device draws the same order."""
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1))
    return gen


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor (drawn from a CPU generator, so every device sees the same numbers) on
    ``device`` without stalling the host: on CUDA it goes through pinned memory and an asynchronous
    copy (the caching host allocator keeps the pinned block until the copy is done); on the CPU it
    is the tensor itself."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def augment(x: torch.Tensor, gen: torch.Generator, padding: int = 4, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop with padding and random horizontal flip of a whole batch on its device.

    The padding holds ``fill`` (per channel, shape (1, C, 1, 1)); ``batches`` passes the normalized
    value of a black pixel, as torchvision's RandomCrop before Normalize gives. Without ``fill``
    the padding is zero. A crop offset of ``padding`` without flip returns an image unchanged.
    """
    n, channels, h, w = x.shape
    if fill is None:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    else:
        padded = torch.nn.functional.pad(x - fill, (padding, padding, padding, padding)) + fill
    dy = to_device(torch.randint(0, 2 * padding + 1, (n,), generator=gen), x.device)
    dx = to_device(torch.randint(0, 2 * padding + 1, (n,), generator=gen), x.device)
    flip = to_device(torch.rand(n, generator=gen) < 0.5, x.device)
    rows = torch.arange(h, device=x.device)[None, :] + dy[:, None]  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (n, w)
    batch_index = torch.arange(n, device=x.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=x.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def batches(split: Split, batch_size: int, gen: torch.Generator, *, shuffle: bool = True,
            augment_batches: bool = False, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Index slices of one seeded permutation; augmentation (if asked) on the whole batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(split)
    device = split.y.device
    order = to_device(torch.randperm(n, generator=gen), device) if shuffle else torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    black = (-split.mean / split.std).to(device)  # a black pixel after normalization
    for start in range(0, stop, batch_size):
        x, y = split.take(order[start:start + batch_size])
        if augment_batches:
            x = augment(x, gen, fill=black)
        yield x, y
