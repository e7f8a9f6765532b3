"""``python -m benchmark data``: where datasets are found, and the explicit download step."""

from __future__ import annotations

import sys

from benchmark import data as data_mod


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="locate, check or fetch datasets",
                       description="Datasets are searched in --data-dir / $BENCHMARK_DATA (the folder or "
                                   "torchvision's layout below it), ./data, then system locations such as "
                                   "/usr/share/datasets/fashion-mnist. Downloads happen only through 'fetch'.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    for name, helptext in [("check", "print where each dataset is found; exit 1 if a named one is missing"),
                           ("fetch", "download datasets through torchvision into --data-dir (or ./data)")]:
        a = actions.add_parser(name, help=helptext, description=helptext)
        a.add_argument("names", nargs="*" if name == "check" else "+", metavar="NAME",
                       help=f"dataset(s): {', '.join(data_mod.DATASETS)}" + (" (default: all)" if name == "check" else ""))
        a.add_argument("--data-dir", help="dataset folder (default: $BENCHMARK_DATA or ./data)")
        a.set_defaults(handler=check if name == "check" else fetch)
    p.set_defaults(handler=lambda args: p.print_help() or 2)


def check(args) -> int:
    missing = 0
    for name in args.names or list(data_mod.DATASETS):
        data_mod.get_spec(name)
        try:
            print(f"{name:14s} {data_mod.locate(name, args.data_dir)}")
        except data_mod.DatasetMissing:
            print(f"{name:14s} missing (fetch: {data_mod.fetch_command(name, args.data_dir)})")
            missing += 1 if args.names else 0
    return 1 if missing else 0


def fetch(args) -> int:
    for name in args.names:
        data_mod.get_spec(name)
        try:
            print(f"{name}: {data_mod.fetch(name, args.data_dir)}")
        except Exception as exc:  # noqa: BLE001 - report every download problem plainly
            print(f"{name}: download failed: {exc}\nDownload the files by hand and point --data-dir at them.",
                  file=sys.stderr)
            return 1
    return 0
