"""Grids as data: TOML files (presets shipped in ``benchmark/presets/``, or any file by path).

A grid is a list of experiments; each crosses its architectures, datasets, seeds and method
entries. A method entry is a table (or an array of tables) of parameters; list values are crossed,
scalars are fixed. Top-level ``seeds``, ``schedule`` and ``subset`` are defaults for every
experiment; an experiment's ``schedule`` is laid over the architecture's default schedule::

    description = "..."
    seeds = [0]

    [[experiment]]
    archs = ["lenet300"]
    datasets = ["fashion-mnist"]
    schedule = { epochs = 20 }
    [experiment.methods.dense]
    [[experiment.methods.dwf]]
    depth = [2, 3, 4]
    lam = [1e-4, 1e-3]

``include = ["lenet", "path/other.toml"]`` adds the cells of other grids (presets or files).
Validation collects every problem (unknown names, wrong types, impossible values) with its line
before anything trains.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from benchmark.cell import Cell

GRID_KEYS = {"description", "seeds", "schedule", "subset", "experiment", "include"}
EXPERIMENT_KEYS = {"archs", "datasets", "seeds", "schedule", "subset", "methods", "name"}


class GridError(ValueError):
    """Everything wrong with a grid file, one problem per line."""


@dataclass
class Grid:
    name: str
    description: str
    cells: list[Cell]
    source: str


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _presets().iterdir() if p.name.endswith(".toml"))


def _presets():
    return resources.files("benchmark").joinpath("presets")


def grid_source(name_or_path: str) -> tuple[str, str, str]:
    """(grid name, TOML text, where it came from) for a preset name or a file path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"grid file {name_or_path} does not exist")
        return path.stem, path.read_text(), str(path)
    if name_or_path in preset_names():
        text = _presets().joinpath(f"{name_or_path}.toml").read_text()
        return name_or_path, text, f"preset {name_or_path!r}"
    raise ValueError(f"unknown grid {name_or_path!r}: not a preset ({', '.join(preset_names())}) and not a file")


def load_grid(name_or_path: str) -> Grid:
    name, text, source = grid_source(name_or_path)
    return parse_grid(text, name, source)


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """Line of each ``key =`` under each table header, with array-of-table indices, e.g.
    ('experiment[1].methods.dwf[0]', 'lam') -> 17. Good enough to point at a grid's problems."""
    lines: dict[tuple[str, str], int] = {}
    counters: dict[str, int] = {}
    table = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        header = re.fullmatch(r"\[\[\s*([^\]]+?)\s*\]\]", line) or re.fullmatch(r"\[\s*([^\]]+?)\s*\]", line)
        if header:
            parts = header.group(1).split(".")
            resolved = []
            for i, part in enumerate(parts):
                prefix = ".".join(resolved + [part])
                is_last = i == len(parts) - 1
                if is_last and line.startswith("[["):
                    counters[prefix] = counters.get(prefix, -1) + 1
                    resolved.append(f"{part}[{counters[prefix]}]")
                elif prefix in counters:
                    resolved.append(f"{part}[{counters[prefix]}]")
                else:
                    resolved.append(part)
            table = ".".join(resolved)
            lines[(table, "")] = lineno
            continue
        key = re.match(r"([A-Za-z0-9_\-]+)\s*=", line)
        if key:
            lines.setdefault((table, key.group(1)), lineno)
    return lines


def parse_grid(text: str, name: str = "grid", source: str = "<text>") -> Grid:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{source}: not valid TOML: {exc}") from None
    lines = _key_lines(text)
    problems: list[str] = []

    def where(table: str, key: str = "") -> str:
        line = lines.get((table, key)) or lines.get((table, ""))
        return f"{source}:{line}" if line else source

    for key in sorted(set(raw) - GRID_KEYS):
        problems.append(f"{where('', key)}: unknown key {key!r}; allowed: {sorted(GRID_KEYS)}")
    experiments = raw.get("experiment", [])
    includes = raw.get("include", [])
    if not isinstance(experiments, list) or not (experiments or includes):
        problems.append(f"{source}: a grid needs at least one [[experiment]] table or an include list")
        experiments = []
    cells: dict[str, Cell] = {}
    for included in includes if isinstance(includes, list) else [includes]:
        try:
            for cell in load_grid(str(included)).cells:
                cells.setdefault(cell.id, cell)
        except (ValueError, FileNotFoundError) as exc:
            problems.append(f"{where('', 'include')}: include {included!r}: {exc}")
    for i, exp in enumerate(experiments):
        table = f"experiment[{i}]"
        for key in sorted(set(exp) - EXPERIMENT_KEYS):
            problems.append(f"{where(table, key)}: unknown key {key!r} in experiment; allowed: {sorted(EXPERIMENT_KEYS)}")
        seeds = exp.get("seeds", raw.get("seeds", [0]))
        schedule = {**raw.get("schedule", {}), **exp.get("schedule", {})}
        subset = exp.get("subset", raw.get("subset"))
        lists = {}
        for key, value in (("archs", exp.get("archs")), ("datasets", exp.get("datasets")), ("seeds", seeds)):
            if not isinstance(value, list) or not value:
                problems.append(f"{where(table, key)}: {key} must be a non-empty list, got {value!r}")
                value = []
            lists[key] = value
        methods = exp.get("methods", {})
        if not isinstance(methods, dict) or not methods:
            problems.append(f"{where(table, 'methods')}: experiment has no [experiment.methods.NAME] tables")
            methods = {}
        for method, entries in methods.items():
            entries = entries if isinstance(entries, list) else [entries]
            for j, entry in enumerate(entries):
                entry_table = f"{table}.methods.{method}" + (f"[{j}]" if isinstance(methods[method], list) else "")
                if not isinstance(entry, dict):
                    problems.append(f"{where(entry_table)}: method {method!r} must be a table of parameters")
                    continue
                keys = list(entry)
                values = [v if isinstance(v, list) else [v] for v in entry.values()]
                for combo in itertools.product(*values) if keys else [()]:
                    params = dict(zip(keys, combo))
                    for arch, dataset, seed in itertools.product(lists["archs"], lists["datasets"], lists["seeds"]):
                        try:
                            cell = Cell.make(method, arch, dataset, seed, params, schedule, subset)
                        except (ValueError, TypeError) as exc:
                            bad_key = next((k for k in keys if k in str(exc)), "")
                            loc = where(entry_table, bad_key) if bad_key else where(table)
                            problems.append(f"{loc}: {exc}")
                            continue
                        cells.setdefault(cell.id, cell)
    if problems:
        unique = list(dict.fromkeys(problems))
        raise GridError(f"grid {name!r} has {len(unique)} problem(s):\n  " + "\n  ".join(unique))
    return Grid(name, raw.get("description", ""), list(cells.values()), source)


def filter_cells(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """Keep cells matching every ``key=value[,value]`` filter (method, arch, dataset, seed or any
    method parameter). A key no cell has is an error, so a typo does not silently select nothing."""
    if not only:
        return cells
    filters = {}
    for item in only:
        key, sep, values = item.partition("=")
        if not sep:
            raise ValueError(f"--only {item!r} is not key=value[,value]")
        filters[key.strip()] = [v.strip() for v in values.split(",")]
    known = {"method", "arch", "dataset", "seed"} | {k for c in cells for k in _columns(c)}
    unknown = sorted(set(filters) - known)
    if unknown:
        raise ValueError(f"--only: unknown key(s) {unknown}; use one of {sorted(known)}")
    return [c for c in cells if all(_matches(_columns(c).get(k), vs) for k, vs in filters.items())]


def _columns(cell: Cell) -> dict:
    from dataclasses import asdict

    return {"method": cell.method, "arch": cell.arch, "dataset": cell.dataset, "seed": cell.seed,
            **asdict(cell.method_params)}


def _matches(value, wanted: list[str]) -> bool:
    for w in wanted:
        if str(value) == w:
            return True
        try:
            if value is not None and float(value) == float(w):
                return True
        except (TypeError, ValueError):
            pass
    return False


def with_seeds(cells: list[Cell], seeds: list[int] | None) -> list[Cell]:
    """Replace every cell's seed by each of ``seeds`` (the --seeds flag)."""
    if not seeds:
        return cells
    out: dict[str, Cell] = {}
    for cell in cells:
        for seed in seeds:
            new = Cell(cell.method, cell.arch, cell.dataset, seed, cell.params, cell.schedule, cell.subset)
            out.setdefault(new.id, new)
    return list(out.values())
