"""The committed reference results (``reference/``, reference/README.md): every record is recomputable
from its own config, the committed CSVs are what ``collect`` makes of the committed records, the
committed tables are what ``report`` makes of those CSVs, reference/README.md quotes those tables, and a
committed record is reproduced by training its cell again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.core.provenance import cpu_model
from benchmark.execution import grids, tuning
from benchmark.execution.cell import Cell, run_cell
from benchmark.execution.store import Store

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference"
GRIDS = sorted(p.parent.name for p in REFERENCE.glob("*/cells"))


def records(grid: str) -> list[tuple[Path, dict]]:
    return [(path, json.loads(path.read_text())) for path in sorted((REFERENCE / grid / "cells").glob("*.json"))]


def test_the_reference_grids_are_committed():
    assert {"lenet-calibration", "lenet-reference", "lenet-reference-v1", "lenet-reference-tuning"} <= set(GRIDS)


def grid_cell_ids(grid: str) -> set[str]:
    """The ids of a preset's cells: its fixed cells and, for its tuned curves, the final cells of the
    picks the committed tuning and final records make (none for a curve whose tuning is not complete),
    and those of candidates dropped because their final training diverged (the records that dropped them)."""
    loaded = grids.load_grid(grid)
    picks, _ = tuning.resolve(loaded.tune_groups, Store(REFERENCE, tuning.folder(grid)).read, Store(REFERENCE, grid).read)
    return {cell.id for cell in loaded.cells + tuning.picked_finals(picks) + tuning.dropped_finals(picks)}


@pytest.mark.parametrize("grid", GRIDS)
def test_every_committed_record_is_recomputable_from_its_own_config(grid):
    preset_ids = grid_cell_ids(grid)
    for path, result in records(grid):
        cell = Cell.from_config(result["config"])
        assert cell.id == result["cell_id"] == path.stem, path
        assert cell.id in preset_ids, f"{path}: not a cell of the {grid} preset any more"
        # a diverged run is a result (the curve ends there); anything else failing is a bug
        error = result["records"][0].get("error") or ""
        assert result["status"] == "ok" or error.startswith("Diverged"), f"{path}: {error}"
        for record in result["records"]:
            # what a bit-identical rerun needs besides the config (docs/design.md, Reproducibility)
            assert record["torch_version"] and record["threads"] >= 1, path


@pytest.mark.parametrize("grid", GRIDS)
def test_committed_csvs_are_what_collect_makes_of_the_committed_records(grid, tmp_path):
    shutil.copytree(REFERENCE / grid / "cells", tmp_path / grid / "cells")
    if (REFERENCE / grid / tuning.TABLE).exists():  # the pick columns of tuned curves' rows come from it
        shutil.copy(REFERENCE / grid / tuning.TABLE, tmp_path / grid / tuning.TABLE)
    Store(tmp_path, grid).collect()
    for name in ("results.csv", "layers.csv", "history.csv"):
        committed = pd.read_csv(REFERENCE / grid / name)
        rebuilt = pd.read_csv(tmp_path / grid / name)
        pd.testing.assert_frame_equal(rebuilt, committed, check_exact=False, rtol=1e-12, obj=f"{grid}/{name}")


def test_the_committed_tuning_table_is_what_the_committed_tuning_records_pick(tmp_path):
    """lenet-reference/tuning.csv (which ``run`` writes and ``collect`` and ``report`` read) is the rule
    applied to the committed tuning records (and to whether the committed final cells' training
    diverged): every curve picked, and nothing else decided the picks."""
    loaded = grids.load_grid("lenet-reference")
    picks, waiting = tuning.resolve(loaded.tune_groups, Store(REFERENCE, tuning.folder("lenet-reference")).read,
                                    Store(REFERENCE, "lenet-reference").read)
    # every curve is picked but those whose tuning cells are not all committed yet (resolve waits for them)
    assert len(picks) + len(waiting) == len(loaded.tune_groups) and len(picks) >= 18
    Store(tmp_path, "lenet-reference").write_picks(tuning.table_rows(picks))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "lenet-reference" / tuning.TABLE),
                                  pd.read_csv(REFERENCE / "lenet-reference" / tuning.TABLE), check_exact=False, rtol=1e-12)


# Records made before records carried ``cpu_model`` were all trained on this project's AMD EPYC machines
# (reference/README.md, "Machine").
REFERENCE_CPU = "AMD EPYC"
#: How far the final accuracy may move on another CPU model or torch build: oneDNN picks other kernels
#: per CPU, so float sums run in another order (an Intel Xeon with AMX moved it by 0.08 points).
FINAL_TOLERANCE = 0.005


@pytest.mark.slow
def test_a_committed_record_is_reproduced_by_training_its_cell_again(tmp_path):
    """The calibration's dense run (30 epochs, LeNet-300-100, LR 0.15): every epoch the same with the same
    CPU model, torch build and thread count; elsewhere the final accuracy within FINAL_TOLERANCE."""
    [(path, result)] = [(p, r) for p, r in records("lenet-calibration") if r["config"]["method"] == "dense"
                        and r["config"]["arch"] == "lenet300" and r["config"]["schedule"]["lr"] == 0.15]
    committed = result["records"][0]
    threads = torch.get_num_threads()
    torch.set_num_threads(committed["threads"])
    try:
        [again] = run_cell(Cell.from_config(result["config"]), device="cpu", work_root=tmp_path / "work",
                           cache_dir=tmp_path / "cache", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert again["status"] == "ok"
    assert again["cpu_model"] == cpu_model()
    same_machine = (again["torch_version"] == committed["torch_version"]
                    and again["cpu_model"] == committed.get("cpu_model", REFERENCE_CPU))
    print(f"{path.name}: committed {committed['test_acc']:.4f}, again {again['test_acc']:.4f} "
          f"(torch {again['torch_version']} vs {committed['torch_version']}, CPU {again['cpu_model']!r} vs "
          f"{committed.get('cpu_model', REFERENCE_CPU)!r}, {committed['threads']} thread(s))")
    if same_machine:
        assert [e["test_acc"] for e in again["history"]] == pytest.approx(
            [e["test_acc"] for e in committed["history"]], abs=0.003)
    assert abs(again["test_acc"] - committed["test_acc"]) <= FINAL_TOLERANCE


def test_the_quick_grid_is_a_subset_of_the_committed_reference_seed_0():
    """The quick grid's numbers (reference/README.md) are the tuned reference protocol's seed-0 records
    of the same cells, every one of which trained."""
    quick = grids.load_grid("quick").cells
    committed = {path.stem: record for path, record in records("lenet-reference")}
    assert {cell.seed for cell in quick} == {0}
    missing = [cell.label() if hasattr(cell, "label") else cell.id for cell in quick if cell.id not in committed]
    assert not missing, f"quick cells not in reference/lenet-reference: {missing}"
    failed = [cell.label() for cell in quick if committed[cell.id]["status"] != "ok"]
    assert not failed, f"quick cells whose committed record failed: {failed}"
    assert {cell.method for cell in quick} >= {"dense", "dwf", "l1", "gmp", "rigl", "lottery", "synflow"}


# grid: the `report` options its committed tables were made with (the Makefile's `reference` target)
REPORT_OPTIONS = {"lenet-reference": {"crs": (10, 30, 100, 300, 1000)},
                  "lenet-reference-v1": {"crs": (10, 30, 100, 300, 1000)}, "lenet-calibration": {}}


@pytest.mark.parametrize("grid", sorted(REPORT_OPTIONS))
def test_committed_tables_are_what_report_makes_of_the_committed_csv(grid, tmp_path):
    """The Markdown tables the README quotes are rebuilt, byte for byte, from the committed results.csv
    (and tuning.csv, where committed; and, where committed, the same at 0.01x the zero threshold)."""
    from benchmark.analysis.report import write_report

    (tmp_path / grid).mkdir()
    shutil.copy(REFERENCE / grid / "results.csv", tmp_path / grid / "results.csv")
    names = [f"{stem}.md" for stem in ("tolerance", "accuracy_at_cr", "comparisons", "cost", "settling")]
    if (REFERENCE / grid / tuning.TABLE).exists():  # report's tuning table reads tuning.csv beside results.csv
        shutil.copy(REFERENCE / grid / tuning.TABLE, tmp_path / grid / tuning.TABLE)
        names.append("tuning.md")
    write_report(grid, tmp_path, **REPORT_OPTIONS[grid])
    if (REFERENCE / grid / "tolerance-thr0.01x.md").exists():
        write_report(grid, tmp_path, threshold_scale=0.01, **REPORT_OPTIONS[grid])
        names += ["tolerance-thr0.01x.md", "accuracy_at_cr-thr0.01x.md"]
    for name in names:
        assert (tmp_path / grid / name).read_text() == (REFERENCE / grid / name).read_text(), f"{grid}/{name}"


def table_rows(text: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table that starts with ``header``, as lists of cell strings."""
    lines = text[text.index(header):].splitlines()[2:]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("| "))]]


def test_the_results_pages_quote_the_committed_tables():
    """reference/README.md quotes the committed tables of the tuned protocol, the first protocol's page
    its own (both LeNets each), and the README a selection of the tuned rows; a regenerated table that the pages did not
    follow fails here, so the numbers a reader cites are the ones the records give."""
    readme = (REFERENCE / "README.md").read_text()
    front = table_rows((ROOT / "README.md").read_text(), "| method | seeds | CR 10 |")
    full = table_rows(readme, "| method | seeds | CR 10 |")
    assert front and all(row in full for row in front), "README.md's table is not rows of reference/README.md's"
    first, reference = REFERENCE / "lenet-reference-v1", REFERENCE / "lenet-reference"

    def of(folder, name, arch):
        return [row[2:] for row in table_rows((folder / name).read_text(), "| arch |") if row[0] == arch]

    # LeNet-300-100: the tuned protocol here, the first protocol on its own page
    assert full == of(reference, "accuracy_at_cr.md", "LeNet-300-100")
    assert table_rows(readme, "| method | seeds | ≤ 1 pt |") == of(reference, "tolerance.md", "LeNet-300-100")
    first_page = (first / "README.md").read_text()
    assert table_rows(first_page, "| method | seeds | CR 10 |") == of(first, "accuracy_at_cr.md", "LeNet-300-100")
    assert table_rows(first_page, "| method | seeds | ≤ 1 pt |") == of(first, "tolerance.md", "LeNet-300-100")
    # LeNet-5: one table per protocol, the 10-point tolerance appended to the accuracies
    lenet5 = "| method | seeds | CR 10 | CR 30 | CR 100 | CR 300 | CR 1000 | CR within 10 pts"
    for page, folder in ((readme, reference), (first_page, first)):
        tolerance_10 = {row[0]: row[-1] for row in of(folder, "tolerance.md", "LeNet-5")}
        expected = [[*row, tolerance_10.get(row[0], "–")] for row in of(folder, "accuracy_at_cr.md", "LeNet-5")]
        assert table_rows(page, lenet5) == expected, folder.name


def verdict_quotes() -> list[tuple[str, str, list[str]]]:
    """The backticked quotes of each verdict, whitespace joined, with its page and the arch it judges:
    the README's (LeNet-300-100) and every `### Verdict ...` section of reference/README.md (LeNet-5
    where its heading names it), each up to the next heading, so that one LeNet's verdict is checked
    against that LeNet's rows only. A section also ends where the next one of its page begins (the
    README's LeNet-300-100 and LeNet-5 verdicts are paragraphs under one heading)."""
    import re

    out = []
    for page, start in ((ROOT / "README.md", "**Verdict"), (REFERENCE / "README.md", "### Verdict")):
        text = page.read_text()
        for begin in [m.start() for m in re.finditer(re.escape(start), text)]:
            verdict = text[begin:]
            heading = verdict.split("\n", 1)[0]
            ends = [i for i in (verdict.find("\n## ", 1), verdict.find("\n### ", 1), verdict.find(start, 1)) if i > 0]
            verdict = verdict[:min(ends)] if ends else verdict
            arch = "lenet5" if "LeNet-5" in heading else "lenet300"
            quotes = re.findall(r"`([^`]+)`", " ".join(verdict.split()))
            out.append((str(page.relative_to(ROOT)), arch, quotes))
    return out


def test_the_verdicts_quote_the_resolved_claims_of_the_comparisons_tables():
    """Every claim a verdict quotes (written in backticks as `winner over loser +d [lo, hi]`) is a
    resolved row of the committed tuned comparisons table for the LeNet that verdict judges, as its
    note gives it: a difference no corrected test supports cannot be quoted as a claim."""
    from benchmark.analysis import comparisons as cmp

    table = pd.read_csv(REFERENCE / "lenet-reference" / "comparisons.csv")
    for page, arch, quotes in verdict_quotes():
        notes = " ".join(cmp.resolved_notes(table[table.arch == arch]))
        quoted = [q for q in quotes if " over " in q]
        assert len(quoted) >= 3, page
        for claim in quoted:
            assert claim in notes, (page, arch, claim)


def test_the_verdicts_quote_the_unresolved_differences_as_the_comparisons_tables_have_them():
    """A difference the README and reference/README.md call unresolved is written in backticks as
    `a vs b at CR c: d [lo, hi]` (optionally `, Holm p x`): it is a row of the committed tuned
    comparisons table at that CR that the corrected test does not resolve, with that difference a - b,
    interval and Holm p as printed (a row of b vs a read turned around), so no stale number survives
    new seeds."""
    import re

    everything = pd.read_csv(REFERENCE / "lenet-reference" / "comparisons.csv")
    number = r"([+\u2212-]?\d+\.\d+)"
    form = re.compile(rf"(.+) vs (.+) at CR ([\d,]+): {number} \[{number}, {number}\](?:, Holm p (\d+\.\d+))?")

    def value(text):
        return float(text.replace("\u2212", "-"))

    def printed(x):
        return f"{x + 0.0:+.2f}"

    checked = 0
    for page, arch, quotes in verdict_quotes():
        table = everything[everything.arch == arch]
        for quote in quotes:
            match = form.fullmatch(quote)
            if match is None:
                continue
            a, b, cr, diff, low, high, holm = match.groups()
            rows = table[(table.cr == float(cr.replace(",", ""))) & (((table.a == a) & (table.b == b)) | ((table.a == b) & (table.b == a)))]
            assert len(rows) == 1, (page, quote)
            row = rows.iloc[0]
            flip = row.a != a
            expect = ((-row.diff_pts, -row.ci_high_pts, -row.ci_low_pts) if flip
                      else (row.diff_pts, row.ci_low_pts, row.ci_high_pts))
            assert [printed(value(x)) for x in (diff, low, high)] == [printed(x) for x in expect], (page, quote)
            assert row.verdict.startswith("not resolved"), (page, quote, row.verdict)
            if holm is not None:
                decimals = len(holm.split(".")[1])
                assert abs(float(holm) - row.p_holm) <= 0.5 * 10 ** -decimals + 1e-12, (page, quote, row.p_holm)
            checked += 1
    assert checked >= 3


def compare_protocols():
    """reference/compare_protocols.py as a module (a script beside the records, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_protocols", REFERENCE / "compare_protocols.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_what_tuning_changed_as_the_reference_readme_quotes_it():
    """reference/README.md quotes reference/compare_protocols.py --seeds 0,1,2 (tuned minus first protocol
    at CR 10 / 100 / 1000): the quoted numbers are what the script makes of the committed CSVs."""
    module = compare_protocols()
    table = module.differences([0, 1, 2]).set_index("curve")
    text = " ".join((REFERENCE / "README.md").read_text().split())

    def quoted(curve):
        return " / ".join(f"{x + 0.0:+.2f}".replace("-", "−").replace("−0.00", "0.00").replace("+0.00", "0.00")
                          for x in table.loc[curve, ["CR 10", "CR 100", "CR 1000"]])

    for curve in ("dwf D=3", "dwf D=4", "magnitude", "global-magnitude", "gmp", "synflow", "set", "rigl", "random"):
        assert quoted(curve) in text, (curve, quoted(curve))
    assert (table.seeds == 3).all() and f"dense {table.loc['dense', 'CR 1']:+.2f}" in text


def test_what_tuning_changed_on_lenet5_as_the_reference_readme_quotes_it():
    """reference/README.md quotes reference/compare_protocols.py --arch lenet5 --seeds 0,1 (the first
    protocol's LeNet-5 has seeds 0-1, seed 0 alone for L1, RigL and the lottery tickets): CR 10 / 100 /
    1000 per curve, and the CR-30 and CR-300 losses where a pick's curve collapses between the
    rule's scoring CRs."""
    module = compare_protocols()
    table = module.differences([0, 1], "lenet5").set_index("curve")
    text = " ".join((REFERENCE / "README.md").read_text().split())

    def printed(x):
        return "–" if np.isnan(x) else f"{x + 0.0:+.2f}".replace("-", "−").replace("−0.00", "0.00").replace("+0.00", "0.00")

    def quoted(curve, crs=("CR 10", "CR 100", "CR 1000")):
        return " / ".join(printed(x) for x in table.loc[curve, list(crs)])

    for curve in ("dwf D=2", "dwf D=3", "dwf D=4", "l1", "global-magnitude", "global-magnitude +FT", "gmp",
                  "magnitude +FT"):
        assert quoted(curve) in text, (curve, quoted(curve))
    for curve, cr in (("rigl", "CR 30"), ("set", "CR 30"), ("lottery", "CR 300"), ("dwf D=3", "CR 300")):
        assert printed(table.loc[curve, cr]) in text, (curve, cr)
    assert f"{quoted('lottery LRR', ('CR 300',))} and {quoted('lottery LRR', ('CR 1000',))}" in text
    assert printed(table.loc["dense", "CR 1"]) in text
    assert (table.seeds == 2).sum() >= 14 and set(table.index[table.seeds == 1]) == {"l1", "rigl", "lottery",
                                                                                   "lottery LRR", "rigl sparse-init"}


def test_what_the_authors_recipes_change_as_the_docs_quote_it():
    """docs/recipes.md's table is reference/compare_protocols.py --recipes on the committed lenet-recipes
    and lenet-reference-v1 records: every recipe's accuracy and difference at every CR."""
    module = compare_protocols()
    table = module.recipes()
    assert len(table) == 5
    text = (ROOT / "docs" / "recipes.md").read_text()
    for _, row in table.iterrows():
        cells = " | ".join(f"{row[f'CR {c}']:.2f} ({row[f'Δ CR {c}'] + 0.0:+.2f})".replace("-", "−")
                           for c in (10, 30, 100, 300, 1000))
        assert cells in text, (row["recipe"], cells)
