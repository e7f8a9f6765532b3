"""What a usable result file is: the one check that calls a cell's result file damaged.

A result file is input (the results folder may be shared, or written by an older version), so
everything that reads one (``run``, ``status``, ``collect``) goes through ``result_problems``: a file
it finds fault with is named and set aside and its cell runs again (docs/design.md, "Resumable,
whatever stops it"). It checks values (accuracy in [0, 1], CR >= 1, finite numbers) and the shape of
what collection reads (layers with their counts, histories of per-epoch tables), so that a record
that passes never ends ``collect`` in a traceback.
"""

from __future__ import annotations

import math

from benchmark.core.untrusted import DamagedFile, is_number, short

#: Record values that are ratios of counts (>= 1; +inf when nothing is kept, a real outcome): these
#: keys, and every key that starts with ``cr_`` or ends with ``_cr``.
RATIO_KEYS = ("cr", "cr_total", "cr_effective", "speedup")
#: Record values that are fractions.
FRACTION_KEYS = ("test_acc", "train_acc", "sparsity", "dense_test_acc")
#: Diagnostics that are nan when undefined (balance of factors that are all zero).
MAY_BE_UNDEFINED = ("balance_error",)
RESULT_STATUSES = ("ok", "failed", "blocked")
#: Record keys that name a row (CSV keys, sort keys): a text where present.
TEXT_KEYS = ("cell_id", "method", "arch", "dataset")
#: Record keys that count: a whole number where present (None allowed: not applicable).
INTEGER_KEYS = ("seed", "level")
#: What each layer entry must have for layers.csv.
LAYER_COUNTS = ("numel", "nonzero")


def diverged(result: dict | None) -> bool:
    """A failed cell whose training diverged (loss nan or inf). That is a result of its settings, not
    an error: the same settings diverge again on the same machine, a curve ends there, and a tuning
    rule reads it, so ``run --retry-failed`` leaves it and only ``--retry-diverged`` reruns it."""
    return bool(result) and result.get("status") == "failed" and any(
        str(r.get("error", "")).startswith("Diverged") for r in result.get("records") or [])


def state(result: dict | None) -> str:
    """A cell's state from its result: ``todo`` (none yet), ``diverged`` (``diverged``), or the result's
    status (``ok``, ``failed``, ``blocked``)."""
    if not result:
        return "todo"
    return "diverged" if diverged(result) else result["status"]


class DamagedResult(DamagedFile):
    """A result file that cannot be used; ``path`` and ``reason`` say which and why."""


class DamagedResults(ValueError):
    """Several damaged result files (collect lists them all)."""


def _is_ratio(key: str) -> bool:
    return key in RATIO_KEYS or key.startswith("cr_") or key.endswith("_cr")


def value_problems(record: dict) -> list[str]:
    """Accuracy or sparsity outside [0, 1], a compression ratio below 1, a number that is nan or
    infinite (except +inf for a ratio with nothing kept, and nan for the diagnostics in
    MAY_BE_UNDEFINED)."""
    problems = []
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and math.isnan(value):
            if key not in MAY_BE_UNDEFINED:
                problems.append(f"{key}=nan is not a number")
        elif _is_ratio(key):
            if not value >= 1:
                problems.append(f"{key}={value!r} is below 1 (a compression ratio is total / kept >= 1)")
        elif isinstance(value, float) and math.isinf(value):
            problems.append(f"{key}={value!r} is not a finite number")
        elif key in FRACTION_KEYS and not 0 <= value <= 1:
            problems.append(f"{key}={short(value)} is outside [0, 1]")
    return problems


def shape_problems(record: dict) -> list[str]:
    """What collection could not read: keys of the wrong type, a history that is not a list of
    per-epoch tables, layer entries without their name and counts (older formats among them)."""
    problems = [f"{key}={short(record[key])} is not a text" for key in TEXT_KEYS
                if record.get(key) is not None and not isinstance(record[key], str)]
    problems += [f"{key}={short(record[key])} is not a whole number" for key in INTEGER_KEYS
                 if record.get(key) is not None and (isinstance(record[key], bool) or not isinstance(record[key], int))]
    if record.get("cr") is not None and not isinstance(record["cr"], (int, float)):
        problems.append(f"cr={short(record['cr'])} is not a number")
    history = record.get("history")
    if history is not None and (not isinstance(history, list) or not all(isinstance(e, dict) for e in history)):
        problems.append(f"history is not a list of per-epoch tables ({short(history)})")
    layers = record.get("layers")
    if layers is not None and not isinstance(layers, list):
        problems.append(f"layers is not a list ({short(layers)})")
    elif layers:
        for index, layer in enumerate(layers):
            if not isinstance(layer, dict):
                problems.append(f"layer {index} is not a table ({short(layer)})")
                continue
            if not isinstance(layer.get("name"), str):
                problems.append(f"layer {index} has no name")
            for key in LAYER_COUNTS:
                if key not in layer:
                    problems.append(f"layer {index} has no {key} (an older record format)")
                elif not is_number(layer[key], at_least=0) or isinstance(layer[key], float):
                    problems.append(f"layer {index}: {key}={short(layer[key])} is not a count")
    return problems


def record_problems(record) -> list[str]:
    """What makes a result record unusable: its status, impossible values (``value_problems``) and a
    shape collection cannot read (``shape_problems``)."""
    if not isinstance(record, dict):
        return [f"a record is not a table: {short(record)}"]
    problems = []
    if record.get("status") not in RESULT_STATUSES:
        problems.append(f"record status={short(record.get('status'))} is not one of {list(RESULT_STATUSES)}")
    if record.get("status") == "ok" and (isinstance(record.get("test_acc"), bool)
                                         or not isinstance(record.get("test_acc"), (int, float))):
        problems.append("an ok record has no test_acc")
    return problems + value_problems(record) + shape_problems(record)


def result_problems(result, cell_id: str | None = None) -> list[str]:
    """Why a parsed result file cannot be used (missing fields, wrong cell, unusable records)."""
    if not isinstance(result, dict):
        return [f"it holds {type(result).__name__}, not a result table"]
    problems = []
    missing = [k for k in ("cell_id", "status", "config", "records") if k not in result]
    if missing:
        problems.append(f"fields {missing} are missing")
    if "status" in result and result["status"] not in RESULT_STATUSES:
        problems.append(f"status={short(result['status'])} is not one of {list(RESULT_STATUSES)}")
    if "cell_id" in result and not isinstance(result["cell_id"], str):
        problems.append(f"cell_id={short(result['cell_id'])} is not a text")
    elif cell_id is not None and "cell_id" in result and result["cell_id"] != cell_id:
        problems.append(f"cell_id={short(result['cell_id'])} does not match its file name")
    if "config" in result and not isinstance(result["config"], dict):
        problems.append("config is not a table")
    records = result.get("records")
    if "records" in result and (not isinstance(records, list) or not records):
        problems.append("records is not a non-empty list")
    elif isinstance(records, list):
        for i, record in enumerate(records):
            problems += [f"record {i}: {p}" for p in record_problems(record)]
    return problems
