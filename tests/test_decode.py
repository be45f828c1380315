"""Decoding rules against hand-computed sets, and fitting on validation data."""

import numpy as np
import pytest
import torch

from mlsoftmax.decode import Decoder, cumulative_mass, fit_decoder, threshold, top_k
from mlsoftmax.metrics import f1_score


def test_top_k_and_threshold():
    s = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 5.0]])
    assert top_k(s, 2).int().tolist() == [[1, 0, 1], [0, 1, 1]]
    assert top_k(s, 10).all() and not top_k(s, 0).any()
    assert torch.equal(top_k(s, np.int64(2)), top_k(s, 2))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="Expected `k` to be an int >= 0"):
            top_k(s, bad)
    p = torch.softmax(s, 1)
    assert torch.equal(threshold(s, 0.2), p >= 0.2)
    assert torch.equal(threshold(p, 0.2, from_logits=False), p >= 0.2)


def test_cumulative_mass_hand():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
    # row 0: 0.5 < 0.7 -> keep second; 0.8 >= 0.7 -> stop. row 1: first label alone covers 0.7
    assert cumulative_mass(p, 0.7, from_logits=False).int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert cumulative_mass(p, 0.0, from_logits=False).sum(1).tolist() == [1, 1]  # always one label


@pytest.mark.parametrize("rule", ["top_k", "threshold", "mass"])
def test_fit_decoder_picks_the_best_on_the_grid(rule, rng):
    k = 6
    y = (rng.random((80, k)) < 0.3).astype(int)
    y[np.arange(80), rng.integers(0, k, 80)] = 1
    s = torch.from_numpy(y * 2.0 + rng.normal(scale=0.8, size=y.shape))
    d = fit_decoder(s, y, rule=rule)
    best = f1_score(d(s), y, "micro")
    grid = {"top_k": range(1, k + 1), "threshold": np.linspace(0.01, 0.5, 50), "mass": np.linspace(0.05, 0.99, 48)}[rule]
    assert best == pytest.approx(max(f1_score(Decoder(rule, float(g))(s), y, "micro") for g in grid))
    assert Decoder(**d.to_dict()) == d


def test_bad_rule():
    with pytest.raises(ValueError, match="Expected `rule`"):
        fit_decoder(torch.zeros(2, 2), torch.ones(2, 2), rule="half")
    with pytest.raises(ValueError, match="Expected `rule`"):
        Decoder("half", 0.5)(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="Expected `grid` to hold at least one"):
        fit_decoder(torch.zeros(2, 2), torch.ones(2, 2), grid=[])


@pytest.mark.parametrize("rule", [threshold, cumulative_mass])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", None, True])
def test_rule_parameters_must_be_finite_numbers(rule, bad):
    """A NaN threshold used to select no label, silently; a string failed inside a comparison."""
    with pytest.raises(ValueError, match="to be a finite number"):
        rule(torch.zeros(2, 3), bad)
    assert rule(torch.zeros(2, 3), np.float32(0.3)).shape == (2, 3)
