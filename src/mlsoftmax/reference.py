"""NumPy float64 oracle for the multi-label softmax cross-entropy.

This module follows the equations of the seed note (Tian, 2016,
"Softmax With Loss (for Multi Label Learning)") literally, with its two slips
corrected (see ``docs/derivation.md``). It imports no torch: every
implementation in the package is tested against it.

Per sample ``i`` with scores ``S_i`` (``[K]``) and multi-hot labels ``Y_i``:

* eq. (1)/(8): ``P_k = exp(S_k) / sum_j exp(S_j)``
* eq. (4):     ``P^g_k = Y_k / |Y|``
* eq. (6):     ``Loss_i = -sum_k P^g_k log P_k``  (eq. 2 lacks the minus sign)
* eq. (16):    ``dLoss_i/dS_k = P_k - Y_k / |Y|``  (the sign for minimisation)

The options the library adds (class weights, soft targets, label smoothing,
reductions) are implemented on top, in the same float64 arithmetic, so that they
can be held to the same oracle. Rows with no positive get a loss of 0 and a
gradient of 0 (the library's ``empty="ignore"`` convention).
"""

from __future__ import annotations

import numpy as np

__all__ = ["softmax", "target_distribution", "loss", "grad", "reduce", "sample_weight_grad"]


def softmax(scores):
    """Eq. (1): ``P = exp(S) / sum exp(S)`` per row, computed stably in float64.

    Args:
        scores: ``[B, K]`` array of scores ``S``.

    Returns:
        ``[B, K]`` float64 array of probabilities ``P``.
    """
    s = np.asarray(scores, dtype=np.float64)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def _log_softmax(s):
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return s - m - np.log(np.sum(np.exp(s - m), axis=-1, keepdims=True))


def target_distribution(target, *, label_smoothing=0.0):
    """Eq. (4): the ground-truth distribution ``P^g = Y / |Y|`` per row.

    Soft (non-negative) targets are normalised by their row sum, which is ``|Y|``
    for a multi-hot row. With label smoothing ``eps``, non-empty rows become
    ``(1 - eps) * Y / |Y| + eps / K``; empty rows stay all-zero.

    Args:
        target: ``[B, K]`` non-negative array (multi-hot or soft weights).
        label_smoothing: ``eps`` in ``[0, 1]``.

    Returns:
        ``[B, K]`` float64 array; each non-empty row sums to 1.
    """
    y = np.asarray(target, dtype=np.float64)
    k = y.shape[-1]
    mass = y.sum(axis=-1, keepdims=True)  # |Y_i|
    nonempty = mass > 0
    pg = np.where(nonempty, y / np.where(nonempty, mass, 1.0), 0.0)
    if label_smoothing:
        pg = np.where(nonempty, (1.0 - label_smoothing) * pg + label_smoothing / k, 0.0)
    return pg


def loss(scores, target, *, weight=None, label_smoothing=0.0):
    """Eq. (6) with the sign fixed: per-row ``-sum_k w_k P^g_k log P_k``.

    Args:
        scores: ``[B, K]`` scores ``S``.
        target: ``[B, K]`` multi-hot or non-negative soft target ``Y``.
        weight: optional ``[K]`` class weights ``w`` (PyTorch's meaning for soft
            targets: each term of the sum is scaled by ``w_k``).
        label_smoothing: ``eps`` in ``[0, 1]``.

    Returns:
        ``[B]`` float64 losses; 0 for rows with no positive.
    """
    s = np.asarray(scores, dtype=np.float64)
    pg = target_distribution(target, label_smoothing=label_smoothing)
    if weight is not None:
        pg = pg * np.asarray(weight, dtype=np.float64)
    logp = _log_softmax(s)
    # A class with zero target mass contributes nothing, even where log P = -inf.
    terms = np.where(pg != 0, pg * np.where(pg != 0, logp, 0.0), 0.0)
    return -terms.sum(axis=-1)


def grad(scores, target, *, weight=None, label_smoothing=0.0):
    """Eq. (16), sign for minimisation: ``dLoss_i/dS_k = P_k - Y_k/|Y|``.

    With class weights the general form is ``(sum_j w_j P^g_j) P_k - w_k P^g_k``,
    which reduces to eq. (16) when all ``w_k = 1``.

    Args:
        scores: ``[B, K]`` scores ``S``.
        target: ``[B, K]`` multi-hot or non-negative soft target ``Y``.
        weight: optional ``[K]`` class weights.
        label_smoothing: ``eps`` in ``[0, 1]``.

    Returns:
        ``[B, K]`` float64 gradient of each row's loss (not reduced); zero on
        rows with no positive.
    """
    s = np.asarray(scores, dtype=np.float64)
    pg = target_distribution(target, label_smoothing=label_smoothing)
    if weight is not None:
        pg = pg * np.asarray(weight, dtype=np.float64)
    p = softmax(s)
    return pg.sum(axis=-1, keepdims=True) * p - pg


def reduce(losses, target, *, reduction="mean", sample_weight=None):
    """Reduce per-row losses the way the library does.

    ``"mean"`` is the (sample-weighted) mean over rows that have at least one
    positive; 0 when there are none. ``"sum"`` is the weighted sum; ``"none"``
    returns the weighted per-row losses.

    Args:
        losses: ``[B]`` per-row losses from :func:`loss`.
        target: ``[B, K]`` target (to find the non-empty rows).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        sample_weight: optional ``[B]`` non-negative row weights.

    Returns:
        A float64 scalar, or ``[B]`` for ``"none"``.
    """
    losses = np.asarray(losses, dtype=np.float64)
    nonempty = np.asarray(target, dtype=np.float64).sum(axis=-1) > 0
    sw = np.ones_like(losses) if sample_weight is None else np.asarray(sample_weight, np.float64)
    weighted = losses * sw
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    denom = (sw * nonempty).sum()
    return weighted.sum() / denom if denom > 0 else 0.0


def sample_weight_grad(losses, target, sample_weight, *, reduction="mean", upstream=None):
    """Gradient of :func:`reduce` with respect to ``sample_weight``.

    With ``n_i`` = row i has a positive and ``D = sum_j w_j n_j``:
    ``"sum"``: ``l_i``; ``"none"``: ``u_i l_i``; ``"mean"``: ``(l_i - L n_i) / D``,
    where ``L`` is the mean (0 when ``D`` is 0, and so is the gradient).

    Args:
        losses: ``[B]`` per-row losses from :func:`loss`.
        target: ``[B, K]`` target (to find the non-empty rows).
        sample_weight: ``[B]`` row weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        upstream: the upstream gradient: ``[B]`` for ``"none"``, else a scalar (default 1).

    Returns:
        ``[B]`` float64.
    """
    losses = np.asarray(losses, dtype=np.float64)
    sw = np.asarray(sample_weight, dtype=np.float64)
    u = np.ones_like(losses) if upstream is None else np.broadcast_to(np.asarray(upstream, np.float64), losses.shape)
    if reduction != "mean":
        return u * losses
    nonempty = np.asarray(target, dtype=np.float64).sum(axis=-1) > 0
    denom = (sw * nonempty).sum()
    if denom <= 0:
        return np.zeros_like(losses)
    return u * (losses - reduce(losses, target, reduction="mean", sample_weight=sw) * nonempty) / denom
