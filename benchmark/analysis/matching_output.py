"""What ``match`` prints and writes: the table of gaps and extensions, and the proposed cells as a grid
file that ``include`` can add to a grid (docs/matching.md). The proposals themselves: ``matching``."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from benchmark.analysis.matching_lambda import MIN_SPLIT
from benchmark.analysis.matching_records import Match


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return "inf" if math.isinf(x) else f"{x:.4g}"


def format_match(match: Match) -> str:
    crs = ", ".join(f"{c:g}" for c in match.crs)
    lines = [f"grid {match.grid}: {match.rows} records in {match.folder}; reported CRs {crs}; "
             f"a seed needs a point within {match.ratio:g}x of each, up to chance"]
    lines += [f"note: {n}" for n in match.notes]
    lines.append("")
    if match.gaps:
        table = [("curve", "seed", "CR", "nearest", "ratio", "why", "from λ (CR)", "λ")]
        for g in sorted(match.gaps, key=lambda g: (g.label, g.seed, g.cr)):
            why = {"gap": f"gap > {match.ratio:g}x", "beyond": "past last point",
                   "below": "before first point", "pruned": "next λ prunes all"}[g.reason]
            around = " .. ".join(f"{lam:.3g} ({_num(c)})" for lam, c in g.between) if g.between else "–"
            table.append((g.label, str(g.seed), f"{g.cr:g}", _num(g.nearest), f"{g.ratio:.2f}x", why, around,
                          f"{g.proposed:g}" if g.proposed is not None else g.note or "–"))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
        lines.append("λ curves: seeds without a measured point near a reported CR")
        for r in table:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        lines.append("")
    if match.complete:
        lines.append("λ curves within " + f"{match.ratio:g}x of every reported CR (up to chance): "
                     + "; ".join(f"{label} ({n} seeds)" if n == of else f"{label} ({n} of {of} seeds; the others have no results yet)"
                                 for label, n, of in match.complete))
        lines.append("")
    if match.jumps:
        lines.append("λ curves whose only gaps are jumps no λ can split (the CR leaps between λs less than "
                     f"{100 * (MIN_SPLIT - 1):.0f}% apart, as where L1 collapses): "
                     + "; ".join(f"{label} ({n} of {of} seeds)" for label, n, of in match.jumps))
        lines.append("")
    if match.extensions:
        lines.append(f"baselines: past the largest CR within {match.reach_points:g} points of dense that a seed of a "
                     f"λ curve reaches in its panel")
        panels = defaultdict(list)
        for e in match.extensions:
            panels[(e.family.arch, e.family.dataset)].append(e)
        for (arch, dataset), exts in panels.items():
            e = exts[0]
            reach = (f"λ curves reach {_num(e.reach)} ({e.reach_by})" if e.reach > 0
                     else "no λ curve reaches past CR 1")
            tops = {x.grid_max for x in exts}
            common = tops.pop() if len(tops) == 1 else None
            top = f"; baseline grids up to target_cr {common:g}" if common is not None else ""
            lines.append(f"  {arch}/{dataset}: {reach}{top}")
            unchanged = defaultdict(list)
            prefix = f"{arch}/{dataset} "
            for e in exts:
                name = e.label[len(prefix):] if e.label.startswith(prefix) else e.label
                if e.values:
                    grid_top = f"grid up to {e.grid_max:g} " if common is None else ""
                    lines.append(f"    {name}: {grid_top}-> target_cr "
                                 + ", ".join(f"{v:g}" for v in e.values) + (f" ({e.note})" if e.note else ""))
                else:
                    unchanged[e.note].append(name + (f" (grid up to {e.grid_max:g})" if common is None else ""))
            for note, names in unchanged.items():
                lines.append(f"    nothing for {', '.join(names)}: {note}")
        lines.append("")
    added = match.added()
    if not added:
        waiting = sum(1 for g in match.gaps if g.proposed is None)
        if not match.rows:
            waiting_on = "no results to match yet"
        else:
            waiting_on = f"{waiting} gap(s) without a proposal, see above" if waiting else ""
        lines.append("nothing to add" + (f" ({waiting_on})" if waiting_on else ""))
        return "\n".join(lines)
    lines.append("to add (every value crossed with the curve's seeds):")
    total = 0
    for family, values in added.items():
        n = len(values) * len(match.seeds[family])
        total += n
        lines.append(f"  {match.labels[family]} ({family.settings()}): {family.swept} = "
                     f"[{', '.join(f'{v:g}' for v in values)}] x seeds {match.seeds[family]} = {n} cells")
    lines.append(f"{total} cells in all")
    return "\n".join(lines)


# -- the grid file --------------------------------------------------------------------------------


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} into a grid file")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) into a grid file")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _kept_defaults(family) -> dict:
    """What the grid writes for the parameters its curve leaves at their dataclass defaults where
    the method would fill them in (``lr = "schedule"``), so that the written cells join that curve."""
    from benchmark.core.method import fill_defaults, get_method, make_params

    method = get_method(family.method)
    params = dict(family.params)
    filled = fill_defaults(method, family.arch, make_params(method, params), params)
    return {name: text for name, text in method.keep_default.items() if name in filled}


def grid_text(match: Match, command: str = "") -> str:
    """The proposed cells as a grid: one experiment per curve, with its full schedule, subset,
    seeds and parameters, and the added λs or targets."""
    added = match.added()
    crs = ", ".join(f"{c:g}" for c in match.crs)
    lines = [f"# Cells proposed by `{command or f'python -m benchmark match --grid {match.grid}'}`",
             f"# (docs/matching.md): every seed of every λ curve within {match.ratio:g}x of CR {crs} up to chance,",
             f"# and the pruning baselines past the largest CR a λ curve reaches within {match.reach_points:g} points",
             "# of dense.",
             "# Each experiment repeats its curve's schedule, parameters and seeds, so these cells join that curve.",
             f"# Run them with the grid (a file with include = [\"{match.grid_arg}\", \"<this file>\"])",
             "# or on their own.",
             f"description = {_toml_value(f'Matched-CR additions to {match.grid}: {len(match.cells())} cells')}",
             ""]
    for family, values in added.items():
        lines += [f"# {match.labels[family]}", "[[experiment]]", f"archs = [{_toml_value(family.arch)}]",
                  f"datasets = [{_toml_value(family.dataset)}]", f"seeds = {_toml_value(match.seeds[family])}",
                  "schedule = { " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in asdict(family.schedule).items())
                  + " }"]
        if family.subset is not None:
            lines.append(f"subset = {family.subset}")
        lines.append(f"[experiment.methods.{_toml_key(family.method)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in family.params]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in _kept_defaults(family).items()]
        values = [int(v) if float(v).is_integer() else float(v) for v in values]  # an int fits int and float fields
        lines += [f"{family.swept} = {_toml_value(values)}", ""]
    return "\n".join(lines)


def write_grid(match: Match, path, command: str = "") -> list:
    """Write ``grid_text`` to ``path`` and check that it parses into exactly the proposed cells, none
    of them in the grid already; returns the cells."""
    from benchmark.execution.grids import load_grid

    path = Path(path)
    expected = {cell.id: cell for cell in match.cells()}
    if not expected:
        raise ValueError("nothing to add: no grid file written")
    path.write_text(grid_text(match, command), encoding="utf-8")
    try:
        got = {cell.id for cell in load_grid(str(path)).cells}
        if got != set(expected):
            raise ValueError(f"{path} does not parse into the proposed cells ({len(got ^ set(expected))} differ); "
                             f"this is a bug")
        already = got & {cell.id for cell in load_grid(match.grid_arg).cells}
        if already:
            raise ValueError(f"{path}: {len(already)} proposed cell(s) are in grid {match.grid} already; this is a bug")
    except ValueError:
        path.unlink(missing_ok=True)
        raise
    return list(expected.values())
