"""Several models of one structure as one module: every tensor stacked along a new first dimension.

The stacked model runs the first model's own ``forward`` on inputs whose batch holds every member's
batch one after the other (``P * B`` rows, member p's rows at ``p*B .. p*B+B-1``), so shape-agnostic
code (ReLU, pooling, ``flatten(1)``, residual additions) needs no change. Only the layers that hold
tensors are replaced, each by a wrapper that runs all members in one kernel:

- ``nn.Linear``: one batched matrix product (``baddbmm``) over the stacked weights;
- ``nn.Conv2d``: one grouped convolution, members as groups;
- ``nn.BatchNorm2d``: one batch norm over ``P * C`` channels, so every member keeps its own
  statistics.

A layer's parametrizations (DWF's factor product, a pruning mask) stay as they are and compute the
stacked weight from the stacked factors or mask: they are elementwise, so a member's slice is what
its own model would compute. Any other module holding tensors cannot be stacked (``NotStackable``).

Measured on a 2-core CPU (docs/scaling.md, "Packed training"): for LeNet-300-100 these batched
products were faster than ``torch.func.vmap`` over ``functional_call`` (which copies the weights' gradients into
another layout on every step).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


class NotStackable(ValueError):
    """The models differ in structure, or hold a layer the stacked model has no kernel for."""


def structure(model: nn.Module) -> tuple:
    """What must be equal for models to stack: module types and every tensor's name, shape, dtype,
    device and trainability."""
    modules = tuple((name, type(m).__name__) for name, m in model.named_modules())
    params = tuple((n, tuple(p.shape), p.dtype, str(p.device), p.requires_grad) for n, p in model.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype, str(b.device)) for n, b in model.named_buffers())
    return modules, params, buffers


class _Stacked(nn.Module):
    """Wraps a copy of member 0's layer whose tensors were replaced by the stacked ones."""

    def __init__(self, inner: nn.Module, size: int):
        super().__init__()
        self.inner = inner
        self.size = size

    def _per_member(self, x: torch.Tensor) -> torch.Tensor:
        """(P*B, ...) -> (P, B, ...)"""
        return x.view(self.size, x.shape[0] // self.size, *x.shape[1:])


class StackedLinear(_Stacked):
    def forward(self, x):
        w = self.inner.weight  # (P, out, in), through the layer's parametrizations
        xt = self._per_member(x).transpose(1, 2)  # (P, in, B)
        b = self.inner.bias
        # w @ x^T rather than x @ w^T: the weight's gradient then comes out in the weight's own
        # layout instead of being copied into it on every step
        out = torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(2), w, xt)  # (P, out, B)
        return out.transpose(1, 2).reshape(-1, out.shape[1])


def _members_as_channels(x: torch.Tensor, size: int) -> torch.Tensor:
    """(P*B, C, H, W) -> (B, P*C, H, W)"""
    n, c, h, w = x.shape
    return x.view(size, n // size, c, h, w).transpose(0, 1).reshape(n // size, size * c, h, w)


def _members_as_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, P*C, H, W) -> (P*B, C, H, W)"""
    b, pc, h, w = x.shape
    return x.view(b, size, pc // size, h, w).transpose(0, 1).reshape(size * b, pc // size, h, w)


class StackedConv2d(_Stacked):
    def forward(self, x):
        conv = self.inner
        if conv.padding_mode != "zeros":
            raise NotStackable(f"Conv2d with padding_mode={conv.padding_mode!r} has no stacked kernel")
        w = conv.weight  # (P, out, in/groups, k, k)
        b = conv.bias
        out = F.conv2d(_members_as_channels(x, self.size), w.reshape(-1, *w.shape[2:]),
                       None if b is None else b.reshape(-1), conv.stride, conv.padding, conv.dilation,
                       conv.groups * self.size)
        return _members_as_batch(out, self.size)


class StackedBatchNorm2d(_Stacked):
    def forward(self, x):
        bn = self.inner
        training = bn.training or bn.running_mean is None
        factor = 0.0
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked[0]) if bn.momentum is None else bn.momentum
        flat = (lambda t: None if t is None else t.view(-1))
        out = F.batch_norm(_members_as_channels(x, self.size), flat(bn.running_mean), flat(bn.running_var),
                           flat(bn.weight), flat(bn.bias), training, factor, bn.eps)
        return _members_as_batch(out, self.size)


STACKED_LAYERS: dict[type, type[_Stacked]] = {nn.Linear: StackedLinear, nn.Conv2d: StackedConv2d,
                                              nn.BatchNorm2d: StackedBatchNorm2d}


def _layer_kind(module: nn.Module) -> type | None:
    for kind in STACKED_LAYERS:
        if isinstance(module, kind):
            return kind
    return None


class StackedModel(nn.Module):
    """``size`` models of one structure as one; ``tensors`` maps each member's tensor name (as in
    its ``named_parameters`` / ``named_buffers``) to the stacked tensor (a leaf parameter for
    parameters that train)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        if not models:
            raise NotStackable("no models to stack")
        first = structure(models[0])
        for i, m in enumerate(models[1:], start=1):
            if structure(m) != first:
                raise NotStackable(f"model {i} differs in structure from model 0")
        self.size = len(models)
        self.net = copy.deepcopy(models[0])
        self.tensors: dict[str, torch.Tensor] = {}
        members = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in models]
        layers = [(name, m) for name, m in self.net.named_modules() if _layer_kind(m) is not None]
        for name, module in layers:
            for local, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                full = f"{name}.{local}" if name else local
                stacked = torch.stack([m[full].detach() for m in members])
                owner, leaf = _owner(module, local)
                if isinstance(tensor, nn.Parameter):
                    stacked = nn.Parameter(stacked, requires_grad=tensor.requires_grad)
                    owner.register_parameter(leaf, stacked)
                else:
                    owner.register_buffer(leaf, stacked)
                self.tensors[full] = stacked
            _replace(self.net, name, STACKED_LAYERS[_layer_kind(module)](module, self.size))
        outside = sorted(set(members[0]) - set(self.tensors))
        if outside:
            raise NotStackable(f"{', '.join(outside)}: held by layers that have no stacked kernel (stackable: "
                               f"{', '.join(k.__name__ for k in STACKED_LAYERS)})")

    def forward(self, x):
        return self.net(x)

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        return {n: t for n, t in self.tensors.items() if isinstance(t, nn.Parameter)}

    @torch.no_grad()
    def copy_to(self, models: dict[int, nn.Module]) -> None:
        """Write member p's slice into ``models[p]`` (which keeps its own tensors)."""
        for p, model in models.items():
            own = dict(model.named_parameters()) | dict(model.named_buffers())
            for name, stacked in self.tensors.items():
                own[name].copy_(stacked[p])


def _owner(module: nn.Module, local: str) -> tuple[nn.Module, str]:
    path, _, leaf = local.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise NotStackable(f"the model itself is a {type(root).__name__}; stack a model that contains it")
    path, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(path) if path else root, leaf, new)
