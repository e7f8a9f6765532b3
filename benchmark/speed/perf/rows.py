"""What every perf benchmark returns and how it is shown: one ``Row`` per contender of a
comparison, its ratio judged against a target (on CPU only), printed as a table and saved as CSV.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from benchmark.core.files import atomic_write_text

#: Rounds (interleaved repetitions) per benchmark unless --repeats says otherwise.
DEFAULT_ROUNDS = {"data": 3, "step_small": 30, "step_large": 5, "grid": 1, "pack": 5, "grid-pack": 1}


@dataclass
class Row:
    """One contender of one comparison; ``ratio`` is defined by ``ratio_of`` within its ``case``."""

    bench: str
    case: str
    variant: str
    unit: str
    median_s: float
    min_s: float
    max_s: float
    rounds: int
    ratio: float | None = None
    ratio_of: str = ""
    target: str = ""
    met: str = ""
    cells_per_hour: float | None = None
    peak_rss_mb: float | None = None  # per worker, shared library pages included
    own_rss_mb: float | None = None  # per worker, anonymous pages only (its tensors and heap)
    device: str = ""
    threads: int = 0
    note: str = ""


COLUMNS = [f.name for f in fields(Row)]


def make_row(bench: str, case: str, variant: str, unit: str, samples: list[float], per: int = 1, **extra) -> Row:
    """A row from timed samples, each covering ``per`` units (a block of steps)."""
    values = [s / per for s in samples]
    return Row(bench, case, variant, unit, statistics.median(values), min(values), max(values), len(values), **extra)


def judge(ratio: float, target: float | None, at_least: bool, device: torch.device) -> tuple[str, str]:
    """(target, met) as the table shows them; empty off the CPU, where the targets are not stated."""
    if target is None or device.type != "cpu":
        return "", ""
    met = ratio >= target if at_least else ratio <= target
    return (f">= {target:g}" if at_least else f"<= {target:g}"), ("yes" if met else "no")


def limit_ratio(step_s: float, flops: float, rate: float) -> tuple[float, str]:
    """(step / limit, a sentence saying it): the limit is ``flops`` at ``rate`` FLOP/s."""
    limit_s = flops / rate
    ratio = step_s / limit_s
    return ratio, (f"{duration(step_s)} per step against {duration(limit_s)} for its {flops / 1e6:.0f} MFLOP at "
                   f"{rate / 1e9:,.0f} GFLOP/s: {ratio:,.2f}x the limit")


def duration(seconds: float) -> str:
    """Seconds in the unit that keeps three figures: a GPU's limit for a small net is microseconds."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.2f} µs"


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table, one line per contender, for the terminal."""
    def fmt_time(seconds: float) -> str:
        return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"

    header = ["bench", "case", "variant", "median", "min..max", "n", "ratio", "target", "met", "extra"]
    lines = []
    for r in rows:
        extra = []
        if r.cells_per_hour is not None:
            extra.append(f"{r.cells_per_hour:.0f} cells/h")
        if r.peak_rss_mb is not None:
            extra.append(f"peak RSS/worker {r.peak_rss_mb:.0f} MB (own {r.own_rss_mb:.0f} MB)")
        if r.note:
            extra.append(r.note)
        lines.append([r.bench, r.case, r.variant, f"{fmt_time(r.median_s)} ({r.unit.split('/')[1]})",
                      f"{fmt_time(r.min_s)}..{fmt_time(r.max_s)}", str(r.rounds),
                      "" if r.ratio is None else f"{r.ratio:.3f} ({r.ratio_of})", r.target, r.met, "; ".join(extra)])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def write_csv(rows: list[Row], path: Path) -> None:
    """The rows as a CSV of ``COLUMNS``, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    atomic_write_text(path, text.getvalue())
