"""Pure-PyTorch forward and backward of the multi-label softmax loss.

Always available (CPU and GPU). It walks the rows in chunks so that the float
temporaries stay small (about ``_CHUNK_ELEMS`` elements on the CPU, ``_CUDA_CHUNK_ELEMS`` on a GPU): the forward keeps only
per-row statistics, and the backward writes the one ``[B, K]`` gradient.

The target comes in one of two canonical forms, prepared by ``mlsoftmax.loss``:

* dense: ``dense`` ``[B, K]`` (any real dtype, non-negative, not yet normalised);
* sparse: ``indices`` ``[nnz]``, ``row_ids`` ``[nnz]`` and optional ``values``
  ``[nnz]`` (unique ``(row, class)`` pairs).

Per row ``i`` with target weights ``t`` (mass ``m = sum t``), class weights
``w`` and smoothing ``eps`` the loss is::

    T_k     = w_k * ((1 - eps) t_k / m + eps / K)
    loss_i  = c_i * lse_i - sum_k T_k x_k,        c_i = sum_k T_k
    grad_ik = c_i * softmax_ik - T_k
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..targets import scatter_dense

_CHUNK_ELEMS = 1 << 21  # float temporaries per chunk on the CPU (8 MB in fp32: cache-sized)
# On a GPU each chunk costs ~10 launches, so chunks are far larger (256 MB in fp32): at B=4096, K=131072 the
# CPU size meant 256 chunks and 52-62 ms on an H100, against 5.5 ms for eager F.cross_entropy (BENCHMARKS.md).
_CUDA_CHUNK_ELEMS = 1 << 26


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 accumulates in fp64, everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_step(k: int, device: torch.device) -> int:
    elems = _CHUNK_ELEMS if device.type == "cpu" else _CUDA_CHUNK_ELEMS
    return max(1, elems // max(k, 1))


def small_rows(
    x: Tensor,  # [B, K]
    dense: Optional[Tensor],  # [B, K] or None
    indices: Optional[Tensor],  # [nnz] or None
    row_ids: Optional[Tensor],  # [nnz] or None
    values: Optional[Tensor],  # [nnz] or None
    weight: Optional[Tensor],  # [K] or None
    label_smoothing: float,
) -> Tensor:
    """Per-row loss ``[B]`` (accumulation dtype, 0 on empty rows) through PyTorch's own ``F.cross_entropy`` on the
    dense probability target, differentiated by autograd.

    For small problems, whose time is the fixed cost per op: about a dozen ops
    against the chunked path's thirty. ``F.cross_entropy`` with a probability
    target, class weights and smoothing is this loss row by row (see the module
    docstring): ``-sum_k w_k ((1 - eps) t_k / m + eps / K) log softmax(x)_k``.
    """
    acc = acc_dtype(x.dtype)
    t = scatter_dense(x.shape, indices, row_ids, values, acc) if dense is None else dense.to(acc)  # [B, K]
    mass = t.sum(1, keepdim=True)  # [B, 1]
    # -inf logits (masked classes) would give 0 * -inf = nan in F.cross_entropy's sum over a probability target;
    # half the dtype's lowest is as good as -inf for exp, and leaves room to subtract the row max. Only where the
    # class has no target mass: a positive at -inf (or, with smoothing, any -inf) has loss +inf, as on the other
    # paths, not a clamped finite one
    z = x.to(acc)
    if not label_smoothing:
        z = torch.where(t > 0, z, z.clamp_min(torch.finfo(acc).min / 2))
    rows = torch.nn.functional.cross_entropy(
        z, t / mass.clamp_min(torch.finfo(acc).tiny), weight=None if weight is None else weight.to(acc),
        label_smoothing=float(label_smoothing), reduction="none",
    )  # [B]
    return torch.where(mass.squeeze(1) > 0, rows, 0.0)


def row_stats(
    x: Tensor,  # [B, K]
    dense: Optional[Tensor],  # [B, K] or None
    indices: Optional[Tensor],  # [nnz] or None
    row_ids: Optional[Tensor],  # [nnz] or None
    values: Optional[Tensor],  # [nnz] or None
    weight: Optional[Tensor],  # [K] or None
    label_smoothing: float,
    sums=None,
):
    """Per-row statistics of the forward pass.

    ``sums`` computes the per-row sums in place of :func:`partial_sums` (Triton's one pass has its signature).

    Returns:
        ``(loss, lse, coef, inv_mass, mass)``, each ``[B]`` in the accumulation
        dtype: the per-row loss (0 on empty rows), the log-sum-exp, ``c_i``,
        ``1 / m_i`` (0 on empty rows) and the raw target mass ``m_i``.
    """
    k = x.shape[1]
    eps = float(label_smoothing)
    parts = (partial_sums if sums is None else sums)(x, dense, indices, row_ids, values, weight, eps > 0)
    wsum = float(k) if weight is None else weight.to(parts[0].dtype).sum()
    return combine(*parts, k, wsum, eps)


def partial_sums(
    x: Tensor,  # [B, K]
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    row_ids: Optional[Tensor],
    values: Optional[Tensor],
    weight: Optional[Tensor],
    smooth: bool,
):
    """Per-row sums over the classes of ``x``: ``(lse, dot, mass, wmass, sx)`` (see :func:`combine`).

    ``sx`` is ``None`` unless ``smooth``. A label-sharded caller combines these
    across shards (log-sum-exp of ``lse``, sums of the rest) before :func:`combine`.
    """
    b, k = x.shape
    acc = acc_dtype(x.dtype)
    lse = x.new_empty(b, dtype=acc)  # [B]
    dot = x.new_zeros(b, dtype=acc)  # [B] sum_k w_k t_k x_k
    mass = x.new_zeros(b, dtype=acc)  # [B] sum_k t_k
    wmass = x.new_zeros(b, dtype=acc)  # [B] sum_k w_k t_k
    sx = x.new_zeros(b, dtype=acc) if smooth else None  # [B] sum_k w_k x_k
    w = None if weight is None else weight.to(acc)
    step = _row_step(k, x.device)
    for r0 in range(0, b, step):
        r1 = min(b, r0 + step)
        xc = x[r0:r1].to(acc)  # [b, K]
        # 1. stable log-sum-exp: the row max, made 0 where it is not finite (a row of -inf gets -inf, not NaN).
        # By hand rather than torch.logsumexp, which measured ~20% slower on large CPU chunks (BENCHMARKS.md)
        mx = xc.amax(1, keepdim=True).nan_to_num_(0.0, 0.0, 0.0)  # [b, 1]
        lse[r0:r1] = (xc - mx).exp_().sum(1).log_().add_(mx.squeeze(1))
        # 2. dense target terms; masked (-inf) logits with zero target add nothing
        if dense is not None:
            t = dense[r0:r1].to(acc)  # [b, K]
            mass[r0:r1] = t.sum(1)
            tw = t if w is None else t * w
            wmass[r0:r1] = tw.sum(1)
            dot[r0:r1] = torch.where(t != 0, xc, torch.zeros_like(xc)).mul_(tw).sum(1)
        # 3. the smoothing term needs the (weighted) row sum of the logits
        if sx is not None:
            sx[r0:r1] = xc.sum(1) if w is None else xc @ w
    if indices is not None:
        # 4. sparse target terms: gather the positives' logits, segment-sum per row
        add_sparse_sums(x[row_ids, indices].to(acc), indices, row_ids, values, w, mass, wmass, dot)
    return lse, dot, mass, wmass, sx


def add_sparse_sums(xg, indices, row_ids, values, weight, mass, wmass, dot) -> None:
    """Add a sparse target's terms to the per-row sums, in place: ``mass += v``, ``wmass += w v``, ``dot += w v x``.

    ``xg`` ``[nnz]`` are the positives' logits in the accumulation dtype.
    """
    v = torch.ones_like(xg) if values is None else values.to(xg.dtype)  # [nnz]
    vw = v if weight is None else v * weight[indices].to(xg.dtype)  # [nnz]
    mass.index_add_(0, row_ids, v)
    wmass.index_add_(0, row_ids, vw)
    dot.index_add_(0, row_ids, xg if values is None and weight is None else vw * xg)


def combine(lse, dot, mass, wmass, sx, k: int, wsum, eps: float):
    """Per-row sums -> ``(loss, lse, coef, inv_mass, mass)`` (see :func:`row_stats`).

    ``dot = sum_k w_k t_k x_k``, ``mass = sum_k t_k``, ``wmass = sum_k w_k t_k``
    and (with smoothing) ``sx = sum_k w_k x_k``, over all ``k`` classes;
    ``wsum = sum_k w_k``. Empty rows get loss 0.
    """
    nonempty = mass > 0
    inv_mass = torch.where(nonempty, mass.reciprocal(), 0.0)
    if eps:
        coef = ((1.0 - eps) * wmass * inv_mass + (eps / k) * wsum) * nonempty
        loss = coef * lse - (1.0 - eps) * dot * inv_mass
        if sx is not None:
            loss = loss - (eps / k) * sx
    else:  # the common case in fewer ops (each costs microseconds at small sizes)
        coef = wmass * inv_mass
        loss = torch.addcmul(coef * lse, dot, inv_mass, value=-1.0)
    loss = torch.where(nonempty, loss, 0.0)
    return loss, lse, coef, inv_mass, mass


def backward(
    grad_rows: Tensor,  # [B]
    x: Tensor,  # [B, K]
    lse: Tensor,  # [B]
    coef: Tensor,  # [B]
    inv_mass: Tensor,  # [B]
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    row_ids: Optional[Tensor],
    values: Optional[Tensor],
    weight: Optional[Tensor],
    label_smoothing: float,
    out: Optional[Tensor] = None,
    num_classes: Optional[int] = None,
) -> Tensor:
    """``grad_rows[:, None] * (c * softmax(x) - T)``, written once into ``out``.

    Every value is computed in the accumulation dtype and rounded once, so in
    bf16/fp16 the target-class entry ``p - 1/|Y|`` does not cancel.
    ``num_classes`` is the total ``K`` when ``x`` holds one shard of the classes.
    """
    b = x.shape[0]
    k = x.shape[1] if num_classes is None else num_classes
    acc = acc_dtype(x.dtype)
    eps = float(label_smoothing)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out  # [B, K]
    g = grad_rows.to(acc)  # [B]
    w = None if weight is None else weight.to(acc)
    scale_p, scale_t, scale_s = grad_scales(coef, inv_mass, g, eps, k)  # [B] each
    step = _row_step(x.shape[1], x.device)
    for r0 in range(0, b, step):
        r1 = min(b, r0 + step)
        # 1. c * softmax, scaled by the incoming gradient (formed in `out` itself when it has the accumulation dtype)
        tmp = out[r0:r1] if out.dtype == acc else None
        p = torch.sub(x[r0:r1].to(acc), lse[r0:r1, None], out=tmp).exp_().mul_(scale_p[r0:r1, None])  # [b, K]
        # 2. minus the (dense) target distribution
        if dense is not None:
            t = dense[r0:r1].to(acc)  # [b, K]; may alias the user's target: no in-place ops on it
            t = t * (scale_t[r0:r1, None] if w is None else scale_t[r0:r1, None] * w)
            p.sub_(t)
        if scale_s is not None:
            p.sub_(scale_s[r0:r1, None] if w is None else scale_s[r0:r1, None] * w)
        if tmp is None:
            out[r0:r1] = p
    if indices is not None:
        # 3. sparse targets: recompute the target entries exactly, then round once
        xg = x[row_ids, indices].to(acc)  # [nnz]
        val = target_entries(xg, lse, scale_p, scale_t, scale_s, indices, row_ids, values, w)
        out.index_put_((row_ids, indices), val.to(out.dtype))
    return out


def grad_scales(coef: Tensor, inv_mass: Tensor, g: Tensor, eps: float, k: int):
    """Per-row scales ``[B]`` of the gradient ``a softmax - w (bt t + bs)`` for upstream ``g``:
    ``(a, bt, bs)`` of the softmax, of the (raw) target and of the smoothing mass; ``bs`` is None without smoothing.
    """
    if not eps:
        return coef * g, inv_mass * g, None
    return coef * g, (1.0 - eps) * inv_mass * g, (eps / k) * g * (inv_mass > 0)


def target_entries(xg, lse, scale_p, scale_t, scale_s, indices, row_ids, values, weight) -> Tensor:
    """The gradient at the positives ``[nnz]``, exact in the accumulation dtype of ``xg`` (their logits).

    ``scale_p * softmax - w (scale_t v + scale_s)`` with the per-row scales of the
    softmax, of the target and of the smoothing mass (``scale_s`` may be None).
    """
    val = (xg - lse[row_ids]).exp_().mul_(scale_p[row_ids])  # [nnz]
    t = scale_t[row_ids]  # [nnz] the target term, times the value and the class weight if any
    if values is not None:
        t = t * values.to(xg.dtype)
    if weight is not None:
        t = t * weight[indices]
    val = val - t
    if scale_s is not None:
        val = val - (scale_s[row_ids] if weight is None else scale_s[row_ids] * weight[indices])
    return val


def lse_parts(m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Merge partial log-sum-exps ``[B, S]`` (maxima, sum-exps relative to them) into ``[B]`` ones.

    A row whose parts are all empty (max ``-inf``) keeps max ``-inf`` and sum 0.
    """
    mx = m.amax(1)  # [B]
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return mx, (s * (m - safe[:, None]).exp()).sum(1)
