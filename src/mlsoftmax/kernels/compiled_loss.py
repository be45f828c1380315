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

Class weights are always passed (ones when unused), so that only ``(dtype,
gradient or not, dense or sparse, smoothing or not)`` select a compiled
variant; shapes are dynamic, so a new batch size does not recompile. The
gradient buffer is allocated with transparent huge pages where Linux allows
it (``madvise``, as PyTorch's ``THP_MEM_ALLOC_ENABLE`` does): first-touch page
faults of a fresh ``[B, K]`` buffer otherwise cost as much as the kernel. When no C++ compiler is found, ``impl="auto"`` keeps
the pure-torch path; a compile failure at run time falls back to the same
eager ops, with one warning.
"""

from __future__ import annotations

import ctypes
import sys
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import torch_chunked


def _rows(x, out, sp, st, t, w, ss, smooth: bool):
    """Per row: ``lse``, ``sum w t x`` (dense), ``sum w x`` (smoothing); writes ``sp P - st w t - ss w`` to ``out``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)  # [B, K]
    # 1. max and sum-exp of the cached row (a row of -inf keeps a finite max: no NaN from -inf - -inf)
    m = xf.amax(1, keepdim=True).clamp_min(torch.finfo(acc).min)  # [B, 1]
    lse = torch.log(torch.exp(xf - m).sum(1, keepdim=True)) + m  # [B, 1]
    # 2. the gradient, formed in the accumulation dtype and rounded once, and the row sums of the loss
    g = torch.exp(xf - lse) * sp[:, None]  # [B, K]
    dot = sx = None
    if t is not None:
        tw = t.to(acc) * w  # [B, K]
        dot = torch.where(tw != 0, xf, torch.zeros_like(xf)).mul(tw).sum(1)  # [B]
        g = g - tw * st[:, None]
    if smooth:
        sx = (xf * w).sum(1)  # [B]
        g = g - ss[:, None] * w
    if out is not None:
        out.copy_(g)  # Inductor writes the fused result straight into `out`
    return lse.squeeze(1), dot, sx


_HUGE = 1 << 21  # 2 MB pages
_MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _empty_huge(shape, dtype) -> Tensor:
    """``torch.empty`` on the CPU, advised to use transparent huge pages before its first touch (Linux)."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if _libc is not None and nbytes >= 4 * _HUGE:
        lo = (out.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
        hi = (out.data_ptr() + nbytes) & ~(_HUGE - 1)
        if hi > lo:
            _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE)  # advisory: errors ignored
    return out


_RECOMPILE_LIMIT = 64
_SUBNORMAL = 1e-310  # a float64 subnormal (a global: Python does not fold it at compile time)


def _subnormals_kept() -> bool:
    """Whether this thread's floating-point mode keeps subnormals (no flush-to-zero / denormals-are-zero).

    Inductor before torch 2.5 built CPU kernels with ``-ffast-math``, whose kernels switch the calling thread to
    flush subnormals to zero (pytorch/pytorch#126848): every later float op of the user's process would then lose
    them. Checked around each call (a Python float multiply) and put back when the call changed it."""
    return _SUBNORMAL * 1.0 != 0.0


_compiled: dict = {}  # (dtype, dense, grad) -> compiled _rows, or None after a failure


def _run_rows(*args):
    x, out, t, smooth = args[0], args[1], args[4], args[-1]
    key = (x.dtype, out is not None, t is not None, smooth)
    if key not in _compiled:
        # the threads at run time (OpenMP's count): otherwise Inductor decides serial or parallel, and bakes in the
        # count, from the first call's sizes, and its on-disk cache hands that kernel to later processes (torch 2.8:
        # one small call left every later process's kernel serial, 1.8x slower at B=2048, K=32768)
        _compiled[key] = torch.compile(_rows, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})
    fn = _compiled[key]
    if fn is not None:
        try:
            # every variant and the size-0/1 specialisations share _rows's code object: allow them all
            config = torch._dynamo.config  # the limit's name in older torch (2.4): cache_size_limit
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            kept = _subnormals_kept()
            with config.patch(**{name: _RECOMPILE_LIMIT}):
                out = fn(*args)
            if kept and not _subnormals_kept():  # torch 2.4's kernels set flush-to-zero in the caller's thread
                torch.set_flush_denormal(False)
            return out
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
    inv = torch.where(nonempty, mass.reciprocal(), 0.0)  # [B]
    rs = row_scale.to(acc)
    if eps:
        coef = ((1.0 - eps) * wmass * inv + (eps / k) * w.sum()) * nonempty  # [B]
        sp, st, ss = coef * rs, (1.0 - eps) * inv * rs, (eps / k) * rs * nonempty  # [B] each
    else:  # fewer small ops in the common case (ss is not read without smoothing)
        coef = wmass * inv
        sp, st = coef * rs, inv * rs
        ss = st
    # 2. the fused row kernel (eager ops if Inductor cannot build it)
    grad = _empty_huge(x.shape, x.dtype) if compute_grad else None  # [B, K]
    lse, dot, sx = _run_rows(x, grad, sp, st, dense, w, ss, eps > 0)
    # 3. sparse targets: the positives' logits, and their exact gradient entries
    if dense is None:
        xg = x[row_ids, indices].to(acc)  # [nnz]
        dot = x.new_zeros(b, dtype=acc).index_add_(0, row_ids, vw * xg)
        if compute_grad and indices.numel():
            val = (xg - lse[row_ids]).exp_().mul_(sp[row_ids]).sub_(vw * st[row_ids])  # [nnz]
            if eps:
                val.sub_(ss[row_ids] * w[indices])
            grad.index_put_((row_ids, indices), val.to(grad.dtype))
    loss = coef * lse - ((1.0 - eps) * dot if eps else dot) * inv
    if eps:  # (0 * sx would turn a row with -inf logits into NaN)
        loss = loss - (eps / k) * sx
    loss = torch.where(nonempty, loss, 0.0) * rs
    return loss, (grad if compute_grad else x.new_empty(0, 0))


def scale_rows_(grad: Tensor, grad_rows: Tensor) -> None:
    """``grad *= grad_rows[:, None]`` in place, skipped when every ``grad_rows`` is 1 (CPU: no device sync)."""
    if grad.numel() and not bool((grad_rows == 1).all()):
        grad.mul_(grad_rows.to(grad.dtype)[:, None])
