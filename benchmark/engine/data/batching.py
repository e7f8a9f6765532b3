"""Batches of a tensor-resident split: a seeded permutation per epoch whose index slices are the
batches, with augmentation on whole batches on their device.

This removes the per-sample Python work of a ``DataLoader`` (see ``python -m benchmark perf data``),
and the order depends only on (seed, epoch), so a resumed run replays the same batches.
"""

from __future__ import annotations

from typing import Iterator

import torch

from benchmark.engine.data.tensors import Split


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
