"""The oracle itself, held to hand computation and finite differences."""

import numpy as np
import pytest

from mlsoftmax import reference as R


def test_hand_computed_case():
    s = np.array([[2.0, 0.0, 1.0]])
    y = np.array([[1, 0, 1]])
    lse = np.log(np.exp(2.0) + 1.0 + np.exp(1.0))
    assert R.loss(s, y)[0] == pytest.approx(lse - 1.5, abs=1e-14)
    p = np.exp(s[0] - lse)
    np.testing.assert_allclose(R.grad(s, y)[0], p - np.array([0.5, 0.0, 0.5]), atol=1e-15)


def test_gradient_matches_finite_differences(rng):
    s = rng.normal(size=(4, 9))
    y = rng.random((4, 9)) * (rng.random((4, 9)) < 0.5)
    y[0, 0] = 1.0
    w = rng.random(9) + 0.2
    for kw in ({}, {"weight": w}, {"label_smoothing": 0.2}, {"weight": w, "label_smoothing": 0.1}):
        g = R.grad(s, y, **kw)
        h = 1e-6
        num = np.zeros_like(s)
        for i in range(s.shape[0]):
            for k in range(s.shape[1]):
                sp, sm = s.copy(), s.copy()
                sp[i, k] += h
                sm[i, k] -= h
                num[i, k] = (R.loss(sp, y, **kw)[i] - R.loss(sm, y, **kw)[i]) / (2 * h)
        np.testing.assert_allclose(g, num, atol=1e-7)


def test_single_positive_is_softmax_cross_entropy(rng):
    s = rng.normal(size=(5, 6))
    lab = rng.integers(0, 6, size=5)
    y = np.eye(6)[lab]
    logp = s - np.log(np.exp(s).sum(1, keepdims=True))
    np.testing.assert_allclose(R.loss(s, y), -logp[np.arange(5), lab], rtol=1e-13)


def test_empty_rows_and_reduce():
    s = np.zeros((3, 4))
    y = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    l = R.loss(s, y)
    assert l[1] == 0.0 and np.all(R.grad(s, y)[1] == 0.0)
    assert R.reduce(l, y) == pytest.approx(np.log(4.0))  # two non-empty rows, both log 4
    assert R.reduce(l, y, reduction="sum") == pytest.approx(2 * np.log(4.0))
    assert R.reduce(np.zeros(2), np.zeros((2, 4))) == 0.0


def test_masked_minus_inf_classes_are_finite():
    s = np.array([[1.0, -np.inf, 0.5]])
    y = np.array([[1, 0, 0]])
    assert np.isfinite(R.loss(s, y)).all()
    g = R.grad(s, y)
    assert np.isfinite(g).all() and g[0, 1] == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sample_weight_grad_matches_finite_differences(reduction, rng):
    losses = rng.random(5) * 3
    y = (rng.random((5, 4)) < 0.5).astype(float)
    y[0], y[1, 2] = 0.0, 1.0  # an empty row (its loss is 0, as R.loss makes it)
    losses[0] = 0.0
    sw = rng.uniform(0.0, 2.0, size=5)
    sw[3] = 0.0  # a zero weight still has a gradient
    u = rng.normal(size=5) if reduction == "none" else 1.3
    g = R.sample_weight_grad(losses, y, sw, reduction=reduction, upstream=u)
    h, num = 1e-6, np.zeros(5)
    for i in range(5):
        wp, wm = sw.copy(), sw.copy()
        wp[i] += h
        wm[i] -= h
        f = lambda w: np.sum(u * R.reduce(losses, y, reduction=reduction, sample_weight=w))
        num[i] = (f(wp) - f(wm)) / (2 * h)
    np.testing.assert_allclose(g, num, atol=1e-8)
