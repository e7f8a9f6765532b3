"""The model structures the harness times and packs (dense, masked, factorized, L1), named and built here so it needs no method's name.

A method says which structure it trains (``Method.step_variant`` for time estimates,
``Method.pack_family`` for packing); the speed estimate and the pack calibration build stand-ins
of a structure through ``stand_in`` without knowing which method asked.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmark.engine.sparsity import prunable_layers
from benchmark.engine.train import TrainHooks

DENSE = "dense"
MASKED = "masked"
L1 = "l1"
_FACTORIZED = "dwf D="


def factorized(depth: int) -> str:
    """The structure of a model whose weights are products of ``depth`` factors."""
    return f"{_FACTORIZED}{depth}"


def depth_of(structure: str | None) -> int | None:
    """The factor count of a factorized structure, None for any other."""
    if structure and structure.startswith(_FACTORIZED):
        return int(structure[len(_FACTORIZED):])
    return None


def stand_in(structure: str, model: nn.Module, index: int) -> TrainHooks:
    """Make a freshly built ``model`` into member ``index`` of a pack of ``structure`` (its own λ
    where the structure has one, its own random mask) and return its training hooks."""
    from methods.dwf import FactorHooks, factorize
    from methods.l1 import L1Hooks
    from methods.masks import apply_masks

    depth = depth_of(structure)
    if depth is not None:
        factorize(model, depth, seed=index)
        return FactorHooks(1e-4 * (1 + index), depth, "decay")
    if structure == L1:
        return L1Hooks(1e-5 * (1 + index))
    if structure == MASKED:
        gen = torch.Generator().manual_seed(index)
        apply_masks(model, {name: torch.rand(m.weight.shape, generator=gen) < 0.1
                            for name, m in prunable_layers(model)})
    return TrainHooks()
