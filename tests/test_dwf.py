"""DWF: Algorithm 1 initialization, balance at stationarity, the lambda convention pinned against
scikit-learn's lasso, and the sparsity advantage of depth 3/4 on a regression with a known answer."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.engine import models
from benchmark.execution.cell import Cell, run_cell
from benchmark.engine.schedule import Schedule
from benchmark.engine.train import train
from methods import make_params
from methods.dwf import FactorHooks, balance_error, collapse, factorize, factorized_modules, factors_of, init_factors

from conftest import make_data

SIGMA = math.sqrt(2 / 784)  # Kaiming std of LeNet-300-100's first layer


def _product(factors):
    w = factors[0]
    for f in factors[1:]:
        w = w * f
    return w


def _truncated_second_moment(low, high):
    """E[z^2] of a standard normal conditioned on low < |z| < high (closed form)."""
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    mass = cdf(high) - cdf(low)
    return (mass - (high * phi(high) - low * phi(low))) / mass


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_algorithm1_init_bounds_and_std(depth):
    gen = torch.Generator().manual_seed(0)
    w = _product(init_factors((300, 784), depth, SIGMA, gen, "dwf", eps_ratio=0.25))
    eps = 0.25 * SIGMA
    assert w.abs().min() > eps and w.abs().max() < 2 * SIGMA  # every weight in (eps, 2 sigma)
    # each factor is N(0, sigma^(2/D)) truncated to (eps^(1/D), (2 sigma)^(1/D)): in units of the
    # factor std the bounds are (0.25^(1/D), 2^(1/D)); the product's std is sigma times
    # sqrt(E[z^2])^D. The truncation costs 14% (D=2) to 22% (D=4) of the dense std.
    per_factor = _truncated_second_moment(0.25 ** (1 / depth), 2 ** (1 / depth))
    expected = SIGMA * per_factor ** (depth / 2)
    assert float(w.std()) == pytest.approx(expected, rel=0.02)  # 235k samples: sampling error << 1%
    assert 0.75 * SIGMA < float(w.std()) < SIGMA


@pytest.mark.parametrize("depth", [3, 4])
def test_naive_inits_show_the_problems_algorithm1_fixes(depth):
    gen = torch.Generator().manual_seed(0)
    kaiming = _product(init_factors((300, 784), depth, SIGMA, gen, "kaiming"))
    assert float(kaiming.std()) < 0.01 * SIGMA  # per-factor Kaiming: the product's variance vanishes
    variance = _product(init_factors((300, 784), depth, SIGMA, gen, "variance"))
    assert float(variance.std()) == pytest.approx(SIGMA, rel=0.05)  # right variance ...
    assert float((variance.abs() < 0.25 * SIGMA).float().mean()) > 0.5  # ... but most products near zero
    truncated = _product(init_factors((300, 784), depth, SIGMA, gen, "dwf"))
    assert float((truncated.abs() < 0.25 * SIGMA).float().mean()) == 0.0


def test_factorized_model_starts_in_bounds_and_collapses_to_its_product():
    model = models.build("lenet300", (1, 28, 28), 10, seed=0)
    factorize(model, depth=3, seed=0)
    assert len(factorized_modules(model)) == 3
    w = model.fc1.weight.detach().clone()
    assert w.abs().min() > 0.25 * SIGMA and w.abs().max() < 2 * SIGMA
    assert torch.allclose(w, _product(factors_of(model.fc1)))
    x = torch.randn(5, 1, 28, 28)
    out = model(x)
    collapse(model)
    assert not factorized_modules(model)
    assert isinstance(model.fc1.weight, nn.Parameter) and torch.equal(model.fc1.weight, w)
    assert torch.allclose(model(x), out)


def test_factors_become_balanced_with_weight_decay():
    """w_i^2 - w_j^2 decays like exp(-2 (2 lam / D) lr t) under weight decay, so the factors of the
    weights the loss keeps large end up equal in magnitude: |w_d| = |w|^(1/D)."""
    data = make_data()
    model = models.build("lenet300", (1, 8, 8), 4, seed=0)
    factorize(model, depth=3, seed=0)
    before = balance_error(model)
    train(model, data, Schedule(epochs=40, lr=0.2, batch_size=32), seed=0, hooks=FactorHooks(0.02, 3, "decay"),
          progress=False)
    after = balance_error(model)
    assert before > 0.3 and after < 0.05 * before
    for module in factorized_modules(model):
        w = module.weight.detach()
        large = w.abs() > 0.1 * w.abs().max()
        for f in factors_of(module):
            assert torch.allclose(f.detach().abs()[large], w.abs()[large] ** (1 / 3), rtol=0.05)


def test_explicit_penalty_equals_weight_decay_form():
    """(lam/D) sum ||w_d||^2 in the loss and SGD weight decay 2 lam / D give the same steps."""
    data = make_data()
    models_ = []
    for mode in ("decay", "explicit"):
        model = models.build("lenet300", (1, 8, 8), 4, seed=0).double()
        factorize(model, depth=3, seed=0)
        data64 = make_data()
        data64.train.x = data64.train.x.double()
        data64.test.x = data64.test.x.double()
        train(model, data64, Schedule(epochs=2, lr=0.1, batch_size=64), seed=0,
              hooks=FactorHooks(0.01, 3, mode), progress=False)
        models_.append(model)
    for a, b in zip(models_[0].parameters(), models_[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    del data


# ---- regression with a known answer ----------------------------------------------------------


def _regression(seed=0, n=100, p=30, rho=0.7, noise=0.5):
    """Correlated design (Toeplitz rho^|i-j|), three true coefficients: the lasso needs a small
    lambda to fit well and then lets noise features in; L_{2/3} and L_{1/2} need not."""
    g = np.random.default_rng(seed)
    cov = rho ** np.abs(np.subtract.outer(np.arange(p), np.arange(p)))
    X = g.multivariate_normal(np.zeros(p), cov, size=n)
    w = np.zeros(p)
    w[[0, 5, 10]] = [2.0, -1.5, 1.0]
    y = X @ w + noise * g.standard_normal(n)
    return torch.tensor(X), torch.tensor(y)


def _fit_dwf(X, y, depth, lam, steps=5000, lr=0.02):
    """Full-batch SGD with momentum on 0.5 * mean squared error, factors decayed by 2 lam / D."""
    lin = nn.Linear(X.shape[1], 1, bias=False).double()
    factorize(lin, depth, seed=0)
    hooks = FactorHooks(lam, depth, "decay")
    opt = torch.optim.SGD(hooks.param_groups(lin, Schedule()), lr=lr, momentum=0.9)
    for _ in range(steps):
        loss = 0.5 * ((lin(X).squeeze(1) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    collapse(lin)
    w = lin.weight.detach().squeeze(0)
    return w, float(0.5 * ((X @ w - y) ** 2).mean())


def test_depth2_converges_to_sklearn_lasso():
    """Pins the convention: DWF D=2 with lam minimizes 0.5*MSE + lam*||w||_1, which is
    sklearn's Lasso(alpha=lam) objective (1/(2n))||y - Xw||^2 + alpha*||w||_1."""
    from sklearn.linear_model import Lasso

    X, y = _regression()
    lam = 0.05
    w, _ = _fit_dwf(X, y, depth=2, lam=lam, steps=6000)
    lasso = Lasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(X.numpy(), y.numpy()).coef_
    np.testing.assert_allclose(w.numpy(), lasso, atol=2e-3)
    assert set(np.flatnonzero(np.abs(w.numpy()) > 5e-3)) == set(np.flatnonzero(np.abs(lasso) > 5e-3))


def test_depth3_and_4_are_sparser_than_depth2_at_similar_fit():
    X, y = _regression()
    support = [0, 5, 10]
    oracle = torch.linalg.lstsq(X[:, support], y[:, None]).solution.squeeze(1)
    target = 1.05 * float(0.5 * ((X[:, support] @ oracle - y) ** 2).mean())  # within 5% of the oracle fit
    nnz = lambda w: int((w.abs() > 1e-6).sum())  # noqa: E731
    # depth 2: the lasso path. lam=0.03 fits within the target with 17 nonzeros; lam=0.1 is sparse
    # (4) but misses the target (the L1 shrinkage bias). So no lasso point here is both.
    lasso_fits = [_fit_dwf(X, y, 2, lam) for lam in (0.03, 0.1)]
    lasso_best = min((nnz(w) for w, mse in lasso_fits if mse <= target), default=X.shape[1])
    assert lasso_best >= 10
    for depth in (3, 4):
        w, mse = _fit_dwf(X, y, depth, 0.03)
        assert mse <= target and nnz(w) <= 5 and nnz(w) < lasso_best


# ---- the method through the harness ------------------------------------------------------------


@pytest.mark.slow  # 40 epochs; the same balance is checked fast by test_factors_become_balanced_with_weight_decay
def test_dwf_cell_records_sparsity_and_convention(tmp_path):
    cell = Cell.make("dwf", "lenet300", "fashion-mnist", params={"depth": 3, "lam": 0.02},
                     schedule={"epochs": 40, "batch_size": 32, "lr": 0.2})
    [record] = run_cell(cell, data=make_data(), work_root=tmp_path / "w", cache_dir=tmp_path / "c", progress=False)
    assert record["status"] == "ok", record.get("error")
    assert record["cr"] > 10 and record["zeroed_by_threshold"] > 0
    assert record["balance_error"] < 0.05
    assert record["threshold"] == pytest.approx(1.19e-7)
    assert "lam/D" in record["lam_convention"] and record["depth"] == 3 and record["penalty"] == "decay"
    assert record["test_acc"] > 0.5


def test_shallow_is_depth_two_and_rejects_other_depths():
    assert make_params("shallow").depth == 2
    with pytest.raises(ValueError, match="depth=3"):
        make_params("shallow", {"depth": 3})


@pytest.mark.parametrize("values,fragment", [
    ({"depth": 1}, "depth=1 must be >= 2"),
    ({"lam": -1}, "lam=-1.0 must be >= 0"),
    ({"init": "xavier"}, "init='xavier' is not allowed"),
    ({"depht": 3}, "unknown parameter(s) ['depht']"),
    ({"depth": "three"}, "is not an integer"),
])
def test_bad_parameters_are_named(values, fragment):
    with pytest.raises(ValueError) as err:
        make_params("dwf", values)
    assert fragment in str(err.value)


def test_skip_last_leaves_the_classifier_plain_with_the_schedules_weight_decay():
    """The choice documented in docs/methods.md: an unfactorized classifier is trained as every plain
    weight is, with the schedule's weight decay; the factors get 2 lam / D, biases nothing."""
    model = models.build("lenet300", (1, 8, 8), 4, seed=0)
    factorize(model, 3, seed=0, skip_last=True)
    groups = FactorHooks(1e-3, 3, "decay").param_groups(model, Schedule(weight_decay=5e-4))
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert model.fc3 not in factorized_modules(model)
    assert decay[id(model.fc3.weight)] == 5e-4 and decay[id(model.fc3.bias)] == 0.0
    assert {decay[id(f)] for m in (model.fc1, model.fc2) for f in factors_of(m)} == {2 * 1e-3 / 3}
