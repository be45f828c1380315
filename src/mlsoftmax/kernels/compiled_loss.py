"""The fused CPU path: one ``torch.compile`` (Inductor C++/OpenMP) kernel per call.

The target's per-row statistics (mass, class-weighted mass, hence the
coefficient ``c_i``) do not depend on the logits, so they are computed first,
from the sparse indices or the dense target. Then one generated kernel walks
the rows in parallel (OpenMP) and, for each row held in cache, computes the max
and sum-exp (one pass), the optional dense-target and smoothing sums, and
writes the row-scaled gradient ``row_scale * (c softmax - T)`` (a second pass
over the cached row). The sparse target entries are then written exactly, in
the accumulation dtype, by ``index_put``. The backward only scales the
gradient by ``grad_out`` (and skips that when it is all ones).

Class weights and smoothing are always passed (ones / zeros when unused), so
that only ``(dtype, dense or sparse, gradient or not)`` select a compiled
variant (each its own compiled function); shapes are dynamic, so a new batch
size does not recompile. When no C++ compiler is found, ``impl="auto"`` keeps
the pure-torch path; a compile failure at run time falls back to the same
eager ops, with one warning.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import torch_chunked


def _rows(x, sp, st, t, w, ss, compute_grad: bool):
    """Per row: ``lse``, ``sum w t x`` (dense), ``sum w x``, and the gradient ``sp P - st w t - ss w``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)  # [B, K]
    # 1. max and sum-exp of the cached row
    m = xf.amax(1, keepdim=True)  # [B, 1]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = torch.log(torch.exp(xf - m).sum(1, keepdim=True)) + m  # [B, 1]
    # 2. the row sums of the loss: dense target term and the smoothing term
    tw = None
    if t is not None:
        tw = t.to(acc) * w  # [B, K]
        dot = torch.where(tw != 0, xf, torch.zeros_like(xf)).mul(tw).sum(1)  # [B]
    else:
        dot = None
    sx = (xf * w).sum(1)  # [B]
    if not compute_grad:
        return lse.squeeze(1), dot, sx, None
    # 3. the gradient, formed in the accumulation dtype and rounded once
    g = torch.exp(xf - lse) * sp[:, None] - ss[:, None] * w  # [B, K]
    if tw is not None:
        g = g - tw * st[:, None]
    return lse.squeeze(1), dot, sx, g.to(x.dtype)


_RECOMPILE_LIMIT = 64
_compiled: dict = {}  # (dtype, dense, grad) -> compiled _rows, or None after a failure


def _run_rows(*args):
    x, t, compute_grad = args[0], args[3], args[-1]
    key = (x.dtype, t is not None, compute_grad)
    if key not in _compiled:
        _compiled[key] = torch.compile(_rows, dynamic=True, fullgraph=True)
    fn = _compiled[key]
    if fn is not None:
        try:
            # every variant and the size-0/1 specialisations share _rows's code object: allow them all
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return fn(*args)
        except Exception as e:  # noqa: BLE001 - a missing or broken compiler must not break the loss
            _compiled[key] = None
            warnings.warn(f"mlsoftmax: the compiled CPU kernel failed ({type(e).__name__}: {str(e)[:200]}); "
                          "using eager ops for this variant")
    return _rows(*args)


def forward(
    x: Tensor,  # [B, K]
    dense: Optional[Tensor],  # [B, K]
    indices: Optional[Tensor],  # [nnz]
    row_ids: Optional[Tensor],  # [nnz]
    values: Optional[Tensor],  # [nnz]
    weight: Optional[Tensor],  # [K]
    row_scale: Tensor,  # [B]
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """``(row_scale * loss [B] (acc dtype), gradient [B, K] or empty)``, the gradient already row-scaled."""
    b, k = x.shape
    acc = torch_chunked.acc_dtype(x.dtype)
    eps = float(label_smoothing)
    w = torch.ones(k, dtype=acc, device=x.device) if weight is None else weight.to(acc)  # [K]
    # 1. target statistics, without the logits
    if dense is not None:
        mass = dense.sum(1, dtype=acc)  # [B]
        wmass = mass if weight is None else torch.mv(dense.to(acc), w)
    else:
        v = torch.ones(indices.numel(), dtype=acc, device=x.device) if values is None else values.to(acc)
        vw = v if weight is None else v * w[indices]  # [nnz]
        mass = x.new_zeros(b, dtype=acc).index_add_(0, row_ids, v)
        wmass = x.new_zeros(b, dtype=acc).index_add_(0, row_ids, vw)
    nonempty = mass > 0
    inv = torch.where(nonempty, 1.0 / torch.where(nonempty, mass, torch.ones_like(mass)), torch.zeros_like(mass))
    coef = ((1.0 - eps) * wmass * inv + (eps / k) * w.sum()) * nonempty  # [B]
    rs = row_scale.to(acc)
    sp, st, ss = coef * rs, (1.0 - eps) * inv * rs, (eps / k) * rs * nonempty  # [B] each
    # 2. the fused row kernel (eager ops if Inductor cannot build it)
    lse, dot, sx, grad = _run_rows(x, sp, st, dense, w, ss, compute_grad)
    # 3. sparse targets: the positives' logits, and their exact gradient entries
    if dense is None:
        xg = x[row_ids, indices].to(acc)  # [nnz]
        dot = x.new_zeros(b, dtype=acc).index_add_(0, row_ids, vw * xg)
        if compute_grad and indices.numel():
            val = (xg - lse[row_ids]).exp() * sp[row_ids] - vw * st[row_ids] - ss[row_ids] * w[indices]
            grad.index_put_((row_ids, indices), val.to(grad.dtype))
    loss = coef * lse - (1.0 - eps) * dot * inv
    if eps:  # (0 * sx would turn a row with -inf logits into NaN)
        loss = loss - (eps / k) * sx
    loss = torch.where(nonempty, loss, torch.zeros_like(loss)) * rs
    return loss, (grad if compute_grad else x.new_empty(0, 0))


def scale_rows_(grad: Tensor, grad_rows: Tensor) -> None:
    """``grad *= grad_rows[:, None]`` in place, skipped when every ``grad_rows`` is 1 (CPU: no device sync)."""
    if grad.numel() and not bool((grad_rows == 1).all()):
        grad.mul_(grad_rows.to(grad.dtype)[:, None])
