"""Fused linear + loss on the GPU: cuBLAS GEMMs per chunk, the fused loss kernels in place.

Two routes, chosen by the memory budget (:func:`mlsoftmax.linear.plan`):

**Rows** (:func:`run`, the fast route). For each chunk of ``R`` rows:

1. ``z = s * h_r @ W.T + b`` with cuBLAS, in the input dtype (``[R, K]``);
2. the fused Triton kernel (:mod:`.triton_loss`) overwrites ``z`` with the
   row-scaled gradient ``G`` (target terms formed in fp32, rounded once) and
   returns the chunk's losses;
3. ``dX_r = s * G @ W`` and ``dW += s * G^T @ h_r``, with ``dW`` accumulated in
   fp32 across chunks, ``db += sum_r G`` and ``ds += <h_r, G @ W>``.

Three GEMMs in all, and the gradients are ready at the end of the forward (the
backward only scales them by ``grad_out``). Extra memory is the ``[R, K]``
chunk plus the fp32 ``dW`` accumulator (``4 K D`` bytes for bf16/fp16 weights).
Sparse targets reach the kernel through a slice of the CSR offsets (the kernel
reads absolute positions), so no host sync is needed to cut the positives.

**Labels** (:func:`labels_forward`, :func:`labels_backward`, the lean route).
Like :mod:`.torch_linear`, chunks of ``C`` classes with an online log-sum-exp,
but each chunk's elementwise work is one Triton pass over the cuBLAS logits:

1. forward: ``z_c = s * h @ W_c.T + b_c`` (``[B, C]``), then one read of ``z_c``
   for its partial max / sum-exp (:func:`.triton_loss.slab_stats`, merged once
   over all chunks by :func:`.triton_loss.merge_stats`); the
   positives' logits are fp32 dot products (:func:`positive_logits`);
2. backward: recompute ``z_c``, overwrite it with ``G_c`` in one pass
   (:func:`.triton_loss.slab_grad`), write the positives' exact fp32 entries
   (:func:`write_entries_`), then ``dX += G_c @ W_c`` (fp32 accumulator) and
   ``dW_c = G_c^T @ h`` (one GEMM over all rows, rounded once: no accumulator).

Four GEMMs, and extra memory ``B C`` elements plus two ``[B, D]`` fp32 buffers.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_chunked, triton_interpreting, triton_loss

# --------------------------------------------------------------------------- constants
BLOCK_N = 64  # positives per program
BLOCK_D = 128  # features per step of the positives' dot products
INTERPRET_BLOCK_D = 16  # small under the interpreter, so tests cover the loop over D


# --------------------------------------------------------------------------- kernels
@triton.jit
def _positive_logits_kernel(
    H, stride_h,  # [B, D] hidden
    Wt, stride_w,  # [K, D] classifier weight
    IDX, ROWS,  # [nnz] class and row of each positive
    OUT,  # [nnz] fp32 out: <h_row, w_class>
    NNZ, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 1. this program's positives
    j = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    jm = j < NNZ
    rows = tl.load(ROWS + j, mask=jm, other=0).to(tl.int64)  # [BLOCK_N]
    idx = tl.load(IDX + j, mask=jm, other=0).to(tl.int64)  # [BLOCK_N]
    # 2. their dot products over D, in fp32
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        m2 = jm[:, None] & (d < D)[None, :]
        h = tl.load(H + rows[:, None] * stride_h + d[None, :], mask=m2, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        w = tl.load(Wt + idx[:, None] * stride_w + d[None, :], mask=m2, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        acc += tl.sum(h * w, 1)
    tl.store(OUT + j, acc, mask=jm)


@triton.jit
def _write_entries_kernel(
    G, stride_g,  # [B, C] gradient of the classes [c0, c0 + C)
    IDX, ROWS, VALS,  # [nnz] class, row and fp32 gradient of each positive
    NNZ, c0, C,
    BLOCK_N: tl.constexpr,
):
    # 1. this program's positives that fall in the chunk
    j = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    jm = j < NNZ
    idx = tl.load(IDX + j, mask=jm, other=0).to(tl.int64) - c0  # [BLOCK_N] column in the chunk
    mine = jm & (idx >= 0) & (idx < C)
    rows = tl.load(ROWS + j, mask=mine, other=0).to(tl.int64)
    # 2. their exact entries, rounded once
    v = tl.load(VALS + j, mask=mine, other=0.0)
    tl.store(G + rows * stride_g + idx, v.to(G.dtype.element_ty), mask=mine)


# --------------------------------------------------------------------------- launchers
def positive_logits(h: Tensor, w: Tensor, indices: Tensor, row_ids: Tensor) -> Tensor:
    """``<h[row_ids[j]], w[indices[j]]>`` for every positive ``j``, ``[nnz]`` fp32 (inputs contiguous in D)."""
    nnz, d = indices.numel(), h.shape[1]
    h, w = (t if t.stride(1) == 1 else t.contiguous() for t in (h, w))
    out = torch.empty(nnz, dtype=torch.float32, device=h.device)  # [nnz]
    if nnz:
        block_d = INTERPRET_BLOCK_D if triton_interpreting() else BLOCK_D
        _positive_logits_kernel[(triton.cdiv(nnz, BLOCK_N),)](
            h, h.stride(0), w, w.stride(0), indices, row_ids, out, nnz, d, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        )
    return out


def write_entries_(g: Tensor, indices: Tensor, row_ids: Tensor, vals: Tensor, c0: int) -> Tensor:
    """``g[row, k - c0] = vals`` for the positives ``(row, k)`` with ``k`` in ``[c0, c0 + C)``; no host sync."""
    nnz = indices.numel()
    if nnz:
        _write_entries_kernel[(triton.cdiv(nnz, BLOCK_N),)](
            g, g.stride(0), indices, row_ids, vals, nnz, c0, g.shape[1], BLOCK_N=BLOCK_N,
        )
    return g


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
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):
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


def _logits(h: Tensor, w: Tensor, bias: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """``s * h @ w.T + b`` (``[R, C]``) in the input dtype: the GEMM, then scale and bias in place."""
    z = h @ w.T  # [R, C]
    if scale is not None:
        z.mul_(scale.to(z.dtype))
    if bias is not None:
        z.add_(bias)
    return z


def run(
    h: Tensor,  # [B, D]
    w: Tensor,  # [K, D]
    bias: Optional[Tensor],  # [K]
    scale: Optional[Tensor],  # [] fp32
    dense: Optional[Tensor],  # [B, K]
    indices: Optional[Tensor],  # [nnz]
    offsets: Optional[Tensor],  # [B + 1]
    values: Optional[Tensor],  # [nnz]
    class_weight: Optional[Tensor],  # [K]
    row_scale: Tensor,  # [B] fp32
    label_smoothing: float,
    rows: int,
    need_grad: bool,
    need_x: bool = True,
    need_w: bool = True,
):
    """The rows route: ``(row_scale * loss [B] fp32, dX [B, D], dW [K, D] fp32, db [K] fp32, ds [] fp32)``.

    The gradients are ``None`` when ``need_grad`` is false; ``dX`` and ``ds``
    also unless ``need_x``, ``dW`` unless ``need_w``, ``db`` without a bias.
    """
    b, k = h.shape[0], w.shape[0]
    loss = torch.empty(b, dtype=torch.float32, device=h.device)  # [B]
    need_x, need_w = need_grad and need_x, need_grad and need_w
    dx = torch.empty_like(h) if need_x else None  # [B, D]
    dw = (torch.empty if b else torch.zeros)(w.shape, dtype=torch.float32, device=h.device) if need_w else None
    db = torch.zeros(k, dtype=torch.float32, device=h.device) if need_grad and bias is not None else None  # [K]
    ds = torch.zeros((), dtype=torch.float32, device=h.device) if need_x else None
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        hr = h[r0:r1]  # [R, D]
        # 1. the chunk's logits
        z = _logits(hr, w, bias, scale)  # [R, K]
        # 2. loss and row-scaled gradient, written over z
        loss[r0:r1] = triton_loss.forward(
            z, None if dense is None else dense[r0:r1], indices, None if offsets is None else offsets[r0:r1 + 1],
            values, class_weight, row_scale[r0:r1], label_smoothing, compute_grad=need_grad, inplace=need_grad,
        )[0]
        if not need_grad:
            continue
        # 3. the products; G @ W is shared by dX and ds
        if dx is not None:
            gw = z @ w  # [R, D]
            if scale is not None:
                ds += (hr.float() * gw.float()).sum()
            dx[r0:r1] = gw if scale is None else gw * scale.to(gw.dtype)
        if dw is not None:
            addmm_fp32_(dw, z.T, hr, beta=0.0 if r0 == 0 else 1.0)  # the first chunk overwrites
        if db is not None:
            db += z.sum(0, dtype=torch.float32)
    if dw is not None and scale is not None:
        dw.mul_(scale)
    return loss, dx, dw, db, ds


def labels_partial_sums(
    h: Tensor,  # [B, D]
    w: Tensor,  # [K, D]
    bias: Optional[Tensor],  # [K]
    scale: Optional[Tensor],  # [] fp32
    dense: Optional[Tensor],  # [B, K]
    indices: Optional[Tensor],  # [nnz]
    row_ids: Optional[Tensor],  # [nnz]
    values: Optional[Tensor],  # [nnz]
    class_weight: Optional[Tensor],  # [K]
    smooth: bool,
    chunk: int,
):
    """Per-row fp32 ``(lse, dot, mass, wmass, sx)`` over the classes of ``w``, and the positives' logits ``[nnz]``.

    The sums follow :func:`.torch_chunked.combine` (a label-sharded caller
    combines them across shards first).
    """
    b, k = h.shape[0], w.shape[0]
    cw = None if class_weight is None else class_weight.float()
    parts = []  # [B, S_c, 6] per chunk: combined once at the end, so that a chunk costs a GEMM and one launch
    for c0 in range(0, k, chunk):
        c1 = min(k, c0 + chunk)
        # 1. the chunk's logits, then one Triton pass for its statistics (max, sum-exp, dense target sums)
        z = _logits(h, w[c0:c1], None if bias is None else bias[c0:c1], scale)  # [B, C]
        parts.append(triton_loss.slab_stats(z, None if dense is None else dense[:, c0:c1],
                                            None if cw is None else cw[c0:c1], smooth))
    # 2. every slice of every chunk merged: log-sum-exp of the parts, plain sums of the rest
    if parts:
        lse, mass, wmass, dot, sx = triton_loss.merge_stats(torch.cat(parts, 1))  # [B] each
    else:  # no classes here (an empty shard): log-sum-exp -inf, sums 0
        lse = h.new_full((b,), float("-inf"), dtype=torch.float32)
        mass, wmass, dot, sx = h.new_zeros((4, b), dtype=torch.float32).unbind(0)
    sx = sx if smooth else None
    xg = None
    if indices is not None:
        # 3. the positives' logits as fp32 dot products, then their sums per row
        xg = positive_logits(h, w, indices, row_ids)  # [nnz]
        if scale is not None:
            xg = xg * scale
        if bias is not None:
            xg = xg + bias[indices].float()
        torch_chunked.add_sparse_sums(xg, indices, row_ids, values, cw, mass, wmass, dot)
    return lse, dot, mass, wmass, sx, xg


def labels_forward(h, w, bias, scale, dense, indices, row_ids, values, class_weight, label_smoothing: float,
                   chunk: int):
    """The labels route's forward: per-row fp32 ``(loss, lse, coef, inv_mass)`` and the positives' logits."""
    k, eps = w.shape[0], float(label_smoothing)
    *parts, xg = labels_partial_sums(h, w, bias, scale, dense, indices, row_ids, values, class_weight, eps > 0, chunk)
    wsum = float(k) if class_weight is None else class_weight.float().sum()
    loss, lse, coef, inv_mass, _ = torch_chunked.combine(*parts, k, wsum, eps)
    return loss, lse, coef, inv_mass, xg


def labels_backward(
    grad_rows: Tensor,  # [B] d(total)/d(loss_i), row scale included
    h: Tensor,  # [B, D]
    w: Tensor,  # [K, D]
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    lse: Tensor,  # [B]
    coef: Tensor,  # [B]
    inv_mass: Tensor,  # [B]
    xg: Optional[Tensor],  # [nnz] the positives' logits, from the forward
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
):
    """The labels route's backward: ``(dX [B, D] fp32, dW [K, D], db [K] fp32, ds [] fp32)``.

    As :func:`.torch_linear.backward`: ``dW`` only if ``need_w``, ``dX`` and
    ``ds`` only if ``need_x``, ``db`` only with a bias. ``num_classes`` is the
    total ``K`` when ``w`` holds one shard of the classes.
    """
    k = w.shape[0] if num_classes is None else num_classes
    eps = float(label_smoothing)
    cw = None if class_weight is None else class_weight.float()
    g = grad_rows.float()
    a, bt, bs = torch_chunked.grad_scales(coef, inv_mass, g, eps, k)  # [B] each
    coefs = triton_loss.pack_coefs(lse, a, bt, bs)  # [B, 4]
    ent = None
    if indices is not None:
        # the positives' gradient entries, exact in fp32 (written over each chunk's pass)
        ent = torch_chunked.target_entries(xg, lse, a, bt, bs, indices, row_ids, values, cw)  # [nnz]
    dx = h.new_empty(h.shape, dtype=torch.float32) if need_x else None  # [B, D] G @ W, before the logit scale
    dw = torch.empty_like(w) if need_w else None  # [K, D]
    db = h.new_empty(w.shape[0], dtype=torch.float32) if bias is not None else None  # [K]
    for c0 in range(0, w.shape[0], chunk):
        c1 = min(w.shape[0], c0 + chunk)
        # 1. recompute the chunk's logits and overwrite them with G in one pass, then the exact positives
        z = _logits(h, w[c0:c1], None if bias is None else bias[c0:c1], scale)  # [B, C]
        triton_loss.slab_grad(z, coefs, None if dense is None else dense[:, c0:c1],
                              None if cw is None else cw[c0:c1], eps > 0)
        if ent is not None:
            write_entries_(z, indices, row_ids, ent, c0)
        # 2. the products: dX accumulated in fp32, dW_c in one GEMM over all rows
        if dx is not None:
            addmm_fp32_(dx, z, w[c0:c1], beta=0.0 if c0 == 0 else 1.0)
        if dw is not None:
            torch.mm(z.T, h, out=dw[c0:c1])
        if db is not None:
            db[c0:c1] = z.sum(0, dtype=torch.float32)
    # 3. the logit scale: dX = s G W, dW = s G^T X, ds = <X, G W>
    ds = (h.float() * dx).sum() if scale is not None and dx is not None else None
    if scale is not None:
        if dx is not None:
            dx.mul_(scale)
        if dw is not None:
            dw.mul_(scale)
    return dx, dw, db, ds
