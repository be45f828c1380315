"""Multi-label evaluation metrics, functional and accumulating.

Inputs are scores ``[N, K]`` and targets (dense multi-hot ``[N, K]`` or
:class:`~mlsoftmax.Positives`), as torch tensors or NumPy arrays. Like
torchmetrics, each metric is built from private stages shared by the functional
API and the :class:`MultilabelEvaluator` accumulator:

* ``_format``: to float64 scores and a bool target on the CPU;
* ``_update_*``: per-batch sufficient statistics (sums over rows, per-class counts);
* ``_compute``: the final values from the summed statistics.

Rows with no positive follow scikit-learn's conventions where scikit-learn has
the metric (average precision 1, ranking loss 0, coverage 0) and are left out
where a metric is undefined for them (recall@k, nDCG@k, one-error).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .targets import Positives

__all__ = [
    "average_precision",
    "ranking_loss",
    "coverage",
    "one_error",
    "precision_at_k",
    "recall_at_k",
    "ndcg_at_k",
    "inverse_propensity",
    "psp_at_k",
    "psndcg_at_k",
    "annotation_scores",
    "mean_average_precision",
    "hamming_loss",
    "f1_score",
    "MultilabelEvaluator",
]


# --------------------------------------------------------------------------- _format
def _as_tensor(a, name: str) -> Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor or numpy.ndarray, but got {type(a).__name__}")
    return a.detach().cpu()


def _format(scores, target) -> tuple[Tensor, Tensor]:
    """Scores ``[N, K]`` float64 and target ``[N, K]`` bool, on the CPU."""
    s = _as_tensor(scores, "scores")
    if s.dim() != 2:
        raise ValueError(f"Expected `scores` to have shape [N, K], but got {tuple(s.shape)}")
    s = s.double()
    n_nan = int(torch.isnan(s).sum())
    if n_nan:  # every ranking would depend on where the sort puts them (scikit-learn refuses them too)
        raise ValueError(f"Expected `scores` to have no NaN, but got {n_nan} NaN entries")
    if isinstance(target, Positives):
        if target.batch_size != s.shape[0]:
            raise ValueError(f"Expected `target` to have {s.shape[0]} rows, but got {target.batch_size}")
        y = target.to("cpu").to_dense(s.shape[1]) > 0
    else:
        y = _as_tensor(target, "target")
        if y.shape != s.shape:
            raise ValueError(f"Expected `target` to have the shape of `scores` {tuple(s.shape)}, but got {tuple(y.shape)}")
        y = y > 0
    return s, y


def _as_set(pred, name: str = "pred") -> Tensor:
    """Predicted label sets ``[N, K]`` as bool, from bool or 0/1 values (scores are refused, not thresholded)."""
    p = _as_tensor(pred, name)
    if p.dim() != 2:
        raise ValueError(f"Expected `{name}` to have shape [N, K], but got {tuple(p.shape)}")
    if p.dtype != torch.bool and bool(((p != 0) & (p != 1)).any()):  # scores or probabilities, not a set
        raise ValueError(f"Expected `{name}` to be predicted label sets (bool or 0/1), but got other values: turn "
                         "scores into sets with mlsoftmax.decode (top_k, threshold, cumulative_mass) first")
    return p > 0


def _format_pred(pred, target) -> tuple[Tensor, Tensor]:
    p = _as_set(pred)
    _, y = _format(torch.zeros(p.shape, dtype=torch.float64), target)
    return p, y


def _check_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, but got {k!r}")
    return int(k)


# --------------------------------------------------------------------------- per-row stages
def _count_ge(s: Tensor, ref: Tensor) -> Tensor:
    """For each row, how many entries of ``s`` are >= each entry of ``ref``."""
    srt, _ = torch.sort(s, dim=1)
    return s.shape[1] - torch.searchsorted(srt, ref.contiguous(), right=False)


def _count_pos_ge(s: Tensor, y: Tensor, ref: Tensor) -> Tensor:
    """For each row, how many positives score >= each entry of ``ref``."""
    srt, _ = torch.sort(torch.where(y, s, torch.full_like(s, -math.inf)), dim=1)
    n_neg = (~y).sum(1, keepdim=True)
    return s.shape[1] - torch.searchsorted(srt, ref.contiguous(), right=False) - n_neg * (ref == -math.inf)


def _ap_rows(s: Tensor, y: Tensor) -> Tensor:
    """Label-ranking average precision per row (scikit-learn's LRAP)."""
    rank = _count_ge(s, s).double()  # [N, K] rank of each label (ties share the worst rank)
    pos_rank = _count_pos_ge(s, y, s).double()
    npos = y.sum(1)
    per = torch.where(y, pos_rank / rank, torch.zeros_like(rank)).sum(1) / npos.clamp_min(1)
    trivial = (npos == 0) | (npos == s.shape[1])
    return torch.where(trivial, torch.ones_like(per), per)


def _ranking_loss_rows(s: Tensor, y: Tensor) -> Tensor:
    """Fraction of (positive, negative) pairs ordered wrongly; ties count as wrong."""
    srt, _ = torch.sort(torch.where(y, s, torch.full_like(s, math.inf)), dim=1)
    pos_le = torch.searchsorted(srt, s.contiguous(), right=True).double()  # positives scoring <= each label
    npos, nneg = y.sum(1), (~y).sum(1)
    bad = torch.where(~y, pos_le, torch.zeros_like(pos_le)).sum(1)
    pairs = (npos * nneg).double()
    return torch.where(pairs > 0, bad / pairs.clamp_min(1), torch.zeros_like(bad))


def _coverage_rows(s: Tensor, y: Tensor) -> Tensor:
    """Steps down the ranking to cover every positive (MULAN: scikit-learn's coverage_error - 1)."""
    min_pos = torch.where(y, s, torch.full_like(s, math.inf)).amin(1, keepdim=True)
    cov = (s >= min_pos).sum(1).double() - 1
    return torch.where(y.any(1), cov, torch.zeros_like(cov))


def _topk_hits(s: Tensor, y: Tensor, k: int) -> Tensor:
    """``[N, k]`` whether the r-th highest-scoring label is a positive."""
    k = min(k, s.shape[1])
    idx = torch.topk(s, k, dim=1).indices
    return torch.gather(y, 1, idx)


def _discounts(k: int) -> Tensor:
    """``[k]`` DCG's position discounts ``1 / log2(r + 1)``, r = 1..k."""
    return 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))


def _ideal_psp(rows: Tensor, gains: Tensor, n: int, k: int) -> Tensor:
    """``[N, k]`` each row's positives' gains (``rows``, ``gains`` ``[nnz]``), largest first, 0 past its
    positives: the propensity-scored gains of a perfect top-k, rank by rank."""
    order = torch.argsort(gains, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]  # by row, each row's gains largest first
    r = rows[order]
    rank = torch.arange(r.numel()) - torch.searchsorted(r, r)  # [nnz] rank within the row (rows sorted)
    keep = rank < k
    return torch.zeros(n, k, dtype=torch.float64).index_put_((r[keep], rank[keep]), gains[order][keep])


def _ndcg_rows(hits: Tensor, npos: Tensor) -> Tensor:
    """nDCG of each row from its top labels' hits ``[N, k]`` and its number of positives ``[N]``."""
    hits = hits.double()
    disc = 1.0 / torch.log2(torch.arange(2, hits.shape[1] + 2, dtype=torch.float64))
    dcg = (hits * disc).sum(1)
    ideal_n = npos.clamp(max=hits.shape[1])
    idcg = torch.cumsum(disc, 0)[(ideal_n - 1).clamp_min(0)]
    return torch.where(ideal_n > 0, dcg / idcg, torch.zeros_like(dcg))


def _ranked_hits(idx: Tensor, target) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(hits [N, m] bool, npos [N], positives' rows and class ids [nnz] each)`` of ranked labels ``idx``
    ``[N, m]``, without a dense ``[N, K]`` target: each (row, label) pair is looked up among the row's positives."""
    if isinstance(target, Positives):
        pos = target.to("cpu")
        if pos.batch_size != idx.shape[0]:
            raise ValueError(f"Expected `target` to have {idx.shape[0]} rows, but got {pos.batch_size}")
        rows, cls, npos = pos.row_ids(), pos.indices, pos.counts()
    else:
        y = _as_tensor(target, "target")
        if y.dim() != 2 or y.shape[0] != idx.shape[0]:
            raise ValueError(f"Expected `target` to have shape [{idx.shape[0]}, K], but got {tuple(y.shape)}")
        rows, cls = torch.nonzero(y > 0, as_tuple=True)
        npos = (y > 0).sum(1)
    big = int(max(int(idx.max()) if idx.numel() else 0, int(cls.max()) if cls.numel() else 0)) + 1
    keys, _ = torch.sort(rows * big + cls)  # [nnz] (row, class) pairs
    if bool((keys[1:] == keys[:-1]).any()):  # a raw Positives may repeat one: it would count twice in |Y|
        raise ValueError("Expected `target` to have unique class indices within each row, but got duplicates")
    query = torch.arange(idx.shape[0]).unsqueeze(1) * big + idx  # [N, m]
    at = torch.searchsorted(keys, query).clamp(max=max(keys.numel() - 1, 0))
    hits = (keys[at] == query) if keys.numel() else torch.zeros(query.shape, dtype=torch.bool)
    return hits, npos, rows, cls


# --------------------------------------------------------------------------- _update / _compute


def _update_top(hits_of, npos: Tensor, ks: Sequence[int], psp_of=None) -> dict:
    """Summed per-row statistics of the top-k metrics; ``hits_of(k)``: ``[N, <=k]`` hits of each row's top labels;
    ``psp_of(k)``, if given: ``([N, <=k], [N, k])`` the inverse-propensity gains of those hits and of a perfect
    top-k, rank by rank."""
    has = npos > 0
    st = {"rows": float(npos.shape[0]), "rows_pos": float(has.sum()),
          "one_error": float((has & ~hits_of(1)[:, 0]).sum())}
    for k in ks:
        top = hits_of(k)
        hits = top.double().sum(1)
        st[f"precision_at_{k}"] = float((hits / k).sum())
        st[f"recall_at_{k}"] = float(torch.where(has, hits / npos.clamp_min(1), torch.zeros_like(hits)).sum())
        st[f"ndcg_at_{k}"] = float(_ndcg_rows(top, npos.long()).sum())
        if psp_of is not None:
            got, best = psp_of(k)
            st[f"psp_at_{k}"], st[f"psp_ideal_at_{k}"] = float(got.sum()), float(best.sum())
            # PSnDCG: each row's discounted gains over its binary ideal DCG (as nDCG@k), then over a perfect ranking's
            idcg = torch.cumsum(_discounts(k), 0)[(npos.long().clamp(max=k) - 1).clamp_min(0)]  # [N]
            disc = _discounts(k)
            st[f"psndcg_at_{k}"] = float(((got * disc[:got.shape[1]]).sum(1) / idcg).sum())
            st[f"psndcg_ideal_at_{k}"] = float(((best * disc).sum(1) / idcg).sum())
    return st


def _psp_of_scores(s: Tensor, y: Tensor, ips: Tensor):
    """``psp_of`` of :func:`_update_top` from scores and a dense target (ties broken as :func:`_topk_hits`)."""
    rows, cls = torch.nonzero(y, as_tuple=True)

    def psp_of(k: int):
        top = torch.topk(s, min(k, s.shape[1]), dim=1).indices  # [N, k]
        return torch.gather(y, 1, top) * ips[top], _ideal_psp(rows, ips[cls], s.shape[0], k)

    return psp_of


def _update_ranking(s: Tensor, y: Tensor, ks: Sequence[int], psp_of=None) -> dict:
    """Summed per-row statistics of one batch (example-based and top-k metrics)."""
    st = _update_top(lambda k: _topk_hits(s, y, k), y.sum(1), ks, psp_of)
    st.update({
        "average_precision": float(_ap_rows(s, y).sum()),
        "ranking_loss": float(_ranking_loss_rows(s, y).sum()),
        "coverage": float(_coverage_rows(s, y).sum()),
    })
    return st


def _compute_ranking(st: dict, ks: Sequence[int]) -> dict:
    n, npos = max(st["rows"], 1.0), max(st["rows_pos"], 1.0)
    out = {key: st[key] / n for key in ("average_precision", "ranking_loss", "coverage") if key in st}
    out["one_error"] = st["one_error"] / npos
    for k in ks:
        out[f"precision_at_{k}"] = st[f"precision_at_{k}"] / n
        out[f"recall_at_{k}"] = st[f"recall_at_{k}"] / npos
        out[f"ndcg_at_{k}"] = st[f"ndcg_at_{k}"] / npos
        for key in (f"psp_at_{k}", f"psndcg_at_{k}"):  # over a perfect ranking's, as the XC repository reports them
            if key in st:
                ideal = st[key.replace("_at_", "_ideal_at_")]
                out[key] = st[key] / ideal if ideal > 0 else 0.0
    return out


def _update_sets(pred: Tensor, y: Tensor) -> dict:
    """Per-class counts of predicted sets ``pred`` ``[N, K]`` bool against ``y``."""
    tp = (pred & y).sum(0).double()
    inter = (pred & y).sum(1).double()
    denom = (pred.sum(1) + y.sum(1)).double()
    return {
        "tp": tp,
        "pred": pred.sum(0).double(),
        "true": y.sum(0).double(),
        "mismatch": float((pred ^ y).sum()),
        "cells": float(pred.numel()),
        "example_f1": float(torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.zeros_like(inter)).sum()),
        "rows": float(pred.shape[0]),
    }


def _merge(a: Optional[dict], b: dict) -> dict:
    if a is None:
        return dict(b)
    return {k: a[k] + b[k] for k in a}


def _div0(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0/0 = 0 (scikit-learn's zero_division=0)."""
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def _compute_sets(st: dict) -> dict:
    tp, pred, true = st["tp"], st["pred"], st["true"]
    f1_class = _div0(2 * tp, pred + true)
    micro = float(_div0(2 * tp.sum(), pred.sum() + true.sum()))
    return {
        "micro_f1": micro,
        "macro_f1": float(f1_class.mean()) if f1_class.numel() else 0.0,
        "example_f1": st["example_f1"] / max(st["rows"], 1.0),
        "hamming_loss": st["mismatch"] / max(st["cells"], 1.0),
    }


def _compute_annotation(st: dict) -> dict:
    tp, pred, true = st["tp"], st["pred"], st["true"]
    present = true > 0
    prec = _div0(tp, pred)[present]
    rec = _div0(tp, true)[present]
    return {
        "per_class_precision": float(prec.mean()) if prec.numel() else 0.0,
        "per_class_recall": float(rec.mean()) if rec.numel() else 0.0,
        "overall_precision": float(_div0(tp.sum(), pred.sum())),
        "overall_recall": float(_div0(tp.sum(), true.sum())),
        "n_plus": int((tp > 0).sum()),
    }


def _label_ap(s: Tensor, y: Tensor) -> Tensor:
    """``[K]`` average precision of each label's ranking of the rows (ties grouped, like scikit-learn)."""
    n = s.shape[0]
    srt, order = torch.sort(s, dim=0, descending=True)
    ys = torch.gather(y, 0, order).double()
    tp = torch.cumsum(ys, 0)
    idx = torch.arange(n).unsqueeze(1).expand_as(srt)
    ends = torch.ones_like(srt, dtype=torch.bool)
    ends[:-1] = srt[:-1] != srt[1:]
    # index of the end of each element's tie group: reverse cumulative minimum of the end indices
    end_idx = torch.where(ends, idx, torch.full_like(idx, n)).flip(0).cummin(0).values.flip(0)
    prec = torch.gather(tp, 0, end_idx) / (end_idx + 1).double()
    npos = ys.sum(0)
    return _div0((ys * prec).sum(0), npos)


# --------------------------------------------------------------------------- functional API
def average_precision(scores, target) -> float:
    """Example-based average precision (scikit-learn's ``label_ranking_average_precision_score``).

    .. math:: \\mathrm{AP} = \\frac1N\\sum_i \\frac1{|Y_i|}\\sum_{j\\in Y_i}
              \\frac{|\\{k\\in Y_i: s_{ik}\\ge s_{ij}\\}|}{|\\{k: s_{ik}\\ge s_{ij}\\}|}

    Rows with no positive (or only positives) score 1, as in scikit-learn.

    Args:
        scores: ``[N, K]`` scores (higher is more relevant).
        target: ``[N, K]`` multi-hot or :class:`~mlsoftmax.Positives`.

    Example:
        >>> import numpy as np
        >>> round(average_precision(np.array([[0.9, 0.1, 0.5]]), np.array([[0, 0, 1]])), 3)
        0.5
    """
    s, y = _format(scores, target)
    return float(_ap_rows(s, y).mean()) if s.shape[0] else 0.0


def ranking_loss(scores, target) -> float:
    """Mean fraction of (positive, negative) pairs with the negative scored >= the positive.

    Equal to scikit-learn's ``label_ranking_loss`` (ties count as mis-ordered; rows
    with no positive or no negative score 0). Shapes as in :func:`average_precision`.
    """
    s, y = _format(scores, target)
    return float(_ranking_loss_rows(s, y).mean()) if s.shape[0] else 0.0


def coverage(scores, target) -> float:
    """How far down the ranking one must go to cover all positives, on average.

    This is the Zhang & Zhou / MULAN convention, ``max_{j in Y} rank(j) - 1``,
    i.e. scikit-learn's ``coverage_error`` minus 1 (a perfect ranking of one
    positive scores 0). Rows with no positive score 0 (as in scikit-learn).
    """
    s, y = _format(scores, target)
    return float(_coverage_rows(s, y).mean()) if s.shape[0] else 0.0


def one_error(scores, target) -> float:
    """Fraction of rows whose top-scored label is not a positive (rows with a positive only).

    Ties at the top go to the lowest class index.
    """
    s, y = _format(scores, target)
    return _compute_ranking(_update_top(lambda j: _topk_hits(s, y, j), y.sum(1), ()), ())["one_error"]


def precision_at_k(scores, target, k: int = 1) -> float:
    """P@k = |top-k ∩ Y| / k, averaged over all rows (the extreme-classification definition)."""
    k = _check_k(k)
    s, y = _format(scores, target)
    return _compute_ranking(_update_top(lambda j: _topk_hits(s, y, j), y.sum(1), (k,)), (k,))[f"precision_at_{k}"]


def recall_at_k(scores, target, k: int = 1) -> float:
    """R@k = |top-k ∩ Y| / |Y|, averaged over rows with at least one positive."""
    k = _check_k(k)
    s, y = _format(scores, target)
    return _compute_ranking(_update_top(lambda j: _topk_hits(s, y, j), y.sum(1), (k,)), (k,))[f"recall_at_{k}"]


def ndcg_at_k(scores, target, k: int = 1) -> float:
    """nDCG@k with binary gains, normalised by the ideal DCG over ``min(k, |Y|)`` positives.

    .. math:: \\mathrm{nDCG@k} = \\frac{\\sum_{r=1}^{k} y_{\\pi(r)}/\\log_2(r+1)}
              {\\sum_{r=1}^{\\min(k,|Y|)} 1/\\log_2(r+1)}

    Averaged over rows with at least one positive.
    """
    k = _check_k(k)
    s, y = _format(scores, target)
    return _compute_ranking(_update_top(lambda j: _topk_hits(s, y, j), y.sum(1), (k,)), (k,))[f"ndcg_at_{k}"]


def inverse_propensity(label_counts, num_rows: int, a: float = 0.55, b: float = 1.5) -> Tensor:
    r"""Inverse propensities of the labels ``[K]`` (Jain, Prabhu and Varma, 2016), for :func:`psp_at_k`.

    .. math:: 1/p_l = 1 + C\,(N_l + B)^{-A}, \qquad C = (\ln N - 1)\,(B + 1)^{A}

    with ``N_l`` the training rows that have label ``l`` and ``N`` the training
    rows. The paper's values: ``A = 0.55, B = 1.5`` (the default), ``0.5, 0.4``
    for Wikipedia data sets, ``0.6, 2.6`` for Amazon ones.

    Args:
        label_counts: ``[K]`` training rows per label (``torch.bincount(pos.indices, minlength=K)``).
        num_rows: ``N``.

    Example:
        >>> inverse_propensity(torch.tensor([0, 10]), 100).round(decimals=3).tolist()
        [5.775, 2.557]
    """
    counts = _as_tensor(label_counts, "label_counts").double()
    if counts.dim() != 1 or bool((counts < 0).any()):
        raise ValueError(f"Expected `label_counts` to be non-negative counts [K], but got shape {tuple(counts.shape)}")
    if isinstance(num_rows, bool) or not isinstance(num_rows, numbers.Integral) or num_rows < 1:
        raise ValueError(f"Expected `num_rows` to be a positive int, but got {num_rows!r}")
    c = (math.log(num_rows) - 1) * (b + 1) ** a
    return 1 + c * (counts + b) ** -a


def _check_ips(inv_propensity, k_all: int) -> Tensor:
    ips = _as_tensor(inv_propensity, "inv_propensity").double()
    if ips.shape != (k_all,):
        raise ValueError(f"Expected `inv_propensity` to have shape ({k_all},), but got {tuple(ips.shape)}")
    return ips


def psp_at_k(scores, target, inv_propensity, k: int = 1) -> float:
    r"""Propensity-scored precision PSP@k (Jain et al., 2016), normalised as the Extreme Classification Repository
    reports it: each hit of a row's top ``k`` counts its label's inverse propensity (rare labels more), and the sum
    over rows is divided by that of a perfect ranking (each row's ``k`` positives of largest weight).

    .. math:: \mathrm{PSP@k} = \frac{\sum_i \sum_{r \le k} y_{i\pi_i(r)} / p_{\pi_i(r)}}
              {\sum_i \max_{S \subseteq Y_i, |S| \le k} \sum_{l \in S} 1/p_l}

    Args:
        scores, target: as in :func:`average_precision`.
        inv_propensity: ``[K]`` from :func:`inverse_propensity` on the training labels.

    Example (the top label, 0, is a hit of gain 1; a perfect top-1 is label 2, of gain 3):
        >>> s, y, ips = torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[1, 0, 1]]), torch.tensor([1.0, 1.0, 3.0])
        >>> round(psp_at_k(s, y, ips), 4), psp_at_k(s, y, ips, k=2)
        (0.3333, 1.0)
    """
    k = _check_k(k)
    s, y = _format(scores, target)
    psp = _psp_of_scores(s, y, _check_ips(inv_propensity, s.shape[1]))
    return _compute_ranking(_update_top(lambda j: _topk_hits(s, y, j), y.sum(1), (k,), psp), (k,))[f"psp_at_{k}"]


def psndcg_at_k(scores, target, inv_propensity, k: int = 1) -> float:
    r"""Propensity-scored nDCG@k (Jain et al., 2016), normalised as the Extreme Classification Repository reports it:
    each row's DCG with inverse-propensity gains, over its binary ideal DCG (as :func:`ndcg_at_k`), summed over the
    rows and divided by the same sum for a perfect ranking (each row's positives by decreasing gain).

    .. math:: \mathrm{PSnDCG@k} = rac{\sum_i Z_i^{-1} \sum_{r \le k} y_{i\pi_i(r)} / (p_{\pi_i(r)} \log_2(r+1))}
              {\sum_i Z_i^{-1} \sum_{r \le k} g^*_{ir} / \log_2(r+1)}, \qquad
              Z_i = \sum_{r=1}^{\min(k, |Y_i|)} rac{1}{\log_2(r+1)}

    with ``g*_i`` row ``i``'s positives' gains ``1/p`` in decreasing order. Arguments as in :func:`psp_at_k`.

    Example (ranked gains 1 then 3, against a perfect ranking's 3 then 1: ``(1 + 3/log2 3) / (3 + 1/log2 3)``):
        >>> s, y, ips = torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[1, 0, 1]]), torch.tensor([1.0, 1.0, 3.0])
        >>> round(psndcg_at_k(s, y, ips, k=2), 4)
        0.7967
    """
    k = _check_k(k)
    s, y = _format(scores, target)
    psp = _psp_of_scores(s, y, _check_ips(inv_propensity, s.shape[1]))
    return _compute_ranking(_update_top(lambda j: _topk_hits(s, y, j), y.sum(1), (k,), psp), (k,))[f"psndcg_at_{k}"]


def annotation_scores(scores, target, k: int = 3) -> dict:
    """Top-k image-annotation metrics of Gong et al. (2014).

    Each row is annotated with its ``k`` highest-scoring labels. For label ``j``,
    precision is ``correct_j / predicted_j`` and recall ``correct_j / true_j``.
    Per-class means are over labels that appear in the target; a label that is
    never predicted has precision 0 (0/0 is taken as 0). Overall precision and
    recall pool the counts over labels; ``n_plus`` counts labels with at least one
    correct prediction.

    Returns:
        dict with ``per_class_precision``, ``per_class_recall``,
        ``overall_precision``, ``overall_recall`` and ``n_plus``.
    """
    k = _check_k(k)
    s, y = _format(scores, target)
    from .decode import top_k

    return _compute_annotation(_update_sets(top_k(s, k), y))


def mean_average_precision(scores, target) -> float:
    """Label-based AP averaged over labels (VOC/COCO style).

    Each label ranks the rows by score; its AP is scikit-learn's
    ``average_precision_score`` (ties grouped). Labels with no positive row are
    left out of the mean.
    """
    s, y = _format(scores, target)
    ap = _label_ap(s, y)
    present = y.any(0)
    return float(ap[present].mean()) if bool(present.any()) else 0.0


def hamming_loss(pred, target) -> float:
    """Fraction of (row, label) cells where the predicted set ``pred`` ``[N, K]`` and the target differ."""
    p, y = _format_pred(pred, target)
    return _compute_sets(_update_sets(p, y))["hamming_loss"]


def f1_score(pred, target, average: str = "micro") -> float:
    """F1 of predicted label sets ``pred`` ``[N, K]`` (bool or 0/1).

    ``average``: ``"micro"`` (pooled counts), ``"macro"`` (mean over labels) or
    ``"example"`` (mean over rows; scikit-learn's ``"samples"``). 0/0 counts as 0,
    scikit-learn's ``zero_division=0``.
    """
    if average not in ("micro", "macro", "example"):
        raise ValueError(f"Expected `average` to be one of ('micro', 'macro', 'example'), but got {average!r}")
    p, y = _format_pred(pred, target)
    return _compute_sets(_update_sets(p, y))[f"{average}_f1"]


# --------------------------------------------------------------------------- accumulator
class MultilabelEvaluator:
    """Accumulates every metric over batches; holds O(K) state, not the scores.

    Only ``mean_average_precision`` needs every score of a label, so it keeps the
    scores and targets it has seen; pass ``label_ap=False`` to hold nothing ``[N, K]``.

    Args:
        ks: the k of precision/recall/nDCG@k.
        annotation_k: k of :func:`annotation_scores` (its keys get an ``_at_{k}`` suffix).
        decoder: a callable ``scores -> bool [N, K]`` giving predicted sets for
            F1 and Hamming loss (see :mod:`mlsoftmax.decode`); none: those are skipped.
        label_ap: also compute ``mean_average_precision``.
        inv_propensity: ``[K]`` inverse propensities (:func:`inverse_propensity`): also ``psp_at_{k}`` and
            ``psndcg_at_{k}``.

    Example:
        >>> import torch
        >>> ev = MultilabelEvaluator(ks=(1,))
        >>> ev.update(torch.tensor([[0.2, 0.8]]), torch.tensor([[0, 1]]))
        >>> ev.compute()["precision_at_1"]
        1.0
    """

    def __init__(self, ks: Sequence[int] = (1, 3, 5), annotation_k: int = 3, decoder=None, label_ap: bool = True,
                 inv_propensity=None):
        self.ks = tuple(_check_k(k, "ks") for k in ks)
        self.annotation_k, self.decoder, self.label_ap = _check_k(annotation_k, "annotation_k"), decoder, label_ap
        self.ips = None if inv_propensity is None else _as_tensor(inv_propensity, "inv_propensity").double()
        self.reset()

    def reset(self) -> None:
        self._rank = None
        self._annot = None
        self._sets = None
        self._kept: list[tuple[Tensor, Tensor]] = []
        self._mode = None  # "scores" or "top_k": what the updates gave

    def _set_mode(self, mode: str) -> None:
        if self._mode not in (None, mode):
            raise ValueError("Expected every update of one evaluation to be `update` or every one `update_top_k`, "
                             "but got both (reset() between evaluations)")
        self._mode = mode

    def update(self, scores, target) -> None:
        from .decode import top_k

        self._set_mode("scores")
        s, y = _format(scores, target)
        psp = None if self.ips is None else _psp_of_scores(s, y, _check_ips(self.ips, s.shape[1]))
        self._rank = _merge(self._rank, _update_ranking(s, y, self.ks, psp))
        self._annot = _merge(self._annot, _update_sets(top_k(s, self.annotation_k), y))
        if self.decoder is not None:
            self._sets = _merge(self._sets, _update_sets(_as_set(self.decoder(s), "decoded"), y))
        if self.label_ap:  # kept in the scores' own precision (fp32 for fp32/bf16/fp16): ties as the functional sees
            kept = s if _as_tensor(scores, "scores").dtype == torch.float64 else s.float()
            self._kept.append((kept, y))

    def update_top_k(self, indices, target) -> None:
        """Update from each row's best labels instead of its scores: the extreme-classification evaluation.

        ``indices`` ``[N, m]`` are each row's top labels, best first (as
        ``torch.topk(scores, m).indices``, or a classifier's chunked top-k), with
        ``m >= max(ks + (annotation_k,))`` (or K, if fewer). It costs O(N m) a
        batch, and with a :class:`~mlsoftmax.Positives` target nothing ``[N, K]``
        is built. It gives the top-k metrics: one-error, precision, recall and
        nDCG at each k, and the annotation scores. The full-ranking metrics, the
        decoder's set metrics and label AP need every score; :meth:`compute`
        leaves them out.

        Example:
            >>> import torch
            >>> ev = MultilabelEvaluator(ks=(1, 2), annotation_k=2)
            >>> ev.update_top_k(torch.tensor([[4, 0], [1, 2]]), torch.tensor([[0, 0, 0, 0, 1], [0, 0, 1, 0, 0]]))
            >>> ev.compute()["precision_at_1"], ev.compute()["recall_at_2"]
            (0.5, 1.0)
        """
        self._set_mode("top_k")
        idx = _as_tensor(indices, "indices")
        if idx.dim() != 2 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"Expected `indices` to be an integer tensor [N, m], but got {tuple(idx.shape)} "
                             f"of dtype {idx.dtype}")
        k_all = target.num_classes if isinstance(target, Positives) else _as_tensor(target, "target").shape[-1]
        if k_all is None:
            raise ValueError("Expected `target.num_classes` to be set for `update_top_k`, but got None")
        need = min(max(self.ks + (self.annotation_k,)), k_all)
        if idx.shape[1] < need:
            raise ValueError(f"Expected `indices` to hold each row's top {need} labels, but got {idx.shape[1]}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k_all):
            raise ValueError(f"Expected `indices` in [0, {k_all}), but got [{int(idx.min())}, {int(idx.max())}]")
        idx = idx.long()
        hits, npos, rows, cls = _ranked_hits(idx, target)
        psp = None
        if self.ips is not None:
            ips = _check_ips(self.ips, k_all)

            def psp(k: int):  # the inverse-propensity gains of the top labels' hits, and of a perfect top-k
                return hits[:, :k] * ips[idx[:, :k]], _ideal_psp(rows, ips[cls], idx.shape[0], k)

        self._rank = _merge(self._rank, _update_top(lambda k: hits[:, :k], npos, self.ks, psp))
        top, top_hits = idx[:, :self.annotation_k], hits[:, :self.annotation_k]
        annot = {"tp": torch.bincount(top[top_hits], minlength=k_all).double(),  # per class: correct, predicted, true
                 "pred": torch.bincount(top.reshape(-1), minlength=k_all).double(),
                 "true": torch.bincount(cls, minlength=k_all).double()}
        self._annot = _merge(self._annot, annot)

    def sync(self, group=None) -> None:
        """Sum the states of every rank of ``group`` in place (``torch.distributed`` all-reduce).

        Each state is a sum over rows (O(K) per metric), so all-reducing them
        gives exactly the metrics of the union of the ranks' rows; nothing is
        gathered. ``mean_average_precision`` needs every score of a label, so a
        synced evaluator must be built with ``label_ap=False``.
        """
        import torch.distributed as dist

        if self.label_ap and self._mode != "top_k":
            raise ValueError("Expected `label_ap=False` for a synced evaluator (label AP needs every score)")
        for name in ("_rank", "_annot", "_sets"):
            st = getattr(self, name)
            if st is None:
                continue
            keys = sorted(st)
            flat = torch.cat([torch.as_tensor(st[k], dtype=torch.float64).reshape(-1) for k in keys])
            home = flat.device
            if str(dist.get_backend(group)) == "nccl":  # NCCL reduces CUDA tensors only
                flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(flat, group=group)
            flat = flat.to(home)
            out, i = {}, 0
            for k in keys:
                n = torch.as_tensor(st[k]).numel()
                out[k] = flat[i:i + n].reshape(torch.as_tensor(st[k]).shape) if isinstance(st[k], Tensor) \
                    else float(flat[i])
                i += n
            setattr(self, name, out)

    def compute(self) -> dict:
        if self._rank is None:
            raise ValueError("Expected at least one `update` before `compute`, but got none")
        out = _compute_ranking(self._rank, self.ks)
        out.update({f"{k}_at_{self.annotation_k}": v for k, v in _compute_annotation(self._annot).items()})
        if self._sets is not None:
            out.update(_compute_sets(self._sets))
        if self.label_ap and self._kept:
            s = torch.cat([a for a, _ in self._kept]).double()
            y = torch.cat([b for _, b in self._kept])
            ap = _label_ap(s, y)
            present = y.any(0)
            out["mean_average_precision"] = float(ap[present].mean()) if bool(present.any()) else 0.0
        return out
