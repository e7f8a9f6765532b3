"""What the methods that prune during training (``gmp``, ``rigl``, ``set``) share.

Masks are the parametrizations of ``methods.masks``: a layer stores its full weight as
``parametrizations.weight.original`` and the forward pass sees ``original * mask``, so a weight
outside the mask is exactly zero in every forward pass and gets exactly zero loss gradient. On top
of that, ``set_masks`` keeps the stored original *and* its SGD momentum at exactly zero wherever the
mask is 0: weight decay and momentum then cannot move it either, and a weight that enters the mask
(RigL/SET growth) starts from zero with no momentum.

The hooks keep one log entry per pruning step or mask update (``log``: the step, its epoch, the
masks' sparsity and kept count after it, and the method's own numbers); it is their checkpointed
state and goes into the record as ``pruning_log``. Each epoch's history entry gets ``cr`` (nonzero
weights, as the final record counts them) and ``mask_cr`` (the masks' ones).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from benchmark.engine.sparsity import cr_at, prunable_layers
from benchmark.engine.train import TrainHooks
from methods.masks import mask_of_module, read_masks


def decision_generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator for a pruning decision (initial random masks, SET's growth), distinct from
    the init and data-order streams and a function of (seed, salt) only, so nothing about it has
    to be checkpointed."""
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 9_176_213 + 12_345) % (2**63 - 1))


def kept_for_density(numel: int, density: float) -> int:
    """Weights kept of ``numel`` at ``density`` (nearest integer, halves up)."""
    return min(numel, max(0, int(math.floor(numel * density + 0.5))))


def mask_counts(model: nn.Module) -> tuple[int, int]:
    """(prunable weights, weights the masks keep) over the masked prunable layers."""
    masks = read_masks(model)
    return sum(m.numel() for m in masks.values()), sum(int(m.sum()) for m in masks.values())


@torch.no_grad()
def set_masks(model: nn.Module, keep: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
    """Give the named (already masked) layers the boolean masks ``keep``; zero the stored weight and
    its momentum buffer (if the optimizer has one yet) wherever the new mask is 0 and wherever a
    weight newly enters the mask."""
    layers = dict(prunable_layers(model))
    for name, new in keep.items():
        module = layers[name]
        mask = mask_of_module(module)
        if mask is None:
            raise ValueError(f"layer {name!r} has no mask to update")
        original = module.parametrizations.weight.original
        new = new.to(original.device)
        reset = ~new | (new & (mask.mask == 0))
        original[reset] = 0.0
        state = optimizer.state.get(original, {}) if optimizer is not None else {}
        buffer = state.get("momentum_buffer")
        if buffer is not None:
            buffer[reset] = 0.0
        mask.mask.copy_(new.to(mask.mask.dtype))


class SparseTrainingHooks(TrainHooks):
    """Bookkeeping for methods that change masks during training: the optimizer and step counts
    from ``bind``, a checkpointed ``log``, and the masks' CR per epoch."""

    def __init__(self):
        self.log: list[dict] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_per_epoch = 1
        self.total_steps = 0

    def bind(self, optimizer, steps_per_epoch, total_steps):
        self.optimizer, self.steps_per_epoch, self.total_steps = optimizer, steps_per_epoch, total_steps

    def entry(self, model: nn.Module, t: int, **extra) -> dict:
        """A log entry for the masks as they stand after ``t`` optimizer steps."""
        total, kept = mask_counts(model)
        return {"step": t, "epoch": t / self.steps_per_epoch, **extra,
                "mask_sparsity": 1.0 - kept / total if total else 0.0, "mask_kept": kept}

    def epoch_metrics(self, model):
        """``cr`` counts nonzero weights, as the record's final ``cr`` does; ``mask_cr`` counts the
        masks' ones (higher than ``cr`` only where kept weights are exactly zero, e.g. grown ones
        that got no gradient yet)."""
        total, kept = mask_counts(model)
        return {"cr": cr_at(model, 0.0), "mask_cr": total / kept if kept else math.inf}

    def state_dict(self):
        return {"log": [dict(e) for e in self.log]}

    def load_state_dict(self, state):
        self.log = [dict(e) for e in state.get("log", [])]
