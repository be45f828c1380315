"""The multi-label losses people compare the softmax loss against.

Each takes ``logits`` ``[B, K]`` and a target (dense multi-hot ``[B, K]`` or
:class:`~mlsoftmax.Positives`), sums over classes within a row and reduces over
rows (``"mean"``, ``"sum"`` or ``"none"``). They use dense ``[B, K]`` (and for the
pairwise losses ``[B, K, K]``) intermediates: they are baselines for moderate K,
not extreme label spaces.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .targets import Positives

__all__ = ["bce_loss", "pairwise_ranking_loss", "warp_loss", "asymmetric_loss", "zlpr_loss", "pick_all_labels_loss", "LOSSES"]


def _dense(logits: Tensor, target) -> Tensor:
    if isinstance(target, Positives):
        target = target.to(logits.device).to_dense(logits.shape[-1])
    if target.shape != logits.shape:
        raise ValueError(f"Expected `target` to have shape {tuple(logits.shape)}, but got {tuple(target.shape)}")
    return (target > 0).to(logits.dtype)


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return rows.mean() if rows.numel() else rows.sum()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"Expected `reduction` to be one of ('mean', 'sum', 'none'), but got {reduction!r}")


def bce_loss(logits: Tensor, target, *, reduction: str = "mean") -> Tensor:
    """One-vs-all sigmoid binary cross-entropy, summed over the K classes of a row.

    .. math:: \\ell = -\\sum_k y_k\\log\\sigma(s_k) + (1-y_k)\\log(1-\\sigma(s_k))
    """
    y = _dense(logits, target)
    return _reduce(F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(-1), reduction)


def _pair_margins(logits: Tensor, y: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """``[B, K, K]`` hinge terms ``max(0, margin - s_j + s_k)`` for positive j and negative k, and the pair mask."""
    pair = (y[:, :, None] > 0) & (y[:, None, :] == 0)
    hinge = (margin - logits[:, :, None] + logits[:, None, :]).clamp_min(0)
    return hinge, pair


def pairwise_ranking_loss(logits: Tensor, target, *, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    """Pairwise hinge ranking loss (Gong et al. 2014, eq. 2): every positive above every negative by a margin.

    .. math:: \\ell = \\sum_{j\\in Y}\\sum_{k\\notin Y}\\max(0, m - s_j + s_k)
    """
    y = _dense(logits, target)
    hinge, pair = _pair_margins(logits, y, margin)
    return _reduce((hinge * pair).sum((1, 2)), reduction)


def _rank_weight(r: Tensor) -> Tensor:
    """WARP's L(r) = sum_{i=1}^{r} 1/i (0 for r = 0)."""
    return torch.where(r > 0, torch.digamma(r + 1.0) + 0.5772156649015329, torch.zeros_like(r))


def warp_loss(
    logits: Tensor, target, *, margin: float = 1.0, reduction: str = "mean", generator: Optional[torch.Generator] = None
) -> Tensor:
    """WARP (Weston et al. 2011), as used for multi-label annotation by Gong et al. 2014.

    For each positive ``j``, negatives are drawn in random order until one
    violates the margin (``m - s_j + s_k > 0``); with ``N`` draws the rank is
    estimated as ``floor((K - |Y|) / N)`` and the violation is weighted by
    ``L(rank) = sum_{i<=rank} 1/i``. The draws are simulated exactly and without
    a loop: a random permutation of the negatives, the first violator in it,
    and ``N`` = its position.

    .. math:: \\ell = \\sum_{j\\in Y} L\\big(\\lfloor (K-|Y|)/N_j \\rfloor\\big)\\,\\max(0, m - s_j + s_{k_j})
    """
    y = _dense(logits, target)
    b, k = y.shape
    hinge, pair = _pair_margins(logits, y, margin)
    viol = pair & (hinge > 0)  # [B, K, K]
    keys = torch.rand(b, 1, k, generator=generator, device=logits.device).expand(b, k, k)  # order of the draws
    big = torch.full_like(keys, 2.0)
    first_key = torch.where(viol, keys, big).amin(2, keepdim=True)  # [B, K, 1]
    chosen = viol & (keys == first_key)
    n_draws = (pair & (keys <= first_key)).sum(2).to(logits.dtype)  # [B, K]
    n_neg = (1 - y).sum(1, keepdim=True)
    rank = torch.floor(n_neg / n_draws.clamp_min(1))
    w = _rank_weight(rank) * viol.any(2)
    per_pos = (hinge * chosen).sum(2)  # [B, K]
    return _reduce((w.detach() * per_pos).sum(1), reduction)


def asymmetric_loss(
    logits: Tensor, target, *, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05,
    eps: float = 1e-8, reduction: str = "mean",
) -> Tensor:
    """Asymmetric loss (ASL, Ridnik et al. 2021), with the paper's defaults.

    .. math:: \\ell = -\\sum_k y_k (1-p_k)^{\\gamma_+}\\log p_k + (1-y_k)\\, p_{m,k}^{\\gamma_-}\\log(1-p_{m,k}),
              \\quad p = \\sigma(s),\\; p_m = \\max(p - c, 0)
    """
    y = _dense(logits, target)
    p = torch.sigmoid(logits)
    p_m = (p - clip).clamp_min(0) if clip else p
    los_pos = y * torch.log(p.clamp_min(eps)) * (1 - p).pow(gamma_pos)
    los_neg = (1 - y) * torch.log((1 - p_m).clamp_min(eps)) * p_m.pow(gamma_neg)
    return _reduce(-(los_pos + los_neg).sum(-1), reduction)


def zlpr_loss(logits: Tensor, target, *, reduction: str = "mean") -> Tensor:
    """ZLPR / multi-label categorical cross-entropy (Su et al. 2022), threshold at 0.

    .. math:: \\ell = \\log\\Big(1 + \\sum_{k\\notin Y} e^{s_k}\\Big) + \\log\\Big(1 + \\sum_{j\\in Y} e^{-s_j}\\Big)
    """
    y = _dense(logits, target).bool()
    ninf = torch.full_like(logits, float("-inf"))
    zero = torch.zeros_like(logits[..., :1])
    neg = torch.logsumexp(torch.cat([torch.where(y, ninf, logits), zero], -1), -1)
    pos = torch.logsumexp(torch.cat([torch.where(y, -logits, ninf), zero], -1), -1)
    return _reduce(neg + pos, reduction)


def pick_all_labels_loss(logits: Tensor, target, *, reduction: str = "mean") -> Tensor:
    """The unnormalised "pick-all-labels" softmax: ``-sum_{j in Y} log softmax(s)_j``.

    It equals ``|Y|`` times the multi-label softmax loss, so rows with more labels
    weigh more (Menon et al. 2019 call it PAL).
    """
    y = _dense(logits, target)
    logp = torch.log_softmax(logits.float(), -1).to(logits.dtype)
    return _reduce(-(y * torch.where(y > 0, logp, torch.zeros_like(logp))).sum(-1), reduction)


LOSSES = {
    "bce": bce_loss,
    "ranking": pairwise_ranking_loss,
    "warp": warp_loss,
    "asl": asymmetric_loss,
    "zlpr": zlpr_loss,
    "pal": pick_all_labels_loss,
}
