"""From result records to the grid's tidy CSVs (results.csv, layers.csv, history.csv), and the curve
each record belongs to (docs/design.md, "What a run does").

Collection reads only records that passed ``records.result_problems``, so every key it indexes is
there with the type it expects; it does not check them again.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import pandas as pd

from benchmark.core.files import atomic_write_text
from benchmark.core.method import SWEEP_PARAMETERS, all_methods
from benchmark.engine.schedule import OPT_IN_DEFAULTS
from benchmark.execution import tuning

#: Record keys that are not CSV columns (nested or bulky); layers go to layers.csv.
NESTED_KEYS = ("history", "layers", "config", "traceback", "pruning_log")

#: The columns results.csv always has, in this order; other record keys follow.
CSV_COLUMNS = [
    "grid", "cell_id", "method", "variant", "family", "arch", "dataset", "seed", "depth", "lam",
    "target_cr", "level", "test_acc", "cr", "cr_total", "cr_effective", "speedup", "sparsity",
    "epochs", "wall_s", "device", "status", "error",
]

#: The CSVs ``collect`` writes into a grid's folder.
CSV_NAMES = ("results.csv", "layers.csv", "history.csv")

#: Columns of history.csv before the per-epoch metrics (one row per record x epoch).
HISTORY_KEYS = ["cell_id", "level", "variant", "method", "arch", "dataset", "seed", "depth", "lam", "target_cr"]
LAYER_COLUMNS = ["cell_id", "level", "layer", "layer_index", "kind", "numel", "nonzero", "effective", "sparsity"]


def training_cost(record: dict) -> float | None:
    """The training behind a record in dense trainings of its schedule: its epochs (every phase: a
    pruned model's dense training, fine-tuning, each lottery level) over the schedule's. Every method
    here computes with dense kernels (a mask or D factors skip no arithmetic), so this is its share of
    training FLOPs too, up to the masks' and factors' elementwise work and scoring passes (docs/recipes.md)."""
    epochs, schedule = record.get("epochs"), record.get("epochs_schedule")
    if not isinstance(epochs, (int, float)) or not isinstance(schedule, (int, float)) or not schedule > 0:
        return None
    return float(epochs) / float(schedule)


def curve_settings(record: dict) -> dict:
    """What makes a record's curve: its method's parameters (with their defaults) except the ones a
    curve sweeps (``SWEEP_PARAMETERS``), and its schedule."""
    method = all_methods().get(str(record.get("method")))
    names = [f.name for f in dataclasses.fields(method.Params)] if method is not None else []
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    params = config.get("params") if isinstance(config.get("params"), dict) else {}
    defaults = {f.name: f.default for f in dataclasses.fields(method.Params)} if method is not None else {}
    settings = {name: params.get(name, defaults.get(name)) for name in names if name not in SWEEP_PARAMETERS}
    schedule = config.get("schedule") if isinstance(config.get("schedule"), dict) else {}
    settings |= {f"schedule.{k}": v for k, v in ({**OPT_IN_DEFAULTS, **schedule}).items()}
    return settings


def distinguish_curves(rows: list[dict], records: list[dict]) -> dict[tuple, str]:
    """Give records of one label but different settings labels of their own, in place: each row's
    ``variant`` gets the settings that differ within its (arch, dataset, variant), e.g. ``gmp
    scope=global``, so that no table or figure averages two settings as one curve. Settings that
    differ only between failed records and the ``ok`` ones label just the failed ones (a tuning pick
    dropped because its training diverged, ``magnitude schedule.lr=0.8``, leaves the curve it gave way
    to its plain label, and is not counted as that curve's cells). Returns the new label of each
    renamed (cell_id, level)."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for row, record in zip(rows, records):
        groups.setdefault((row.get("arch"), row.get("dataset"), row.get("variant")), []).append((row, record))
    renamed = {}
    for pairs in groups.values():
        members = [row for row, _ in pairs]
        settings = [curve_settings(record) for _, record in pairs]
        drawn = [s for s, row in zip(settings, members) if row.get("status") == "ok"] or settings
        keys = sorted({k for s in settings for k in s})
        drawn_values = {k: {repr(s.get(k)) for s in drawn} for k in keys}
        varying = [k for k in keys if len(drawn_values[k]) > 1]
        for row, own in zip(members, settings):
            own_keys = varying + [k for k in keys if k not in varying and repr(own.get(k)) not in drawn_values[k]]
            if own_keys:
                row["variant"] = f"{row['variant']} " + " ".join(f"{k}={_short(own.get(k))}" for k in own_keys)
                renamed[(row.get("cell_id"), row.get("level"))] = row["variant"]
    return renamed


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def variant_label(record: dict) -> str:
    """The curve a record (or CSV row) belongs to, as its method labels it (``Method.curve_label``:
    ``dwf D=3``, ``magnitude +FT``, ``lottery LRR rewind=500it``); a method that is not installed
    here is labelled by its name."""
    method = str(record.get("method"))
    known = all_methods()
    return known[method].curve_label(record) if method in known else method


def tables(grid: str, results: list[dict], picks: dict[str, dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results, layers, history) of checked ``results`` as tidy DataFrames: one row per record, per
    record x layer, and per record x training epoch (the per-epoch trajectory: test accuracy, and CR
    where the method tracks it). ``picks``: the tuning columns per final cell id (``read_picks``)."""
    rows, layer_rows, history_rows, sources = [], [], [], []
    for result in results:
        for record in result["records"]:
            row = {k: v for k, v in record.items() if k not in NESTED_KEYS}
            row["grid"] = grid
            row.setdefault("cell_id", result["cell_id"])
            row["variant"] = variant_label(record)
            row.update(picks.get(row["cell_id"], {}))
            row["train_cost"] = training_cost(record)
            rows.append(row)
            sources.append(record)
            keys = {k: row.get(k) for k in HISTORY_KEYS}
            history_rows += [keys | {"step": i + 1} | epoch for i, epoch in enumerate(record.get("history") or [])]
            for index, layer in enumerate(record.get("layers") or []):
                layer_rows.append({"cell_id": row["cell_id"], "level": record.get("level"), "layer": layer["name"],
                                   "layer_index": index, "kind": layer.get("kind"), "numel": layer["numel"],
                                   "nonzero": layer["nonzero"], "effective": layer.get("effective"),
                                   "sparsity": layer.get("sparsity")})
    renamed = distinguish_curves(rows, sources)
    for entry in history_rows:
        entry["variant"] = renamed.get((entry["cell_id"], entry["level"]), entry["variant"])
    table = pd.DataFrame(rows)
    for col in CSV_COLUMNS:
        if col not in table:
            table[col] = None
    table = table[CSV_COLUMNS + sorted(c for c in table.columns if c not in CSV_COLUMNS)]
    if len(table):
        table = table.sort_values(["arch", "dataset", "variant", "seed", "cr"], na_position="last",
                                  kind="stable").reset_index(drop=True)
    layers = pd.DataFrame(layer_rows, columns=LAYER_COLUMNS)
    history = pd.DataFrame(history_rows)
    if len(history):
        history = history[HISTORY_KEYS + ["step"] + [c for c in history.columns if c not in HISTORY_KEYS + ["step"]]]
    return table, layers, history


def write_csvs(root: Path, frames: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> tuple[Path, Path]:
    """Write ``tables``' frames as the grid's CSVs (``CSV_NAMES``) into ``root``; returns the paths of
    results.csv and layers.csv."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / name for name in CSV_NAMES]
    for path, frame in zip(paths, frames):
        atomic_write_text(path, frame.to_csv(index=False))
    return paths[0], paths[1]


def write_picks(root: Path, rows: list[dict]) -> Path:
    """The grid's tuning table (``tuning.TABLE``), rewritten from the tuning records on each run."""
    path = root / tuning.TABLE
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))
    return path


def read_picks(root: Path) -> dict[str, dict]:
    """Per final cell id, the pick columns its rows get from the tuning table (none without one).
    The table is derived data that the next run rewrites: a damaged one is named and ignored."""
    path = root / tuning.TABLE
    if not path.is_file():
        return {}
    try:
        table = pd.read_csv(path)
        return tuning.pick_columns(table)
    except Exception as exc:  # noqa: BLE001 - any parse or content problem: say which file, go on
        warnings.warn(f"{path} could not be read ({type(exc).__name__}: {exc}); results.csv has no tuning "
                      f"columns until the next run rewrites it")
        return {}


def newest_record_ns(cells_dir: Path) -> int | None:
    """When a result file in ``cells_dir`` last appeared, changed or went (the folder's own time covers
    files renamed in or set aside); None without result files."""
    try:
        entries = [e for e in os.scandir(cells_dir) if e.name.endswith(".json") and not e.name.startswith(".")]
        if not entries:
            return None
        return max(cells_dir.stat().st_mtime_ns, *(e.stat().st_mtime_ns for e in entries))
    except FileNotFoundError:
        return None


def stale_csvs(root: Path, cells_dir: Path) -> str | None:
    """Why the CSVs in ``root`` need collecting (one is missing, or older than the newest result
    file); None when they are current or there are no result files to collect (a CSV written by hand)."""
    newest = newest_record_ns(cells_dir)
    if newest is None:
        return None
    for name in CSV_NAMES:
        try:
            if (root / name).stat().st_mtime_ns < newest:
                return f"{name} was older than the newest result file"
        except FileNotFoundError:
            return f"{name} was missing"
    return None
