"""``perf grid-pack``: cells per hour of a whole grid with ``run --pack auto`` against ``--pack off``,
same ``--jobs``, each in a fresh results folder so ``auto`` pays its calibration, plus the largest
accuracy and CR differences between the two runs' records.
"""

from __future__ import annotations

import math
import os
import statistics

import torch

from benchmark.engine.timing import paired_ratio
from benchmark.speed.perf.grid import grid_to_run, run_grid_child
from benchmark.speed.perf.rows import Row, judge, make_row

GRID_PACK_TARGET = 1.0  # issue 15 on CPU: auto is never slower than off on the quick grid


def largest_differences(off: dict, auto: dict) -> tuple[float, float, int]:
    """Largest |test accuracy difference| (points) and |relative CR difference| between the two runs'
    records of each cell, and how many records were compared (float32 packs sum in another order)."""
    acc, cr, compared = 0.0, 0.0, 0
    for cell_id, records in off.items():
        for (acc_off, cr_off, _), (acc_auto, cr_auto, _) in zip(records, auto.get(cell_id, [])):
            if None in (acc_off, acc_auto, cr_off, cr_auto):
                continue
            compared += 1
            acc = max(acc, abs(acc_off - acc_auto) * 100)
            if math.isfinite(cr_off) and math.isfinite(cr_auto) and cr_off > 0:
                cr = max(cr, abs(cr_auto - cr_off) / cr_off)
    return acc, cr, compared


def bench_grid_pack(device: torch.device, rounds: int, quick: bool, grid: str | None, jobs: int) -> list[Row]:
    """The whole grid, each round once with ``--pack off`` and once with ``--pack auto`` (order
    reversed every other round), each in a fresh results folder so ``auto`` pays its calibration.
    The ratio is cells per hour auto / off: what packing buys a user on this device, all costs in."""
    with grid_to_run(grid, quick, "quick") as (grid, loaded):
        runs: dict[str, list[dict]] = {"off": [], "auto": []}
        for r in range(rounds):
            for mode in ("off", "auto") if r % 2 == 0 else ("auto", "off"):
                result = run_grid_child(grid, jobs, str(device), pack=mode)
                runs[mode].append(result)
                print(f"grid {loaded.name}, --jobs {jobs} --pack {mode}: {result['seconds']:.0f} s for "
                      f"{result['cells']} cells", flush=True)
    per_cell = {mode: [run["seconds"] / max(1, run["cells"]) for run in done] for mode, done in runs.items()}
    ratio = paired_ratio(per_cell["off"], per_cell["auto"])
    target, met = judge(ratio, None if quick else GRID_PACK_TARGET, True, device)
    acc, cr, compared = largest_differences(runs["off"][-1]["records"], runs["auto"][-1]["records"])
    packed = sorted({size for records in runs["auto"][-1]["records"].values() for *_, size in records})
    rows = []
    for mode in ("off", "auto"):
        bad = sum(run["failed"] + run["blocked"] for run in runs[mode])
        note = f"{bad} failed/blocked cell runs; " if bad else ""
        if mode == "auto":
            note += (f"pack sizes {packed}; against off, {compared} records: test accuracy within {acc:.2f} "
                     f"points, CR within {cr:.2%}")
        rows.append(make_row("grid-pack", f"grid {loaded.name}, {len(loaded.cells)} cells, --jobs {jobs}",
                         f"--pack {mode}", "s/cell", per_cell[mode],
                         ratio=paired_ratio(per_cell["off"], per_cell[mode]), ratio_of="cells per hour / --pack off",
                         cells_per_hour=3600 / statistics.median(per_cell[mode]), device=str(device),
                         threads=max(1, (os.cpu_count() or 1) // jobs),
                         target=target if mode == "auto" else "", met=met if mode == "auto" else "", note=note))
    print(f"grid {loaded.name}: --pack auto / --pack off: {ratio:.2f}x", flush=True)
    return rows
