"""The results page: one self-contained HTML file per grid, ``<results-dir>/<grid>/report.html``.

Something a researcher can open in a browser without a server, or attach to an email: the figures
(PNG, embedded as base64), the tolerance, accuracy, comparisons, cost and settling tables, the grid as it ran,
which cells failed, the machines and versions behind the numbers, the commands that rebuild it,
and links to the CSVs beside it (those work while the page sits in its results folder). Built from
the CSVs only, like every figure and table (``plot.figures``, ``report.build_tables``).
"""

from __future__ import annotations

import base64
import html
import io
import shlex
import time
from pathlib import Path

import pandas as pd

from benchmark import __version__
from benchmark.core.provenance import source_commit
from benchmark.analysis import curves as cv
from benchmark.analysis import tables as tb
from benchmark.analysis import report
from benchmark.core.files import atomic_write_text
from benchmark.execution.store import Store

PAGE = "report.html"
#: Resolution of the embedded figures: sharp on screen, a page that still fits in an email.
DPI = 110
CAPTIONS = {
    "accuracy_vs_cr": "Test accuracy against compression ratio (log scale): mean over seeds (line), ±1 std (band), "
                      "single runs (markers), dense model (dashed).",
    "layer_sparsity": "Weights each layer keeps, in each method's run closest to one CR (× marks a layer pruned "
                      "to nothing).",
    "effective_cr": "Direct against effective CR, for the methods where they differ (kept weights on no "
                    "input-to-output path count as pruned).",
    "trajectories": "Per-epoch test accuracy, CR and factor misalignment of one run per method.",
}
CSV_FILES = ("results.csv", "layers.csv", "history.csv", "tolerance.csv", "accuracy_at_cr.csv", "comparisons.csv",
             "cost.csv", "settling.csv")
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 78rem;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.88rem; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 0.25rem 0.6rem; text-align: right; vertical-align: top; }
th { background: #f5f5f5; } td:nth-child(-n+3), th:nth-child(-n+3) { text-align: left; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .explain { color: #555; font-size: 0.9rem; }
pre { background: #f7f7f7; padding: 0.7rem; overflow-x: auto; font-size: 0.85rem; }
nav a { margin-right: 1rem; } .notes li { color: #555; font-size: 0.9rem; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def figure_html(stem: str, fig) -> str:
    """A figure as an <img> with its PNG inline (base64), and its caption."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    caption = CAPTIONS.get(stem, stem)
    return (f'<figure id="fig-{_e(stem)}"><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def table_html(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>no rows</em></p>"
    return frame.to_html(index=False, border=0, escape=True, na_rep=report.MISSING)


def _notes(notes: list[str]) -> str:
    return ('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>") if notes else ""


def failed_rows(results: cv.Results) -> pd.DataFrame:
    """Rows that are not ok: which cell, and the first line of its error."""
    bad = results.rows[results.rows.status != "ok"]
    columns = [c for c in ("cell_id", "variant", "arch", "dataset", "seed", "status") if c in bad.columns]
    frame = bad[columns].copy()
    errors = bad["error"] if "error" in bad.columns else pd.Series("", index=bad.index)
    frame["error"] = [str(e).strip().splitlines()[0][:300] if isinstance(e, str) and e.strip() else ""
                      for e in errors]
    return frame


def machines(results: cv.Results) -> pd.DataFrame:
    """Per device x CPU or GPU model x host x code commit x torch build x threads: records and the hours they ran (what a
    bit-identical rerun needs, docs/design.md, Reproducibility)."""
    rows = results.rows
    keys = [c for c in ("device", "cpu_model", "gpu", "host", "commit", "torch_version", "threads", "compiled")
            if c in rows.columns]
    if not keys:
        return pd.DataFrame()
    wall = pd.to_numeric(rows["wall_s"], errors="coerce").fillna(0) if "wall_s" in rows.columns else 0
    if "cell_id" in rows.columns:  # every record of a cell (lottery levels) carries the cell's wall time
        wall = wall * ~rows.cell_id.duplicated()
    frame = rows[keys].astype(object).fillna("not recorded").astype(str).assign(records=1, hours=wall / 3600)
    out = frame.groupby(keys, dropna=False, sort=True).agg(records=("records", "sum"), hours=("hours", "sum"))
    out = out.reset_index()
    out["hours"] = out["hours"].map(lambda h: f"{h:.3g}")
    return out


def grid_section(store: Store, grid: str) -> tuple[str, str, str]:
    """(description, where the grid came from, its TOML) from grid.json, or from the preset of that name."""
    record = store.grid_record()
    if record:
        return record.get("description", ""), record.get("source", ""), record.get("toml", "")
    from benchmark.execution import grids

    try:
        _, toml, source = grids.grid_source(grid)
        return grids.load_grid(grid).description, source, toml
    except (ValueError, OSError):
        return "", "", ""


def commands(store: Store, grid: str, results_dir) -> list[str]:
    record = store.grid_record()
    where = "" if str(results_dir) == "results" else f" --results-dir {shlex.quote(str(results_dir))}"
    grid_arg = shlex.quote(record.get("grid_arg") or grid)
    lines = [f"python -m benchmark run --grid {grid_arg}{where}  # trains what is missing (finished cells are kept)",
             f"python -m benchmark report --grid {shlex.quote(grid)}{where}  # CSVs, tables and this page",
             f"python -m benchmark plot --grid {shlex.quote(grid)}{where}  # figures as PNG and PDF in plots/"]
    if record.get("command"):
        lines.append(f"# the last run of this grid was: {record['command']}")
    return lines


def write_page(grid: str, results_dir: Path | str = "results", points=tb.TOLERANCE_POINTS, crs=tb.FIXED_CRS,
               at_cr: float | None = None) -> Path:
    """Write ``<results_dir>/<grid>/report.html`` from the grid's CSVs; returns its path."""
    from benchmark.analysis import plot

    store = Store(results_dir, grid)
    results = cv.load_results(store.root / "results.csv")
    tables = report.build_tables(results, grid, points, crs)
    dense = tb.dense_summary(results)
    drawn, figure_notes = plot.figures(grid, results_dir, at_cr)
    description, source, toml = grid_section(store, grid)
    cells = results.rows.drop_duplicates("cell_id") if "cell_id" in results.rows.columns else results.rows
    statuses = cells.status.value_counts()
    counts = ", ".join(f"{n} {s}" for s, n in statuses.items())
    failed = failed_rows(results)

    parts = [f"<h1>dwf-bench results: {_e(grid)}</h1>"]
    if description:
        parts.append(f"<p>{_e(description)}</p>")
    parts.append(f'<p class="explain">{int(statuses.sum())} cells ({_e(counts)}), {len(results.rows)} records. '
                 f"Page written {_e(time.strftime('%Y-%m-%d %H:%M'))} by dwf-bench {_e(__version__)} "
                 f"(commit {_e(source_commit() or 'unknown: not a git checkout')}) from "
                 f'<a href="results.csv">results.csv</a>.</p>')
    sections = [("figures", "Figures"), *((t.stem, t.title) for t in tables), ("failed", "Failed or blocked cells"),
                ("machines", "Machines and versions"), ("grid", "The grid"), ("reproduce", "Rebuild it"),
                ("files", "Files")]
    links = "".join(f'<a href="#{anchor}">{_e(title.split(" (")[0])}</a>' for anchor, title in sections)
    parts.append(f"<nav>{links}</nav>")

    parts.append('<h2 id="figures">Figures</h2>')
    parts += [figure_html(stem, fig) for stem, fig in drawn]
    parts.append(_notes(figure_notes))

    for table in tables:
        parts.append(f'<h2 id="{_e(table.stem)}">{_e(table.title)}</h2><p class="explain">{_e(table.explanation)}</p>')
        if table.headline and len(dense):
            parts.append(f"<p>Dense accuracy (mean ± std over seeds): {_e('; '.join(report.dense_lines(dense)))}.</p>")
        parts.append(table_html(table.wide))
        parts.append(_notes(table.notes))
    parts.append(_notes(results.notes()))

    parts.append('<h2 id="failed">Failed or blocked cells</h2>')
    parts.append(table_html(failed) if len(failed) else "<p>None: every cell finished.</p>")
    if len(failed):
        parts.append(f'<p class="explain">Errors in full: <code>python -m benchmark status --grid {_e(grid)} '
                     f"--errors</code>; rerun failed cells with <code>run --retry-failed</code>. A cell whose training "
                     "diverged (loss nan or inf) is a result of its settings, which the same machine repeats: "
                     "<code>run --retry-diverged</code> reruns those.</p>")

    parts.append('<h2 id="machines">Machines and versions</h2><p class="explain">The device, host, torch build and '
                 "thread count behind the records (a bit-identical rerun needs the same).</p>")
    parts.append(table_html(machines(results)))

    parts.append('<h2 id="grid">The grid</h2>')
    if source:
        parts.append(f"<p>From {_e(source)}.</p>")
    parts.append(f"<pre>{_e(toml)}</pre>" if toml else "<p>Not recorded (this grid's cells were not run by a version "
                                                         "of <code>run</code> that records it).</p>")

    parts.append('<h2 id="reproduce">Rebuild it</h2>')
    parts.append(f"<pre>{_e(chr(10).join(commands(store, grid, results_dir)))}</pre>")

    parts.append('<h2 id="files">Files</h2><p class="explain">Beside this page in its results folder.</p><ul>')
    parts += [f'<li><a href="{name}">{name}</a></li>' for name in CSV_FILES if (store.root / name).is_file()]
    parts.append("</ul>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>dwf-bench: {_e(grid)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(p for p in parts if p) + "\n</body>\n</html>\n")
    path = store.root / PAGE
    atomic_write_text(path, page)
    return path
