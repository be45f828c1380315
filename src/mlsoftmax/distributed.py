"""Label-sharded ("vocab-parallel") loss on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Each rank of ``group`` holds a contiguous slice of the classes: the logits
``[B, K_r]`` (or the classifier rows ``[K_r, D]``) of classes
``[class_start, class_start + K_r)``. Shards may be uneven; a rank may hold one
class. The target uses global class ids and is the same on every rank.

Communication per call is O(B), never O(B·K):

1. one all-reduce (MAX) of the per-row local log-sum-exp ``[B]``;
2. one all-reduce (SUM) of the packed per-row partial sums ``[B, 5]``:
   ``exp(lse_r - lse_max)``, the target-weighted sum of logits, the target mass,
   its class-weighted version and (for smoothing) the class-weighted logit sum.

Every rank then holds the exact single-process loss. The backward of
:func:`sharded_multilabel_softmax_loss` needs no collective (each rank writes
the gradient of its own columns); :func:`sharded_linear_multilabel_softmax_loss`
all-reduces ``dX`` ``[B, D]`` once and keeps ``dW`` local. Finding the default
``class_start`` costs one all-gather of one integer per rank.

Selecting this shard's positives from a ``Positives`` target is one host sync
per call (a boolean mask); a dense target needs none.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import _amp, _validation as V
from .kernels import resolve_impl, torch_chunked, torch_linear
from .linear import LINEAR_IMPLS, _check_linear, _check_sizes, default_chunk, labels_chunk
from .loss import _check_first_order, _check_no_grad, _check_options, _requiring_grad, _row_scale, _split_row_scale
from .targets import Positives

__all__ = ["sharded_multilabel_softmax_loss", "sharded_linear_multilabel_softmax_loss", "shard_range"]


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The ``[start, stop)`` classes of ``rank`` when ``num_classes`` are split as evenly as possible.

    Example:
        >>> [shard_range(11, r, 3) for r in range(3)]
        [(0, 4), (4, 8), (8, 11)]
    """
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _layout(k_local: int, class_start: Optional[int], target, device, group) -> tuple[int, int]:
    """``(class_start, K)``: from the all-gathered shard sizes unless ``class_start`` is given."""
    if class_start is None:
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([k_local], dtype=torch.long, device=device), group=group)
        sizes = [int(s) for s in sizes]
        rank = dist.get_rank(group)
        return sum(sizes[:rank]), sum(sizes)
    if isinstance(target, Positives) and target.num_classes is not None:
        return class_start, target.num_classes
    if isinstance(target, Tensor):
        return class_start, target.shape[-1]
    stop = torch.tensor([class_start + k_local], dtype=torch.long, device=device)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=group)
    return class_start, int(stop)


def _local_target(target, b: int, k: int, start: int, stop: int, device, validate: bool):
    """Global target -> ``(local dense | None, local CSR (idx, rows, vals), global (dense, idx, rows, vals))``.

    The global part gives each row's whole target mass without communication.
    """
    if isinstance(target, Positives):
        if target.batch_size != b:
            raise ValueError(f"Expected `target` to have {b} rows like `logits`, but got {target.batch_size}")
        if target.num_classes is not None and target.num_classes != k:
            raise ValueError(f"Expected `target` to have num_classes == {k} (all shards), but got {target.num_classes}")
        V.check_same_device("target", target.indices, torch.empty(0, device=device))
        if validate:
            from .loss import _validate_positives

            _validate_positives(target, k)
        rows = target.row_ids()
        keep = ((target.indices >= start) & (target.indices < stop)).nonzero().flatten()  # [nnz_r]; one host sync
        vals = None if target.values is None else target.values[keep]
        return None, (target.indices[keep] - start, rows[keep], vals), (None, target.indices, rows, target.values)
    if isinstance(target, Tensor):
        if target.dim() != 2 or target.shape != (b, k):
            raise ValueError(f"Expected `target` to have shape {(b, k)} (global classes), but got {tuple(target.shape)}")
        if validate:
            V.check_nonnegative_finite("target", target)
        return target[:, start:stop], (None, None, None), (target, None, None, None)
    raise TypeError(f"Expected `target` to be a dense tensor [B, K] or mlsoftmax.Positives, but got {type(target).__name__}")


def _no_classes(b: int, dtype: torch.dtype, device, smooth: bool):
    """A shard of no classes: its per-row sums, neutral in :func:`_global_stats` (log-sum-exp -inf, sums 0)."""
    acc = torch_chunked.acc_dtype(dtype)
    zeros = [torch.zeros(b, dtype=acc, device=device) for _ in range(4 if smooth else 3)]
    return (torch.full((b,), -math.inf, dtype=acc, device=device), *zeros) + ((None,) if not smooth else ())


def _global_stats(parts, smooth: bool, k: int, wsum, eps: float, group):
    """All-reduce the local partial sums and combine them: the single-process per-row statistics."""
    lse_r, dot, mass, wmass, sx = parts
    # 1. global max of the local log-sum-exps (rows of a shard may be all -inf)
    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # 2. one packed all-reduce of the per-row sums
    cols = [(lse_r - m_safe).exp(), dot, mass, wmass] + ([sx] if smooth else [])
    packed = torch.stack(cols, 1)  # [B, 4 or 5]
    dist.all_reduce(packed, group=group)
    lse = packed[:, 0].log() + m_safe
    sx = packed[:, 4] if smooth else None
    return torch_chunked.combine(lse, packed[:, 1], packed[:, 2], packed[:, 3], sx, k, wsum, eps)


def _prepare(b, k_local, dtype, device, target, weight, sample_weight, class_start, reduction, empty,
             label_smoothing, group, validate):
    _check_options(reduction, empty, label_smoothing, "auto")
    start, k = _layout(k_local, class_start, target, device, group)
    if not 0 <= start <= k - k_local:
        raise ValueError(f"Expected `class_start` in [0, {k - k_local}], but got {start}")
    acc = torch_chunked.acc_dtype(dtype)
    if weight is not None:
        V.check_float_tensor("weight", weight)
        if weight.shape != (k,):
            raise ValueError(f"Expected `weight` to have shape ({k},) (all classes), but got {tuple(weight.shape)}")
    if sample_weight is not None:
        V.check_float_tensor("sample_weight", sample_weight)
        if sample_weight.shape != (b,):
            raise ValueError(f"Expected `sample_weight` to have shape ({b},), but got {tuple(sample_weight.shape)}")
    _check_no_grad(_requiring_grad(target, weight), "the sharded loss")
    dense, local, full = _local_target(target, b, k, start, start + k_local, device, validate)
    # the row mass and reduction weights come from the global target: no communication
    row_scale = _row_scale(*full, b, acc, device, sample_weight, reduction, empty)
    row_scale, outer = _split_row_scale(row_scale)  # outer: a sample_weight to differentiate
    w_local = None if weight is None else weight[start:start + k_local]
    wsum = float(k) if weight is None else weight.to(acc).sum()
    return k, dense, local, w_local, wsum, row_scale, outer


def _use_triton(impl: str, x: Tensor) -> bool:
    """``impl`` ("auto", "torch" or "triton") resolved for ``x``: whether the Triton kernels run."""
    V.check_choice("impl", impl, LINEAR_IMPLS)
    return resolve_impl(impl, x) == "triton"


class _ShardedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dense, idx, rows, vals, w_local, wsum, row_scale, k, eps, group, triton):
        smooth = eps > 0
        if x.shape[1]:
            parts = _kernels(triton).partial_sums(x, dense, idx, rows, vals, w_local, smooth)
        else:  # this rank holds no classes: it still joins the collectives
            parts = _no_classes(x.shape[0], x.dtype, x.device, smooth)
        loss, lse, coef, inv_mass, _ = _global_stats(parts, smooth, k, wsum, eps, group)
        ctx.save_for_backward(x, lse, coef, inv_mass, dense, idx, rows, vals, w_local, row_scale)
        ctx.k, ctx.eps, ctx.triton = k, eps, triton
        return loss * row_scale

    @staticmethod
    @_amp.off_in_backward
    def backward(ctx, grad_rows):
        _check_first_order("the sharded loss")
        x, lse, coef, inv_mass, dense, idx, rows, vals, w_local, row_scale = ctx.saved_tensors
        if not x.shape[1]:
            return (torch.zeros_like(x),) + (None,) * 11
        g = _kernels(ctx.triton).backward((grad_rows * row_scale).contiguous(), x, lse, coef, inv_mass, dense, idx,
                                          rows, vals, w_local, ctx.eps, num_classes=ctx.k)
        return (g,) + (None,) * 11


def _kernels(triton: bool):
    """The module with ``partial_sums`` and ``backward`` for a shard: Triton's one-pass kernels, or pure torch."""
    if triton:
        from .kernels import triton_loss

        return triton_loss
    return torch_chunked


def sharded_multilabel_softmax_loss(
    local_logits: Tensor,
    target: Union[Tensor, Positives],
    *,
    group=None,
    class_start: Optional[int] = None,
    reduction: str = "mean",
    empty: str = "ignore",
    weight: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    impl: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""The multi-label softmax loss of logits whose classes are split across the ranks of ``group``.

    .. math::
        \ell_i = \log \sum_r \sum_{k \in \text{shard}_r} e^{S_{ik}} - \operatorname{mean}_{k \in Y_i} S_{ik}

    Args:
        local_logits: ``[B, K_r]`` this rank's columns (classes
            ``class_start .. class_start + K_r - 1``; ``K_r`` may be 0).
        target: ``Positives`` with global class ids, or a dense ``[B, K]`` over
            all classes; the same on every rank.
        group: the process group (default: the world).
        class_start: this rank's first class; default the prefix sum of the
            shard sizes over the group in rank order (one small all-gather).
        reduction, empty, sample_weight, label_smoothing, validate: as in
            :func:`~mlsoftmax.multilabel_softmax_loss`.
        weight: ``[K]`` per-class weights over all classes.
        impl: ``"auto"`` (the Triton kernels on CUDA, else torch), ``"torch"`` or
            ``"triton"``: the local statistics and gradient in one fused pass each.

    Returns:
        The single-process loss (identical on every rank; fp32 at least under
        ``torch.autocast``); the gradient of ``local_logits`` is this rank's
        slice of the single-process gradient.

    Example:
        >>> import os, tempfile, torch, torch.distributed as dist
        >>> from mlsoftmax import Positives, multilabel_softmax_loss
        >>> init = "file://" + os.path.join(tempfile.mkdtemp(), "store")
        >>> dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        >>> x, y = torch.randn(2, 6), Positives.from_lists([[0, 4], [5]], 6)
        >>> torch.allclose(sharded_multilabel_softmax_loss(x, y), multilabel_softmax_loss(x, y))
        True
        >>> dist.destroy_process_group()
    """
    V.check_float_tensor("local_logits", local_logits)
    if local_logits.dim() != 2:
        raise ValueError(f"Expected `local_logits` to have shape [B, K_r], but got {tuple(local_logits.shape)}")
    b, k_local = local_logits.shape
    triton = _use_triton(impl, local_logits)
    k, dense, (idx, rows, vals), w_local, wsum, row_scale, outer = _prepare(
        b, k_local, local_logits.dtype, local_logits.device, target, weight, sample_weight, class_start, reduction,
        empty, label_smoothing, group, validate,
    )
    out_dtype = _amp.result_dtype(local_logits.dtype, _amp.autocast_dtype(local_logits.device))
    with _amp.off(local_logits.device):
        out = _ShardedLoss.apply(local_logits, dense, idx, rows, vals, w_local, wsum, row_scale, k,
                                 float(label_smoothing), group, triton)
    out = out if outer is None else out * outer
    return out.to(out_dtype) if reduction == "none" else out.sum().to(out_dtype)


class _ShardedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, bias, dense, idx, rows, vals, w_local, wsum, row_scale, k, eps, chunk, group, triton, amp):
        ctx.dtypes = [None if t is None else t.dtype for t in (h, w, bias)]  # the gradients' dtypes
        h, w, bias = (_amp.cast(t, amp) for t in (h, w, bias))  # under autocast, as F.linear takes them
        smooth = eps > 0
        xg = None
        if triton:
            from .kernels import triton_linear

            *parts, xg = triton_linear.labels_partial_sums(h, w, bias, None, dense, idx, rows, vals, w_local, smooth,
                                                           chunk)
        else:
            parts = torch_linear.partial_sums(h, w, bias, None, dense, idx, rows, vals, w_local, smooth, chunk)
        loss, lse, coef, inv_mass, _ = _global_stats(parts, smooth, k, wsum, eps, group)
        ctx.save_for_backward(h, w, bias, lse, coef, inv_mass, dense, idx, rows, vals, w_local, row_scale, xg)
        ctx.k, ctx.eps, ctx.chunk, ctx.group, ctx.triton = k, eps, chunk, group, triton
        return loss * row_scale

    @staticmethod
    @_amp.off_in_backward
    def backward(ctx, grad_rows):
        _check_first_order("the sharded linear loss")
        h, w, bias, lse, coef, inv_mass, dense, idx, rows, vals, w_local, row_scale, xg = ctx.saved_tensors
        args = (grad_rows * row_scale, h, w, bias, None, lse, coef, inv_mass)
        opts = dict(need_w=ctx.needs_input_grad[1], need_x=ctx.needs_input_grad[0], num_classes=ctx.k,
                    dw_dtype=_amp.master_grad_dtype(ctx.dtypes[1], w.dtype))
        if ctx.triton:
            from .kernels import triton_linear

            dx, dw, db, _ = triton_linear.labels_backward(*args, xg, dense, idx, rows, vals, w_local, ctx.eps,
                                                          ctx.chunk, **opts)
        else:
            dx, dw, db, _ = torch_linear.backward(*args, dense, idx, rows, vals, w_local, ctx.eps, ctx.chunk, **opts)
        # the only collective of the backward: every shard's part of dX (skipped on every rank for a frozen input)
        if dx is not None:
            dist.all_reduce(dx, group=ctx.group)
        hdt, wdt, bdt = ctx.dtypes
        return (None if dx is None else dx.to(hdt), None if dw is None else dw.to(wdt),
                None if bias is None else db.to(bdt)) + (None,) * 13


def sharded_linear_multilabel_softmax_loss(
    hidden: Tensor,
    local_weight: Tensor,
    target: Union[Tensor, Positives],
    *,
    bias: Optional[Tensor] = None,
    group=None,
    class_start: Optional[int] = None,
    reduction: str = "mean",
    empty: str = "ignore",
    weight: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""The fused linear + loss with the classifier's rows split across the ranks of ``group``.

    Equals ``multilabel_softmax_loss(hidden @ W.T + b, target)`` for the full
    ``W = cat(local_weight over ranks)``. ``hidden`` ``[B, D]`` is the same on
    every rank; its gradient is all-reduced (one ``[B, D]`` all-reduce in the
    backward), while ``local_weight``'s gradient stays local.

    Args:
        hidden: ``[B, D]`` features, replicated over the group.
        local_weight: ``[K_r, D]`` this rank's classifier rows.
        target: as in :func:`sharded_multilabel_softmax_loss`.
        bias: ``[K_r]`` this rank's bias.
        weight: ``[K]`` per-class weights over all classes.
        chunk_size: classes per chunk of the local label loop (default from a memory budget).
        impl: ``"auto"`` (on CUDA the Triton labels route of
            :func:`~mlsoftmax.linear_multilabel_softmax_loss`, else torch),
            ``"torch"`` or ``"triton"``.
        group, class_start, reduction, empty, sample_weight, label_smoothing, validate:
            as in :func:`sharded_multilabel_softmax_loss`.

    Returns:
        The single-process loss, identical on every rank (fp32 at least under
        ``torch.autocast``, which casts ``hidden``, ``local_weight`` and ``bias``
        as it would for ``F.linear``; gradients keep their tensors' dtypes).

    Example:
        >>> import os, tempfile, torch, torch.distributed as dist
        >>> from mlsoftmax import Positives, linear_multilabel_softmax_loss
        >>> init = "file://" + os.path.join(tempfile.mkdtemp(), "store")
        >>> dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        >>> h, w, y = torch.randn(2, 4), torch.randn(6, 4), Positives.from_lists([[0, 4], [5]], 6)
        >>> torch.allclose(sharded_linear_multilabel_softmax_loss(h, w, y), linear_multilabel_softmax_loss(h, w, y))
        True
        >>> dist.destroy_process_group()
    """
    amp = _amp.autocast_dtype(hidden.device)
    _check_linear(hidden, local_weight, bias, None, amp)
    if hidden.dim() != 2:
        raise ValueError(f"Expected `hidden` to have shape [B, D], but got {tuple(hidden.shape)}")
    _check_sizes(chunk_size=chunk_size)
    b, k_local = hidden.shape[0], local_weight.shape[0]
    triton = _use_triton(impl, hidden) and k_local > 0  # a rank of no classes: the torch route's empty loops
    cdt = _amp.compute_dtype(hidden, amp)  # the GEMMs' dtype
    k, dense, (idx, rows, vals), w_local, wsum, row_scale, outer = _prepare(
        b, k_local, cdt, hidden.device, target, weight, sample_weight, class_start, reduction, empty,
        label_smoothing, group, validate,
    )
    if triton:
        chunk = chunk_size or labels_chunk(b, hidden.shape[1], k_local, cdt, device=hidden.device)
    else:
        chunk = chunk_size or default_chunk(b, k_local, cdt, device=hidden.device)
    with _amp.off(hidden.device):
        out = _ShardedLinearLoss.apply(hidden, local_weight, bias, dense, idx, rows, vals, w_local, wsum, row_scale,
                                       k, float(label_smoothing), chunk, group, triton, amp)
    out = out if outer is None else out * outer
    out_dtype = _amp.result_dtype(hidden.dtype, amp)
    return out.to(out_dtype) if reduction == "none" else out.sum().to(out_dtype)
