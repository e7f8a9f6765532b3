"""Lottery-ticket options on real (tiny) training: rewinding to an iteration, learning-rate rewinding,
fine-tuning, an unpruned output layer, the one level plan, resume, validation, the CLI and grids.

Expectations are computed here from the dense run or from the papers' rules written out, not from
the method's own helpers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from benchmark.engine import schedule as schedule_mod
from benchmark.execution import grids
from benchmark.engine import models
from benchmark.__main__ import main
from benchmark.execution.cell import Cell, Context, run_cell
from benchmark.execution.todo import estimate_epochs
from benchmark.execution.collection import variant_label
from benchmark.engine.schedule import Schedule
from benchmark.engine.train import TrainHooks, train
from methods import get_method
from methods.lottery import level_keep_counts
from methods.masks import kept_count

from conftest import make_data

# 256 training images in batches of 64: 4 steps per epoch, 8 in all.
SCHEDULE = {"epochs": 2, "batch_size": 64, "warmup_epochs": 0}
STEPS_PER_EPOCH = 4
LAYERS = (64 * 300, 300 * 100, 100 * 4)  # lenet300 on the 8x8, 4-class synthetic data


@pytest.fixture(scope="module")
def data():
    return make_data(augment=True)


@pytest.fixture
def early_points(monkeypatch):
    """The dense cache keeps iterations 2, 6 and 50 instead of 100, 500 and 2000, so that rewind points
    fall inside an 8-step run (training 100 steps takes most of a minute on a loaded 2-core machine)."""
    monkeypatch.setattr(schedule_mod, "REWIND_ITERATIONS", (2, 6, 50))
    monkeypatch.setattr(schedule_mod, "REWIND_POINTS", (0, 1, 2, "2it", "6it", "50it"))


def lottery(**params) -> Cell:
    return Cell.make("lottery", "lenet300", "fashion-mnist", params={"target_cr": 4.0, "prune_fraction": 0.5} | params,
                     schedule=SCHEDULE)


class Watching(Context):
    """A Context that keeps, for each level, the model a level starts from and how it trains."""

    def __init__(self, *args, stop_in: tuple[str, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts, self.calls, self.stop_in = {}, {}, stop_in

    def train(self, model, hooks=None, phase="train", **kwargs):
        self.starts[phase] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.calls[phase] = kwargs
        if self.stop_in and self.stop_in[0] == phase:
            hooks = StopInEpoch(self.stop_in[1])
        return super().train(model, hooks, phase, **kwargs)


class StopInEpoch(TrainHooks):
    """Interrupts training the way a kill would, in epoch ``epoch`` (0-based) before its checkpoint."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def after_epoch(self, model, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class StepRecorder(TrainHooks):
    """Records the weights after given steps and the learning rate of every step."""

    def __init__(self, steps=()):
        self.steps, self.states, self.lrs = set(steps), {}, []

    def bind(self, optimizer, steps_per_epoch, total_steps):
        self.optimizer = optimizer

    def after_step(self, model, step):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        if step + 1 in self.steps:
            self.states[step + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_watched(cell: Cell, data, tmp_path, cache=None, **kwargs) -> tuple[Watching, list[dict]]:
    ctx = Watching(cell, data, torch.device("cpu"), tmp_path / "w" / cell.id, cache or tmp_path / "c", progress=False,
                   **kwargs)
    return ctx, get_method("lottery")(cell.method_params).run(ctx)


def label(cell: Cell) -> str:
    """The curve a cell's records go to (its records carry every parameter, defaults included)."""
    return variant_label({"method": cell.method} | dataclasses.asdict(cell.method_params))


def kept_weights_equal(start: dict, source: dict) -> bool:
    """Every weight the level keeps (nonzero in its masked start) equals ``source``'s, and every bias."""
    for name in ("fc1", "fc2", "fc3"):
        mask_key = f"{name}.parametrizations.weight.0.mask"
        everything = torch.ones_like(source[f"{name}.weight"], dtype=torch.bool)  # an unmasked (dense) layer
        mask = start[mask_key] != 0 if mask_key in start else everything
        weight = start.get(f"{name}.parametrizations.weight.original", start.get(f"{name}.weight"))
        if not torch.equal(weight[mask], source[f"{name}.weight"][mask]):
            return False
        if not torch.equal(start[f"{name}.bias"], source[f"{name}.bias"]):
            return False
    return True


# ------------------------------------------------------------------------------------------------
# Rewinding to an iteration
# ------------------------------------------------------------------------------------------------

def test_the_dense_cache_keeps_the_state_after_k_steps_and_taking_it_changes_nothing(tmp_path, data, early_points):
    cell = lottery(rewind="6it")
    dense = Context(cell, data, torch.device("cpu"), tmp_path / "w", tmp_path / "c", progress=False).dense("6it")
    kept = [p for p in schedule_mod.REWIND_POINTS if p in dense.snapshots]
    assert kept == [0, 1, 2, "2it", "6it"]  # 50it: past the end of the 8 steps
    # An independent run without snapshots, watched after each step: same states at 2, 6 and the end.
    watcher = StepRecorder(steps=(2, 6))
    model = models.build("lenet300", (1, 8, 8), 4, seed=0)
    train(model, data, cell.schedule, seed=0, hooks=watcher, progress=False)
    for k in (2, 6):
        for key, value in watcher.states[k].items():
            assert torch.equal(dense.snapshots[f"{k}it"][key], value), (k, key)
    for key, value in model.state_dict().items():
        assert torch.equal(dense.model.state_dict()[key], value), key


def test_joining_the_schedule_mid_epoch_continues_it_exactly(data):
    """Without momentum the optimizer has no state: a run that joins after 6 steps (epoch 1, batch 2)
    from the straight run's weights there ends with the same weights, learning rates and batches
    (augmented: the skipped batches still draw their random crops)."""
    schedule = Schedule(**SCHEDULE | {"epochs": 3, "lr": 0.05, "momentum": 0.0, "warmup_epochs": 1})
    straight = models.build("lenet300", (1, 8, 8), 4, seed=0)
    full_steps = StepRecorder()
    _, snaps = train(straight, data, schedule, seed=3, hooks=full_steps, snapshot_steps=(6,), progress=False)
    joined = models.build("lenet300", (1, 8, 8), 4, seed=0)
    joined.load_state_dict(snaps["6it"])
    late_steps = StepRecorder()
    late, _ = train(joined, data, schedule, seed=3, hooks=late_steps, first_epoch=1, first_batch=2, progress=False)
    assert [e["epoch"] for e in late.epochs] == [2, 3]
    assert late_steps.lrs == full_steps.lrs[6:] and len(late_steps.lrs) == 6
    for key, value in straight.state_dict().items():
        assert torch.equal(joined.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"first_batch=4 must be in \[0, 4\) \(the steps of one epoch\)"):
        train(models.build("lenet300", (1, 8, 8), 4), data, schedule, seed=3, first_batch=4, progress=False)


def test_rewinding_to_an_iteration_starts_every_level_from_the_dense_state_there(tmp_path, data, early_points):
    cell = lottery(rewind="2it")
    ctx, records = run_watched(cell, data, tmp_path)
    dense = ctx.dense()
    assert list(ctx.starts) == ["level1", "level2"]
    for phase, start in ctx.starts.items():
        assert kept_weights_equal(start, dense.snapshots["2it"]), phase
        assert not kept_weights_equal(start, dense.snapshots[0]), phase
        assert ctx.calls[phase] == {"first_epoch": 0, "first_batch": 2}
    per_level = 2 - 2 / STEPS_PER_EPOCH
    assert [r["epochs"] for r in records] == [2, 2 + per_level, 2 + 2 * per_level]
    assert ctx.trained_epochs == 2 * per_level
    # the levels end each epoch at the dense run's learning rate: the same point of the schedule
    assert [e["lr"] for e in records[1]["history"]] == [e["lr"] for e in dense.history]
    total = sum(LAYERS)
    assert [r["nonzero_params"] for r in records] == [total, kept_count(total, 2), kept_count(total, 4)]
    assert variant_label({"method": "lottery", "rewind": "2it"}) == "lottery rewind=2it"


# ------------------------------------------------------------------------------------------------
# Learning-rate rewinding and fine-tuning
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rewind", [0, "3it"])
def test_lr_rewinding_keeps_the_previous_levels_weights_and_restarts_the_lr_schedule(tmp_path, data, rewind):
    cell = lottery(retrain="lr_rewind", rewind=rewind)
    ctx, records = run_watched(cell, data, tmp_path)
    dense = ctx.dense()
    assert kept_weights_equal(ctx.starts["level1"], dense.model.state_dict())
    steps = 0 if rewind == 0 else 3
    assert ctx.calls["level1"] == {"first_epoch": 0, "first_batch": steps}
    # level 2 starts from level 1's trained weights (pruned ones zero), not from any dense state
    trained1 = torch.load(ctx.work_dir / "level1.ckpt", weights_only=False)["model"]
    start2 = ctx.starts["level2"]
    for name in ("fc1", "fc2", "fc3"):
        original, mask = f"{name}.parametrizations.weight.original", f"{name}.parametrizations.weight.0.mask"
        kept = start2[mask] != 0
        assert torch.equal(start2[original][kept], (trained1[original] * trained1[mask])[kept])
    assert not kept_weights_equal(ctx.starts["level2"], dense.model.state_dict())
    for record in records[1:]:
        assert [e["lr"] for e in record["history"]] == [e["lr"] for e in dense.history]
        assert record["history"][-1]["lr"] == 0.0  # trained to the end of the cosine schedule
    assert label(cell) == ("lottery LRR" if rewind == 0 else "lottery LRR rewind=3it")
    assert records[-1]["epochs"] == pytest.approx(2 + 2 * (2 - steps / STEPS_PER_EPOCH))


def test_finetuning_keeps_the_weights_and_trains_at_a_constant_small_lr(tmp_path, data):
    cell = lottery(retrain="finetune", finetune_epochs=1)
    ctx, records = run_watched(cell, data, tmp_path)
    assert kept_weights_equal(ctx.starts["level1"], ctx.dense().model.state_dict())
    lr = cell.schedule.lr / 100  # the default: a hundredth of the schedule's peak
    for phase in ("level1", "level2"):
        assert ctx.calls[phase]["constant_lr"] is True and ctx.calls[phase]["schedule"].lr == lr
    for record in records[1:]:
        assert [e["lr"] for e in record["history"]] == [lr]
        assert (record["finetune_epochs"], record["finetune_lr"]) == (1, lr)
    assert [r["epochs"] for r in records] == [2, 3, 4]
    assert label(cell) == "lottery FT"
    # and the loop's constant rate is constant at every step, from the first
    watcher = StepRecorder()
    train(models.build("lenet300", (1, 8, 8), 4), data, Schedule(**SCHEDULE).finetune(1, 0.003), seed=0,
          hooks=watcher, constant_lr=True, progress=False)
    assert watcher.lrs == [0.003] * STEPS_PER_EPOCH


# ------------------------------------------------------------------------------------------------
# An unpruned output layer and the level plan
# ------------------------------------------------------------------------------------------------

def independent_plan(layers, target_cr, fraction, prune_output) -> list[int]:
    """Kept weights per level written out: the pool (all layers, or all but the output layer) keeps
    (1 - fraction)^l until the next level would reach the target, and the last level keeps
    round(total / target_cr) in all."""
    total, fixed = sum(layers), 0 if prune_output else layers[-1]
    final, pool, counts, level = math.floor(total / target_cr + 0.5), total - fixed, [], 1
    while fixed + pool * (1 - fraction) ** level > total / target_cr * (1 + 1e-12):
        counts.append(fixed + math.floor(pool * (1 - fraction) ** level + 0.5))
        level += 1
    return counts + [final]


def test_an_unpruned_output_layer_stays_dense_and_the_last_level_reaches_the_target(tmp_path, data):
    cell = lottery(prune_output=False, target_cr=4.0)
    records = run_cell(cell, data=data, work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False)
    assert [r["status"] for r in records] == ["ok"] * 4, records[0].get("traceback")
    expected = independent_plan(LAYERS, 4.0, 0.5, prune_output=False)
    # 49,600 weights, 12,400 kept at CR 4; the output layer's 400 stay, so the other 49,200 keep 12,000
    assert expected == [400 + 24600, 400 + 12300, 12400]
    assert [r["nonzero_params"] for r in records[1:]] == expected
    assert abs(records[-1]["nonzero_params"] - sum(LAYERS) / 4.0) <= 1  # the target, within one weight
    for record in records:
        output = record["layers"][-1]
        assert output["nonzero"] == output["numel"] == 400
    assert variant_label(records[-1]) == "lottery dense-output"


@pytest.mark.parametrize("target_cr,fraction", [(1000, 0.5), (100, 0.2), (0.8 ** -3, 0.2), (1.5, 0.9), (250, 0.5)])
@pytest.mark.parametrize("prune_output", [True, False])
def test_the_level_plan_matches_the_rule_written_out_for_lenet_300_100(target_cr, fraction, prune_output):
    layers = (784 * 300, 300 * 100, 100 * 10)
    if not prune_output and target_cr == 1000:
        with pytest.raises(ValueError, match=r"keeps 266 of 266200 weights, not more than the 1000 left dense"):
            level_keep_counts(sum(layers), target_cr, fraction, fixed=layers[-1])
        return
    counts = level_keep_counts(sum(layers), target_cr, fraction, fixed=0 if prune_output else layers[-1])
    assert counts == independent_plan(layers, target_cr, fraction, prune_output)
    assert abs(counts[-1] - sum(layers) / target_cr) <= 0.5


def test_the_runner_estimate_counts_each_options_levels_and_epochs():
    schedule = {"epochs": 10}

    def estimate(**params):
        return estimate_epochs(Cell.make("lottery", "lenet300", "fashion-mnist", schedule=schedule,
                                         params={"target_cr": 100.0, "prune_fraction": 0.5} | params))

    assert estimate() == 7 * 10  # 2^7 = 128 >= 100
    assert estimate(rewind=2) == 7 * 8
    assert estimate(retrain="lr_rewind", rewind=1) == 7 * 9
    assert estimate(retrain="finetune") == 7 * 10
    assert estimate(retrain="finetune", finetune_epochs=3) == 7 * 3
    # 265,200 prunable weights besides the output layer's 1,000 must come down to 1,662: 2^8 > 159.6
    assert estimate(prune_output=False) == 8 * 10
    assert estimate(rewind="500it") == 7 * 10  # an upper bound: steps per epoch are known only with the data


# ------------------------------------------------------------------------------------------------
# Resume, ids, validation, labels, the CLI and grids
# ------------------------------------------------------------------------------------------------

def _comparable(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k != "wall_s"}
    out["history"] = [{k: v for k, v in e.items() if k != "seconds"} for e in record["history"]]
    return out


# one retraining kind in the fast tier; the other two resume by the same checkpoint path (make test)
@pytest.mark.parametrize("params", [{"rewind": "2it"}, pytest.param({"retrain": "lr_rewind"}, marks=pytest.mark.slow),
                                    pytest.param({"retrain": "finetune", "finetune_epochs": 2, "prune_output": False},
                                                 marks=pytest.mark.slow)])
def test_a_cell_killed_mid_level_resumes_to_the_same_records(tmp_path, data, params, early_points):
    cell = lottery(**params)
    kwargs = dict(data=data, cache_dir=tmp_path / "c", progress=False)
    straight = run_cell(cell, work_root=tmp_path / "a", **kwargs)
    assert straight[0]["status"] == "ok", straight[0].get("traceback")
    with pytest.raises(KeyboardInterrupt):  # killed in level 2's second epoch, after its first checkpoint
        run_watched(cell, data, tmp_path / "b", cache=tmp_path / "c", stop_in=("level2", 1))
    saved = torch.load(tmp_path / "b" / "w" / cell.id / "level2.ckpt", weights_only=False)
    assert saved["epoch"] == 1
    resumed = run_cell(cell, work_root=tmp_path / "b" / "w", **kwargs)
    assert resumed[2]["history"][0]["seconds"] == saved["history"][0]["seconds"]  # really resumed
    assert [_comparable(r) for r in resumed] == [_comparable(r) for r in straight]


def replace(state: dict, path) -> None:
    """Write through a new file, as the cache does: the old one may still be memory-mapped."""
    torch.save(state, path.with_suffix(".new"))
    path.with_suffix(".new").replace(path)


def test_an_old_dense_cache_is_extended_only_when_training_again_reproduces_it(tmp_path, data, early_points):
    cell = lottery(rewind="2it")
    ctx = Context(cell, data, torch.device("cpu"), tmp_path / "w", tmp_path / "c", progress=False)
    ctx.dense()
    [path] = (tmp_path / "c").glob("dense-*.pt")
    old = torch.load(path, weights_only=False)
    del old["snapshot_points"]  # as the version that kept epochs 0-2 only wrote it
    old["snapshots"] = {k: v for k, v in old["snapshots"].items() if isinstance(k, int)}
    replace(old, path)
    assert sorted(ctx.dense(1).snapshots) == [0, 1, 2]  # an epoch it has: used as it is
    assert "2it" in ctx.dense("2it").snapshots  # trained again, same weights: extended
    old["model"]["fc1.weight"][0, 0] += 1.0  # a cache this machine does not reproduce
    replace(old, path)
    with pytest.raises(RuntimeError, match=r"keeps no snapshot at '2it'.*did not reproduce its weights"):
        ctx.dense("2it")


def test_existing_lottery_cells_keep_their_ids():
    """Ids computed before the options existed: the new parameters at their defaults add nothing,
    and an epoch is the integer it was (also when it comes as text from the command line)."""
    assert Cell.make("lottery", "lenet300", "fashion-mnist").id == "e0c20e279af0c3c1"
    assert Cell.make("lottery", "lenet300", "fashion-mnist", params={"rewind": "2"}).id == "9cd1dd26c82c2303"
    assert Cell.make("lottery", "lenet300", "fashion-mnist",
                     params={"target_cr": 1000, "prune_fraction": 0.5, "retrain": "rewind", "rewind": 0,
                             "prune_output": True}).id == "df6ba325e9c56f4a"
    assert Cell.make("lottery", "lenet300", "fashion-mnist", params={"rewind": "500it"}).params == {"rewind": "500it"}


@pytest.mark.parametrize("params,named", [
    ({"rewind": 3}, r"rewind=3 is not allowed; choose one of \[0, 1, 2\] \(epochs\) or \['100it', '500it', "
                    r"'2000it'\] \(iterations\)"),
    ({"rewind": "300it"}, r"rewind='300it' is not allowed; choose one of \[0, 1, 2\]"),
    ({"retrain": "lr_rewind", "rewind": "5 it"}, r"rewind='5 it' is not allowed; choose an epoch \(an integer >= 0\) "
                                                 r"or an iteration such as '500it'"),
    ({"retrain": "lr_rewind", "rewind": -1}, r"rewind=-1 is not allowed; choose an epoch"),
    ({"retrain": "late"}, r"retrain='late' is not allowed; choose one of \['rewind', 'lr_rewind', 'finetune'\]"),
    ({"retrain": "finetune", "rewind": 1}, r"rewind=1 does not apply to retrain='finetune'"),
    ({"finetune_lr": 0.01}, r"finetune_lr=0.01 applies only to retrain='finetune', not retrain='rewind'"),
    ({"retrain": "finetune", "finetune_epochs": 0}, r"finetune_epochs=0 must be >= 1"),
    ({"retrain": "finetune", "finetune_lr": -1}, r"finetune_lr=-1.0 must be > 0"),
    ({"prune_output": "maybe"}, r"prune_output='maybe' is not a boolean"),
    ({"prune_output": False, "target_cr": 1000}, r"target_cr=1000 with prune_output=false is out of reach: it keeps "
                                                 r"266 of 266,200 prunable weights, no more than the 1,000 of the "
                                                 r"output layer, which stays dense; target_cr must be <= 265.93"),
])
def test_bad_options_fail_naming_the_value_and_what_is_allowed(params, named):
    with pytest.raises(ValueError, match=named):
        Cell.make("lottery", "lenet300", "fashion-mnist", params=params)


def test_a_rewind_point_the_dense_run_did_not_reach_fails_naming_the_points_it_has(tmp_path, data, early_points):
    [record] = run_cell(lottery(rewind="50it"), data=data, work_root=tmp_path / "w", cache_dir=tmp_path / "c",
                        progress=False)
    assert record["status"] == "failed"
    assert "rewind='50it': the dense run has snapshots only at [0, 1, 2, '2it', '6it'] (a schedule of 2 epochs " \
           "of 4 steps)" in record["error"]


def test_variant_labels_tell_the_options_apart_and_old_records_keep_theirs():
    base = {"method": "lottery", "family": "lottery"}
    assert variant_label(base | {"rewind": 0}) == "lottery"  # a record written before the options
    assert variant_label(base | {"rewind": 0, "retrain": "rewind", "prune_output": True}) == "lottery"
    assert variant_label(base | {"rewind": 2, "retrain": "rewind", "prune_output": True}) == "lottery rewind=2"
    assert variant_label(base | {"rewind": "500it", "retrain": "lr_rewind", "prune_output": False}) == \
        "lottery LRR rewind=500it dense-output"
    assert variant_label(base | {"rewind": 0, "retrain": "finetune", "finetune_epochs": 5}) == "lottery FT"
    from benchmark.analysis import plot_style

    styles = plot_style.variant_styles({v: ("lottery", None) for v in ("lottery", "lottery LRR", "lottery FT",
                                                                       "lottery rewind=2")})
    assert len({(s.color, s.linestyle) for s in styles.values()}) == 4


@pytest.mark.slow  # a 9-level lottery cell on real data
def test_the_cli_runs_the_options_and_prints_one_record_per_level(tmp_path, capsys):
    """Real Fashion-MNIST, 256 images, one epoch of 4 steps: LR rewinding to iteration 1 with the output
    layer dense (265,200 other weights down to 1,662: 8 levels of a half)."""
    code = main(["cell", "lottery", "--arch", "lenet300", "--dataset", "fashion-mnist", "--subset", "256",
                 "--epochs", "1", "--batch-size", "64", "--set", "retrain=lr_rewind", "--set", "rewind=1it",
                 "--set", "prune_output=false", "--set", "target_cr=100", "--set", "prune_fraction=0.5", "--json",
                 "--no-progress", "--device", "cpu", "--cache-dir", str(tmp_path / "c"), "--work-dir",
                 str(tmp_path / "w")])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    layers = (784 * 300, 300 * 100, 100 * 10)
    assert [r["nonzero_params"] for r in records[1:]] == independent_plan(layers, 100, 0.5, prune_output=False)
    assert all(r["layers"][-1]["nonzero"] == 1000 for r in records)
    assert records[-1]["epochs"] == pytest.approx(1 + 8 * 0.75)  # 8 levels, each 3 of the 4 steps


def test_a_grid_with_the_options_parses_into_cells_and_bad_values_name_their_line():
    text = """
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
[experiment.methods.lottery]
target_cr = 100
prune_fraction = 0.5
retrain = ["rewind", "lr_rewind"]
rewind = [0, 2, "500it"]
prune_output = [true, false]
"""
    cells = grids.parse_grid(text, "g").cells
    assert len(cells) == 12
    assert {c.params.get("rewind", 0) for c in cells} == {0, 2, "500it"}
    assert {(c.method_params.retrain, c.method_params.prune_output) for c in cells} == \
        {(r, o) for r in ("rewind", "lr_rewind") for o in (True, False)}
    bad = text.replace('"500it"', '"50it"').replace("target_cr = 100", "target_cr = 1000")
    with pytest.raises(grids.GridError) as err:
        grids.parse_grid(bad, "bad", "bad.toml")
    message = str(err.value)
    assert "bad.toml:9:" in message and "rewind='50it' is not allowed" in message
    assert "bad.toml:6:" in message and "target_cr=1000 with prune_output=false is out of reach" in message
