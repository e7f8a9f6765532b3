"""``python -m benchmark perf``: flags in, the benchmarks of ``benchmark.speed.perf`` run, one table out.

``--help`` describes each benchmark in a user's words (``DESCRIPTION``); the package's docstring says
the same for whoever works on it, naming the code each one goes through.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from benchmark.engine.devices import check_compile, pick_device
from benchmark.speed import perf
from benchmark.speed.perf import DEFAULT_ROUNDS, LIMIT_ARCHS, PACK_SIZES, SMALL_STEP_BLOCK, STEP_ARCHS, WHATS, Row


#: What ``perf --help`` says: what each benchmark compares and its target, no module paths.
DESCRIPTION = """\
The speed claims of this project, measured as ratios on this machine:

- data: one LeNet-300-100 / Fashion-MNIST training epoch with the suite's tensor-resident batches
  against a plain torchvision DataLoader loop training the same model the same way.
  Target on CPU: ours >= 8x faster.
- step: one training step (forward, backward, optimizer; batch 128) of DWF depth 2, 3 and 4 against
  the dense model, for every architecture, built as a real run builds them. Targets on CPU: <= 1.15x
  for VGG-16 and ResNet-18, <= 1.6x for LeNet-300-100 at depth 4.
- grid: cells per hour of a small grid with --jobs 1 and 2, and each worker's peak memory.
- pack: packed training (run --pack) against one model at a time, per pack size (1, 8, 16, 64), for
  dense and DWF D=3 LeNet-300-100 and SynFlow LeNet-5, timed as 'run --pack auto' calibrates.
  Printed as one N.NNx per line (cells per hour packed / one at a time).
- grid-pack (not part of all: it runs a whole grid twice per round; the quick grid took 33 minutes on
  2 cores): cells per hour of a grid with 'run --pack auto' against '--pack off', same --jobs, each
  in a fresh results folder, and the largest accuracy and CR differences between the two runs.
  Target on CPU: auto >= off (1.00x).

Machines are often shared, so each comparison alternates its contenders round by round in one
process and reports medians of the ratios within a round: load that comes and goes hits every
contender alike. CPU runs tune glibc's allocator first, as every CPU training run does
(BENCHMARK_NO_MALLOC_TUNING=1 measures without it).
"""


def add_commands(sub) -> None:
    p = sub.add_parser("perf", formatter_class=argparse.RawDescriptionHelpFormatter, description=DESCRIPTION)
    p.add_argument("what", nargs="?", default="all", choices=[*WHATS, "grid-pack", "all"],
                   help="data: our epoch vs a torchvision DataLoader epoch; step: DWF D=2/3/4 vs dense step time "
                        "per architecture; grid: cells per hour with --jobs 1 and 2 and peak memory per worker; "
                        "pack: packed training vs one model at a time per pack size; limit: each model's step against "
                        "its arithmetic limit here, float32 per memory layout and bf16 where the CPU has it; "
                        "all: the five (default); "
                        "grid-pack: a whole grid with --pack auto vs --pack off (long: not part of all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (cuda > mps > cpu); default auto")
    p.add_argument("--out", type=Path,
                   help="CSV file for the table (default results/perf/perf-<what>.csv)")
    p.add_argument("--repeats", type=int,
                   help=f"interleaved rounds per comparison (default: data {DEFAULT_ROUNDS['data']}, step "
                        f"{DEFAULT_ROUNDS['step_small']} blocks of {SMALL_STEP_BLOCK} steps for LeNets and "
                        f"{DEFAULT_ROUNDS['step_large']} single steps for VGG/ResNet, grid and grid-pack {DEFAULT_ROUNDS['grid']})")
    p.add_argument("--compile", action="store_true",
                   help="step: also time torch.compile'd models (ratio to the compiled dense model and the "
                        "eager/compiled speedup); compiling VGG/ResNet takes minutes on a small CPU")
    p.add_argument("--archs",
                   help=f"step, limit: comma-separated architectures (default: step {','.join(STEP_ARCHS)}, "
                        f"limit {','.join(LIMIT_ARCHS)})")
    p.add_argument("--grid", help="grid, grid-pack: preset name or TOML file to run (default: smoke for grid, "
                                  "quick for grid-pack; with --quick, a built-in three-cell grid)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="grid-pack: worker processes of both runs, as 'run --jobs' (default: 2, or 1 on one core)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads for data and step (default: torch's choice, usually the core "
                        "count); grid workers always get cores/jobs each, as 'run' gives them")
    p.add_argument("--sizes", help=f"pack: comma-separated pack sizes (default {','.join(map(str, PACK_SIZES))}; "
                                   f"with --quick 2)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings to check that everything runs (tests): 2000 examples, one round, batch 8 "
                        "for VGG/ResNet, a three-cell grid; ratios are not meaningful and targets are not judged")
    p.set_defaults(handler=perf_command)


def perf_command(args) -> int:
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: must be >= 1")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    archs = [a.strip() for a in (args.archs or ",".join(STEP_ARCHS)).split(",") if a.strip()]
    unknown = [a for a in archs if a not in STEP_ARCHS]
    if unknown or not archs:
        raise ValueError(f"--archs: unknown {unknown}; choose from {', '.join(STEP_ARCHS)}")
    sizes = (2,) if args.quick else PACK_SIZES
    if args.sizes is not None:
        try:
            sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--sizes {args.sizes!r}: give comma-separated pack sizes >= 1, e.g. 1,8,16")
    device = pick_device(args.device)
    if args.compile and args.what in ("step", "all"):
        check_compile(device)
    whats = list(WHATS) if args.what == "all" else [args.what]
    out = args.out or Path("results") / "perf" / f"perf-{args.what}.csv"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    cores = os.cpu_count() or 1
    print(f"perf {args.what} on {device} ({perf.machine_name(device)}): torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{cores} cores, load average {load:.1f}")
    if load > cores:
        print(f"note: this machine is busy (load {load:.1f} on {cores} cores); times are inflated, and contenders "
              f"are interleaved so that the ratios stay comparable", file=sys.stderr)
    rows: list[Row] = []
    for what in whats:
        began = time.perf_counter()
        if what == "data":
            rows += perf.bench_data(device, args.repeats or (1 if args.quick else DEFAULT_ROUNDS["data"]), args.quick)
        elif what == "step":
            rows += perf.bench_step(device, args.repeats, args.quick, archs, args.compile)
        elif what == "limit":
            limit_archs = archs if args.archs else list(LIMIT_ARCHS)
            rows += perf.bench_limit(device, args.repeats, args.quick, limit_archs)
        elif what == "pack":
            rows += perf.bench_pack(device, args.repeats or (1 if args.quick else DEFAULT_ROUNDS["pack"]), args.quick, sizes)
        elif what == "grid-pack":
            rows += perf.bench_grid_pack(device, args.repeats or DEFAULT_ROUNDS["grid-pack"], args.quick, args.grid, args.jobs)
        else:
            rows += perf.bench_grid(device, args.repeats or DEFAULT_ROUNDS["grid"], args.quick, args.grid)
        print(f"[{what}: {time.perf_counter() - began:.0f} s]", file=sys.stderr)
    print(perf.format_table(rows))
    perf.write_csv(rows, out)
    print(f"table written to {out}")
    misses = [r for r in rows if r.met == "no"]
    if misses:
        print("targets missed: " + "; ".join(f"{r.case} {r.variant} {r.ratio:.2f} ({r.target})" for r in misses))
    return 0
