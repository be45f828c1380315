"""Turning softmax scores into predicted label sets.

A softmax spreads one unit of probability over the positives: with ``|Y|`` true
labels each gets about ``1/|Y|``, so a fixed 0.5 threshold (right for sigmoids)
predicts almost nothing once a row has two or more labels. Use instead:

* :func:`top_k`: a fixed number of labels per row. Right when the number of
  labels per row is nearly constant, and for ranking-style evaluation (P@k).
* :func:`threshold`: labels whose softmax probability is at least ``t``. With
  ``t`` fitted on validation data (:func:`fit_decoder` with ``rule="threshold"``),
  this adapts the set size to how peaked the distribution is.
* :func:`cumulative_mass`: the smallest set of top labels whose probabilities
  add up to at least ``m``. Scale-free in ``|Y|``; a good default for softmax
  models whose label counts vary a lot (fit ``m`` with ``rule="mass"``).

:func:`fit_decoder` picks the rule's parameter that maximises a set metric
(micro-F1 by default) on validation data; never fit it on the test split.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["top_k", "threshold", "cumulative_mass", "Decoder", "fit_decoder"]

RULES = ("top_k", "threshold", "mass")


def _scores(scores) -> Tensor:
    s = torch.from_numpy(scores) if isinstance(scores, np.ndarray) else scores
    if not isinstance(s, Tensor) or s.dim() != 2:
        raise ValueError(f"Expected `scores` to be a [N, K] tensor or array, but got {getattr(s, 'shape', type(s))}")
    return s.detach()


def _check_param(name: str, value) -> float:
    """A rule's parameter: a finite real number (a NaN would silently select nothing, or everything)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(float(value)):
        raise ValueError(f"Expected `{name}` to be a finite number, but got {value!r}")
    return float(value)


def top_k(scores, k: int) -> Tensor:
    """``[N, K]`` bool: the ``k`` highest-scoring labels of each row (``k`` is clipped to K)."""
    s = _scores(scores)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"Expected `k` to be an int >= 0, but got {k!r}")
    k = min(int(k), s.shape[1])
    out = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    return out.scatter_(1, torch.topk(s, k, dim=1).indices, True) if k else out


def threshold(scores, t: float, *, from_logits: bool = True) -> Tensor:
    """``[N, K]`` bool: labels with probability ``>= t`` (softmax of the scores when ``from_logits``)."""
    t = _check_param("t", t)
    s = _scores(scores).float()
    p = torch.softmax(s, dim=1) if from_logits else s
    return p >= t


def cumulative_mass(scores, m: float, *, from_logits: bool = True) -> Tensor:
    """``[N, K]`` bool: the fewest top labels whose probabilities sum to at least ``m`` (always >= 1 label)."""
    m = _check_param("m", m)
    s = _scores(scores).float()
    p = torch.softmax(s, dim=1) if from_logits else s
    srt, order = torch.sort(p, dim=1, descending=True)
    before = torch.cumsum(srt, 1) - srt  # mass of the labels ranked above
    keep_sorted = before < m
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)


@dataclass
class Decoder:
    """A fitted decoding rule: ``rule`` in ``("top_k", "threshold", "mass")`` and its ``param``."""

    rule: str
    param: float

    def __call__(self, scores) -> Tensor:
        if self.rule == "top_k":
            return top_k(scores, int(self.param))
        if self.rule == "threshold":
            return threshold(scores, self.param)
        if self.rule == "mass":
            return cumulative_mass(scores, self.param)
        raise ValueError(f"Expected `rule` to be one of {RULES}, but got {self.rule!r}")

    def to_dict(self) -> dict:
        return {"rule": self.rule, "param": float(self.param)}


def fit_decoder(scores, target, *, rule: str = "threshold", metric: str = "micro_f1", grid=None) -> Decoder:
    """Choose the rule's parameter that maximises ``metric`` on validation data.

    Args:
        scores: ``[N, K]`` validation logits.
        target: ``[N, K]`` multi-hot (or :class:`~mlsoftmax.Positives`).
        rule: ``"top_k"``, ``"threshold"`` (softmax probability) or ``"mass"``.
        metric: ``"micro_f1"``, ``"macro_f1"`` or ``"example_f1"``.
        grid: candidate parameters; a sensible default per rule.

    Example:
        >>> import torch
        >>> s = torch.tensor([[3.0, 2.9, -2.0], [4.0, -1.0, -1.0]])
        >>> y = torch.tensor([[1, 1, 0], [1, 0, 0]])
        >>> d = fit_decoder(s, y, rule="threshold")
        >>> d(s).int().tolist()
        [[1, 1, 0], [1, 0, 0]]
    """
    from .metrics import _compute_sets, _format, _update_sets

    if rule not in RULES:
        raise ValueError(f"Expected `rule` to be one of {RULES}, but got {rule!r}")
    if metric not in ("micro_f1", "macro_f1", "example_f1"):
        raise ValueError(f"Expected `metric` to be micro_f1, macro_f1 or example_f1, but got {metric!r}")
    s, y = _format(scores, target)
    if grid is None:
        grid = {
            "top_k": range(1, min(s.shape[1], 20) + 1),
            "threshold": np.round(np.linspace(0.01, 0.5, 50), 4),
            "mass": np.round(np.linspace(0.05, 0.99, 48), 4),
        }[rule]
    grid = list(grid)
    if not grid:
        raise ValueError("Expected `grid` to hold at least one candidate parameter, but got none")
    best, best_val = None, -1.0
    for g in grid:
        d = Decoder(rule, float(g))
        val = _compute_sets(_update_sets(d(s), y))[metric]
        if val > best_val:
            best, best_val = d, val
    return best
