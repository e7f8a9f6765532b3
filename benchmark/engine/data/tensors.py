"""Each split as one tensor on the training device: decoding a dataset's arrays into normalized
tensors, and the validation split held out of the training set.

Every split is decoded once into one tensor that lives on the training device (docs/design.md,
"One training loop"); ``batching`` slices it into batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmark.engine.data.discovery import locate
from benchmark.engine.data.errors import DatasetCorrupt
from benchmark.engine.data.registry import DatasetSpec, get_spec


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
