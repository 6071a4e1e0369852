"""Batched L-BFGS (stages.probe.lbfgs) and the many-logistic-regressions objective (stages.probe.logistic)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize as scipy_minimize
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from stages.probe.lbfgs import minimize
from stages.probe.logistic import LogisticObjective, fit_logistic


def rosenbrock(a: torch.Tensor, b: torch.Tensor):
    """Member m: (a_m - u)^2 + b_m (v - u^2)^2, minimum at (a_m, a_m^2); batched values and gradients."""

    def objective(index, x):
        u, v, am, bm = x[:, 0], x[:, 1], a[index], b[index]
        values = (am - u) ** 2 + bm * (v - u**2) ** 2
        grad = torch.stack([-2 * (am - u) - 4 * bm * u * (v - u**2), 2 * bm * (v - u**2)], dim=1)
        return values, grad

    return objective


def test_minimize_reaches_scipys_optimum_for_every_member():
    a = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    b = torch.tensor([100.0, 10.0, 5.0, 1.0], dtype=torch.float64)
    x0 = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [3.0, -2.0], [1.0, 1.0]], dtype=torch.float64)
    result = minimize(rosenbrock(a, b), x0, tol=1e-10, max_iter=2000)
    assert bool(result.converged.all())
    for m in range(len(a)):

        def f(z, m=m):
            values, grad = rosenbrock(a, b)(torch.tensor([m]), torch.tensor(z[None]))
            return float(values[0]), grad[0].numpy()

        reference = scipy_minimize(
            f, x0[m].numpy(), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000}
        )
        np.testing.assert_allclose(result.x[m].numpy(), reference.x, atol=1e-7)
        np.testing.assert_allclose(result.x[m].numpy(), [a[m], a[m] ** 2], atol=1e-7)


def test_a_members_result_does_not_depend_on_the_others():
    a = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    b = torch.tensor([100.0, 10.0, 5.0, 1.0], dtype=torch.float64)
    x0 = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [3.0, -2.0], [1.0, 1.0]], dtype=torch.float64)
    together = minimize(rosenbrock(a, b), x0, tol=1e-9)
    for m in range(len(a)):
        alone = minimize(rosenbrock(a[m : m + 1], b[m : m + 1]), x0[m : m + 1], tol=1e-9)
        # the same arithmetic member by member: the same iterates, not merely the same optimum
        assert int(alone.iterations[0]) == int(together.iterations[m])
        torch.testing.assert_close(alone.x[0], together.x[m], rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X, y = X[:600], y[:600]
    std = X.std(0)
    std[std < 1e-6] = 1
    return (X - X.mean(0)) / std, y


def test_the_logistic_gradient_is_autograds(digits):
    X, y = digits
    features = torch.tensor(np.stack([X, X[:, ::-1] * 0.5]))  # two input sets of 64 features
    decays = [1e-2, 1e-4, 0.0]
    objective = LogisticObjective(features, torch.tensor(y), 10, decays)
    x = torch.randn(6, objective.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    index = torch.tensor([0, 2, 3, 5])  # members (set 0, decay 0), (0, 2), (1, 0), (1, 2)
    values, grad = objective(index, x[index])
    for j, m in enumerate(index.tolist()):
        i, k = divmod(m, 3)
        p = x[m].clone().requires_grad_(True)
        W, bias = p[:640].view(10, 64), p[640:]
        logits = features[i] @ W.T + bias
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y)) + 0.5 * decays[k] * (W * W).sum()
        loss.backward()
        torch.testing.assert_close(values[j], loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad[j], p.grad, rtol=1e-10, atol=1e-12)


def test_fit_logistic_is_scikit_learns_logistic_regression(digits):
    X, y = digits
    n = len(y)
    Cs = [0.01, 1.0, 100.0]
    features = torch.tensor(np.stack([X, np.tanh(X)]))
    decays = [1 / (C * n) for C in Cs]
    params, counts = fit_logistic(features, torch.tensor(y), 10, decays, tol=1e-9, max_iter=5000)
    objective = LogisticObjective(features, torch.tensor(y), 10, decays)
    assert counts["converged"] == counts["members"] == 6
    for i in range(2):
        for j, C in enumerate(Cs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                reference = LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(features[i].numpy(), y)
            theirs = torch.tensor(np.concatenate([reference.coef_.ravel(), reference.intercept_]))[None]
            member = torch.tensor([i * len(Cs) + j])
            ours_value, ours_grad = objective(member, params[member])
            their_value, _ = objective(member, theirs)
            # the same optimum: ours is stationary (to where float64 stops improving the value) and no worse than
            # scikit-learn's
            assert float(ours_grad.abs().max()) <= 1e-7 and float(ours_value) <= float(their_value) + 1e-12
            # and the same point, as closely as the conditioning allows (weak regularisation is flat)
            p = params[member][0].numpy()
            W, bias = p[:640].reshape(10, 64), p[640:]
            tight = 1e-5 if C <= 1 else 1e-3
            scale = np.abs(reference.coef_).max()
            np.testing.assert_allclose(W, reference.coef_, atol=tight * scale)
            # the multinomial intercept is defined up to a constant (no penalty on it): compare centred
            np.testing.assert_allclose(
                bias - bias.mean(), reference.intercept_ - reference.intercept_.mean(), atol=tight * max(scale, 1.0)
            )


def test_the_path_polishes_what_selection_needs_and_chooses_as_a_fully_polished_path(digits):
    """fit_lbfgs with validation rows: float32 along the path, float64 only for the decays selection may choose.
    Its choice and the chosen head are those of every member solved to the optimum in float64."""
    from stages.probe.banks import FlatBank, fit_lbfgs

    X, y = digits
    fit, val = slice(0, 500), slice(500, 600)
    features = torch.tensor(np.stack([X, np.tanh(2 * X)]), dtype=torch.float32)
    Cs = 10.0 ** (np.arange(-6, 7) / 2)  # strongest decay first, as the path walks it
    decays = [float(1 / (C * 500)) for C in Cs]
    labels, y_val = torch.tensor(y[fit]), torch.tensor(y[val])
    bank = FlatBank([64, 64], len(decays), 10)
    trained, counts = fit_lbfgs(
        bank, [features[:, fit]], labels, decays, validation=([features[:, val]], y_val), tol=1e-6
    )
    polished = counts["members"] - len(trained)  # members counts the float32 path's, then the float64 polish's
    assert 0 < polished < len(trained) and counts["member_iterations_float64"] > 0
    full, _ = fit_logistic(features[:, fit].double(), labels, 10, decays, tol=1e-6, max_iter=1000)
    full = full.view(2, len(decays), -1)

    def score(i, params):  # validation (top-1, -loss) of input set i: the probe's rule
        logits = features[i, val].double() @ params[:640].view(10, 64).T + params[640:]
        loss = torch.nn.functional.cross_entropy(logits, y_val)
        return float((logits.argmax(1) == y_val).double().mean()), -float(loss)

    for i in range(2):
        reached = [d for d in range(len(decays)) if i * len(decays) + d in trained]
        with torch.no_grad():
            ours = {
                d: torch.cat(
                    [bank.weights[bank._slot[(0, 0, d)]][i].flatten(), bank.biases[bank._slot[(0, 0, d)]][i].flatten()]
                ).double()
                for d in reached
            }
        chosen = max(reached, key=lambda d: score(i, ours[d]))
        assert chosen == max(reached, key=lambda d: score(i, full[i, d]))
        # polished: the float64 optimum, to the bank's float32
        torch.testing.assert_close(ours[chosen], full[i, chosen], rtol=0, atol=2e-3 * float(full[i].abs().max()))


def test_the_eigenbasis_changes_the_path_not_the_optimum(digits):
    """Features rotated into the eigenbasis of their second moment, with the preconditioner that basis allows:
    the same optimum as the plain fit (W = W_rot U'), in fewer iterations."""
    from stages.probe.logistic import Eigenbasis

    X, y = digits
    n = len(y)
    raw = np.stack([X, np.tanh(2 * X)])
    features = torch.tensor((raw - raw.mean(1, keepdims=True)) / np.maximum(raw.std(1, keepdims=True), 1e-6))
    decays = [1 / (C * n) for C in (0.01, 1.0, 100.0)]
    labels = torch.tensor(y)
    plain, plain_counts = fit_logistic(features, labels, 10, decays, tol=1e-8, max_iter=5000, rough=None)
    basis = Eigenbasis.of(features)
    every = torch.arange(2)
    rotated, counts = fit_logistic(
        basis.rotate(features), labels, 10, decays, tol=1e-8, max_iter=5000, rough=None, spectrum=basis.spectrum(every)
    )
    assert counts["converged"] == plain_counts["converged"] == 6
    assert counts["member_iterations"] < plain_counts["member_iterations"]
    rotated = rotated.view(2, 3, -1)
    weights = basis.unrotate(rotated[..., :640].reshape(2, 3 * 10, 64), every).reshape(6, 640)
    back = torch.cat([weights, rotated[..., 640:].reshape(6, 10)], dim=1)
    objective = LogisticObjective(features, labels, 10, decays)
    values, grad = objective(torch.arange(6), back)
    plain_values, _ = objective(torch.arange(6), plain)
    assert float(grad.abs().max()) <= 1e-7
    # both stationary to 1e-8: the same value to what the flattest (weakest-decay) member resolves
    torch.testing.assert_close(values, plain_values, rtol=1e-9, atol=1e-10)


def test_mixed_precision_is_float64_arithmetic_on_float32_features(digits):
    """LogisticObjective(mixed=True): float32 products around a float64 anchor give the float64 objective's values
    and gradients on the same (float32) features, far closer than plain float32 does."""
    X, y = digits
    features = torch.tensor(np.stack([X, np.tanh(X)]), dtype=torch.float32)
    decays = [1e-2, 1e-5]
    exact = LogisticObjective(features.double(), torch.tensor(y), 10, decays)
    mixed = LogisticObjective(features, torch.tensor(y), 10, decays, mixed=True)
    plain = LogisticObjective(features, torch.tensor(y), 10, decays)
    generator = torch.Generator().manual_seed(0)
    every = torch.arange(4)
    anchor = torch.randn(4, exact.size, dtype=torch.float64, generator=generator)
    values, grad = mixed.anchor_at(every, anchor)
    want_values, want_grad = exact(every, anchor)
    torch.testing.assert_close(values, want_values, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-13)
    # a step of the size the polish takes (the path's optima are within 1e-4 of the gradient test)
    x = anchor + 1e-3 * torch.randn(4, exact.size, dtype=torch.float64, generator=generator)
    index = torch.tensor([1, 2, 3])  # a subset, packed set by set
    values, grad = mixed(index, x[index])
    want_values, want_grad = exact(index, x[index])
    rough_values, rough_grad = plain(index, x[index].float())
    mixed_error = float((grad - want_grad).abs().max())
    value_error = float(((values - want_values) / want_values).abs().max())
    assert mixed_error <= 1e-9 and value_error <= 1e-10
    assert mixed_error < 1e-2 * float((rough_grad.double() - want_grad).abs().max())
    assert value_error < 1e-2 * float(((rough_values.double() - want_values) / want_values).abs().max())


def test_fit_logistic_on_float32_features_meets_tol_in_float64(digits):
    """float32 features: the path in float32, the polish in mixed precision; every member's float64 gradient (on
    the same features) meets tol, at the optimum a float64 fit finds."""
    X, y = digits
    features = torch.tensor(np.stack([X, np.tanh(2 * X)]), dtype=torch.float32)
    decays = [1 / (C * len(y)) for C in (0.01, 1.0, 100.0)]
    labels = torch.tensor(y)
    ours, counts = fit_logistic(features, labels, 10, decays, tol=1e-7, max_iter=5000)
    assert counts["converged"] == counts["members"] == 6 and counts["member_iterations_float64"] > 0
    exact = LogisticObjective(features.double(), labels, 10, decays)
    values, grad = exact(torch.arange(6), ours)
    assert float(grad.abs().max()) <= 1e-7
    reference, _ = fit_logistic(features.double(), labels, 10, decays, tol=1e-9, max_iter=5000)
    reference_values, _ = exact(torch.arange(6), reference)
    # within what a gradient of 1e-7 leaves of the weakest decay's flat optimum (a float64 fit to 1e-7: 4e-9)
    gap = values - reference_values
    assert float(gap.min()) >= -1e-12 and float(gap.max()) <= 1e-8
