"""Two runs of the same cells, record by record: test accuracy and CR of an ``other`` run (bf16, or
channels-last) against a ``base`` run (the float32 contiguous records), as a CSV and a Markdown table
(docs/scaling.md, "bf16 on the CPU" and "Memory layout").

    python -m benchmark.speed.perf.cell_compare reference/lenet-reference/cells \\
        reference/bf16-quick/quick/cells reference/bf16-quick/comparison --labels float32,bf16

Precision and memory layout say how a cell is computed, not what it is, so both runs have the same
cell ids. Every GPU run trains under bf16 autocast: the bf16 table says whether GPU numbers may be
mixed with the float32 CPU reference. DWF's weights approach zero through products of factors, where
bf16's 8-bit mantissa could move the zero threshold's count: CR is the first column to read.

Result files are untrusted input: each is read through ``records.result_problems``; a damaged one is
named and left out (never moved: these folders are someone's committed results).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
import warnings
from pathlib import Path

from benchmark.core.files import atomic_write_text
from benchmark.core.untrusted import DamagedFile, checked_json
from benchmark.execution.records import result_problems

COLUMNS = ["cell_id", "method", "params", "record", "test_acc_base", "test_acc_other", "acc_diff",
           "cr_base", "cr_other", "cr_ratio", "dtype_base", "dtype_other", "layout_base", "layout_other"]
#: A result file larger than this is not a cell's result (the largest committed one is under 1 MB).
RESULT_LIMIT = 64 * 2**20


def load_cells(folder: Path) -> dict[str, dict]:
    """The cell results in ``folder`` (``<cell_id>.json``) that pass the result check, by cell id."""
    cells = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            result = checked_json(path, lambda value, cell_id=path.stem: result_problems(value, cell_id), RESULT_LIMIT)
        except DamagedFile as exc:
            warnings.warn(f"{path} is damaged ({exc.reason}); left out of the comparison", RuntimeWarning, stacklevel=2)
            continue
        if result is not None:
            cells[path.stem] = result
    return cells


def short_params(params: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def compare(base_cells: dict[str, dict], other_cells: dict[str, dict]) -> list[dict]:
    """One row per record of every cell both runs hold (a cell may hold several records, e.g.
    lottery rounds): other minus base accuracy and other / base CR."""
    rows = []
    for cell_id in sorted(set(base_cells) & set(other_cells)):
        base, other = base_cells[cell_id], other_cells[cell_id]
        config = base["config"]
        for index, (a, b) in enumerate(zip(base["records"], other["records"])):
            acc_a, acc_b = a.get("test_acc"), b.get("test_acc")
            cr_a, cr_b = a.get("cr"), b.get("cr")
            rows.append({
                "cell_id": cell_id, "method": config["method"], "params": short_params(config.get("params", {})),
                "record": index, "test_acc_base": acc_a, "test_acc_other": acc_b,
                "acc_diff": None if acc_a is None or acc_b is None else acc_b - acc_a,
                "cr_base": cr_a, "cr_other": cr_b,
                "cr_ratio": cr_b / cr_a if cr_a and cr_b is not None and math.isfinite(cr_a) else None,
                # records from before these fields trained in float32, contiguous
                "dtype_base": a.get("compute_dtype", "float32"), "dtype_other": b.get("compute_dtype", "float32"),
                "layout_base": a.get("memory_format", "contiguous"), "layout_other": b.get("memory_format", "contiguous"),
            })
    return rows


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def to_csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return text.getvalue()


def summary(rows: list[dict]) -> list[str]:
    """Per method: records, median and largest |accuracy difference|, median and extreme CR ratios."""
    lines = []
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        diffs = [abs(r["acc_diff"]) for r in mine if r["acc_diff"] is not None]
        ratios = [r["cr_ratio"] for r in mine if r["cr_ratio"] is not None]
        acc = f"|acc diff| median {statistics.median(diffs):.4f}, max {max(diffs):.4f}" if diffs else "no accuracy"
        cr = (f"CR ratio median {statistics.median(ratios):.3f}, range {min(ratios):.3f}..{max(ratios):.3f}"
              if ratios else "no CR")
        lines.append(f"- {method}: {len(mine)} records; {acc}; {cr}")
    return lines


def to_markdown(rows: list[dict], base_dir: str, other_dir: str, labels: tuple[str, str]) -> str:
    base, other = labels
    head = ["cell", "method", "params", "#", f"acc {base}", f"acc {other}", "diff", f"CR {base}", f"CR {other}",
            "CR ratio"]
    out = [f"# {other} against {base}, per cell\n",
           f"{base}: `{base_dir}`; {other}: `{other_dir}`; {len(rows)} records of "
           f"{len({r['cell_id'] for r in rows})} cells. diff = {other} - {base} test accuracy; "
           f"CR ratio = {other} / {base}.\n",
           *summary(rows), "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([r["cell_id"], r["method"], r["params"], str(r["record"]), fmt(r["test_acc_base"]),
                                      fmt(r["test_acc_other"]), fmt(r["acc_diff"]), fmt(r["cr_base"], 1),
                                      fmt(r["cr_other"], 1), fmt(r["cr_ratio"], 3)]) + " |")
    return "\n".join(out) + "\n"


def write_comparison(base_dir: Path, other_dir: Path, out_prefix: Path,
                     labels: tuple[str, str] = ("float32", "bf16")) -> list[dict]:
    """``<out_prefix>.csv`` and ``<out_prefix>.md`` from the two folders of cell results."""
    rows = compare(load_cells(base_dir), load_cells(other_dir))
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_prefix.with_suffix(".csv"), to_csv(rows))
    atomic_write_text(out_prefix.with_suffix(".md"), to_markdown(rows, str(base_dir), str(other_dir), labels))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.speed.perf.cell_compare",
                                description="Compare two runs of the same cells, record by record.")
    p.add_argument("base", type=Path, help="folder of the base run's cell results (<cell_id>.json)")
    p.add_argument("other", type=Path, help="folder of the other run's cell results")
    p.add_argument("out", type=Path, help="output prefix: OUT.csv and OUT.md are written")
    p.add_argument("--labels", default="float32,bf16",
                   help="names of the two runs in the Markdown table, base first (default float32,bf16)")
    args = p.parse_args(argv)
    labels = tuple(part.strip() for part in args.labels.split(","))
    if len(labels) != 2 or not all(labels):
        p.error(f"--labels {args.labels!r}: give two names separated by a comma, e.g. --labels contiguous,channels-last")
    found = write_comparison(args.base, args.other, args.out, labels)
    print("\n".join(summary(found)) or "no cell in both folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
