"""Structured pruning: remove whole channels / neurons with Torch-Pruning, then fine-tune.

Unlike the unstructured methods, the pruned model is physically smaller, so its own counts say
nothing about compression. The record therefore measures it against the ORIGINAL dense model:

- ``cr`` = dense prunable weights / nonzero prunable weights of the pruned model (section 4's
  definition; with no exact zeros left it is dense / pruned prunable weights);
- ``cr_total`` = dense parameters / nonzero parameters of the pruned model (biases, BN included);
- ``cr_effective`` = dense prunable weights / effective weights of the pruned model (equal to ``cr``
  unless a layer lost every path);
- ``speedup`` = dense conv/linear MACs / MACs of the pruned model with nonzero weights (the MAC
  count of ``benchmark.engine.sparsity`` on both models, so it matches the other methods' column);
- ``prunable_params``, ``total_params`` and ``macs`` are the dense model's, as for other methods;
  ``params_dense/params_pruned``, ``macs_dense/macs_pruned`` and ``latency_ms_dense/_pruned``
  (median of timed forward passes of one batch) show the physical change;
- each entry of ``layers`` counts against its dense layer: ``numel`` and ``macs`` are the dense
  layer's, ``shape`` the pruned one (``dense_shape`` beside it), so per-layer ``sparsity`` means
  the same as for unstructured methods.

Ranking uses Torch-Pruning's dependency graph (coupled layers, residual additions and flattening
are pruned together) and its group importance; the selection is ours so that every layer keeps at
least one channel (Torch-Pruning silently skips a layer whose quota rounds to zero channels, which
would miss the requested ratio) and how many layers hit that floor is reported.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from benchmark.engine import sparsity
from benchmark.engine.precision import autocast, prepare_input
from benchmark.core.context import MethodContext
from benchmark.core.method import Method, Plotting, register

#: Fine-tuning length when ``finetune_epochs`` is None: this fraction of the schedule's epochs,
#: rounded up (ours). A short recovery phase keeps the extra compute small next to the dense
#: training it reuses, and scales with the schedule (10 epochs for LeNets' 100, 20 for CIFAR's 200).
FINETUNE_FRACTION = 0.1

#: Fine-tuning learning rate when ``finetune_lr`` is None: the schedule's divided by this (ours):
#: the weights are already trained, a full restart of the learning rate would undo them.
FINETUNE_LR_DIVISOR = 10.0

LATENCY_WARMUP = 3

TORCH_PRUNING_INSTALL = "pip install torch-pruning"


class _TorchPruning:
    """Torch-Pruning, imported where a structured method first uses it (it is optional: ``import
    methods`` and every other method work without it); an ImportError names the package and the fix."""

    def __getattr__(self, name: str):
        try:
            import torch_pruning
        except ImportError as exc:
            raise ImportError(f"the structured pruning methods (structured-magnitude, structured-random) need "
                              f"the package torch-pruning, which is not installed here ({exc}): "
                              f"{TORCH_PRUNING_INSTALL}") from None
        return getattr(torch_pruning, name)


tp = _TorchPruning()


@dataclass
class PruneReport:
    channels_dense: int  # channels / neurons over all pruned groups before pruning
    channels_kept: int
    groups: int  # coupled channel groups considered (the classifier's outputs are never one)
    floored_groups: int  # groups whose share rounded to nothing and kept one channel instead

    @property
    def channel_ratio_reached(self) -> float:
        return 1.0 - self.channels_kept / self.channels_dense if self.channels_dense else 0.0


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The conv/linear layers whose output is the model's output (the classifier), found by one
    forward pass; falls back to the last conv/linear layer."""
    produced: dict[int, nn.Module] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: produced.__setitem__(id(out), mod))
             for _, m in sparsity.prunable_layers(model)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if id(out) in produced:
        return [produced[id(out)]]
    return [sparsity.prunable_layers(model)[-1][1]]


def prune_channels(model: nn.Module, example_input: torch.Tensor, channel_ratio: float,
                   importance: tp.importance.Importance, global_pruning: bool = False,
                   seed: int = 0) -> PruneReport:
    """Remove ``channel_ratio`` of the channels / neurons of ``model`` in place.

    Per layer (``global_pruning=False``) each coupled group loses ``ratio * n`` (rounded) of its n
    channels, the least important first; globally the least important channels over all groups go
    (Torch-Pruning's importances are normalized per group, so scores are comparable). Every group
    keeps at least its most important channel. The classifier's outputs are never pruned; its
    inputs shrink with the layer before it. ``seed`` fixes random importance (global RNG in
    Torch-Pruning) without touching the caller's random state.
    """
    if not 0 < channel_ratio < 1:
        raise ValueError(f"channel_ratio={channel_ratio} must be in (0, 1)")
    was_training = model.training
    ignored = output_layers(model, example_input)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)  # traces in eval mode
    scored = []  # (root module, root pruning function, importance per channel)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(sparsity.PRUNABLE_TYPES)):
            scores = importance(group)
            if scores is None:  # no layer with weights in the group
                continue
            root_dep, root_idxs = group[0]
            if len(scores) != len(root_idxs):
                raise RuntimeError(f"grouped channels are not supported (layer {root_dep.target.module})")
            scored.append((root_dep.target.module, root_dep.handler, scores.detach().float().cpu()))
    removals, floored = _choose_removals([s for *_, s in scored], channel_ratio, global_pruning)
    for (module, handler, _), idxs in zip(scored, removals):
        if not idxs:
            continue
        group = graph.get_pruning_group(module, handler, idxs)
        if not graph.check_pruning_group(group):
            raise RuntimeError(f"pruning {len(idxs)} channels of {module} would empty a layer")
        group.prune()
    model.train(was_training)
    total = sum(len(s) for *_, s in scored)
    if floored:
        warnings.warn(f"channel_ratio={channel_ratio}: {floored} layer group(s) would have lost every "
                      f"channel and keep one instead", stacklevel=2)
    return PruneReport(total, total - sum(len(r) for r in removals), len(scored), floored)


def _choose_removals(scores: list[torch.Tensor], ratio: float, global_pruning: bool) -> tuple[list[list[int]], int]:
    """Channel indices to remove per group, and how many groups were held at one channel."""
    if not global_pruning:
        removals, floored = [], 0
        for s in scores:
            n_remove = _share(ratio, len(s))
            if n_remove >= len(s):
                n_remove, floored = len(s) - 1, floored + 1
            removals.append(sorted(torch.argsort(s, stable=True)[:n_remove].tolist()))
        return removals, floored
    # Global: the lowest scores over all groups, but each group's best channel is protected.
    wanted = _share(ratio, sum(len(s) for s in scores))
    unprotected = _lowest(scores, wanted)
    floored = sum(bool(chosen.all()) for chosen in unprotected)
    protected = [s.clone().index_fill_(0, torch.argmax(s).view(1), math.inf) for s in scores]
    n_remove = min(wanted, sum(len(s) - 1 for s in scores))
    return [chosen.nonzero().flatten().tolist() for chosen in _lowest(protected, n_remove)], floored


def _share(ratio: float, n: int) -> int:
    """ratio * n rounded half up (Python's round would send 2.5 to 2 but 3.5 to 4)."""
    return math.floor(ratio * n + 0.5)


def _lowest(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per group, a mask of its channels among the k lowest scores over all groups."""
    flat = torch.cat(scores)
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.argsort(flat, stable=True)[:k]] = True
    return list(chosen.split([len(s) for s in scores]))


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape, batch_size: int, device: torch.device, repeats: int = 20,
               channels_last: bool = False) -> float:
    """Median wall time of one forward pass of a batch, in milliseconds (after a warm-up)."""
    was_training = model.training
    model.eval()
    x = prepare_input(_fixed_input((batch_size, *input_shape), device), channels_last)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    times = []
    try:
        with autocast(device):
            for i in range(LATENCY_WARMUP + repeats):
                sync()
                began = time.perf_counter()
                model(x)
                sync()
                if i >= LATENCY_WARMUP:
                    times.append((time.perf_counter() - began) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)


def _fixed_input(shape, device: torch.device) -> torch.Tensor:
    """A normal random input that leaves the global random stream alone."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)


class StructuredMethod(Method):
    """Shared run of the structured methods; subclasses choose the channel importance."""

    family = "structured"
    needs_dense = True
    columns = ("params_dense", "params_pruned", "macs_dense", "macs_pruned", "latency_ms_dense", "latency_ms_pruned",
               "channel_ratio_reached", "floored_groups", "test_acc_before_finetune")

    @dataclass(frozen=True)
    class Params(Method.Params):
        channel_ratio: float = 0.5  # fraction of channels / neurons removed in each layer (or overall)
        global_pruning: bool = False  # rank channels over the whole net instead of per layer
        finetune_epochs: int | None = None  # None: ceil(FINETUNE_FRACTION * schedule epochs) (ours)
        finetune_lr: float | None = None  # None: schedule lr / FINETUNE_LR_DIVISOR (ours)
        latency_repeats: int = 20  # timed forward passes per model (median reported)

        def validate(self):
            problems = []
            if not 0 < self.channel_ratio < 1:
                problems.append(f"channel_ratio={self.channel_ratio} must be in (0, 1) (fraction of channels removed)")
            if self.finetune_epochs is not None and self.finetune_epochs < 0:
                problems.append(f"finetune_epochs={self.finetune_epochs} must be >= 0 (or none for the default)")
            if self.finetune_lr is not None and not self.finetune_lr > 0:
                problems.append(f"finetune_lr={self.finetune_lr} must be > 0 (or none for schedule lr / 10)")
            if self.latency_repeats < 1:
                problems.append(f"latency_repeats={self.latency_repeats} must be >= 1")
            return problems

    class Workload(Method.Workload):
        def training_epochs(self, schedule, layer_sizes):
            return self.params.finetune_epochs or 0  # None (a share of the schedule) counts as 0 here, as before

    def importance(self) -> tp.importance.Importance:
        raise NotImplementedError

    def finetune_schedule(self, schedule):
        p = self.params
        epochs = math.ceil(FINETUNE_FRACTION * schedule.epochs) if p.finetune_epochs is None else p.finetune_epochs
        lr = schedule.lr / FINETUNE_LR_DIVISOR if p.finetune_lr is None else p.finetune_lr
        return schedule.finetune(epochs, lr)

    def run(self, ctx: MethodContext) -> list[dict]:
        p = self.params
        dense = ctx.dense()
        model = dense.model
        batch = ctx.schedule.batch_size
        dense_stats = sparsity.summarize(model, ctx.input_shape, effective=False)
        dense_latency = latency_ms(model, ctx.input_shape, batch, ctx.device, p.latency_repeats, ctx.channels_last)

        example = _fixed_input((1, *ctx.input_shape), ctx.device)
        report = prune_channels(model, example, p.channel_ratio, self.importance(), p.global_pruning, ctx.cell.seed)
        if ctx.channels_last:  # re-sliced weights may have lost the memory format
            model = model.to(memory_format=torch.channels_last)
        acc_before_finetune, _ = ctx.evaluate(model)

        schedule = self.finetune_schedule(ctx.schedule)
        history = None
        if schedule.epochs > 0:
            history, _ = ctx.train(model, phase="finetune", schedule=schedule)
        pruned_latency = latency_ms(model, ctx.input_shape, batch, ctx.device, p.latency_repeats, ctx.channels_last)
        record = ctx.measure(model, history=history)

        pruned_params, pruned_macs = record["total_params"], sum(layer["macs"] for layer in record["layers"])
        record.update(sparsity.summarize_against_dense(model, record, dense_stats))
        record.update(
            params_dense=dense_stats["total_params"],
            params_pruned=pruned_params,
            macs_dense=dense_stats["macs"],
            macs_pruned=pruned_macs,
            latency_ms_dense=dense_latency,
            latency_ms_pruned=pruned_latency,
            latency_batch_size=batch,
            channel_ratio=p.channel_ratio,
            channel_ratio_reached=report.channel_ratio_reached,
            channels_dense=report.channels_dense,
            channels_kept=report.channels_kept,
            floored_groups=report.floored_groups,
            dense_test_acc=dense.test_acc,
            test_acc_before_finetune=acc_before_finetune,
            finetune_epochs=schedule.epochs,
            finetune_lr=schedule.lr,
            epochs=ctx.schedule.epochs + schedule.epochs,  # dense training (cached) + fine-tuning
        )
        return [record]


@register
class StructuredMagnitude(StructuredMethod):
    """Channel pruning by group weight norm (Torch-Pruning), after dense training, then fine-tuning."""

    name = "structured-magnitude"
    plotting = Plotting(order=13, style=(1, 0.45, "d", (0, (5, 1, 1, 1, 1, 1))))

    @dataclass(frozen=True)
    class Params(StructuredMethod.Params):
        importance_norm: int = 2  # p of the group L_p magnitude (Torch-Pruning's default is 2)

        def validate(self):
            problems = super().validate()
            if self.importance_norm not in (1, 2):
                problems.append(f"importance_norm={self.importance_norm} must be 1 or 2")
            return problems

    def importance(self):
        # Sum of |w|^p over each channel's weights in every coupled layer (its conv/linear outputs,
        # the next layer's inputs, its BatchNorm), averaged over the layers, normalized per group.
        return tp.importance.GroupMagnitudeImportance(p=self.params.importance_norm)


@register
class StructuredRandom(StructuredMethod):
    """Channel pruning at random (seeded by the cell), after dense training, then fine-tuning."""

    name = "structured-random"
    plotting = Plotting(order=14, style=(7, 0.5, "d", (0, (5, 1, 1, 1, 1, 1))))

    def importance(self):
        return tp.importance.RandomImportance()
