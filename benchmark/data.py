"""Datasets: registry, discovery on disk, and tensor-resident loaders.

Every split is decoded once into one tensor that lives on the training device; an epoch is a
seeded permutation whose index slices are the batches, and augmentation runs on whole batches.
This removes the per-sample Python work of a ``DataLoader`` (see ``python -m benchmark perf data``).

Discovery order for a dataset: ``--data-dir`` / ``$BENCHMARK_DATA`` (the folder itself or
torchvision's layout below it), the project's ``./data`` folder, then known system locations such
as Debian's ``/usr/share/datasets/fashion-mnist``. Downloading is a separate, explicit step
(``python -m benchmark data fetch NAME``), never done inside a training worker.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

ENV_VAR = "BENCHMARK_DATA"
DEFAULT_DATA_DIR = Path("data")


class DatasetMissing(FileNotFoundError):
    """The dataset's files were found nowhere; the message lists the places and the fix."""


class DatasetCorrupt(ValueError):
    """A dataset file exists but cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop (padding 4) + horizontal flip during training
    folder_names: tuple[str, ...]  # sub-folders that may hold the files (torchvision layout first)
    system_dirs: tuple[str, ...]
    find: Callable[[Path], bool]  # does this folder hold the dataset's files?
    read: Callable[[Path, str], tuple[np.ndarray, np.ndarray]]  # (folder, split) -> (uint8 NCHW, labels)
    fetch: Callable[[Path], None]

    @property
    def splits(self) -> tuple[str, str]:
        return ("train", "test")


# --------------------------------------------------------------------------------------------
# On-disk formats
# --------------------------------------------------------------------------------------------

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _existing(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Decode one IDX file (plain or gzip), checking its header against its size."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DatasetCorrupt(f"cannot read {path}: {exc}; delete it and fetch the dataset again") from exc
    if len(raw) < 4:
        raise DatasetCorrupt(f"{path} is truncated ({len(raw)} bytes); delete it and fetch again")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DatasetCorrupt(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DatasetCorrupt(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes), file has "
            f"{len(raw)} bytes; delete it and fetch the dataset again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_find(folder: Path) -> bool:
    return all(_existing(folder, stem) for pair in _IDX_FILES.values() for stem in pair)


def _idx_read(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _IDX_FILES[split]
    images = read_idx(_existing(folder, image_stem))
    labels = read_idx(_existing(folder, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetCorrupt(f"{folder}: {split} images {images.shape} do not match labels {labels.shape}")
    return images[:, None], labels.astype(np.int64)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DatasetCorrupt(f"cannot read {path}: {exc}; delete it and fetch the dataset again") from exc


def _cifar_reader(files: dict[str, list[str]], label_key: bytes):
    def read(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in files[split]:
            path = folder / name
            batch = _unpickle(path)
            try:
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = np.asarray(batch[label_key], dtype=np.int64)
            except (KeyError, ValueError) as exc:
                raise DatasetCorrupt(f"{path} is not a CIFAR python batch ({exc})") from exc
            if len(data) != len(labels):
                raise DatasetCorrupt(f"{path}: {len(data)} images but {len(labels)} labels")
            xs.append(data)
            ys.append(labels)
        return np.concatenate(xs), np.concatenate(ys)

    def find(folder: Path) -> bool:
        return all((folder / n).is_file() for names in files.values() for n in names)

    return find, read


_CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR100_FILES = {"train": ["train"], "test": ["test"]}


def _tiny_find(folder: Path) -> bool:
    return (folder / "wnids.txt").is_file() and (folder / "val" / "val_annotations.txt").is_file()


def _decode_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DatasetCorrupt(f"cannot decode image {path}: {exc}") from exc
    if arr.shape != (64, 64, 3):
        raise DatasetCorrupt(f"{path} has shape {arr.shape}, Tiny ImageNet images are 64x64 RGB")
    return arr.transpose(2, 0, 1)


def _tiny_read(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Official layout: train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt (val = test).

    Decoding 100k JPEGs takes minutes, so the decoded arrays are cached in a ``.npz`` beside the
    folder (or under ``$BENCHMARK_DATA_CACHE``), keyed by the file list.
    """
    wnids = [line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    items: list[tuple[Path, int]] = []
    if split == "train":
        for wnid in wnids:
            image_dir = folder / "train" / wnid / "images"
            if not image_dir.is_dir():
                raise DatasetCorrupt(f"{image_dir} is missing (class {wnid} listed in wnids.txt)")
            items += [(p, index[wnid]) for p in sorted(image_dir.iterdir()) if p.suffix.lower() in (".jpeg", ".jpg", ".png")]
    else:
        annotations = folder / "val" / "val_annotations.txt"
        for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DatasetCorrupt(f"{annotations}:{lineno}: expected '<file>\\t<wnid>...', got {line!r}")
            items.append((folder / "val" / "images" / parts[0], index[parts[1]]))
    digest = hashlib.sha1("\n".join(f"{p.name}:{y}" for p, y in items).encode()).hexdigest()[:12]
    cache_root = Path(os.environ.get("BENCHMARK_DATA_CACHE", folder))
    cache = cache_root / f".decoded-{split}-{digest}.npz"
    if cache.is_file():
        with np.load(cache) as npz:
            return npz["x"], npz["y"]
    x = np.stack([_decode_image(p) for p, _ in items]) if items else np.zeros((0, 3, 64, 64), np.uint8)
    y = np.asarray([label for _, label in items], dtype=np.int64)
    try:
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only dataset folder: decode again next time
    return x, y


# --------------------------------------------------------------------------------------------
# Fetching (explicit, through torchvision)
# --------------------------------------------------------------------------------------------


def _fetch_torchvision(cls_name: str) -> Callable[[Path], None]:
    def fetch(root: Path) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        for train in (True, False):
            cls(str(root), train=train, download=True)

    return fetch


def _fetch_tiny(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(root))


def _mnist_like(name: str, tv: str, mean: float, std: float, system: tuple[str, ...] = ()) -> DatasetSpec:
    return DatasetSpec(
        name=name, shape=(1, 28, 28), num_classes=10, mean=(mean,), std=(std,), augment=False,
        folder_names=(f"{tv}/raw", tv, name, ""), system_dirs=system,
        find=_idx_find, read=_idx_read, fetch=_fetch_torchvision(tv),
    )


_c10_find, _c10_read = _cifar_reader(_CIFAR10_FILES, b"labels")
_c100_find, _c100_read = _cifar_reader(_CIFAR100_FILES, b"fine_labels")

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        _mnist_like("mnist", "MNIST", 0.1307, 0.3081, ("/usr/share/datasets/mnist",)),
        _mnist_like("fashion-mnist", "FashionMNIST", 0.2860, 0.3530, ("/usr/share/datasets/fashion-mnist",)),
        _mnist_like("kmnist", "KMNIST", 0.1918, 0.3483),
        DatasetSpec(
            "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True,
            ("cifar-10-batches-py", "cifar10", ""), (), _c10_find, _c10_read, _fetch_torchvision("CIFAR10"),
        ),
        DatasetSpec(
            "cifar100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
            ("cifar-100-python", "cifar100", ""), (), _c100_find, _c100_read, _fetch_torchvision("CIFAR100"),
        ),
        DatasetSpec(
            "tiny-imagenet", (3, 64, 64), 200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), True,
            ("tiny-imagenet-200", "tiny-imagenet", ""), (), _tiny_find, _tiny_read, _fetch_tiny,
        ),
    ]
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched, in order: the explicit one, $BENCHMARK_DATA, ./data."""
    roots = []
    for candidate in (data_dir, os.environ.get(ENV_VAR), DEFAULT_DATA_DIR):
        if candidate:
            path = Path(candidate).expanduser()
            if path not in roots:
                roots.append(path)
    return roots


def candidate_folders(name: str, data_dir=None) -> list[Path]:
    spec = get_spec(name)
    folders = [root / sub if sub else root for root in search_roots(data_dir) for sub in spec.folder_names]
    return folders + [Path(d) for d in spec.system_dirs]


def fetch_command(name: str, data_dir=None) -> str:
    target = data_dir or os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR
    return f"python -m benchmark data fetch {name} --data-dir {target}"


def locate(name: str, data_dir=None) -> Path:
    """The folder that holds ``name``'s files, or DatasetMissing naming every place searched."""
    folders = candidate_folders(name, data_dir)
    spec = get_spec(name)
    for folder in folders:
        if folder.is_dir() and spec.find(folder):
            return folder
    searched = "\n  ".join(str(f) for f in folders)
    raise DatasetMissing(
        f"dataset {name!r} not found. Searched:\n  {searched}\n"
        f"Fetch it with:  {fetch_command(name, data_dir)}\n"
        f"or point --data-dir / ${ENV_VAR} at a folder that holds it."
    )


def fetch(name: str, data_dir=None) -> Path:
    root = Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR)
    root.mkdir(parents=True, exist_ok=True)
    get_spec(name).fetch(root)
    return locate(name, root)


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
        x = self.x[index]
        if x.dtype == torch.uint8:
            x = (x.float().div_(255) - self.mean) / self.std
        return x, self.y[index]

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device), self.mean.to(device), self.std.to(device))


@dataclass
class Data:
    spec: DatasetSpec
    train: Split
    test: Split
    source: Path

    def to(self, device) -> "Data":
        return Data(self.spec, self.train.to(device), self.test.to(device), self.source)


# Splits above this many bytes as float32 are kept as uint8 and normalized per batch.
UINT8_ABOVE_BYTES = 2 * 1024**3


def _to_split(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec, device) -> Split:
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    if tuple(images.shape[1:]) != spec.shape:
        raise DatasetCorrupt(f"{spec.name}: images have shape {images.shape[1:]}, expected {spec.shape}")
    x = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    y = torch.from_numpy(np.require(labels, requirements=["C", "W"])).long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise DatasetCorrupt(f"{spec.name}: labels outside 0..{spec.num_classes - 1}")
    if x.numel() * 4 <= UINT8_ABOVE_BYTES:
        x = (x.float().div_(255) - mean) / std
    return Split(x, y, mean, std).to(device)


def load(name: str, data_dir=None, device="cpu", limit: int | None = None) -> Data:
    """Load both splits of ``name`` onto ``device``. ``limit`` keeps the first N of each (tests, perf)."""
    spec = get_spec(name)
    folder = locate(name, data_dir)
    splits = {}
    for split in spec.splits:
        images, labels = spec.read(folder, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        splits[split] = _to_split(images, labels, spec, device)
    return Data(spec, splits["train"], splits["test"], folder)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch): resuming at any epoch replays the same
    batches, and every device draws the same order."""
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1))
    return gen


def augment(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, applied to a whole batch on its device."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    flip = torch.rand(n, generator=gen).to(x.device) < 0.5
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (n, w)
    batch_index = torch.arange(n, device=x.device)[:, None, None, None]
    channel_index = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def batches(split: Split, batch_size: int, gen: torch.Generator, *, shuffle: bool = True,
            augment_batches: bool = False, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Index slices of one seeded permutation; augmentation (if asked) on the whole batch."""
    n = len(split)
    device = split.y.device
    order = torch.randperm(n, generator=gen).to(device) if shuffle else torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        x, y = split.take(order[start:start + batch_size])
        if augment_batches:
            x = augment(x, gen)
        yield x, y
