"""``match``: the λs and target CRs that put every seed of every curve near every reported CR."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from benchmark.__main__ import main
from benchmark.analysis import matching, matching_baselines, matching_lambda, matching_output
from benchmark.execution import cell as cell_mod
from benchmark.execution.grids import load_grid

# lenet300 on Fashion-MNIST (10 classes: chance 0.10), 2 seeds. Method tables name their λs; each
# depth of DWF is one curve with its own shape below. D=2 sets its lr, D=3 and D=4 take the
# schedule's, L1 its calibrated default (0.05, written into its cells).
GRID = """
description = "matching test grid"
seeds = [0, 1]

[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 2, lr = 0.1 }
[experiment.methods.dense]
[[experiment.methods.dwf]]
depth = 2
lr = 0.2
lam = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
[[experiment.methods.dwf]]
depth = 3
lam = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
lr = "schedule"
[[experiment.methods.dwf]]
depth = 4
lam = [1e-4, 3e-4, 1e-3, 3e-3]
lr = "schedule"
[experiment.methods.l1]
lam = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
[experiment.methods.magnitude]
target_cr = [10, 100, 1000]
finetune_epochs = 3
[experiment.methods.random]
target_cr = [10, 100, 1000]
[experiment.methods.lottery]
target_cr = 1000
prune_fraction = 0.5
"""

#: (λ, CR, accuracy) per curve, the same for both seeds unless a test changes them.
CURVES = {
    # D=2: CR 10, 30, 57.7, 173, 300, 1000; 57.7 and 173 sit sqrt(3) = 1.73x either side of CR 100 (a 3x gap)
    2: [(1e-4, 10, 0.89), (3e-4, 30, 0.88), (1e-3, 100 / math.sqrt(3), 0.87), (3e-3, 100 * math.sqrt(3), 0.86),
        (1e-2, 300, 0.85), (3e-2, 1000, 0.84)],
    # D=3: reaches chance (0.11) at CR 400, before CR 1000: nothing is needed past it
    3: [(1e-4, 10, 0.89), (3e-4, 30, 0.88), (1e-3, 100, 0.86), (3e-3, 250, 0.60), (1e-2, 400, 0.11)],
    # D=4: stops at CR 400 above chance: CR 1000 lies past its last point
    4: [(1e-4, 10, 0.89), (3e-4, 30, 0.88), (1e-3, 100, 0.87), (3e-3, 400, 0.86)],
}
# L1: within 1.5x of every reported CR already, and within 10 points of dense (0.90) up to CR 4000
L1 = [(1e-5, 9, 0.89), (3e-5, 28, 0.88), (1e-4, 110, 0.87), (3e-4, 290, 0.86), (1e-3, 1100, 0.85),
      (3e-3, 2000, 0.84), (1e-2, 4000, 0.82)]


def row(cell, cr, acc, status="ok") -> dict:
    return {"grid": "g", "cell_id": cell.id, "method": cell.method, "arch": cell.arch, "dataset": cell.dataset,
            "seed": cell.seed, "depth": cell.params.get("depth", 3 if cell.method == "dwf" else None),
            "lam": getattr(cell.method_params, "lam", None),
            "target_cr": getattr(cell.method_params, "target_cr", None),
            "level": "", "test_acc": acc, "cr": cr, "status": status}


def results_rows(grid, curves=CURVES, l1=L1, skip=(), lottery=True) -> list[dict]:
    """Rows for every dense, DWF and L1 cell of ``grid`` (``skip``: (depth, λ, seed) left unrun); the
    magnitude baseline at 0.85 at CR 1000 (still within 10 points), random at chance; the lottery
    ticket (one cell, one record per level: CR 2, 4, ..., 512, 1000) at 0.84 at CR 1000 unless not
    ``lottery``."""
    rows = []
    for cell in grid.cells:
        p = cell.method_params
        if cell.method == "dense":
            rows.append(row(cell, 1.0, 0.90))
        elif cell.method == "dwf":
            if (p.depth, p.lam, cell.seed) in skip:
                continue
            rows += [row(cell, cr, acc) for lam, cr, acc in curves[p.depth] if math.isclose(lam, p.lam)]
        elif cell.method == "l1":
            rows += [row(cell, cr, acc) for lam, cr, acc in l1 if math.isclose(lam, p.lam)]
        elif cell.method == "magnitude":
            rows.append(row(cell, p.target_cr, {10: 0.89, 100: 0.88, 1000: 0.85}[p.target_cr]))
        elif cell.method == "random":
            rows.append(row(cell, p.target_cr, {10: 0.85, 100: 0.40, 1000: 0.10}[p.target_cr]))
        elif cell.method == "lottery" and lottery:
            rows += [row(cell, cr, 0.89 - 0.05 * level / 10) | {"level": level}
                     for level, cr in enumerate([2 ** k for k in range(1, 10)] + [1000], start=1)]
    return rows


@pytest.fixture
def setup(tmp_path):
    """(grid file, results dir) with every cell run."""
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    grid = load_grid(str(path))
    folder = tmp_path / "results" / "g"
    folder.mkdir(parents=True)
    pd.DataFrame(results_rows(grid)).to_csv(folder / "results.csv", index=False)
    return path, tmp_path / "results"


def by_label(match) -> dict:
    return {match.labels[f]: v for f, v in match.added().items()}


def gaps_of(match, text: str) -> list:
    return [g for g in match.gaps if text in g.label]


def match_with_d4(tmp_path, points):
    """``match`` on the test grid with DWF D=4's λs and (λ, CR, accuracy) replaced by ``points``."""
    path = tmp_path / "g.toml"
    lams = ", ".join(f"{lam:g}" for lam, _, _ in points)
    path.write_text(GRID.replace("lam = [1e-4, 3e-4, 1e-3, 3e-3]", f"lam = [{lams}]"))
    folder = tmp_path / "results" / "g"
    folder.mkdir(parents=True)
    rows = results_rows(load_grid(str(path)), dict(CURVES) | {4: points})
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    return matching.match_grid(str(path), tmp_path / "results")


def test_a_3x_gap_around_cr_100_gets_one_lambda_between_its_neighbours(setup):
    path, results = setup
    match = matching.match_grid(str(path), results)
    gaps = gaps_of(match, "dwf D=2")
    assert [(g.seed, g.cr, g.reason) for g in gaps] == [(0, 100.0, "gap"), (1, 100.0, "gap")]
    assert gaps[0].nearest == pytest.approx(100 / math.sqrt(3)) and gaps[0].ratio == pytest.approx(math.sqrt(3))
    # log λ halfway between 1e-3 and 3e-3 (CR 100 is halfway in log CR): sqrt(3e-6) = 1.73e-3; both seeds agree
    assert by_label(match)["lenet300/fashion-mnist dwf D=2 [lr=0.2]"] == [0.00173]
    assert all(g.proposed == 0.00173 for g in gaps)
    assert 1e-3 < 0.00173 < 3e-3


def test_a_curve_reaching_chance_gets_nothing_beyond_it(setup):
    path, results = setup
    match = matching.match_grid(str(path), results)
    assert not gaps_of(match, "dwf D=3")  # CR 1000 is past chance (CR 400); 10..300 are matched
    assert ("lenet300/fashion-mnist dwf D=3", 2, 2) in match.complete


def test_a_curve_stopping_short_extrapolates_one_step(setup):
    path, results = setup
    match = matching.match_grid(str(path), results)
    gaps = gaps_of(match, "dwf D=4")
    assert {(g.cr, g.reason) for g in gaps} == {(1000.0, "beyond")}
    (lam,) = by_label(match)["lenet300/fashion-mnist dwf D=4"]
    assert 3e-3 < lam <= 3e-3 * matching_lambda.MAX_STEP * 1.001  # one step past its largest λ, at most half a decade
    # along the last segment's slope (log λ / log CR = log 3 / log 4), aimed at sqrt(1.5) x CR 1000
    slope = math.log(3) / math.log(4)
    assert lam == matching_lambda.round3(3e-3 * min(matching_lambda.MAX_STEP, (1000 * math.sqrt(1.5) / 400) ** slope))


def test_a_curve_short_of_a_cr_where_the_next_lambda_pruned_everything_gets_a_lambda_between(tmp_path):
    """CR 800 is within 1.5x of CR 1000, but the table cannot read CR 1000 between CR 800 and every
    weight pruned: the geometric mean of the two λs fills it (LeNet-5's D=2 in lenet-reference)."""
    match = match_with_d4(tmp_path, [(1e-4, 10, 0.89), (3e-4, 30, 0.88), (1e-3, 100, 0.87), (2e-3, 300, 0.85),
                                     (3e-3, 800, 0.80), (1e-2, math.inf, 0.10)])
    gaps = gaps_of(match, "dwf D=4")
    assert {(g.seed, g.cr, g.reason) for g in gaps} == {(0, 1000.0, "pruned"), (1, 1000.0, "pruned")}
    assert all(g.ratio == pytest.approx(1.25) for g in gaps)  # near enough by the ratio alone
    assert by_label(match)["lenet300/fashion-mnist dwf D=4"] == [matching_lambda.round3(math.sqrt(3e-3 * 1e-2))]
    assert "next λ prunes all" in matching_output.format_match(match)


def test_a_curve_within_the_ratio_everywhere_gets_nothing(setup):
    path, results = setup
    match = matching.match_grid(str(path), results)
    assert not gaps_of(match, "l1")
    assert ("lenet300/fashion-mnist l1 [lr=0.05]", 2, 2) in match.complete
    assert "lenet300/fashion-mnist l1 [lr=0.05]" not in by_label(match)


def test_baselines_get_targets_past_the_lambda_curves_reach(setup):
    path, results = setup
    match = matching.match_grid(str(path), results)
    ext = {e.label: e for e in match.extensions}
    # L1 stays within 10 points of dense (0.90) up to its last point, CR 4000: 1-2-5 past 1000 up to 5000
    magnitude = ext["lenet300/fashion-mnist magnitude +FT [finetune_epochs=3]"]
    assert magnitude.reach == pytest.approx(4000) and magnitude.values == [2000, 5000]
    assert max(magnitude.values) > max(cr for _, cr, _ in L1)
    assert ext["lenet300/fashion-mnist random"].values == []  # at chance at CR 1000: nothing past it
    lottery = [e for label, e in ext.items() if "lottery" in label]
    assert len(lottery) == 1 and lottery[0].values == [2000, 5000]  # 0.84 at its last level, CR 1000


def test_a_baseline_waits_for_its_largest_target(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    grid = load_grid(str(path))
    folder = tmp_path / "results" / "g"
    folder.mkdir(parents=True)
    pd.DataFrame(results_rows(grid, lottery=False)).to_csv(folder / "results.csv", index=False)
    match = matching.match_grid(str(path), tmp_path / "results")
    (lottery,) = [e for e in match.extensions if "lottery" in e.label]
    assert lottery.values == [] and "waits on its target_cr 1000" in lottery.note


def test_baseline_targets_stop_at_the_prunable_weights(setup, monkeypatch):
    monkeypatch.setattr(cell_mod, "prunable_weights", lambda arch, dataset: 3000)
    path, results = setup
    match = matching.match_grid(str(path), results)
    magnitude = [e for e in match.extensions if e.label.startswith("lenet300/fashion-mnist magnitude")][0]
    assert magnitude.values == [2000] and "5000 left out" in magnitude.note


def test_a_gap_around_a_grid_lambda_not_run_yet_waits_for_it(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    grid = load_grid(str(path))
    folder = tmp_path / "results" / "g"
    folder.mkdir(parents=True)
    # seed 1 has not run D=2 at λ 1e-2 yet (CR 300): its gap 173..1000 waits for it
    pd.DataFrame(results_rows(grid, skip={(2, 1e-2, 1)})).to_csv(folder / "results.csv", index=False)
    match = matching.match_grid(str(path), tmp_path / "results")
    waiting = [g for g in gaps_of(match, "dwf D=2") if g.seed == 1 and g.cr == 300]
    assert len(waiting) == 1 and waiting[0].proposed is None and "0.01" in waiting[0].note
    assert by_label(match)["lenet300/fashion-mnist dwf D=2 [lr=0.2]"] == [0.00173]


def test_a_lambda_already_in_the_grid_is_never_proposed(tmp_path):
    # D=2's grid has λ 1.73e-3, the interpolated λ of its CR-100 gap, but it failed (diverged) for both seeds
    path = tmp_path / "g.toml"
    path.write_text(GRID.replace("lam = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]",
                                 "lam = [1e-4, 3e-4, 1e-3, 1.73e-3, 3e-3, 1e-2, 3e-2]"))
    grid = load_grid(str(path))
    folder = tmp_path / "results" / "g"
    folder.mkdir(parents=True)
    failed = [row(c, "", "", status="failed") for c in grid.cells
              if c.method == "dwf" and math.isclose(c.method_params.lam, 1.73e-3)]
    pd.DataFrame(results_rows(grid) + failed).to_csv(folder / "results.csv", index=False)
    match = matching.match_grid(str(path), tmp_path / "results")
    gaps = gaps_of(match, "dwf D=2")
    assert len(gaps) == 2 and all(g.proposed is None and "in the grid already" in g.note for g in gaps)
    assert "lenet300/fashion-mnist dwf D=2 [lr=0.2]" not in by_label(match)


def test_a_jump_between_nearly_equal_lambdas_is_not_split(tmp_path):
    match = match_with_d4(tmp_path, [(1e-4, 10, 0.89), (3e-4, 30, 0.88), (1e-3, 50, 0.87), (1.04e-3, 1000, 0.86)])
    gaps = gaps_of(match, "dwf D=4")
    assert {g.cr for g in gaps} == {100.0, 300.0} and all("jumps" in g.note and g.jump for g in gaps)
    assert "lenet300/fashion-mnist dwf D=4" not in by_label(match)
    # the curve is named once as left with jumps only, and not as matched
    assert match.jumps == [("lenet300/fashion-mnist dwf D=4", 2, 2)]
    assert not any(label.startswith("lenet300/fashion-mnist dwf D=4") for label, _, _ in match.complete)
    assert "jumps no λ can split" in matching_output.format_match(match) and "dwf D=4 (2 of 2 seeds)" in matching_output.format_match(match)


def test_written_grid_parses_into_the_proposed_cells_with_their_curves_settings(setup, tmp_path):
    path, results = setup
    match = matching.match_grid(str(path), results)
    out = tmp_path / "added.toml"
    cells = matching_output.write_grid(match, out)
    written = load_grid(str(out))
    assert {c.id for c in written.cells} == {c.id for c in cells} and len(cells) == len(match.cells())
    original = load_grid(str(path)).cells
    assert not {c.id for c in written.cells} & {c.id for c in original}
    proposed = {(f.method, f.arch, f.dataset, f.swept, v) for f, vs in match.added().items() for v in vs}
    for cell in written.cells:
        swept = "lam" if "lam" in asdict(cell.method_params) else "target_cr"
        value = getattr(cell.method_params, swept)
        assert (cell.method, cell.arch, cell.dataset, swept, value) in proposed
        # the curve it extends: a cell of the grid equal in everything but λ / target_cr (and seed)
        rest = {k: v for k, v in asdict(cell.method_params).items() if k != swept}
        twins = [c for c in original if c.method == cell.method and c.arch == cell.arch and c.dataset == cell.dataset
                 and {k: v for k, v in asdict(c.method_params).items() if k != swept} == rest]
        assert twins, cell.label()
        assert all(c.schedule == cell.schedule and c.subset == cell.subset for c in twins)
        assert cell.seed in {c.seed for c in twins}
    # D=4's curve is at the schedule's learning rate: the written grid says so, or its cells would
    # take the calibrated rate and join no curve (write_grid checks the ids)
    d4 = out.read_text().split("# lenet300/fashion-mnist dwf D=4")[1].split("[[experiment]]")[1]
    assert 'lr = "schedule"' in d4 and all(c.method_params.lr is None for c in written.cells
                                            if c.method == "dwf" and c.method_params.depth == 4)
    # the lottery ticket's single target became a list of two
    assert sorted(c.method_params.target_cr for c in written.cells if c.method == "lottery") == [2000, 2000, 5000, 5000]
    # crossed with the curve's seeds: D=2 gets λ 0.00173 on seeds 0 and 1
    assert sorted(c.seed for c in written.cells if getattr(c.method_params, "lam", None) == 0.00173) == [0, 1]
    # added to the grid through include, every cell of both is there once
    both = tmp_path / "both.toml"
    both.write_text(f'include = ["{path}", "{out}"]\n')
    assert len(load_grid(str(both)).cells) == len(original) + len(cells)


def test_cli_prints_the_table_and_writes_the_grid(setup, tmp_path, capsys):
    path, results = setup
    out = tmp_path / "added.toml"
    assert main(["match", "--grid", str(path), "--results-dir", str(results), "--write", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dwf D=2" in text and "gap > 1.5x" in text and "0.00173" in text and "past last point" in text
    assert load_grid(str(out)).cells


def test_cli_says_nothing_to_add_when_every_curve_is_matched(tmp_path, capsys):
    path = tmp_path / "g.toml"
    path.write_text(GRID.split("[[experiment.methods.dwf]]")[0] + GRID[GRID.index("[experiment.methods.l1]"):]
                    .split("[experiment.methods.magnitude]")[0])
    grid = load_grid(str(path))
    folder = tmp_path / "results" / "g"
    folder.mkdir(parents=True)
    pd.DataFrame(results_rows(grid)).to_csv(folder / "results.csv", index=False)
    out = tmp_path / "added.toml"
    assert main(["match", "--grid", str(path), "--results-dir", str(tmp_path / "results"), "--write", str(out)]) == 0
    assert "nothing to add" in capsys.readouterr().out
    assert not out.exists()


def test_reads_the_result_files_of_a_run_still_going(tmp_path):
    """No results.csv yet: the cell records are read (and the folder is left as it is)."""
    from benchmark.execution.cell import cell_columns
    from benchmark.execution.store import Store

    path = tmp_path / "g.toml"
    path.write_text(GRID)
    grid = load_grid(str(path))
    store = Store(tmp_path / "results", "g")
    for r in results_rows(grid):
        cell = next(c for c in grid.cells if c.id == r["cell_id"])
        record = cell_columns(cell) | {"status": "ok", "test_acc": r["test_acc"], "cr": float(r["cr"])}
        store.write(cell.id, cell.config(), [record], "run1")
    match = matching.match_grid(str(path), tmp_path / "results")
    assert by_label(match)["lenet300/fashion-mnist dwf D=2 [lr=0.2]"] == [0.00173]
    assert any("records" in n and "not written" in n for n in match.notes)
    assert not (store.root / "results.csv").exists()


def test_one_two_five_and_rounding():
    assert matching_baselines.one_two_five(1000, 4000) == [2000, 5000]
    assert matching_baselines.one_two_five(1000, 2000) == [2000]
    assert matching_baselines.one_two_five(500, 600) == [1000]
    assert matching_lambda.round3(0.0017320508) == 0.00173 and matching_lambda.round3(12345) == 12300


def test_the_committed_reference(tmp_path):
    """lenet-reference-v1 (the first protocol): D=2 on LeNet-300-100 jumps from CR ~500 to ~2000-3000 around CR 1000 on every
    seed; the grid file of the proposals parses; the reference folder is only read."""
    reference = Path(__file__).resolve().parents[1] / "reference"
    before = {p: p.stat().st_mtime_ns for p in (reference / "lenet-reference-v1").glob("*.csv")}
    match = matching.match_grid("lenet-reference-v1", reference)
    d2 = [g for g in match.gaps if g.label.startswith("lenet300/fashion-mnist dwf D=2")]
    assert {(g.seed, g.cr) for g in d2} == {(0, 1000.0), (1, 1000.0), (2, 1000.0)}
    assert all(0.0178 < g.proposed < 0.0316 for g in d2)
    cells = matching_output.write_grid(match, tmp_path / "more.toml")
    assert len(load_grid(str(tmp_path / "more.toml")).cells) == len(cells) > 0
    assert before == {p: p.stat().st_mtime_ns for p in (reference / "lenet-reference-v1").glob("*.csv")}


def test_a_tuned_grid_is_matched_on_the_final_cells_of_its_picks():
    """lenet-reference tunes LeNet-300-100's learning rates: its DWF curves are matched at the picked
    rate (the committed tuning records pick 0.2 for D=3), with the committed final cells as their points."""
    reference = Path(__file__).resolve().parents[1] / "reference"
    match = matching.match_grid("lenet-reference", reference)
    labels = set(match.labels.values())
    assert "lenet300/fashion-mnist dwf D=3 [lr=0.2]" in labels
    assert not any("not in grid" in note for note in match.notes)
    # a curve counts as matched for the seeds that have results, never for seeds not run yet
    rows = pd.read_csv(reference / "lenet-reference" / "results.csv", low_memory=False)
    for label, matched, seeds in match.complete:
        arch, rest = label.split("/", 1)
        variant = rest.split(" ", 1)[1].split(" [")[0]
        ran = rows[(rows.arch == arch) & (rows.variant == variant) & (rows.status == "ok")].seed.nunique()
        assert matched == ran <= seeds, label
