"""Sparsity metrics as small pure functions of a model (docs/design.md, Metrics).

All functions read a layer's weight through ``module.weight``, so they see the effective weight
of masked or factorized (parametrized) layers as well as of plain ones.

- prunable weights: weights of conv and linear layers;
- ``cr``: prunable weights / nonzero prunable weights, sparsity = 1 - 1/cr;
- ``cr_total``: all parameters (biases, BatchNorm included) / nonzero parameters;
- ``cr_effective``: like ``cr`` but a weight counts as kept only if it lies on a path of nonzero
  weights from the input to the output (Vysogorets & Kempe 2021);
- ``speedup``: dense multiply-adds / multiply-adds with nonzero weights (conv and linear layers).

A weight counts as zero when ``|w| < threshold`` (default 0, so exact zeros only).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def logical_parameters(model: nn.Module):
    """(name, tensor) for every parameter as the forward pass sees it: a parametrized weight is
    reported once, as its computed value, not as its factors or its unmasked original."""
    for mod_name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # the stored original / factors, reported below as the weight they compute
        for name, p in module.named_parameters(recurse=False):
            yield f"{mod_name}.{name}" if mod_name else name, p
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                yield f"{mod_name}.{name}" if mod_name else name, getattr(module, name)


def nonzero(t: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Boolean tensor of entries counted as kept."""
    return t.detach().abs() >= threshold if threshold > 0 else t.detach() != 0


@dataclass
class LayerStats:
    name: str
    kind: str
    shape: list[int]
    numel: int
    nonzero: int
    effective: int
    macs: int
    nonzero_macs: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.numel if self.numel else 0.0


def _ratio(total: float, kept: float) -> float:
    return total / kept if kept else math.inf


def layer_macs(model: nn.Module, input_shape) -> dict[str, int]:
    """Output positions per prunable layer (1 for linear), from one forward pass of a zero input."""
    positions: dict[str, int] = {}
    hooks = []
    for name, module in prunable_layers(model):
        def hook(mod, inp, out, name=name):
            positions[name] = out[0, 0].numel() if isinstance(mod, nn.Conv2d | nn.Conv1d | nn.Conv3d) else (
                out.numel() // out.shape[-1] // out.shape[0])
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return positions


def effective_masks(model: nn.Module, input_shape, threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """Per prunable layer, the weights that lie on some input-to-output path of nonzero weights.

    Works on a float64 copy whose prunable weights are replaced by their 0/1 masks, biases by 0,
    BatchNorm by the identity and max-pooling by average pooling (so no connection is hidden by an
    argmax). With an all-ones input, d(sum of outputs)/d(w) counts the paths through w: it is
    positive exactly for the weights that are effective.
    """
    net = copy.deepcopy(model).cpu().double().eval()
    unparametrize(net)
    _replace_pools_and_norms(net)
    masks = {}
    for mod_name, module in net.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            masks[mod_name] = nonzero(module.weight, threshold).double()
            module.weight = nn.Parameter(masks[mod_name].clone())
            if module.bias is not None:
                module.bias = nn.Parameter(torch.zeros_like(module.bias), requires_grad=False)
        for p in module.parameters(recurse=False):
            if not isinstance(module, PRUNABLE_TYPES):
                p.requires_grad_(False)
    out = net(torch.ones((1, *input_shape), dtype=torch.float64))
    out.sum().backward()
    result = {}
    for mod_name, module in net.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            result[mod_name] = (masks[mod_name] > 0) & (module.weight.grad > 0)
    return result


def unparametrize(model: nn.Module, select=lambda module: True) -> nn.Module:
    """Replace every parametrized tensor of the selected modules by a plain parameter holding its
    current value, in place.

    ``torch.nn.utils.parametrize.remove_parametrizations`` deletes the property from the generated
    ``Parametrized<Class>`` class, which deep copies share, so using it on a copy breaks the original
    (and vice versa). This changes only the instance.
    """
    for module in model.modules():
        if not parametrize.is_parametrized(module) or not select(module):
            continue
        values = {n: getattr(module, n).detach().clone() for n in module.parametrizations}
        module.__class__ = module.__class__.__bases__[0]
        del module._modules["parametrizations"]
        for name, value in values.items():
            module.register_parameter(name, nn.Parameter(value))
    return model


def _replace_pools_and_norms(net: nn.Module) -> None:
    """Max-pooling becomes average pooling, BatchNorm the identity (a module, not ``eps = 0``: torch
    2.11 rejects a zero eps, which the first GPU check found)."""
    for name, child in list(net.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(net, name, nn.Identity())
        elif isinstance(child, nn.MaxPool2d):
            setattr(net, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
        elif isinstance(child, nn.AdaptiveMaxPool2d):
            setattr(net, name, nn.AdaptiveAvgPool2d(child.output_size))
        else:
            _replace_pools_and_norms(child)


def layer_stats(model: nn.Module, input_shape, threshold: float = 0.0, effective: bool = True) -> list[LayerStats]:
    positions = layer_macs(model, input_shape)
    eff = effective_masks(model, input_shape, threshold) if effective else {}
    stats = []
    for name, module in prunable_layers(model):
        w = module.weight
        kept = int(nonzero(w, threshold).sum())
        stats.append(LayerStats(
            name=name, kind=type(module).__name__, shape=list(w.shape), numel=w.numel(), nonzero=kept,
            effective=int(eff[name].sum()) if name in eff else kept,
            macs=w.numel() * positions[name], nonzero_macs=kept * positions[name],
        ))
    return stats


def summarize(model: nn.Module, input_shape, threshold: float = 0.0, effective: bool = True) -> dict:
    """All metrics of docs/design.md, Metrics as one flat dict (plus ``layers``, a list of dicts)."""
    layers = layer_stats(model, input_shape, threshold, effective)
    prunable = sum(s.numel for s in layers)
    kept = sum(s.nonzero for s in layers)
    prunable_names = {f"{s.name}.weight" for s in layers}
    other_total = other_kept = 0
    for name, p in logical_parameters(model):
        if name not in prunable_names:
            other_total += p.numel()
            other_kept += int(nonzero(p, threshold).sum())
    macs = sum(s.macs for s in layers)
    return {
        "cr": _ratio(prunable, kept),
        "sparsity": 1.0 - kept / prunable if prunable else 0.0,
        "cr_total": _ratio(prunable + other_total, kept + other_kept),
        "cr_effective": _ratio(prunable, sum(s.effective for s in layers)),
        "speedup": _ratio(macs, sum(s.nonzero_macs for s in layers)),
        "prunable_params": prunable,
        "nonzero_params": kept,
        "total_params": prunable + other_total,
        "macs": macs,
        "threshold": threshold,
        "layers": [asdict(s) | {"sparsity": s.sparsity} for s in layers],
    }


def summarize_against_dense(model: nn.Module, summary: dict, dense: dict) -> dict:
    """The metrics above for a model made physically smaller (structured pruning), counted against
    the dense model it came from, so that they mean what they mean for every other method.

    ``summary`` is ``summarize(model, ...)`` of the smaller model and ``dense`` that of the dense
    one (same layer names). Ratios have the dense counts above and the smaller model's nonzero
    counts below; ``prunable_params``, ``total_params`` and ``macs`` are the dense model's; each
    layer keeps its own ``shape`` and gets ``dense_shape``, the dense ``numel`` and ``macs`` and a
    ``sparsity`` against them. Returns the changed keys (``layers`` included, as new dicts).
    """
    dense_layers = {layer["name"]: layer for layer in dense["layers"]}
    layers = summary["layers"]
    kept = sum(layer["nonzero"] for layer in layers)
    prunable = dense["prunable_params"]
    nonzero_all = sum(int(nonzero(p).sum()) for _, p in logical_parameters(model))
    counted = []
    for layer in layers:
        base = dense_layers[layer["name"]]
        counted.append(layer | {"dense_shape": base["shape"], "numel": base["numel"], "macs": base["macs"],
                                "sparsity": 1.0 - layer["nonzero"] / base["numel"]})
    return {
        "cr": _ratio(prunable, kept),
        "sparsity": 1.0 - kept / prunable,
        "cr_total": _ratio(dense["total_params"], nonzero_all),
        "cr_effective": _ratio(prunable, sum(layer["effective"] for layer in layers)),
        "speedup": _ratio(dense["macs"], sum(layer["nonzero_macs"] for layer in layers)),
        "prunable_params": prunable,
        "nonzero_params": kept,
        "total_params": dense["total_params"],
        "macs": dense["macs"],
        "layers": counted,
    }


def cr_at(model: nn.Module, threshold: float) -> float:
    """CR of the prunable weights counting ``|w| < threshold`` as zero (cheap: no forward pass)."""
    total = kept = 0
    with torch.no_grad():
        for _, module in prunable_layers(model):
            w = module.weight
            total += w.numel()
            kept += int(nonzero(w, threshold).sum())
    return _ratio(total, kept)


#: How far below / above the zero threshold the settling check looks (docs/design.md, Reproducibility).
THRESHOLD_SPAN = 100.0


def threshold_sensitivity(model: nn.Module, threshold: float) -> dict:
    """CR at 0.01x and 100x the zero threshold, measured before anything is zeroed.

    Where the two differ by more than 10% the record's CR is a property of the threshold, not of
    training: the weights on their way to zero have not got there yet (train longer).
    """
    return {"cr_thr_small": cr_at(model, threshold / THRESHOLD_SPAN),
            "cr_thr_large": cr_at(model, threshold * THRESHOLD_SPAN)}


def zero_below(model: nn.Module, threshold: float) -> int:
    """Set prunable weights with |w| < threshold to exactly zero (plain layers only); returns how many."""
    count = 0
    with torch.no_grad():
        for _, module in prunable_layers(model):
            small = module.weight.abs() < threshold
            count += int(small.sum())
            module.weight[small] = 0.0
    return count
