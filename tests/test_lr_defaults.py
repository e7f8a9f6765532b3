"""DWF, shallow and L1 without an ``lr`` train at the calibrated rate of their architecture and depth
(issue 29: at the schedule's rate a new user's DWF grid zeroed nothing). The rate is written into the
cell's parameters, so it is part of the cell id; ``lr = "schedule"`` gives the old meaning and the old id
(docs/methods.md, "Learning rates of DWF and L1")."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from benchmark.__main__ import main
from benchmark.core import method as method_base
from benchmark.execution.cell import Cell
from benchmark.execution.grids import GridError, load_grid, parse_grid


def grid(methods: str, archs=("lenet300",), top: str = "") -> str:
    arch_list = ", ".join(f'"{a}"' for a in archs)
    return f"""{top}
seeds = [0]
[[experiment]]
archs = [{arch_list}]
datasets = ["fashion-mnist"]
schedule = {{ epochs = 3 }}
{methods}
"""


def cells_of(text: str) -> dict[tuple[str, str, int | None], Cell]:
    """(method, arch, depth or None) -> the grid's one cell there."""
    out = {}
    for cell in parse_grid(text, "g", "g.toml").cells:
        key = (cell.method, cell.arch, getattr(cell.method_params, "depth", None))
        assert key not in out
        out[key] = cell
    return out


def test_dwf_d3_on_lenet300_without_lr_gets_the_calibrated_rate_in_its_params_and_id():
    [default] = cells_of(grid("[experiment.methods.dwf]\ndepth = 3\nlam = 1e-3")).values()
    [schedule] = cells_of(grid('[experiment.methods.dwf]\ndepth = 3\nlam = 1e-3\nlr = "schedule"')).values()
    [explicit] = cells_of(grid("[experiment.methods.dwf]\ndepth = 3\nlam = 1e-3\nlr = 0.5")).values()
    assert default.params == {"lam": 1e-3, "lr": 0.5} and default.method_params.lr == 0.5
    assert default.config()["params"]["lr"] == 0.5  # in the record's config too
    assert default.id == explicit.id != schedule.id
    # "schedule" is the dataclass default (None): left out of the id, as before the calibrated default
    assert schedule.params == {"lam": 1e-3} and schedule.method_params.lr is None
    assert schedule.id == Cell.make("dwf", "lenet300", "fashion-mnist", 0, {"lam": 1e-3}, {"epochs": 3}).id


def test_every_calibrated_rate_and_none_on_architectures_without_calibration():
    text = grid("[experiment.methods.dwf]\ndepth = [2, 3, 4, 5]\n[experiment.methods.shallow]\n[experiment.methods.l1]",
                archs=("lenet300", "lenet5", "vgg16"))
    lrs = {key: cell.params.get("lr") for key, cell in cells_of(text).items()}
    assert lrs == {
        ("dwf", "lenet300", 2): 0.2, ("dwf", "lenet300", 3): 0.5, ("dwf", "lenet300", 4): 0.3,
        ("dwf", "lenet5", 2): 0.2, ("dwf", "lenet5", 3): 0.1, ("dwf", "lenet5", 4): 0.1,
        ("shallow", "lenet300", 2): 0.2, ("shallow", "lenet5", 2): 0.2,
        ("l1", "lenet300", None): 0.05, ("l1", "lenet5", None): 0.05,
        # no calibration: the schedule's rate, and the same id as before
        ("dwf", "vgg16", 2): None, ("dwf", "vgg16", 3): None, ("dwf", "vgg16", 4): None,
        ("dwf", "lenet300", 5): None, ("dwf", "lenet5", 5): None, ("dwf", "vgg16", 5): None,
        ("shallow", "vgg16", 2): None, ("l1", "vgg16", None): None,
    }


def test_the_calibrated_rates_are_the_references():
    """The preset that keeps the reference's first protocol (lenet-reference-v1, both LeNets) sets the
    same rates by hand."""
    reference = parse_grid(grid("[experiment.methods.dwf]\ndepth = [2, 3, 4]\n[experiment.methods.l1]",
                                archs=("lenet300", "lenet5")), "g")
    chosen = {(c.method, c.arch, getattr(c.method_params, "depth", None)): c.method_params.lr
              for c in load_grid("lenet-reference-v1").cells if c.method in ("dwf", "l1")
              and c.dataset == "fashion-mnist" and c.seed == 0}
    for cell in reference.cells:
        assert cell.method_params.lr == chosen[(cell.method, cell.arch, getattr(cell.method_params, "depth", None))]


def test_a_rate_the_tune_table_chooses_is_not_filled_in():
    text = grid("[experiment.methods.dwf]\ndepth = 3\nlam = [1e-4, 1e-3]\n"
                "[experiment.tune]\nparameter = \"lr\"\ncandidates = [0.1, 0.4]\nvalidation = 1000")
    [group] = parse_grid(text, "g").tune_groups
    assert all("lr" not in cell.params for cell in group.finals)
    assert sorted({c.method_params.lr for c in group.all_tuning_cells()}) == [0.1, 0.4]


@pytest.mark.parametrize("value, shown", [('"fast"', "'fast'"), ("-0.1", "-0.1"), ("0", "0"), ("true", "True")])
def test_a_bad_lr_is_rejected_with_the_file_the_value_and_what_is_allowed(value, shown):
    with pytest.raises(GridError) as error:
        parse_grid(grid(f"[experiment.methods.dwf]\ndepth = 3\nlr = {value}"), "g", "mine.toml")
    message = str(error.value)
    assert "mine.toml:9:" in message and f"dwf.lr={shown}" in message and '"schedule"' in message
    assert "number" in message or "> 0" in message


def test_cell_fills_in_the_calibrated_rate_and_takes_lr_schedule(capsys):
    assert method_base.with_defaults("dwf", "lenet300", {"depth": "4"}) == {"depth": "4", "lr": 0.3}
    assert method_base.with_defaults("dwf", "lenet300", {"lr": "schedule"}) == {"lr": "schedule"}
    assert method_base.with_defaults("l1", "resnet18", {}) == {}
    assert main(["cell", "dwf", "--arch", "lenet300", "--dataset", "fashion-mnist", "--epochs", "1", "--subset", "200",
                 "--set", "lam=1e-3", "--json", "--no-progress", "--device", "cpu"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert record["lr"] == 0.5 and record["config"]["params"] == {"lam": 1e-3, "lr": 0.5}


@dataclass(frozen=True)
class _PluginParams(method_base.Method.Params):
    lr: float | None = None
    lam: float = 1e-4


class _PluginWithoutHook(method_base.Method):
    """A plugin's regularizer with an lr parameter of its own and no default_params."""

    name = "plugin-lr"
    family = "regularization"
    Params = _PluginParams


def test_a_plugin_method_without_the_hook_is_unaffected(monkeypatch):
    monkeypatch.setitem(method_base.METHODS, _PluginWithoutHook.name, _PluginWithoutHook)
    cells = cells_of(grid("[experiment.methods.plugin-lr]\nlam = 1e-3", archs=("lenet300", "lenet5")))
    assert [cell.params for cell in cells.values()] == [{"lam": 1e-3}, {"lam": 1e-3}]
    # "schedule" means nothing to it: an ordinary bad value
    with pytest.raises(GridError, match="plugin-lr.lr='schedule' is not a number"):
        parse_grid(grid('[experiment.methods.plugin-lr]\nlr = "schedule"'), "g")
