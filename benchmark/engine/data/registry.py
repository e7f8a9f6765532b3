"""The datasets this suite knows: shape, classes, normalization, where their files may sit, how
they are read and where they are downloaded from.

``DATASETS`` is the one registry; everything else (discovery, loading, the ``data`` command, the
grid checks) asks it by name through ``get_spec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from benchmark.engine.data.cifar import cifar_format
from benchmark.engine.data.idx import idx_missing_for, idx_read
from benchmark.engine.data.tiny_imagenet import tiny_missing, tiny_read


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
# Downloads (explicit, through torchvision or the official archive; never inside a worker)
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
        missing=idx_missing_for(name), read=idx_read, fetch=_fetch_torchvision(tv), system_package=package,
    )


_c10_missing, _c10_read = cifar_format(
    {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels", 10)
_c100_missing, _c100_read = cifar_format({"train": ["train"], "test": ["test"]}, b"fine_labels", 100)

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
            ("tiny-imagenet-200", "tiny-imagenet", ""), (), tiny_missing, tiny_read, _fetch_tiny,
        ),
    ]
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None
