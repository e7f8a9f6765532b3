"""``python -m benchmark data``: where datasets are found, and the explicit download step."""

from __future__ import annotations

import sys

from benchmark.engine import data as data_mod


def add_commands(sub) -> None:
    p = sub.add_parser("data",
                       description="Datasets are searched in --data-dir, then $BENCHMARK_DATA (each the folder "
                                   "itself or torchvision's layout below it), ./data, then system locations such "
                                   "as /usr/share/datasets/fashion-mnist. Downloads happen only through 'fetch'.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    names_help = f"dataset(s): {', '.join(data_mod.DATASETS)}"

    check_help = "print where each dataset is found; exit 1 if a named one is missing or corrupt"
    c = actions.add_parser("check", help=check_help, description=check_help)
    c.add_argument("names", nargs="*", metavar="NAME", help=names_help + " (default: all)")
    c.add_argument("--data-dir", help="dataset folder searched first (default: $BENCHMARK_DATA, ./data, system)")
    c.add_argument("--verify", action="store_true",
                   help="also decode every file and print the split sizes (Tiny ImageNet: slow the first time)")
    c.set_defaults(handler=check)

    fetch_help = "download datasets through torchvision (Tiny ImageNet: the official archive); needs internet"
    f = actions.add_parser("fetch", help=fetch_help, description=fetch_help)
    f.add_argument("names", nargs="+", metavar="NAME", help=names_help)
    f.add_argument("--data-dir", help="folder to download into (default: $BENCHMARK_DATA or ./data)")
    f.set_defaults(handler=fetch)

    p.set_defaults(handler=lambda args: p.print_help() or 2)


def check(args) -> int:
    """Named datasets must be usable (exit 1 otherwise); without names, report all and exit 0."""
    from pathlib import Path

    if args.data_dir and not Path(args.data_dir).expanduser().is_dir():
        raise ValueError(f"--data-dir {args.data_dir}: no such folder (leave it out to search $BENCHMARK_DATA, ./data "
                         f"and system locations; 'data fetch NAME --data-dir DIR' creates it)")
    failed = 0
    for name in args.names or list(data_mod.DATASETS):
        data_mod.get_spec(name)
        try:
            folder = data_mod.locate(name, args.data_dir)
            detail = ""
            if args.verify:
                data = data_mod.load(name, args.data_dir)
                detail = f"  (train {len(data.train)}, test {len(data.test)}, {data.spec.num_classes} classes)"
            print(f"{name:14s} {folder}{detail}")
        except data_mod.DatasetMissing as exc:
            if args.names:
                print(f"{name:14s} missing\n{exc}", file=sys.stderr)
                failed += 1
            else:
                print(f"{name:14s} missing (fetch: {data_mod.fetch_command(name, args.data_dir)})")
        except data_mod.DatasetCorrupt as exc:
            print(f"{name:14s} corrupt: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def fetch(args) -> int:
    for name in args.names:
        data_mod.get_spec(name)
        try:
            print(f"{name}: {data_mod.fetch(name, args.data_dir)}")
        except data_mod.FetchFailed as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
    return 0
