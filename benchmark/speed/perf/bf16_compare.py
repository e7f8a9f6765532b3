"""What bf16 training does to results: per cell, test accuracy and CR of a bf16 run against the
float32 records of the same cells (same cell ids: precision is not part of a cell), as a CSV and a
Markdown table (docs/scaling.md, "bf16 on the CPU").

    python -m benchmark.speed.perf.bf16_compare reference/lenet-reference/cells \\
        reference/bf16-quick/quick/cells reference/bf16-quick/comparison

Every GPU run trains under bf16 autocast, so this says whether GPU numbers may be mixed with the
float32 CPU reference. DWF's weights approach zero through products of factors, where bf16's 8-bit
mantissa could move the zero threshold's count: CR is the first column to read.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from pathlib import Path

from benchmark.core.files import atomic_write_text

COLUMNS = ["cell_id", "method", "params", "record", "test_acc_fp32", "test_acc_bf16", "acc_diff",
           "cr_fp32", "cr_bf16", "cr_ratio", "dtype_fp32", "dtype_bf16"]


def load_cells(folder: Path) -> dict[str, dict]:
    """The cell results in ``folder`` (``<cell_id>.json``), by cell id."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))}


def short_params(params: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def compare(fp32_cells: dict[str, dict], bf16_cells: dict[str, dict]) -> list[dict]:
    """One row per record of every cell both folders hold (a cell may hold several records, e.g.
    lottery rounds), bf16 minus float32 accuracy and bf16 / float32 CR."""
    rows = []
    for cell_id in sorted(set(fp32_cells) & set(bf16_cells)):
        base, other = fp32_cells[cell_id], bf16_cells[cell_id]
        config = base["config"]
        for index, (a, b) in enumerate(zip(base["records"], other["records"])):
            acc_a, acc_b = a.get("test_acc"), b.get("test_acc")
            cr_a, cr_b = a.get("cr"), b.get("cr")
            rows.append({
                "cell_id": cell_id, "method": config["method"], "params": short_params(config.get("params", {})),
                "record": index, "test_acc_fp32": acc_a, "test_acc_bf16": acc_b,
                "acc_diff": None if acc_a is None or acc_b is None else acc_b - acc_a,
                "cr_fp32": cr_a, "cr_bf16": cr_b,
                "cr_ratio": cr_b / cr_a if cr_a and cr_b is not None and math.isfinite(cr_a) else None,
                "dtype_fp32": a.get("compute_dtype", "float32"), "dtype_bf16": b.get("compute_dtype", "?"),
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
    """Per method: cells, median and largest |accuracy difference|, median and extreme CR ratios."""
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


def to_markdown(rows: list[dict], fp32_dir: str, bf16_dir: str) -> str:
    head = ["cell", "method", "params", "#", "acc fp32", "acc bf16", "diff", "CR fp32", "CR bf16", "CR ratio"]
    out = [f"# bf16 against float32, per cell\n",
           f"float32: `{fp32_dir}`; bf16: `{bf16_dir}`; {len(rows)} records of "
           f"{len({r['cell_id'] for r in rows})} cells. diff = bf16 - fp32 test accuracy; CR ratio = bf16 / fp32.\n",
           *summary(rows), "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([r["cell_id"], r["method"], r["params"], str(r["record"]), fmt(r["test_acc_fp32"]),
                                      fmt(r["test_acc_bf16"]), fmt(r["acc_diff"]), fmt(r["cr_fp32"], 1),
                                      fmt(r["cr_bf16"], 1), fmt(r["cr_ratio"], 3)]) + " |")
    return "\n".join(out) + "\n"


def write_comparison(fp32_dir: Path, bf16_dir: Path, out_prefix: Path) -> list[dict]:
    """``<out_prefix>.csv`` and ``<out_prefix>.md`` from the two folders of cell results."""
    rows = compare(load_cells(fp32_dir), load_cells(bf16_dir))
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_prefix.with_suffix(".csv"), to_csv(rows))
    atomic_write_text(out_prefix.with_suffix(".md"), to_markdown(rows, str(fp32_dir), str(bf16_dir)))
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m benchmark.speed.perf.bf16_compare FP32_CELLS BF16_CELLS OUT_PREFIX")
    found = write_comparison(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    print("\n".join(summary(found)) or "no cell in both folders")
