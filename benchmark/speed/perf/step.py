"""``perf step``: one training step (forward, backward, optimizer; batch 128) of DWF depth 2, 3, 4
against the dense model, for every architecture, through the real code path (``models.build``,
``methods.dwf.factorize``, ``FactorHooks`` groups, ``train.make_optimizer``). ``build_training``
is also what ``run --dry-run`` times its estimates with (``benchmark.speed.estimate``).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from benchmark.engine import models
from benchmark.engine.precision import uses_channels_last
from benchmark.engine.sparsity import prunable_layers
from benchmark.engine.timing import interleave, paired_ratio, sync
from benchmark.engine.precision import prepare_input
from benchmark.engine.devices import tune_cpu_allocator
from benchmark.engine.schedule import default_schedule
from benchmark.engine.train import TrainHooks, make_optimizer, training_step
from benchmark.speed.perf.rows import DEFAULT_ROUNDS, Row, judge, make_row

STEP_ARCHS = {"lenet300": ((1, 28, 28), 10), "lenet5": ((1, 28, 28), 10),
              "vgg16": ((3, 32, 32), 10), "resnet18": ((3, 32, 32), 10)}
DEPTHS = (2, 3, 4)
DWF_LAM = 1e-4  # only sets the weight decay on the factors; the step's cost does not depend on it

#: Targets from the speed issue; they are stated for CPU and only judged there.
STEP_TARGETS = {("vgg16", d): 1.15 for d in DEPTHS} | {("resnet18", d): 1.15 for d in DEPTHS} | {("lenet300", 4): 1.6}
SMALL_STEP_BLOCK = 10  # LeNet steps take milliseconds: time blocks of steps, not single steps


def build_training(arch: str, depth: int | None, device: torch.device, batch: int, compiled: bool = False,
                   masked: bool = False, shape: tuple[tuple[int, int, int], int] | None = None):
    """(model, hooks, optimizer, step): ``arch`` (dense when ``depth`` is None) built as a cell builds
    it, channels-last where a cell would be (``precision.uses_channels_last``) before factorizing, FactorHooks groups, the shared optimizer, bf16
    autocast, and ``step`` one training step on a fixed batch. ``masked`` puts an all-ones mask on
    every weight (what a pruned model trains with); ``shape`` is (input shape, classes), default
    the architecture's in STEP_ARCHS."""
    from methods.dwf import FactorHooks, factorize
    from methods.masks import apply_masks

    in_shape, classes = shape or STEP_ARCHS[arch]
    channels_last = uses_channels_last(device, arch)
    model = models.build(arch, in_shape, classes, seed=0).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    hooks: TrainHooks = TrainHooks() if depth is None else FactorHooks(DWF_LAM, depth, "decay")
    if depth is not None:
        factorize(model, depth, seed=0)
    if masked:
        apply_masks(model, {name: torch.ones_like(module.weight) for name, module in prunable_layers(model)})
    optimizer = make_optimizer(model, default_schedule(arch), hooks)
    forward = torch.compile(model) if compiled else model
    gen = torch.Generator().manual_seed(0)
    x = prepare_input(torch.randn(batch, *in_shape, generator=gen).to(device), channels_last)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    model.train()

    def step():
        training_step(model, x, y, optimizer, hooks, device, forward)

    return model, hooks, optimizer, step


def make_step(arch: str, depth: int | None, device: torch.device, batch: int, compiled: bool = False) -> Callable[[], None]:
    """One training step of ``arch`` (dense when ``depth`` is None) as a DWF cell builds it."""
    return build_training(arch, depth, device, batch, compiled)[3]


def bench_step(device: torch.device, rounds: int | None, quick: bool, archs: list[str], compiled: bool) -> list[Row]:
    """Per architecture, all variants stay built so that their steps can alternate; LeNet steps are
    timed in blocks (milliseconds each), VGG/ResNet steps one at a time (seconds each on a CPU)."""
    if device.type == "cpu":
        tune_cpu_allocator()  # what train() does in every CPU run
    rows: list[Row] = []
    for arch in archs:
        small = arch.startswith("lenet")
        batch = 128 if small or not quick else 8
        block = (2 if quick else SMALL_STEP_BLOCK) if small else 1
        n_rounds = rounds or (1 if quick else DEFAULT_ROUNDS["step_small" if small else "step_large"])
        variants = {"dense": None} | {f"dwf D={d}": d for d in DEPTHS}
        modes = [False, True] if compiled else [False]
        contenders: dict[str, Callable[[], None]] = {}
        warmup_s: dict[str, float] = {}
        for mode in modes:
            for name, depth in variants.items():
                key = name + (" compiled" if mode else "")
                step = make_step(arch, depth, device, batch, compiled=mode)
                began = time.perf_counter()
                step()  # first-call costs (allocation, kernel selection, compilation) stay out
                step()
                sync(device)
                warmup_s[key] = time.perf_counter() - began

                def block_of(step=step):
                    for _ in range(block):
                        step()

                contenders[key] = block_of
        seconds = interleave(contenders, n_rounds, device)
        case = f"{arch} {'x'.join(map(str, STEP_ARCHS[arch][0]))}, batch {batch}"
        for mode in modes:
            suffix = " compiled" if mode else ""
            for name, depth in variants.items():
                key = name + suffix
                ratio = paired_ratio(seconds[key], seconds["dense" + suffix])
                target, met = judge(ratio, STEP_TARGETS.get((arch, depth)) if not quick else None, False, device)
                note = f"block of {block} steps" if block > 1 else ""
                if mode:
                    eager = paired_ratio(seconds[name], seconds[key])
                    vs_dense = paired_ratio(seconds[key], seconds["dense"])
                    note = (f"{note}; eager/compiled {eager:.2f}x; this / eager dense {vs_dense:.2f}; "
                            f"compile + 2 warm-up steps {warmup_s[key]:.1f} s").lstrip("; ")
                rows.append(make_row("step", case, key, "s/step", seconds[key], per=block, ratio=ratio,
                                 ratio_of=f"this / dense{suffix}", target=target, met=met, device=str(device),
                                 threads=torch.get_num_threads(), note=note))
        del contenders
    return rows
