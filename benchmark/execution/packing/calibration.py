"""The measurement behind ``run --pack auto``: one training step of a pack against the same steps one model at a time.

It runs the real code (``benchmark.execution.packing.train.TrainingPack`` and
``benchmark.engine.train.training_step``) on stand-ins of a structure (``methods.structures``), in
alternating rounds (``benchmark.engine.timing``); ``benchmark.execution.packing.plan.calibrate``
caches its ratio, and ``perf pack`` prints it.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from benchmark.engine import models
from benchmark.engine.precision import uses_channels_last
from benchmark.engine.timing import interleave, paired_ratio
from benchmark.engine.precision import prepare_input
from benchmark.engine.devices import tune_cpu_allocator
from benchmark.engine.schedule import default_schedule
from benchmark.engine.train import make_optimizer, training_step
from benchmark.execution.packing.jobs import Job
from benchmark.execution.packing.train import TrainingPack
from methods import structures

CALIBRATION_ROUNDS = 5
#: A calibration whose warm-up round takes longer than this runs at most 3 rounds.
SLOW_ROUND_S = 2.0


def calibration_members(arch: str, in_shape, classes: int, kind: str, size: int, device: torch.device) -> list[Job]:
    """``size`` models of ``kind`` (a ``benchmark.execution.packing.plan.family``) as their cells would build them,
    each with its own λ where the family has one."""
    schedule = default_schedule(arch)
    channels_last = uses_channels_last(device, arch)
    jobs = []
    for i in range(size):
        model = models.build(arch, in_shape, classes, seed=i).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        hooks = structures.stand_in(kind, model, i)
        jobs.append(Job(model, schedule, i, Path(os.devnull), hooks, channels_last=channels_last))
    return jobs


def measure(arch: str, in_shape, classes: int, kind: str, size: int, batch: int, device: torch.device,
            rounds: int = CALIBRATION_ROUNDS) -> dict:
    """Time one step of ``size`` models packed against one step of each alone, in alternating
    rounds; ``ratio`` is the median over rounds of (one at a time) / (packed)."""
    if device.type == "cpu":
        tune_cpu_allocator()
    jobs = calibration_members(arch, in_shape, classes, kind, size, device)
    schedule = jobs[0].schedule
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(size, batch, *in_shape, generator=gen).to(device)
    ys = torch.randint(0, classes, (size, batch), generator=gen).to(device)
    channels_last = jobs[0].channels_last
    alone = [(job, make_optimizer(job.model, schedule, job.hooks)) for job in jobs]
    pack = TrainingPack(jobs, schedule)
    x_all = prepare_input(xs.flatten(0, 1), channels_last)
    y_all = ys.flatten()

    def one_at_a_time():
        for i, (job, optimizer) in enumerate(alone):
            training_step(job.model, prepare_input(xs[i], channels_last), ys[i], optimizer, job.hooks, device)

    def packed():
        pack.step(x_all, y_all, schedule.lr, device)

    contenders = {"sequential": one_at_a_time, "packed": packed}
    for fn in contenders.values():
        fn()
    began = time.perf_counter()
    for fn in contenders.values():
        fn()
    if time.perf_counter() - began > SLOW_ROUND_S:  # big models on a CPU: a few rounds tell enough
        rounds = min(rounds, 3)
    seconds = interleave(contenders, rounds, device)
    ratio = paired_ratio(seconds["sequential"], seconds["packed"])
    return {"ratio": ratio, "sequential_s": statistics.median(seconds["sequential"]),
            "packed_s": statistics.median(seconds["packed"]), "size": size, "batch": batch, "rounds": rounds,
            "sequential_rounds": seconds["sequential"], "packed_rounds": seconds["packed"]}
