"""Grids as data: expansion, canonical cell ids, filters, and one message listing every problem."""

import pytest

from benchmark.execution import grids, tuning
from benchmark.execution.cell import Cell

GRID = """
description = "two experiments"
seeds = [0, 1]

[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 2 }
[experiment.methods.dense]
[[experiment.methods.dwf]]
depth = [2, 3]
lam = [1e-4, 1e-3]
[[experiment.methods.dwf]]
depth = 4
lr = 0.2
lam = 1e-3

[[experiment]]
archs = ["lenet5"]
datasets = ["fashion-mnist", "mnist"]
seeds = [7]
[experiment.methods.l1]
lam = 1e-5
"""


def test_expansion_crosses_lists_and_keeps_scalars():
    grid = grids.parse_grid(GRID, "g")
    by_method = {}
    for cell in grid.cells:
        by_method.setdefault(cell.method, []).append(cell)
    assert len(by_method["dense"]) == 2  # 2 seeds
    assert len(by_method["dwf"]) == 2 * 2 * 2 + 2  # depth x lam x seeds + the depth-4 entry x seeds
    assert {c.method_params.lr for c in by_method["dwf"] if c.method_params.depth == 4} == {0.2}
    assert len(by_method["l1"]) == 2 and {c.seed for c in by_method["l1"]} == {7}
    assert all(c.schedule.epochs == 2 for c in by_method["dwf"])
    assert by_method["l1"][0].schedule.epochs == 100  # the LeNet default schedule


def test_cell_id_ignores_key_order_number_format_and_explicit_defaults():
    a = Cell.make("dwf", "lenet300", "fashion-mnist", 0, {"depth": 3, "lam": 0.001}, {"epochs": 5})
    b = Cell.make("dwf", "lenet300", "fashion-mnist", 0, {"lam": "1e-3", "init": "dwf"}, {"epochs": "5"})
    assert a.id == b.id
    c = Cell.make("dwf", "lenet300", "fashion-mnist", 0, {"lam": 0.002}, {"epochs": 5})
    d = Cell.make("dwf", "lenet300", "fashion-mnist", 1, {"lam": 0.001}, {"epochs": 5})
    assert len({a.id, c.id, d.id}) == 3
    assert Cell.from_config(a.config()).id == a.id


def test_every_problem_is_listed_with_its_line():
    bad = """seeds = [0]
colour = "red"
[[experiment]]
archs = ["lenet300", "alexnet"]
datasets = ["fashion-mnist"]
[experiment.methods.dwf]
depth = 1
lam = -3
[experiment.methods.magic]
[experiment.methods.l1]
lamda = 1e-4
"""
    with pytest.raises(grids.GridError) as err:
        grids.parse_grid(bad, "bad", "bad.toml")
    text = str(err.value)
    assert "bad.toml:2: unknown key 'colour'" in text
    assert "unknown architecture 'alexnet'" in text
    assert "bad.toml:7:" in text and "depth=1 must be >= 2" in text
    assert "lam=-3.0 must be >= 0" in text
    assert "unknown method 'magic'" in text
    assert "bad.toml:11:" in text and "unknown parameter(s) ['lamda']" in text
    assert text.count("alexnet") == 1  # one line per problem, not one per cell


def test_invalid_toml_names_the_position():
    with pytest.raises(grids.GridError, match="line 2"):
        grids.parse_grid("[[experiment]]\narchs = [\"a\" \"b\"]\n", "x", "x.toml")


def test_filters_and_seed_override():
    cells = grids.parse_grid(GRID, "g").cells
    dwf3 = grids.filter_cells(cells, ["method=dwf", "depth=3"])
    assert dwf3 and all(c.method == "dwf" and c.method_params.depth == 3 for c in dwf3)
    assert len(grids.filter_cells(cells, ["lam=0.001,1e-4", "method=dwf"])) == 10
    with pytest.raises(ValueError, match="unknown key"):
        grids.filter_cells(cells, ["dept=3"])
    reseeded = grids.with_seeds(grids.filter_cells(cells, ["method=dense"]), [4, 5, 6])
    assert sorted(c.seed for c in reseeded) == [4, 5, 6]


@pytest.mark.parametrize("name", ["smoke", "quick", "lenet", "cifar", "full", "dwf-study", "lenet-calibration",
                                  "lenet-reference", "lenet-reference-v1"])
def test_presets_parse(name):
    grid = grids.load_grid(name)
    assert (grid.cells or grid.final_templates()) and grid.description


def test_the_lenet_grid_holds_every_reference_cell():
    """`lenet` is the reference's settings on three datasets, so a GPU box that runs it extends the committed
    reference (same cell ids, records reused) instead of training LeNet-5 at rates the calibration rejected."""
    lenet = {cell.id for cell in grids.load_grid("lenet").cells}
    reference = grids.load_grid("lenet-reference")
    lenet_grid = grids.load_grid("lenet")
    lenet |= {cell.id for cell in lenet_grid.final_templates() + tuning.tuning_cells(lenet_grid.tune_groups)}
    missing = [cell.label for cell in reference.cells + reference.final_templates()
               + tuning.tuning_cells(reference.tune_groups) if cell.id not in lenet]
    assert not missing, missing[:5]


def test_an_include_table_moves_the_included_grid_onto_other_datasets(tmp_path, monkeypatch):
    """`{ grid = ..., datasets = [...] }` gives the cells the grid itself would give with those datasets
    in every experiment: same ids, so records are shared with a grid written out in full."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(GRID)
    (tmp_path / "moved.toml").write_text('include = [{ grid = "base.toml", datasets = ["mnist", "kmnist"] }]\n')
    written_out = GRID.replace('datasets = ["fashion-mnist", "mnist"]', 'datasets = ["mnist", "kmnist"]') \
                      .replace('datasets = ["fashion-mnist"]', 'datasets = ["mnist", "kmnist"]')
    moved = grids.load_grid("moved.toml").cells
    base = grids.load_grid("base.toml").cells
    assert {c.dataset for c in moved} == {"mnist", "kmnist"}
    assert len(moved) == 2 * len({(c.method, c.arch, c.seed, str(c.params)) for c in base})
    assert sorted(c.id for c in moved) == sorted(c.id for c in grids.parse_grid(written_out).cells)


@pytest.mark.parametrize("item, message", [
    ('{ grid = "base.toml", datasets = ["mnits"] }', "unknown dataset 'mnits'"),
    ('{ grid = "base.toml", sets = ["mnist"] }', "unknown key(s) ['sets'] in an include table"),
    ('{ datasets = ["mnist"] }', 'an include table needs grid = "<preset or file>"'),
    ('{ grid = "base.toml", datasets = "mnist" }', "datasets must be a non-empty list of names, got 'mnist'"),
])
def test_a_bad_include_table_is_named_with_its_line(tmp_path, monkeypatch, item, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text(GRID)
    (tmp_path / "moved.toml").write_text(f'description = "x"\ninclude = [{item}]\n')
    with pytest.raises(grids.GridError) as err:
        grids.load_grid("moved.toml")
    assert message in str(err.value) and "moved.toml:2" in str(err.value)
