"""``perf pack``: packed training (``run --pack``) against one model at a time, per pack size, through
the code ``--pack auto`` calibrates with (``benchmark.execution.packing.calibration.measure``), with the
hardware's limit on what packing can gain.
"""

from __future__ import annotations

import statistics

import torch

from benchmark.speed.arithmetic import matmul_rate, step_flops
from benchmark.speed.perf.rows import Row, make_row
from methods import structures

#: (what is printed, architecture, input shape, classes, structure of methods.structures): the issue's cases.
PACK_CASES = [("dense LeNet-300-100", "lenet300", (1, 28, 28), 10, structures.DENSE),
              ("DWF D=3 LeNet-300-100", "lenet300", (1, 28, 28), 10, structures.factorized(3)),
              ("SynFlow LeNet-5", "lenet5", (1, 28, 28), 10, structures.MASKED)]
PACK_SIZES = (1, 8, 16, 64)


def bench_pack(device: torch.device, rounds: int, quick: bool, sizes: tuple[int, ...]) -> list[Row]:
    """Per case and pack size, one step of the pack against the same steps one model at a time,
    alternating rounds (``packing.calibration.measure``); prints one ratio per line as it goes. Per case it
    also prints the hardware's limit: one model's step against its weight layers' FLOPs at the
    device's large-matmul rate. Packing only removes what a step spends beyond that arithmetic
    (per-op launches, small-kernel inefficiency), so no pack can be faster than the limit."""
    from benchmark.execution.packing.calibration import measure

    rows = []
    batch = 16 if quick else 128
    rate = matmul_rate(device)
    for label, arch, shape, classes, kind in PACK_CASES:
        flops = step_flops(arch, shape, classes, batch)
        case_rows, step_seconds = [], []
        for size in sizes:
            result = measure(arch, shape, classes, kind, size, batch, device, rounds)
            print(f"{label}, pack of {size}: {result['ratio']:.2f}x", flush=True)
            case_rows.append(make_row("pack", f"{label}, batch {batch}", f"pack of {size}", "s/step", result["packed_rounds"],
                                  ratio=result["ratio"], ratio_of="one at a time / packed, same steps",
                                  device=str(device), threads=torch.get_num_threads(),
                                  note=f"one at a time {result['sequential_s'] * 1e3:.1f} ms per {size} steps"))
            step_seconds.append(result["sequential_s"] / size)
        step_s = statistics.median(step_seconds)
        limit = step_s / (flops / rate)
        print(f"{label}: one step {step_s * 1e3:.2f} ms, its {flops / 1e6:.0f} MFLOP take {flops / rate * 1e3:.2f} ms "
              f"at {device.type}'s best matmul rate, {rate / 1e9:.0f} GFLOP/s: packing can gain at most about {limit:.2f}x "
              f"(hardware limit)", flush=True)
        for row in case_rows:
            row.note += f"; hardware limit {limit:.2f}x ({flops / 1e6:.0f} MFLOP per step at {rate / 1e9:.0f} GFLOP/s)"
        rows += case_rows
    return rows
