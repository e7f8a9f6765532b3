"""Fair timing of competing code paths in one process: alternating rounds and paired ratios.

``perf`` (speed claims) and the packing calibration (``run --pack auto``) both compare contenders
that share a noisy machine; they time them the same way, here.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def interleave(contenders: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each contender, one call each per round, the order reversed every other
    round so that neither drift nor a noisy neighbour favours whoever runs first."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            began = time.perf_counter()
            contenders[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - began)
    return seconds


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the ratio within each round: contenders of one round ran seconds apart,
    so a slow phase of the machine divides out instead of landing on whoever it hit."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))
