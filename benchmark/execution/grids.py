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

``include = ["lenet", "path/other.toml"]`` adds the cells of other grids (presets or files);
an item ``{ grid = "lenet-reference", datasets = ["mnist", "kmnist"] }`` adds them on other datasets.
Validation collects every problem (unknown names, wrong types, impossible values) with its line
before anything trains.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from benchmark.core import method as method_base
from benchmark.execution import tuning
from benchmark.execution.cell import Cell, canonical_json

GRID_KEYS = {"description", "seeds", "schedule", "subset", "experiment", "include"}
EXPERIMENT_KEYS = {"archs", "datasets", "seeds", "schedule", "subset", "methods", "name", "tune"}


class GridError(ValueError):
    """Everything wrong with a grid file, one problem per line."""


@dataclass
class Grid:
    name: str
    description: str
    cells: list[Cell]  # the cells whose settings are fixed (every cell when nothing is tuned)
    source: str
    #: Curves whose setting is chosen on the validation split first (``benchmark.execution.tuning``).
    tune_groups: list[tuning.TuneGroup] = field(default_factory=list)

    def final_templates(self) -> list[Cell]:
        """The tuned curves' cells as the grid wrote them (before their pick)."""
        return [cell for group in self.tune_groups for cell in group.finals]


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


def grid_folder(name_or_path: str, reading: bool = False) -> str:
    """The results folder a ``--grid`` value names, the same for every command: a grid file's name
    without ``.toml`` (``run --grid my/grid.toml`` writes ``<results-dir>/grid/``), a preset's name.
    For commands that only read results (``collect``, ``plot``, ``report``, with ``reading``) any
    other value is taken as the folder's name, so ``plot --grid grid`` still reads that run (and a
    missing folder is reported by the reader, with the command that makes it)."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        return path.stem
    if reading or name_or_path in preset_names():
        return name_or_path
    raise ValueError(f"unknown grid {name_or_path!r}: not a preset ({', '.join(preset_names())}) and not a grid file")


def load_grid(name_or_path: str, _chain: tuple[str, ...] = ()) -> Grid:
    name, text, source = grid_source(name_or_path)
    base = Path(name_or_path).resolve().parent if source == str(Path(name_or_path)) else None
    return parse_grid(text, name, source, _chain=_chain or (_identity(name_or_path, source),), base=base)


def _from_base(included: str, base: Path | None) -> str:
    """An include as the including file means it: a file path relative to that file's folder (so a
    grid means the same from any working directory); a preset name as it is."""
    if base is None or included in preset_names() or Path(included).is_absolute():
        return included
    return str(base / included)


def _identity(name_or_path: str, source: str) -> str:
    """What makes two includes the same grid: the resolved file, or the preset's name."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.is_file() else source


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


INCLUDE_KEYS = {"grid", "datasets"}


def _include_entry(entry, problems: list[str], where: str) -> tuple[str | None, list[str] | None]:
    """(grid, datasets or None) of one ``include`` item: a grid's name or file, or a table
    ``{ grid = ..., datasets = [...] }`` that moves the grid's cells onto other datasets (one
    grid's settings reused on every dataset, without a copy of the file)."""
    if isinstance(entry, str):
        return entry, None
    unknown = sorted(set(entry) - INCLUDE_KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown} in an include table; allowed: {sorted(INCLUDE_KEYS)}")
    grid, datasets = entry.get("grid"), entry.get("datasets")
    if not isinstance(grid, str):
        problems.append(f"{where}: an include table needs grid = \"<preset or file>\", got {grid!r}")
        return None, None
    if datasets is not None and (not isinstance(datasets, list) or not datasets
                                 or not all(isinstance(d, str) for d in datasets)):
        problems.append(f"{where}: include {grid!r}: datasets must be a non-empty list of names, got {datasets!r}")
        return None, None
    return grid, datasets


def _on_datasets(cell: Cell, datasets: list[str] | None) -> list[Cell]:
    """The cell on each of ``datasets`` (itself when None); a bad name raises ValueError naming it."""
    if datasets is None:
        return [cell]
    return [Cell.make(cell.method, cell.arch, d, cell.seed, cell.params, cell.schedule, cell.subset) for d in datasets]


#: How deep includes may nest (a cycle is reported before this; this bounds honest nesting).
MAX_INCLUDE_DEPTH = 16


def parse_grid(text: str, name: str = "grid", source: str = "<text>", _chain: tuple[str, ...] = (),
               base: Path | None = None) -> Grid:
    """Parse and validate a grid; GridError lists every problem with its file and line."""
    from benchmark.engine import data as data_mod
    from benchmark.engine import models
    from benchmark.execution.cell import capacity_problems, cell_id, check_seed, check_subset
    from benchmark.engine.schedule import Schedule, default_schedule

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{source}: not valid TOML: {exc}") from None
    lines = _key_lines(text)
    problems: list[str] = []
    chain = _chain or (source,)

    def where(table: str, key: str = "") -> str:
        line = lines.get((table, key)) or lines.get((table, ""))
        return f"{source}:{line}" if line else source

    for key in sorted(set(raw) - GRID_KEYS):
        problems.append(f"{where('', key)}: unknown key {key!r}; allowed: {sorted(GRID_KEYS)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        problems.append(f"{where('', 'description')}: description must be text, got {description!r}")
        description = str(description)
    experiments = raw.get("experiment", [])
    includes = raw.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, (str, dict)) for i in includes):
        problems.append(f"{where('', 'include')}: include must be a list of grid names or files, or of tables "
                        f'like {{ grid = "lenet-reference", datasets = ["mnist"] }}, got {includes!r}')
        includes = []
    if not isinstance(experiments, list) or not all(isinstance(e, dict) for e in experiments):
        problems.append(f"{where('', 'experiment')}: experiment must be a list of [[experiment]] tables, "
                        f"got {experiments!r}")
        experiments = []
    if not (experiments or includes) and not problems:
        problems.append(f"{source}: a grid needs at least one [[experiment]] table or an include list")
    cells: dict[str, Cell] = {}
    groups: list[tuning.TuneGroup] = []
    for entry in includes:
        included, datasets = _include_entry(entry, problems, where('', 'include'))
        if included is None:
            continue
        target = _from_base(included, base)
        try:
            _, _, included_source = grid_source(target)
            identity = _identity(target, included_source)
            if identity in chain:
                cycle = " -> ".join([*chain, identity][chain.index(identity):])
                problems.append(f"{where('', 'include')}: include {included!r} makes a cycle ({cycle}); "
                                f"a grid cannot include itself")
                continue
            if len(chain) >= MAX_INCLUDE_DEPTH:
                problems.append(f"{where('', 'include')}: include {included!r} nests deeper than "
                                f"{MAX_INCLUDE_DEPTH} grids")
                continue
            included_grid = load_grid(target, _chain=chain + (identity,))
            for cell in included_grid.cells:
                for copy in _on_datasets(cell, datasets):
                    cells.setdefault(copy.id, copy)
            for group in included_grid.tune_groups:
                if datasets is None:
                    groups.append(group)
                else:
                    groups += tuning.build_groups(group.spec, [copy for cell in group.finals
                                                               for copy in _on_datasets(cell, datasets)])
        except (ValueError, FileNotFoundError) as exc:
            problems.append(f"{where('', 'include')}: include {included!r}: {exc}")

    top_schedule = raw.get("schedule", {})
    if not isinstance(top_schedule, dict):
        problems.append(f"{where('', 'schedule')}: schedule must be a table of settings "
                        f"(e.g. schedule = {{ epochs = 20 }}), got {top_schedule!r}")
        top_schedule = {}
    for i, exp in enumerate(experiments):
        table = f"experiment[{i}]"
        for key in sorted(set(exp) - EXPERIMENT_KEYS):
            problems.append(f"{where(table, key)}: unknown key {key!r} in experiment; allowed: {sorted(EXPERIMENT_KEYS)}")

        def names(key: str, known) -> list:
            value = exp.get(key)
            if not isinstance(value, list) or not value:
                problems.append(f"{where(table, key)}: {key} must be a non-empty list, got {value!r}")
                return []
            good = []
            for item in value:
                if isinstance(item, str) and item in known:
                    good.append(item)
                else:
                    kind = {"archs": "architecture", "datasets": "dataset"}[key]
                    problems.append(f"{where(table, key)}: unknown {kind} {item!r}; choose one of: {', '.join(known)}")
            return good

        archs = names("archs", list(models.MODELS))
        datasets = names("datasets", list(data_mod.DATASETS))
        seeds_key = "seeds" if "seeds" in exp else ""
        seeds_value = exp.get("seeds", raw.get("seeds", [0]))
        seeds_where = where(table, "seeds") if seeds_key else where("", "seeds")
        seeds = []
        if not isinstance(seeds_value, list) or not seeds_value:
            problems.append(f"{seeds_where}: seeds must be a non-empty list, got {seeds_value!r}")
        else:
            for seed in seeds_value:
                try:
                    seeds.append(check_seed(seed))
                except ValueError as exc:
                    problems.append(f"{seeds_where}: {exc}")
        subset = exp.get("subset", raw.get("subset"))
        try:
            subset = check_subset(subset)
        except ValueError as exc:
            problems.append(f"{where(table, 'subset') if 'subset' in exp else where('', 'subset')}: {exc}")
            subset = None
        exp_schedule = exp.get("schedule", {})
        schedules: dict[str, Schedule] = {}
        if not isinstance(exp_schedule, dict):
            problems.append(f"{where(table, 'schedule')}: schedule must be a table of settings "
                            f"(e.g. schedule = {{ epochs = 20 }}), got {exp_schedule!r}")
            archs = []
        else:
            schedule_where = where(table, "schedule") if "schedule" in exp else where("", "schedule")
            for arch in archs:
                try:
                    schedules[arch] = Schedule.from_dict({**asdict(default_schedule(arch)), **top_schedule,
                                                          **exp_schedule})
                except ValueError as exc:
                    problems.append(f"{schedule_where}: {exc}")
        schedule_json = {arch: canonical_json(schedule.config()) for arch, schedule in schedules.items()}
        methods = exp.get("methods", {})
        if not isinstance(methods, dict) or not methods:
            problems.append(f"{where(table, 'methods')}: experiment has no [experiment.methods.NAME] tables")
            methods = {}
        spec = None
        if "tune" in exp:
            spec = tuning.parse_spec(exp["tune"], list(methods), where(f"{table}.tune"), problems)
        tuned: dict[str, Cell] = {}
        for method, entries in methods.items():
            try:
                method_cls = method_base.get_method(method)
            except ValueError as exc:
                problems.append(f"{where(f'{table}.methods.{method}')}: {exc}")
                continue
            # a parameter the tune table chooses is not filled in: its candidates replace it
            tuned_here = {spec.parameter} if spec is not None and spec.tunes(method) and \
                tuning.target_of(method, spec.parameter) == "method" else set()
            listed = isinstance(entries, list)
            for j, entry in enumerate(entries if listed else [entries]):
                entry_table = f"{table}.methods.{method}" + (f"[{j}]" if listed else "")
                if not isinstance(entry, dict):
                    problems.append(f"{where(entry_table)}: method {method!r} must be a table of parameters, "
                                    f"got {entry!r}")
                    continue
                keys, values, empty = [], [], False
                if spec is not None and spec.tunes(method) and spec.parameter in entry \
                        and tuning.target_of(method, spec.parameter) == "method":
                    problems.append(f"{where(entry_table, spec.parameter)}: {method}.{spec.parameter} is chosen by "
                                    f"this experiment's tune table; remove it here (its candidates are in tune)")
                for key, value in entry.items():
                    if isinstance(value, list) and not value:
                        problems.append(f"{where(entry_table, key)}: {method}.{key} = [] is an empty list, which "
                                        f"crosses to no cells; give at least one value")
                        empty = True  # the other parameters are still checked, without this one
                        continue
                    keys.append(key)
                    values.append(value if isinstance(value, list) else [value])
                for combo in itertools.product(*values):
                    try:
                        params = method_base.make_params(method_cls, dict(zip(keys, combo)))
                    except method_base.ParamsError as exc:
                        for key, message in exc.problems:
                            problems.append(f"{where(entry_table, key or '')}: {message}")
                        continue
                    if empty:
                        continue
                    given = dict(zip(keys, combo))
                    per_arch = _with_arch_defaults(method_cls, archs, params, given, tuned_here)
                    for arch, dataset in itertools.product(archs, datasets):
                        arch_params, changed, changed_json = per_arch[arch]
                        too_far = capacity_problems(method, arch_params, arch, dataset, schedules.get(arch))
                        if too_far:
                            problems += [f"{where(entry_table, 'target_cr')}: {p}" for p in too_far]
                            continue
                        if arch not in schedules:
                            continue
                        schedule = schedules[arch]
                        for seed in seeds:
                            # validated above; the id from pieces computed once per combination
                            key = cell_id(method, arch, dataset, changed_json, schedule_json[arch], seed, subset)
                            into = tuned if spec is not None and spec.tunes(method) else cells
                            if key not in into:
                                into[key] = Cell.trusted(method, arch, dataset, seed, changed, schedule, subset,
                                                         arch_params, key)
        if spec is not None and tuned and not problems:
            try:
                groups += tuning.build_groups(spec, list(tuned.values()))
            except ValueError as exc:  # a candidate the method or schedule refuses
                problems.append(f"{where(f'{table}.tune', 'candidates')}: {exc}")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise GridError(f"grid {name!r} has {len(unique)} problem(s):\n  " + "\n  ".join(unique))
    if not cells and not groups:
        raise GridError(f"grid {name!r} ({source}) has no cells")
    return Grid(name, description, list(cells.values()), source, groups)


def _with_arch_defaults(method_cls, archs: list[str], params, given: dict, tuned: set[str]) -> dict[str, tuple]:
    """Per architecture, (params, non-default params, their canonical JSON) of a grid entry's
    combination, with the values the method fills in there for the parameters the entry leaves out
    (a calibrated learning rate; ``Method.default_params``), written explicitly so that they are
    part of the cell id (docs/design.md, Cells). Parameters the tune table chooses are not filled."""
    changed = method_base.non_default(params)
    as_given = (params, changed, canonical_json(changed))
    out = {}
    for arch in archs:
        filled = {name: value for name, value in method_base.fill_defaults(method_cls, arch, params, given).items()
                  if name not in tuned}
        if not filled:
            out[arch] = as_given
            continue
        arch_params = method_base.make_params(method_cls, given | filled)
        arch_changed = method_base.non_default(arch_params)
        out[arch] = (arch_params, arch_changed, canonical_json(arch_changed))
    return out


def filter_cells(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """Keep cells matching every ``key=value[,value]`` filter (method, arch, dataset, seed or any
    method parameter). A key no cell has, a value no cell has, and filters that together select
    nothing are errors, so a typo does not silently select nothing."""
    if not only:
        return cells
    filters = {}
    for item in only:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"--only {item!r} is not key=value[,value]")
        filters.setdefault(key.strip(), []).extend(v.strip() for v in values.split(","))
    columns = [_columns(c) for c in cells]
    known = {"method", "arch", "dataset", "seed"} | {k for col in columns for k in col}
    unknown = sorted(set(filters) - known)
    if unknown:
        raise ValueError(f"--only: unknown key(s) {unknown}; use one of {sorted(known)}")
    problems = []
    for key, wanted in filters.items():
        present = {col.get(key) for col in columns if key in col}
        for w in wanted:
            if not any(_matches(value, [w]) for value in present):
                shown = ", ".join(sorted(map(str, present))[:20]) + (", ..." if len(present) > 20 else "")
                problems.append(f"--only {key}={w}: no cell of this grid has {key}={w} (its values: {shown})")
    if problems:
        raise ValueError("; ".join(problems))
    kept = [c for c, col in zip(cells, columns) if all(_matches(col.get(k), vs) for k, vs in filters.items())]
    if not kept:
        raise ValueError(f"--only {' --only '.join(only)}: each filter matches some cells, but no cell matches all "
                         f"of them together")
    return kept


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
    from benchmark.execution.cell import check_seed

    if not seeds:
        return cells
    seeds = [check_seed(seed, "--seeds") for seed in seeds]
    out: dict[str, Cell] = {}
    for cell in cells:
        for seed in seeds:
            new = Cell(cell.method, cell.arch, cell.dataset, seed, cell.params, cell.schedule, cell.subset)
            out.setdefault(new.id, new)
    return list(out.values())
