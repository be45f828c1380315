"""Fused linear + loss on the GPU: GEMMs per chunk of rows, the fused loss kernel in place.

For each chunk of ``R`` rows:

1. ``z = s * h_r @ W.T + b`` with cuBLAS, in the input dtype (``[R, K]``);
2. the fused Triton kernel (:mod:`.triton_loss`) overwrites ``z`` with the
   row-scaled gradient ``G`` (target terms formed in fp32, rounded once) and
   returns the chunk's losses;
3. ``dX_r = s * G @ W`` and ``dW += s * G^T @ h_r``, with ``dW`` accumulated in
   fp32 across chunks, ``db += sum_r G`` and ``ds += <h_r, G @ W>``.

The gradients are therefore ready at the end of the forward; the backward only
scales them by ``grad_out``. Extra memory is the ``[R, K]`` chunk plus the
fp32 ``dW`` accumulator (for bf16/fp16 weights). Sparse targets are passed to
the kernel through a slice of the CSR offsets (the kernel reads absolute
positions), so no host sync is needed to cut the positives per chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_loss


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated and returned in fp32 (cuBLAS ``out_dtype`` for bf16/fp16 on CUDA)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


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
):
    """``(row_scale * loss [B] fp32, dX [B, D], dW [K, D] fp32, db [K] fp32, ds [] fp32)``.

    The gradients are ``None`` when ``need_grad`` is false.
    """
    b, k = h.shape[0], w.shape[0]
    loss = torch.empty(b, dtype=torch.float32, device=h.device)  # [B]
    dx = torch.empty_like(h) if need_grad else None  # [B, D]
    dw = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if need_grad else None  # [K, D]
    db = torch.zeros(k, dtype=torch.float32, device=h.device) if need_grad else None  # [K]
    ds = torch.zeros((), dtype=torch.float32, device=h.device) if need_grad else None
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        hr = h[r0:r1]  # [R, D]
        # 1. the chunk's logits
        z = hr @ w.T  # [R, K]
        if scale is not None:
            z.mul_(scale.to(z.dtype))
        if bias is not None:
            z.add_(bias)
        # 2. loss and row-scaled gradient, written over z
        loss[r0:r1] = triton_loss.forward(
            z, None if dense is None else dense[r0:r1], indices, None if offsets is None else offsets[r0:r1 + 1],
            values, class_weight, row_scale[r0:r1], label_smoothing, compute_grad=need_grad, inplace=need_grad,
        )[0]
        if not need_grad:
            continue
        # 3. the products; G @ W is shared by dX and ds
        gw = z @ w  # [R, D]
        ds += (hr.float() * gw.float()).sum()
        dx[r0:r1] = gw if scale is None else gw * scale.to(gw.dtype)
        dw += _mm_fp32(z.T, hr)
        db += z.sum(0, dtype=torch.float32)
    if need_grad and scale is not None:
        dw.mul_(scale)
    return loss, dx, dw, db, ds
