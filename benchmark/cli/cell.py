"""``python -m benchmark cell``: run one cell in this process and print its records."""

from __future__ import annotations

import argparse
import json
import sys

from benchmark.core import cell_progress
from benchmark.engine import data as data_mod
from benchmark.engine import models


def parse_assignments(items: list[str] | None, flag: str = "--set") -> dict[str, str]:
    """``["k=v", ...]`` -> dict, with an error that names a malformed item."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def add_common_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder holding datasets (default: $BENCHMARK_DATA, ./data, system locations)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (cuda > mps > cpu); default auto")


def add_commands(sub) -> None:
    from benchmark.core.method import all_methods

    p = sub.add_parser(
        "cell",
        description="Train and evaluate one cell here and print its result records (one per line with "
                    "--json). Parameters not given use the architecture's default schedule and the method's "
                    "defaults (see 'python -m benchmark list'), and what the method fills in for the architecture, "
                    "as a grid does (DWF's and L1's calibrated learning rate: docs/methods.md).",
    )
    p.add_argument("method", choices=sorted(all_methods()), help="method name")
    p.add_argument("--arch", required=True, choices=list(models.MODELS), help="architecture")
    p.add_argument("--dataset", required=True, choices=list(data_mod.DATASETS), help="dataset")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and pruning scores (default 0)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the architecture's schedule)")
    p.add_argument("--lr", type=float, help="the schedule's learning rate (default: the architecture's); a method "
                                            "with its own lr parameter trains at that: --set lr=... (docs/methods.md)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the architecture's schedule)")
    p.add_argument("--weight-decay", type=float, help="weight decay of unregularized methods' weights")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    p.add_argument("--subset", type=int, help="use only the first N examples of each split (quick checks)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method parameter, e.g. --set depth=3 --set lam=1e-4; repeatable")
    add_common_io(p)
    p.add_argument("--cache-dir", default="results/cache", help="where the shared dense trainings are cached (default results/cache)")
    p.add_argument("--work-dir", default="results/work", help="per-cell checkpoints, removed when the cell ends (default results/work)")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (speed only; the record says compiled=true)")
    p.add_argument("--deterministic", action="store_true",
                   help="GPU-only: cuDNN and cuBLAS use reproducible kernels (torch.use_deterministic_algorithms, "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8), so a GPU run repeats bit for bit, somewhat slower; records "
                        "say deterministic=true. No effect on a CPU (its training is deterministic already); "
                        "cell ids do not change")
    p.add_argument("--stall-timeout", type=float, default=cell_progress.DEFAULT_STALL_S, metavar="SECONDS",
                   help=f"how long to wait on a holder of the dense-model lock (another cell training the same "
                        f"dense model) that makes no progress before training it here (default "
                        f"{cell_progress.DEFAULT_STALL_S:g})")
    p.add_argument("--json", action="store_true", help="print each record as one JSON line instead of a summary")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run_command)


def run_command(args) -> int:
    from pathlib import Path

    from benchmark.core.method import with_defaults
    from benchmark.execution.cell import Cell, run_cell
    from benchmark.engine.devices import pick_device

    if args.data_dir and not Path(args.data_dir).expanduser().is_dir():
        raise ValueError(f"--data-dir {args.data_dir}: no such folder. Datasets are searched there first; fix the "
                         f"path, or leave --data-dir out to search $BENCHMARK_DATA, ./data and system locations")
    pick_device(args.device)  # a device that is not here: a message before anything is built
    if (stall := cell_progress.stall_problem(args.stall_timeout)) is not None:
        raise ValueError(stall)

    schedule = {k: v for k, v in {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                                  "weight_decay": args.weight_decay, "momentum": args.momentum}.items() if v is not None}
    # what the method fills in on this architecture (a calibrated learning rate) is part of the cell, as in a grid
    params = with_defaults(args.method, args.arch, parse_assignments(args.set))
    cell = Cell.make(args.method, args.arch, args.dataset, args.seed, params, schedule, args.subset)
    if args.compile:
        from benchmark.engine.devices import check_compile, pick_device

        check_compile(pick_device(args.device))
    records = run_cell(cell, data_dir=args.data_dir, device=args.device, work_root=args.work_dir,
                       cache_dir=args.cache_dir, progress=False if args.no_progress else None, compiled=args.compile,
                       deterministic=args.deterministic, stall_s=args.stall_timeout)
    for record in records:
        if args.json:
            print(json.dumps(record))
        else:
            print(summary_line(record))
    failed = [r for r in records if r["status"] != "ok"]
    for r in failed:
        print(f"{r['status']}: {r.get('error')}", file=sys.stderr)
    return 1 if failed else 0


def summary_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['method']} {r['arch']}/{r['dataset']} seed={r['seed']}: {r['status']}"
    level = f" level={r['level']}" if r.get("level") is not None else ""
    return (f"{r['method']}{level} {r['arch']}/{r['dataset']} seed={r['seed']}: test_acc={r['test_acc']:.4f} "
            f"cr={r['cr']:.2f} cr_effective={r['cr_effective']:.2f} cr_total={r['cr_total']:.2f} "
            f"speedup={r['speedup']:.2f} epochs={r['epochs']} wall_s={r['wall_s']:.1f} device={r['device']}")
