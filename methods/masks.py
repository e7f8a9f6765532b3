"""Binary masks on conv/linear weights, and turning scores into masks at a target compression.

A mask is a ``torch.nn.utils.parametrize`` parametrization: the layer stores its full weight as
``parametrizations.weight.original`` and every forward pass sees ``original * mask``. So pruned
weights are exactly zero in every forward pass and get exactly zero loss gradient, whatever
momentum or weight decay do to the stored original, and the model needs no training hook. The
mask is a persistent buffer, so it is saved in checkpoints and restored when a run resumes.

Scores become masks by keeping the ``round(n / target_cr)`` highest scores, either over all
prunable weights at once (global) or in each layer (layer-wise). Ties are broken by position
(earlier layer, then lower flat index, is kept first), so a mask depends only on the scores.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from benchmark.engine.sparsity import prunable_layers, unparametrize
from benchmark.engine.train import TrainHooks
from methods import structures

Scope = Literal["global", "layer"]


class Mask(nn.Module):
    """Parametrization ``weight -> weight * mask`` with a persistent 0/1 buffer of the weight's dtype."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def mask_of_module(module: nn.Module) -> Mask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, Mask)), None)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], parametrization: type[Mask] = Mask) -> None:
    """Mask the named prunable layers (a layer already masked gets its mask replaced).
    ``parametrization`` is the class a new mask is made of (``Mask`` or a subclass of it)."""
    layers = dict(prunable_layers(model))
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise KeyError(f"no prunable layer named {unknown}; prunable layers: {list(layers)}")
    for name, keep in masks.items():
        module = layers[name]
        if tuple(keep.shape) != tuple(module.weight.shape):
            raise ValueError(f"mask for {name} has shape {tuple(keep.shape)}, weight {tuple(module.weight.shape)}")
        as_weight = keep.to(device=module.weight.device, dtype=module.weight.dtype)
        existing = mask_of_module(module)
        if existing is not None:
            existing.mask.copy_(as_weight)
        else:
            parametrize.register_parametrization(module, "weight", parametrization(as_weight))


def read_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The boolean keep-mask of every masked prunable layer."""
    out = {}
    for name, module in prunable_layers(model):
        mask = mask_of_module(module)
        if mask is not None:
            out[name] = mask.mask != 0
    return out


def remove_masks(model: nn.Module) -> None:
    """Make masked layers plain again, their weight holding the masked values (pruned = 0)."""
    unparametrize(model, lambda module: mask_of_module(module) is not None)


def check_target_cr(target_cr: float, minimum: float = 1.0, strict: bool = False) -> list[str]:
    """Problems with a target compression ratio (shared by all methods that take one)."""
    ok = target_cr > minimum if strict else target_cr >= minimum
    if ok and math.isfinite(target_cr):
        return []
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    return [f"target_cr={target_cr} must be a finite number {bound} (prunable weights / kept weights; "
            f"e.g. 10 keeps 10%)"]


def kept_count(numel: int, target_cr: float) -> int:
    """How many of ``numel`` weights to keep for compression ``target_cr`` (nearest integer)."""
    return min(numel, max(0, int(math.floor(numel / target_cr + 0.5))))


def output_rate_problems(output_rate: float) -> list[str]:
    if 0 < output_rate <= 1 and math.isfinite(output_rate):
        return []
    return [f"output_rate={output_rate} must be in (0, 1]: the output layer is pruned at this multiple of the other "
            f"layers' rate (1: the same rate; 0.5: half, as Frankle & Carbin prune LeNet's output layer)"]


def layer_kept_counts(sizes: list[int], density: float, output_rate: float = 1.0) -> list[int]:
    """Weights each layer keeps (the output layer last) when the others keep ``density`` of theirs
    and the output layer is pruned at ``output_rate`` times their rate: it keeps ``density **
    output_rate`` of its weights, what pruning at that fraction of the rate level after level gives."""
    counts = [min(n, max(0, int(math.floor(n * density + 0.5)))) for n in sizes[:-1]]
    output = sizes[-1]
    return counts + [min(output, max(0, int(math.floor(output * density ** output_rate + 0.5))))]


def layer_counts_for_cr(sizes: list[int], target_cr: float, output_rate: float = 1.0) -> list[int]:
    """Per-layer kept counts for compression ``target_cr`` with every layer at one density, except
    the output layer at ``output_rate`` (``layer_kept_counts``). Rate 1 is ``kept_count`` per layer;
    otherwise the density is the one whose counts come closest to ``kept_count(total, target_cr)``."""
    if output_rate == 1.0:
        return [kept_count(n, target_cr) for n in sizes]
    wanted = kept_count(sum(sizes), target_cr)
    low, high = 0.0, 1.0
    for _ in range(100):  # kept weights grow with the density: bisect to float precision
        middle = (low + high) / 2
        if sum(sizes[:-1]) * middle + sizes[-1] * middle ** output_rate < wanted:
            low = middle
        else:
            high = middle
    return layer_kept_counts(sizes, (low + high) / 2, output_rate)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest entries; ties go to the lower flat index, NaN ranks last."""
    flat = scores.detach().flatten().nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[:k]] = True
    return keep.view(scores.shape)


def masks_from_scores(scores: dict[str, torch.Tensor], target_cr: float, scope: Scope = "global",
                      keep: int | None = None, warn: bool = True, output_rate: float = 1.0) -> dict[str, torch.Tensor]:
    """Keep the highest scores so that (scored weights / kept) = ``target_cr``.

    ``scope='global'`` ranks all layers' scores together (they must be comparable);
    ``scope='layer'`` keeps the same fraction of every layer (each rounded to a whole weight), the
    last one (the output layer) pruned at ``output_rate`` times the others' rate (``layer_counts_for_cr``).
    ``keep`` overrides the global count (used when a schedule fixes it). Entries scored ``-inf`` or NaN
    are never kept (used to keep earlier pruning when pruning iteratively). Warns (unless
    ``warn=False``, for intermediate rounds) for every layer left with no weight at all.
    """
    if scope == "layer":
        counts = layer_counts_for_cr([s.numel() for s in scores.values()], target_cr, output_rate)
        masks = {name: top_k_mask(s, k) for (name, s), k in zip(scores.items(), counts)}
    elif scope == "global":
        total = sum(s.numel() for s in scores.values())
        k = kept_count(total, target_cr) if keep is None else keep
        dtype = functools.reduce(torch.promote_types, (s.dtype for s in scores.values()))
        flat = torch.cat([s.detach().flatten().to(dtype) for s in scores.values()])
        keep_flat = top_k_mask(flat, k)
        masks, start = {}, 0
        for name, s in scores.items():
            masks[name] = keep_flat[start:start + s.numel()].view(s.shape)
            start += s.numel()
    else:
        raise ValueError(f"scope={scope!r}; choose 'global' or 'layer'")
    for name, s in scores.items():
        masks[name] &= s.detach() > -math.inf  # also drops NaN
    if warn:
        warn_empty_layers(masks)
    return masks


def warn_empty_layers(masks: dict[str, torch.Tensor]) -> None:
    """Say so when a layer is pruned to nothing: the network then computes a constant."""
    for name, keep in masks.items():
        if keep.numel() and not keep.any():
            warnings.warn(f"layer {name!r} is pruned to nothing ({keep.numel()} weights, none kept); "
                          f"the network output no longer depends on its input", RuntimeWarning, stacklevel=3)


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """|w| of every prunable layer as the forward pass sees it."""
    return {name: module.weight.detach().abs() for name, module in prunable_layers(model)}


def masked_stand_in(structure: str, model: nn.Module, index: int) -> TrainHooks:
    """Member ``index`` of a pack of masked models, for timing packs (its own random 10% mask)."""
    gen = torch.Generator().manual_seed(index)
    apply_masks(model, {name: torch.rand(m.weight.shape, generator=gen) < 0.1 for name, m in prunable_layers(model)})
    return TrainHooks()


structures.provide_stand_in(structures.MASKED, masked_stand_in)
