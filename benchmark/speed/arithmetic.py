"""A device's arithmetic: how many floating-point operations a model's training step needs, and how
many per second the device does on large matrix products. ``perf pack`` sets a step against that
limit; ``run --dry-run`` makes its rough estimate from it before anything is timed."""

from __future__ import annotations

import functools
import time

import torch

from benchmark.engine import models
from benchmark.engine.sparsity import layer_macs, prunable_layers
from benchmark.engine.timing import sync
from benchmark.engine.train import training_dtype


def step_flops(arch: str, shape, classes: int, batch: int) -> int:
    """Floating-point operations of one training step in its weight layers: forward, input gradient
    and weight gradient, each 2 per multiply-add (activations, pooling and the update not counted)."""
    model = models.build(arch, shape, classes)
    positions = layer_macs(model, shape)
    return 6 * batch * sum(m.weight.numel() * positions[name] for name, m in prunable_layers(model))


@functools.lru_cache(maxsize=None)
def example_flops(arch: str, shape: tuple[int, ...], classes: int) -> tuple[float, float]:
    """(training, evaluation) FLOPs per example, as torch's FlopCounterMode counts a forward and
    backward pass (and a forward pass alone) of ``arch`` built on the meta device: no weights are
    allocated and nothing is computed, so a ResNet costs as little to count as a LeNet."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = models.build(arch, tuple(shape), classes)
        x = torch.empty(2, *shape)
        y = torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model.eval()(x)
    with FlopCounterMode(display=False) as training:
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
    return training.get_total_flops() / 2, forward.get_total_flops() / 2


def matmul_rate(device: torch.device, rounds: int = 10) -> float:
    """The device's FLOP/s on large square matrix products (best of ``rounds`` at two sizes), in the
    dtype training computes in there (``training_dtype``: bf16 on GPUs with native bf16, under
    autocast; float32 elsewhere), at torch's current thread count: the rate no step can beat."""
    dtype = training_dtype(device)
    best = 0.0
    for n in ((4096, 8192) if device.type == "cuda" else (512, 1024)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(rounds + 1):
            sync(device)
            began = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - began))
    return best
