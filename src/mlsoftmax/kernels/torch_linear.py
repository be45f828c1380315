"""Pure-PyTorch fused linear + loss, chunked over the labels (CPU and GPU).

The logits ``z = s * hidden @ weight.T + bias`` (``[B, K]``) are never built.
The forward walks the classes in chunks of ``C`` columns with an online
log-sum-exp and keeps per-row statistics only; the positives' logits are
indexed dot products ``s * <hidden_i, weight_k> + bias_k`` in the accumulation
dtype. The backward recomputes each chunk's logits, forms the chunk's gradient
``G = c * softmax - T`` (``[B, C]``) in the accumulation dtype (fp32; fp64 for
fp64), the sparse target entries included (scattered into the chunk, so they
are exact before any rounding), and computes

    dX += s * G @ W_c,    dW_c = s * G^T @ X,    db_c = sum_i G_i,    ds += <X, G @ W_c>

The GEMMs run in the input dtype (tensor cores for bf16/fp16, which accumulate
in fp32 inside), ``dX`` is accumulated in fp32 across chunks, and each chunk's
``dW_c`` is one GEMM over all rows, so ``dW`` needs no accumulator across
chunks. Peak extra memory is ``O(B * C + B * D)`` beyond the gradients.

Per-row quantities (``loss, lse, coef, inv_mass``) follow
:mod:`.torch_chunked`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import torch_chunked


def _logits(h: Tensor, w: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], c0: int, c1: int) -> Tensor:
    """Chunk ``[B, C]`` of ``s * h @ w.T + b``: the GEMM in the input dtype, the result in the accumulation dtype."""
    acc = torch_chunked.acc_dtype(h.dtype)
    z = (h @ w[c0:c1].T).to(acc)  # [B, C]
    if scale is not None:
        z.mul_(scale)
    if bias is not None:
        z.add_(bias[c0:c1].to(acc))
    return z


def _gather_logits(h, w, bias, scale, indices, row_ids, step: int) -> Tensor:
    """Logits of the positives ``[nnz]``: ``s * <h[row], w[idx]> + b[idx]`` in the accumulation dtype."""
    acc = torch_chunked.acc_dtype(h.dtype)
    out = torch.empty(indices.numel(), dtype=acc, device=h.device)  # [nnz]
    for j0 in range(0, indices.numel(), step):
        j1 = min(indices.numel(), j0 + step)
        out[j0:j1] = (h[row_ids[j0:j1]].to(acc) * w[indices[j0:j1]].to(acc)).sum(-1)  # [n]
    if scale is not None:
        out.mul_(scale)
    if bias is not None:
        out.add_(bias[indices].to(acc))
    return out


def forward(
    h: Tensor,  # [B, D], the dtype of w
    w: Tensor,  # [K, D]
    bias: Optional[Tensor],  # [K]
    scale: Optional[Tensor],  # [] logit scale s
    dense: Optional[Tensor],  # [B, K]
    indices: Optional[Tensor],  # [nnz]
    row_ids: Optional[Tensor],  # [nnz]
    values: Optional[Tensor],  # [nnz]
    class_weight: Optional[Tensor],  # [K]
    label_smoothing: float,
    chunk: int,
):
    """Per-row ``(loss, lse, coef, inv_mass, mass)`` of the logits ``s * h @ w.T + b``."""
    k, eps = w.shape[0], float(label_smoothing)
    parts = partial_sums(h, w, bias, scale, dense, indices, row_ids, values, class_weight, eps > 0, chunk)
    wsum = float(k) if class_weight is None else class_weight.to(parts[0].dtype).sum()
    return torch_chunked.combine(*parts, k, wsum, eps)


def partial_sums(h, w, bias, scale, dense, indices, row_ids, values, class_weight, smooth: bool, chunk: int):
    """Per-row ``(lse, dot, mass, wmass, sx)`` over the classes of ``w`` (see ``torch_chunked.combine``)."""
    b, k = h.shape[0], w.shape[0]
    acc = torch_chunked.acc_dtype(h.dtype)
    cw = None if class_weight is None else class_weight.to(acc)
    m = h.new_full((b,), float("-inf"), dtype=acc)  # [B] running max
    s = h.new_zeros(b, dtype=acc)  # [B] running sum of exp(z - m)
    dot, mass, wmass = (h.new_zeros(b, dtype=acc) for _ in range(3))  # [B]
    sx = h.new_zeros(b, dtype=acc) if smooth else None  # [B]
    for c0 in range(0, k, chunk):
        c1 = min(k, c0 + chunk)
        z = _logits(h, w, bias, scale, c0, c1)  # [B, C]
        # 1. online log-sum-exp: rescale the running sum to the new max
        m_new = torch.maximum(m, z.amax(1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        s = s * (m - m_safe).exp() + (z - m_safe[:, None]).exp_().sum(1)
        m = m_new
        # 2. dense target terms of this chunk
        if dense is not None:
            t = dense[:, c0:c1].to(acc)  # [B, C]
            tw = t if cw is None else t * cw[c0:c1]
            mass += t.sum(1)
            wmass += tw.sum(1)
            dot += (tw * z).sum(1)
        # 3. smoothing needs the (weighted) row sum of the logits
        if sx is not None:
            sx += z.sum(1) if cw is None else z @ cw[c0:c1]
    lse = s.log() + torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # [B]
    if indices is not None:
        # 4. sparse target terms from the positives' logits
        xg = _gather_logits(h, w, bias, scale, indices, row_ids, _gather_step(h))  # [nnz]
        torch_chunked.add_sparse_sums(xg, indices, row_ids, values, cw, mass, wmass, dot)
    return lse, dot, mass, wmass, sx


_FUSED_ADDMM = [True]  # cuBLAS addmm with an fp32 out for bf16/fp16 inputs (newer PyTorch); off once it fails


def addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor, beta: float = 1.0) -> Tensor:
    """``acc = beta * acc + a @ b`` with ``acc`` fp32: in the GEMM's epilogue when PyTorch can, else via a product.

    The fused form (``addmm`` with ``out_dtype=float32, out=acc``, as Liger-Kernel's
    fused linear cross-entropy also accumulates its weight gradient) needs no
    ``[M, N]`` fp32 temporary; PyTorch versions without it raise, and the
    fallback is used from then on. With ``beta=0`` the old content of ``acc`` is
    ignored (it may be uninitialised).
    """
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b, beta=beta)
    if a.is_cuda and _FUSED_ADDMM[0]:
        try:
            return torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError) as e:  # no out_dtype here (TypeError), or not for these dtypes
            if isinstance(e, torch.OutOfMemoryError) or "dtype" not in str(e):
                raise  # anything else (a shape, a CUDA fault) is the caller's error, not a missing feature
            _FUSED_ADDMM[0] = False
    prod = _mm_fp32(a, b)
    return acc.copy_(prod) if beta == 0 else acc.add_(prod)


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in fp32: cuBLAS with an fp32 ``out_dtype`` (PyTorch >= 2.8), else the product in the input dtype."""
    if not a.is_cuda:
        return a.float() @ b.float()
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except TypeError:  # no out_dtype: each chunk's product is rounded once, like the naive path's
        return (a @ b).float()


def backward(
    grad_rows: Tensor,  # [B] d(total)/d(loss_i), row scale included
    h: Tensor,  # [B, D], the dtype of w
    w: Tensor,  # [K, D]
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    lse: Tensor,
    coef: Tensor,
    inv_mass: Tensor,
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    row_ids: Optional[Tensor],
    values: Optional[Tensor],
    class_weight: Optional[Tensor],
    label_smoothing: float,
    chunk: int,
    need_w: bool = True,
    num_classes: Optional[int] = None,
    need_x: bool = True,
    dw_dtype: Optional[torch.dtype] = None,
):
    """``(dX [B, D], db [K], ds [])`` in the accumulation dtype and ``dW [K, D]`` in ``dw_dtype`` (``w``'s).

    ``dW`` is None unless ``need_w``; ``dX`` and ``ds`` are None unless
    ``need_x`` (their GEMM is skipped: a frozen encoder costs three GEMMs, not
    four); ``db`` is None without a bias. ``num_classes`` is the total ``K``
    when ``w`` holds one shard of the classes. A ``dw_dtype`` wider than ``w``'s
    (fp32 master weights under autocast) takes each ``dW_c`` from its GEMM's fp32
    result, unrounded.
    """
    k = w.shape[0] if num_classes is None else num_classes
    acc = torch_chunked.acc_dtype(h.dtype)
    eps = float(label_smoothing)
    cw = None if class_weight is None else class_weight.to(acc)
    g = grad_rows.to(acc)
    scale_p, scale_t, scale_s = torch_chunked.grad_scales(coef, inv_mass, g, eps, k)  # [B] each
    scale_p = scale_p[:, None]  # [B, 1]
    scale_s = None if scale_s is None else scale_s[:, None]  # [B, 1]
    gw = h.new_zeros(h.shape, dtype=acc) if need_x else None  # [B, D] G @ W, before the logit scale
    dw = torch.empty_like(w, dtype=dw_dtype or w.dtype) if need_w else None  # [K, D] G^T @ X, before the logit scale
    db = h.new_empty(w.shape[0], dtype=acc) if bias is not None else None  # [K]
    if indices is not None:
        # the sparse target weights a_j = v_j w_k (1 - eps) / m_i * grad_i of the positives
        v = torch.ones(indices.numel(), dtype=acc, device=h.device) if values is None else values.to(acc)
        a = v * scale_t[row_ids] if cw is None else v * cw[indices] * scale_t[row_ids]  # [nnz]
    for c0 in range(0, w.shape[0], chunk):
        c1 = min(w.shape[0], c0 + chunk)
        # 1. recompute the chunk's logits, then G = c softmax - T (times grad), exactly, before any rounding
        gc = (_logits(h, w, bias, scale, c0, c1) - lse[:, None]).exp_().mul_(scale_p)  # [B, C]
        if dense is not None:
            t = dense[:, c0:c1].to(acc) * scale_t[:, None]  # [B, C]
            gc.sub_(t if cw is None else t * cw[c0:c1])
        if scale_s is not None:
            gc.sub_(scale_s if cw is None else scale_s * cw[c0:c1])
        if indices is not None:
            # positives of this chunk get -a_j; the others add 0 to a clamped column (no host sync)
            local = indices - c0
            inside = (local >= 0) & (local < c1 - c0)
            gc.index_put_((row_ids, local.clamp(0, c1 - c0 - 1)), torch.where(inside, -a, 0.0), accumulate=True)
        # 2. the three products of the chunk, the GEMMs in the input dtype
        gq = gc.to(h.dtype)
        if gw is not None and gq.dtype == acc:
            gw.addmm_(gq, w[c0:c1])
        elif gw is not None:
            gw.add_(gq @ w[c0:c1])
        if dw is not None and dw.dtype == gq.dtype:
            torch.mm(gq.T, h, out=dw[c0:c1])
        elif dw is not None:
            addmm_fp32_(dw[c0:c1], gq.T, h, beta=0.0)
        if db is not None:
            db[c0:c1] = gc.sum(0)
    # 3. the logit scale: dX = s G W, dW = s G^T X, ds = <X, G W>
    ds = None if gw is None else (h.to(acc) * gw).sum()
    if scale is not None:
        if gw is not None:
            gw.mul_(scale)
        if dw is not None:
            dw.mul_(scale)
    return gw, dw, db, ds


def _gather_step(h: Tensor) -> int:
    """Positives per block in the indexed dot products (``step * D`` floats)."""
    return max(1, torch_chunked._CHUNK_ELEMS // max(h.shape[1], 1))
