"""Pruning during training (``gmp``, ``rigl``, ``set``) and the hooks API they need: the global step,
the optimizer, hook state in the checkpoint. Invariants are checked on real (tiny) training by
hooks that subclass the methods' own and only observe; expectations come from the papers' formulas
written out here, not from the methods' helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmark.engine import models
from benchmark.execution.cell import Cell, Context, run_cell
from benchmark.engine.sparsity import prunable_layers
from benchmark.engine.schedule import Schedule
from benchmark.engine.train import TrainHooks, train
from methods import get_method
from methods.gmp import GMPHooks, gmp_schedule
from methods.masks import apply_masks, kept_count, mask_of_module, read_masks
from methods.rigl import DenseGradMask, DynamicSparseHooks, drop_and_grow, erk_densities, layer_kept_counts

from conftest import make_data

# 256 training images in batches of 32: 8 steps per epoch, 24 steps in all.
SCHEDULE = {"epochs": 3, "batch_size": 32, "warmup_epochs": 0}
STEPS = 24


def cell_of(method: str, **params) -> Cell:
    return Cell.make(method, "lenet300", "fashion-mnist", params=params, schedule=SCHEDULE)


def context(cell: Cell, tmp_path, data) -> Context:
    return Context(cell, data, torch.device("cpu"), tmp_path / "w" / cell.id, tmp_path / "c", progress=False)


def half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ------------------------------------------------------------------------------------------------
# The hooks API of the training loop
# ------------------------------------------------------------------------------------------------

class Recorder(TrainHooks):
    """Keeps what the loop tells it; its list of steps is its checkpointed state."""

    def __init__(self, stop_at_epoch: int | None = None):
        self.stop_at_epoch, self.steps, self.bound, self.loaded = stop_at_epoch, [], None, None

    def bind(self, optimizer, steps_per_epoch, total_steps):
        self.bound = (optimizer, steps_per_epoch, total_steps)

    def after_step(self, model, step):
        assert all(p.grad is not None for p in model.parameters())  # this step's gradients are still there
        self.steps.append(step)

    def after_epoch(self, model, epoch):
        if epoch == self.stop_at_epoch:
            raise KeyboardInterrupt

    def state_dict(self):
        return {"steps": list(self.steps)}

    def load_state_dict(self, state):
        self.loaded = state
        self.steps = list(state["steps"])


def test_hooks_get_the_global_step_the_optimizer_and_their_state_back_on_resume(tmp_path):
    data = make_data()
    schedule = Schedule(epochs=3, lr=0.05, batch_size=32)
    model = models.build("lenet300", (1, 8, 8), 4, seed=0)
    first = Recorder(stop_at_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        train(model, data, schedule, seed=0, hooks=first, checkpoint=tmp_path / "c.ckpt", progress=False)
    optimizer, per_epoch, total = first.bound
    assert isinstance(optimizer, torch.optim.SGD) and (per_epoch, total) == (8, 24)
    assert first.steps == list(range(16))  # 0-based over the schedule
    assert torch.load(tmp_path / "c.ckpt", weights_only=False)["hooks"] == {"steps": list(range(8))}

    second = Recorder()
    train(models.build("lenet300", (1, 8, 8), 4, seed=0), data, schedule, seed=0, hooks=second,
          checkpoint=tmp_path / "c.ckpt", progress=False)
    assert second.loaded == {"steps": list(range(8))}  # restored before the first resumed step
    assert second.steps == list(range(24))

    joined = Recorder()  # a run joining the schedule at epoch 2 counts on from there
    train(models.build("lenet300", (1, 8, 8), 4, seed=0), data, schedule, seed=0, hooks=joined, first_epoch=2,
          progress=False)
    assert joined.steps == list(range(16, 24)) and joined.bound[2] == 24 and joined.loaded is None


# ------------------------------------------------------------------------------------------------
# GMP
# ------------------------------------------------------------------------------------------------

def test_gmp_schedule_is_the_cubic_formula_from_start_to_end():
    s_i, s_f = 0.2, 1 - 1 / 10
    got = gmp_schedule(1000, 10.0, s_i, start=0.1, end=0.75, interval=100)
    # t0 = 100; the last multiple of 100 after t0 not past 750 is 700: n = 6
    assert list(got) == [100, 200, 300, 400, 500, 600, 700]
    for t, s in got.items():
        assert s == pytest.approx(s_f + (s_i - s_f) * (1 - (t - 100) / 600) ** 3, abs=1e-15)
    assert got[100] == pytest.approx(s_i) and got[700] == s_f
    assert all(a < b for a, b in zip(got.values(), list(got.values())[1:]))
    assert gmp_schedule(10, 4.0, 0.0, start=0.0, end=0.3, interval=5) == {1: 0.75}  # n = 0: one step, at least t=1


class WatchedGMP(GMPHooks):
    """GMP's hooks, checking each pruning step against the formula as it happens."""

    def __init__(self, params, per_layer: bool):
        super().__init__(params.target_cr, params.scope, params.initial_sparsity, params.start, params.end,
                         params.interval)
        self.per_layer, self.pruned_at, self.params = per_layer, [], params

    def after_step(self, model, step):
        before = {n: m.clone() for n, m in read_masks(model).items()}
        magnitude = {n: m.weight.detach().abs().clone() for n, m in prunable_layers(model)}
        super().after_step(model, step)
        after = read_masks(model)
        t = step + 1
        if all(torch.equal(before[n], after[n]) for n in before) and t not in self.expected:
            return
        self.pruned_at.append(t)
        p = self.params
        s_f = 1 - 1 / p.target_cr
        s_t = s_f + (p.initial_sparsity - s_f) * (1 - (t - 2) / 16) ** 3  # t0 = 2, n * dt = 16 (see below)
        for n in before:
            assert not (after[n] & ~before[n]).any(), "a pruned weight came back"
        groups = [[n] for n in before] if self.per_layer else [list(before)]
        for names in groups:
            kept = sum(int(after[n].sum()) for n in names)
            size = sum(after[n].numel() for n in names)
            assert abs(kept - size * (1 - s_t)) <= 1, (t, names, kept, size * (1 - s_t))
            if t == 18 and self.per_layer:
                assert kept == kept_count(size, p.target_cr)  # the last step lands exactly on the target
            survivors = torch.cat([magnitude[n][after[n]] for n in names])
            dropped = torch.cat([magnitude[n][before[n] & ~after[n]] for n in names])
            if len(dropped) and len(survivors):
                assert survivors.min() >= dropped.max(), "pruned a larger weight than one it kept"
        for name, module in prunable_layers(model):  # pruned: stored value and momentum exactly zero
            original = module.parametrizations.weight.original
            assert not original[~after[name]].any()
            buffer = self.optimizer.state.get(original, {}).get("momentum_buffer")
            assert buffer is None or not buffer[~after[name]].any()

    @property
    def expected(self):
        return set(range(2, 19, 2))


@pytest.mark.parametrize("scope,initial", [("layer", 0.0), ("global", 0.3)])
def test_gmp_prunes_by_magnitude_to_the_cubic_schedule_during_real_training(tmp_path, scope, initial):
    cell = cell_of("gmp", target_cr=20.0, scope=scope, initial_sparsity=initial, interval=2)
    ctx = context(cell, tmp_path, make_data())
    method = get_method("gmp")(cell.method_params)
    model, _ = method.prepare(ctx)
    hooks = WatchedGMP(cell.method_params, per_layer=scope == "layer")
    history, _ = ctx.train(model, hooks)
    # T = 24: t0 = round(0.1 T) = 2, round(0.75 T) = 18, dt = 2, so n = 8 pruning intervals
    assert hooks.pruned_at == sorted(hooks.expected) == [e["step"] for e in hooks.log]
    assert [e["target_sparsity"] for e in hooks.log][-1] == 1 - 1 / 20
    assert history.epochs[-1]["mask_cr"] == pytest.approx(20.0, rel=1e-3)
    crs = [e["mask_cr"] for e in history.epochs]
    assert crs == sorted(crs) and crs[0] > 1  # pruning spread over the epochs


def test_gmp_record_reaches_the_target_and_carries_its_trajectory(tmp_path):
    cell = cell_of("gmp", target_cr=10.0, interval=2)
    [r] = run_cell(cell, data=make_data(), work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False)
    assert r["status"] == "ok", r.get("traceback")
    layers = {layer["name"]: layer for layer in r["layers"]}
    assert r["nonzero_params"] == sum(kept_count(layer["numel"], 10.0) for layer in layers.values())
    assert r["cr"] == pytest.approx(10.0, rel=1e-3)
    assert r["epochs"] == 3 and len(r["history"]) == 3 and r["family"] == "during-training"
    assert r["pruning_steps"] == len(r["pruning_log"]) == 9
    assert r["pruning_log"][-1]["mask_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert r["test_acc"] > 0.5


# ------------------------------------------------------------------------------------------------
# RigL and SET
# ------------------------------------------------------------------------------------------------

def water_filled_densities(shapes: dict, target_cr: float) -> dict:
    """An independent ERK: bisection for ε in sum_l min(1, ε * raw_l) * n_l = N / target_cr."""
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / numel[k] for k, s in shapes.items()}
    budget = sum(numel.values()) / target_cr
    lo, hi = 0.0, 1e9
    for _ in range(300):
        mid = (lo + hi) / 2
        if sum(min(1.0, mid * raw[k]) * numel[k] for k in shapes) < budget:
            lo = mid
        else:
            hi = mid
    return {k: min(1.0, hi * raw[k]) for k in shapes}


@pytest.mark.parametrize("shapes,target_cr,saturated", [
    ({"fc1": (300, 64), "fc2": (100, 300), "fc3": (4, 100)}, 10.0, {"fc3"}),  # fc3 would get density 1.48
    ({"conv1": (6, 1, 5, 5), "conv2": (16, 6, 5, 5), "fc1": (120, 256), "fc2": (84, 120), "fc3": (10, 84)}, 5.0,
     {"conv1", "fc3"}),
    ({"a": (50, 40), "b": (40, 30)}, 4.0, set()),
])
def test_erk_densities_are_the_formula_with_saturated_layers_made_dense(shapes, target_cr, saturated):
    got = erk_densities(shapes, target_cr)
    expected = water_filled_densities(shapes, target_cr)
    assert {k for k, d in got.items() if d == 1.0} == saturated
    for k in shapes:
        assert got[k] == pytest.approx(expected[k], rel=1e-9), k
    free = [k for k in shapes if k not in saturated]  # the rest: density proportional to sum/prod of dims
    ratios = {k: got[k] * math.prod(shapes[k]) / sum(shapes[k]) for k in free}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()), rel=1e-12)
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(got[k] * math.prod(s) for k, s in shapes.items()) == pytest.approx(total / target_cr, rel=1e-12)


def test_layer_counts_round_each_layers_density_uniform_or_erk():
    model = models.build("lenet300", (1, 8, 8), 4, seed=0)
    shapes = {n: tuple(m.weight.shape) for n, m in prunable_layers(model)}
    assert layer_kept_counts(model, 10.0, "uniform") == {"fc1": 1920, "fc2": 3000, "fc3": 40}
    erk = layer_kept_counts(model, 10.0, "erk")
    density = water_filled_densities(shapes, 10.0)
    assert erk["fc3"] == 400
    assert all(abs(erk[n] - density[n] * math.prod(shapes[n])) <= 0.5 for n in shapes)


def test_the_captured_dense_gradient_is_the_gradient_of_the_masked_weight():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    keep = {"0": torch.rand(5, 6) < 0.5, "2": torch.rand(3, 5) < 0.5}
    apply_masks(net, keep, DenseGradMask)
    with torch.no_grad():  # the plain copy holds the masked weights as ordinary parameters
        for name in keep:
            plain.get_submodule(name).weight.copy_(net.get_submodule(name).weight)
            plain.get_submodule(name).bias.copy_(net.get_submodule(name).bias)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    nn.functional.cross_entropy(net(x), y).backward()
    nn.functional.cross_entropy(plain(x), y).backward()
    for name in keep:
        module = net.get_submodule(name)
        dense = mask_of_module(module).grad
        torch.testing.assert_close(dense, plain.get_submodule(name).weight.grad, rtol=0, atol=0)
        assert dense[~keep[name]].abs().sum() > 0  # nonzero where the weight is pruned ...
        original_grad = module.parametrizations.weight.original.grad
        assert not original_grad[~keep[name]].any()  # ... where the stored tensor's gradient is zero
    mask_of_module(net.get_submodule("0")).capture = False
    mask_of_module(net.get_submodule("0")).grad = None
    nn.functional.cross_entropy(net(x), y).backward()
    assert mask_of_module(net.get_submodule("0")).grad is None


def test_drop_and_grow_drops_the_smallest_active_and_grows_the_best_inactive_or_just_dropped():
    weight = torch.tensor([0.5, -0.1, 0.0, 0.3, -0.7, 0.0])
    active = torch.tensor([True, True, False, True, True, False])
    scores = torch.tensor([0.0, 0.9, 0.2, 0.0, 0.0, 0.8])
    # k = 2: drop -0.1 and 0.3; candidates are positions 1, 2, 3, 5; the best scores 0.9 (1) and 0.8 (5)
    assert drop_and_grow(weight, active, scores, 2).tolist() == [True, True, False, False, True, True]
    assert drop_and_grow(weight, active, scores, 0).tolist() == active.tolist()


class WatchedDynamic(DynamicSparseHooks):
    """The method's hooks, checking every mask update against the paper's rules as it happens."""

    def __init__(self, params, growth, seed):
        super().__init__(params.drop_fraction, params.interval, params.end, growth, seed)
        self.p, self.updates, self.kept_history = params, [], []

    def expect_update(self, t):
        t_end = round(self.p.end * STEPS)
        return t % self.p.interval == 0 and t < t_end

    def after_step(self, model, step):
        t = step + 1
        before = {n: m.clone() for n, m in read_masks(model).items()}
        magnitude = {n: m.weight.detach().abs().clone() for n, m in prunable_layers(model)}
        grads = {n: mask_of_module(m).grad for n, m in prunable_layers(model)} if self.growth == "gradient" else {}
        super().after_step(model, step)
        after = read_masks(model)
        self.kept_history.append({n: int(a.sum()) for n, a in after.items()})
        for name, module in prunable_layers(model):
            mask = mask_of_module(module)
            if self.growth == "gradient":  # capture only before an update, nothing kept in between
                assert mask.capture == self.expect_update(t + 1) and mask.grad is None
        if not self.expect_update(t):
            assert all(torch.equal(before[n], after[n]) for n in before), f"mask changed at step {t}"
            return
        t_end = round(self.p.end * STEPS)
        zeta = self.p.drop_fraction / 2 * (1 + math.cos(math.pi * t / t_end))
        changed = 0
        for name, module in prunable_layers(model):
            old, new = before[name], after[name]
            k = half_up(zeta * int(old.sum()))
            # the k active weights of smallest magnitude (ties to the lower index) are the drop candidates
            order = sorted(torch.nonzero(old.flatten()).flatten().tolist(),
                           key=lambda i: (float(magnitude[name].flatten()[i]), i))
            drop = torch.zeros(old.numel(), dtype=torch.bool)
            drop[order[:k]] = True
            drop = drop.view(old.shape)
            survivors = old & ~drop
            assert torch.equal(new & survivors, survivors), "kept a weight off the mask that should stay"
            grown = new & ~survivors
            assert int(grown.sum()) == k and int(new.sum()) == int(old.sum())
            assert int((old & ~new).sum()) == int((new & ~old).sum()) <= k
            if self.growth == "gradient":
                g = grads[name].abs().masked_fill(survivors, -math.inf).flatten()
                best = sorted(range(g.numel()), key=lambda i: (-float(g[i]), i))[:k]
                expected = torch.zeros(g.numel(), dtype=torch.bool)
                expected[best] = True
                assert torch.equal(grown.flatten(), expected), "did not grow the largest dense gradients"
            original = module.parametrizations.weight.original
            fresh = new & ~old
            assert not original[fresh].any() and not original[~new].any()  # new and inactive: exactly zero
            buffer = self.optimizer.state[original]["momentum_buffer"]
            assert not buffer[fresh].any() and not buffer[~new].any()
            changed += int(fresh.sum())
        self.updates.append((t, zeta, changed))


@pytest.mark.parametrize("method,distribution", [("rigl", "erk"), ("set", "uniform")])
def test_drop_and_grow_follows_the_cosine_schedule_at_constant_sparsity_in_real_training(tmp_path, method,
                                                                                         distribution):
    cell = cell_of(method, target_cr=5.0, distribution=distribution, interval=3, drop_fraction=0.4)
    ctx = context(cell, tmp_path, make_data())
    m = get_method(method)(cell.method_params)
    model, _ = m.prepare(ctx)
    initial = {n: int(k.sum()) for n, k in read_masks(model).items()}
    assert initial == layer_kept_counts(model, 5.0, distribution)
    for name, module in prunable_layers(model):  # weights off the initial mask hold zero
        assert not module.parametrizations.weight.original[~read_masks(model)[name]].any()
    hooks = WatchedDynamic(cell.method_params, m.growth, cell.seed)
    history, _ = ctx.train(model, hooks)
    # T_end = round(0.75 * 24) = 18: updates after steps 3, 6, ..., 15
    assert [u[0] for u in hooks.updates] == [3, 6, 9, 12, 15] == [e["step"] for e in hooks.log]
    assert all(kept == initial for kept in hooks.kept_history)  # every layer's count constant throughout
    assert sum(u[2] for u in hooks.updates) > 0  # the masks really moved
    for (t, zeta, _), entry in zip(hooks.updates, hooks.log):
        assert entry["drop_fraction"] == pytest.approx(zeta)
        assert entry["dropped"] == entry["grown"] == sum(half_up(zeta * k) for k in initial.values())
    assert all(e["mask_cr"] == pytest.approx(sum(m.weight.numel() for _, m in prunable_layers(model))
                                              / sum(initial.values())) for e in history.epochs)


def test_set_grows_at_random_not_by_gradient(tmp_path):
    """Same cell, same magnitudes: the grown weights of SET and RigL differ at the first update."""
    masks = {}
    for method in ("rigl", "set"):
        cell = cell_of(method, target_cr=5.0, interval=3, drop_fraction=0.4)
        ctx = context(cell, tmp_path / method, make_data())
        m = get_method(method)(cell.method_params)
        model, hooks = m.prepare(ctx)
        ctx.train(model, hooks, schedule=ctx.schedule.replace(epochs=1))  # 8 steps, T_end = 6: update at 3
        masks[method] = read_masks(model)
    assert any(not torch.equal(masks["rigl"][n], masks["set"][n]) for n in masks["rigl"])


# ------------------------------------------------------------------------------------------------
# All three: resume, records, validation
# ------------------------------------------------------------------------------------------------

class StopAfterEpoch(TrainHooks):
    """Wraps a method's hooks and interrupts training the way a kill would, in epoch ``epoch`` (0-based)
    before its checkpoint: the checkpoint holds the epochs before it."""

    def __init__(self, inner: TrainHooks, epoch: int):
        self.inner, self.epoch = inner, epoch

    def bind(self, *args):
        self.inner.bind(*args)

    def param_groups(self, model, schedule):
        return self.inner.param_groups(model, schedule)

    def penalty(self, model):
        return self.inner.penalty(model)

    def after_step(self, model, step):
        self.inner.after_step(model, step)

    def after_epoch(self, model, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt
        self.inner.after_epoch(model, epoch)

    def epoch_metrics(self, model):
        return self.inner.epoch_metrics(model)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _comparable(record: dict) -> dict:
    drop = {"wall_s", "prune_wall_s"}
    out = {k: v for k, v in record.items() if k not in drop}
    out["history"] = [{k: v for k, v in e.items() if k != "seconds"} for e in record["history"]]
    return out


@pytest.mark.parametrize("method,params", [
    ("gmp", {"interval": 2, "initial_sparsity": 0.2}),
    # GMP in the fast tier; RigL and SET resume through the same checkpoint path (make test)
    pytest.param("rigl", {"interval": 3}, marks=pytest.mark.slow),
    pytest.param("set", {"interval": 3, "distribution": "uniform"}, marks=pytest.mark.slow),
])
def test_a_killed_cell_resumes_from_its_checkpoint_to_the_same_weights_and_record(tmp_path, method, params):
    data = make_data(augment=True)
    cell = cell_of(method, target_cr=8.0, **params)
    straight = run_cell(cell, data=data, work_root=tmp_path / "a", cache_dir=tmp_path / "c", progress=False,
                        keep_work=True)
    assert straight[0]["status"] == "ok", straight[0].get("traceback")

    ctx = Context(cell, data, torch.device("cpu"), tmp_path / "b" / cell.id, tmp_path / "c", progress=False)
    m = get_method(method)(cell.method_params)
    model, hooks = m.prepare(ctx)
    with pytest.raises(KeyboardInterrupt):
        ctx.train(model, StopAfterEpoch(hooks, epoch=1))
    saved = torch.load(tmp_path / "b" / cell.id / "train.ckpt", weights_only=False)
    assert saved["epoch"] == 1 and saved["hooks"]["log"]  # mid-schedule, with pruning steps behind it
    assert len(saved["hooks"]["log"]) < len(straight[0]["pruning_log"])

    resumed = run_cell(cell, data=data, work_root=tmp_path / "b", cache_dir=tmp_path / "c", progress=False,
                       keep_work=True)
    assert resumed[0]["status"] == "ok", resumed[0].get("traceback")
    assert resumed[0]["history"][0]["seconds"] == saved["history"][0]["seconds"]  # really resumed
    a = torch.load(tmp_path / "a" / cell.id / "train.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / cell.id / "train.ckpt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["hooks"] == b["hooks"]
    assert _comparable(straight[0]) == _comparable(resumed[0])


@pytest.mark.parametrize("method,params,named", [
    ("gmp", {"target_cr": 0.5}, r"target_cr=0.5 must be a finite number >= 1"),
    ("gmp", {"initial_sparsity": 0.95}, r"initial_sparsity=0.95 must be in \[0, 0.9\]"),
    ("gmp", {"start": 0.8, "end": 0.5}, r"start=0.8, end=0.5: need 0 <= start < end <= 1"),
    ("gmp", {"interval": 0}, r"interval=0 must be >= 1"),
    ("gmp", {"scope": "channel"}, r"scope='channel' is not allowed; choose one of \['layer', 'global'\]"),
    ("rigl", {"drop_fraction": 1.0}, r"drop_fraction=1.0 must be in \[0, 1\)"),
    ("rigl", {"end": 0.0}, r"end=0.0 must be in \(0, 1\]"),
    ("rigl", {"distribution": "er"}, r"distribution='er' is not allowed; choose one of \['erk', 'uniform'\]"),
    ("set", {"interval": -1}, r"interval=-1 must be >= 1"),
    ("rigl", {"init": "kaiming"}, r"init='kaiming' is not allowed; choose one of \['dense', 'sparse'\]"),
    ("set", {"target_cr": "inf"}, r"target_cr=inf"),
])
def test_bad_parameters_fail_before_training_naming_the_value_and_what_is_allowed(method, params, named):
    with pytest.raises(ValueError, match=named) as err:
        Cell.make(method, "lenet300", "fashion-mnist", params=params)
    assert f"{method}." in str(err.value)


def test_defaults_leave_the_cell_id_alone_and_families_are_during_training():
    for method in ("gmp", "rigl", "set"):
        assert get_method(method).family == "during-training"
        assert cell_of(method).id == cell_of(method, target_cr=10.0, interval=100, end=0.75).id
    assert cell_of("rigl").id == cell_of("rigl", init="dense").id != cell_of("rigl", init="sparse").id


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_sparse_init_rescales_each_unit_to_its_kept_fan_in_and_keeps_the_mask(tmp_path, method):
    """init="sparse": the same mask, each unit's kept weights times sqrt(fan-in / kept fan-in), so a
    unit's pre-activation variance is the dense initialization's whatever its density."""
    data = make_data(shape=(1, 28, 28), classes=10)
    built = {}
    for init in ("dense", "sparse"):
        cell = Cell.make(method, "lenet5", "fashion-mnist", params={"target_cr": 100.0, "init": init},
                         schedule=SCHEDULE)
        model, _ = get_method(method)(cell.method_params).prepare(context(cell, tmp_path, data))
        built[init] = model
    assert get_method(method).curve_label({"init": "sparse"}) == f"{method} sparse-init"
    assert get_method(method).curve_label({"init": "dense"}) == method
    dense_masks, sparse_masks = read_masks(built["dense"]), read_masks(built["sparse"])
    for (name, plain), (_, rescaled) in zip(prunable_layers(built["dense"]), prunable_layers(built["sparse"])):
        mask = dense_masks[name]
        assert torch.equal(mask, sparse_masks[name]), name
        kept = mask.flatten(1).sum(1)
        assert (kept < mask[0].numel()).all(), name  # CR 100: every unit lost inputs
        per_unit = (mask[0].numel() / kept.clamp(min=1)).sqrt()
        expected = per_unit.view(-1, *[1] * (mask.dim() - 1)).expand(mask.shape)[mask]
        ratio = rescaled.weight.detach()[mask] / plain.weight.detach()[mask]
        torch.testing.assert_close(ratio, expected.to(ratio.dtype), rtol=1e-5, atol=0)
