"""Fused classifier + loss for extreme label spaces: the ``[B, K]`` logits are never materialised.

Layers, like :mod:`mlsoftmax.loss`:

* the implementations in :mod:`mlsoftmax.kernels` (``torch_linear``: chunked
  over the labels with an online log-sum-exp; ``triton_linear``: GEMMs per chunk
  of rows with the fused loss kernel in place);
* one ``torch.autograd.Function`` (:class:`LinearMultiLabelSoftmaxFunction`);
* the public :func:`linear_multilabel_softmax_loss` and the
  :class:`LinearMultiLabelSoftmaxLoss` module, which owns the classifier and
  predicts in chunks (:meth:`LinearMultiLabelSoftmaxLoss.top_k`).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _amp, _validation as V
from .kernels import resolve_impl, torch_chunked, torch_linear
from .loss import (_as_grad_mode_sees, _canonical_target, _check_first_order, _check_no_grad, _check_options,
                   _check_weights, _functorch_wrapped, _once, _requiring_grad, _row_scale, _split_row_scale)
from .targets import Positives

__all__ = ["linear_multilabel_softmax_loss", "LinearMultiLabelSoftmaxLoss", "LinearMultiLabelSoftmaxFunction",
           "chunked_top_k"]

LINEAR_IMPLS = ("auto", "torch", "triton")
MEMORY_BUDGET = 256 << 20  # bytes of temporaries beyond the inputs and their gradients (GPU default)
CPU_BUDGET = 32 << 20  # CPU: two 16 MB temporaries, reused by malloc instead of mmap'd per chunk
FAST_MIN_ROWS = 1024  # the Triton rows route needs chunks this tall (or the whole batch) to pay for its dW accumulator
MIN_LABEL_CHUNK = 128  # never fewer classes per chunk, whatever the budget


def _budget(budget: Optional[int], device) -> int:
    if budget is not None:
        return budget
    return MEMORY_BUDGET if torch.device(device).type == "cuda" else CPU_BUDGET


def default_chunk(b: int, k: int, dtype: torch.dtype, budget: Optional[int] = None,
                  device: Union[str, torch.device] = "cpu") -> int:
    """Classes per chunk of the label-chunked torch route, from a memory budget.

    The budget (bytes of the two ``[B, chunk]`` temporaries in the accumulation
    dtype) defaults to ``MEMORY_BUDGET`` on GPUs and to ``CPU_BUDGET`` on the
    CPU, where each temporary then stays below glibc's largest mmap threshold
    (32 MB): larger ones are mapped and unmapped on every chunk, and their
    first-touch page faults cost more than the GEMMs (measured in BENCHMARKS.md).

    Example:
        >>> default_chunk(2048, 200_000, torch.float32)
        2048
        >>> default_chunk(2048, 200_000, torch.float32, device="cuda")
        16384
    """
    acc_bytes = torch.finfo(torch_chunked.acc_dtype(dtype)).bits // 8
    return max(1, min(max(k, 1), _budget(budget, device) // (2 * acc_bytes * max(b, 1))))


def plan(impl: str, b: int, d: int, k: int, dtype: torch.dtype, *, budget: Optional[int] = None,
         device: Union[str, torch.device] = "cpu", grad_dtype: Optional[torch.dtype] = None,
         nnz: Optional[int] = None) -> tuple[str, int]:
    """The route and its chunk for a concrete ``impl`` (``"torch"`` or ``"triton"``) under a memory budget.

    ``dtype`` is the GEMMs' and ``grad_dtype`` that of ``dW`` (the weight's own:
    fp32 for an fp32 master weight under autocast; default ``dtype``). ``nnz``
    is the number of positives of a sparse target (None: a dense target).

    * ``("torch", C)``: label chunks of ``C`` classes (:func:`default_chunk`).
    * ``("triton_rows", R)``, the fast route: three GEMMs, chunks of ``R`` rows;
      needs ``R K`` logits plus, for bf16/fp16, a ``4 K D``-byte fp32 ``dW``
      accumulator, unless ``dW`` is fp32 itself: then the accumulator is the
      gradient. Chosen when ``R >= min(B, FAST_MIN_ROWS)`` fits the budget.
    * ``("triton_rows_lean", R)``, with ``triton_linear.LEAN_ROWS`` (on; not
      yet timed on a GPU), a sparse target and a 16-bit ``dW``: the rows
      route with ``dW`` accumulated in its own dtype, the positives' target
      terms apart (:func:`.triton_linear.run`); needs ``R K`` logits and
      ``O(nnz + B)`` more, in at most ``triton_linear.MAX_LEAN_CHUNKS``
      chunks of rows (balanced). Chosen when the fast route does not fit.
    * ``("triton_labels", C)``, the lean route: four GEMMs, chunks of ``C``
      classes; needs ``B C`` logits plus two ``[B, D]`` fp32 buffers. Always for
      fp16 GEMMs: the rows routes form ``G`` in the forward, rounded to fp16
      before the upstream gradient (a ``GradScaler``'s loss scale) is known, so
      its small entries would underflow; this route forms it in the backward.

    (Under autocast the bf16 copies of the operands, which ``F.linear`` makes too,
    come on top of the budget.)

    Example:
        >>> plan("triton", 8192, 1024, 262_144, torch.bfloat16, budget=2 << 30)
        ('triton_rows', 2048)
        >>> plan("triton", 8192, 1024, 262_144, torch.bfloat16, budget=256 << 20)
        ('triton_labels', 12288)
    """
    budget = _budget(budget, device)
    if impl != "triton":
        return "torch", default_chunk(b, k, dtype, budget)
    if dtype == torch.float16:  # the rows routes round G to fp16 in the forward, before a loss scale reaches it
        return "triton_labels", labels_chunk(b, d, k, dtype, budget)
    elt = torch.finfo(dtype).bits // 8
    acc = 0 if torch.float32 in (dtype, grad_dtype) else 4 * k * d  # the fp32 dW accumulator, if not dW itself
    rows = min(max(b, 1), max(0, budget - acc) // max(k * elt, 1))
    if rows >= min(max(b, 1), FAST_MIN_ROWS):
        return "triton_rows", rows
    if acc and nnz is not None:
        from .kernels import triton_linear

        lean = lean_rows(b, k, dtype, budget, nnz) if triton_linear.LEAN_ROWS else 0
        if lean:
            return "triton_rows_lean", lean
    return "triton_labels", labels_chunk(b, d, k, dtype, budget)


def lean_rows(b: int, k: int, dtype: torch.dtype, budget: int, nnz: int) -> int:
    """Rows per chunk of the lean rows route (0: it does not fit): ``R K`` logits and ``32 nnz + 16 B`` bytes for
    the target terms and their sort, at most ``triton_linear.MAX_LEAN_CHUNKS`` chunks, balanced.

    Example:
        >>> lean_rows(8192, 262_144, torch.bfloat16, 256 << 20, 8 * 8192)
        482
    """
    from .kernels import triton_linear

    b = max(b, 1)
    most = max(0, budget - 32 * nnz - 16 * b) // max(k * (torch.finfo(dtype).bits // 8), 1)
    if most == 0 or -(-b // most) > triton_linear.MAX_LEAN_CHUNKS:
        return 0
    return -(-b // -(-b // most))


def labels_chunk(b: int, d: int, k: int, dtype: torch.dtype, budget: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu") -> int:
    """Classes per chunk of the Triton labels route: ``B C`` logits plus two ``[B, D]`` fp32 buffers in the budget.

    Example:
        >>> labels_chunk(8192, 1024, 262_144, torch.bfloat16, 256 << 20)
        12288
    """
    elt = torch.finfo(dtype).bits // 8
    cols = max(0, _budget(budget, device) - 8 * b * d) // max(b * elt, 1)  # less the fp32 dX accumulator and a product
    return max(1, min(max(k, 1), max(cols, MIN_LABEL_CHUNK)))


class LinearMultiLabelSoftmaxFunction(torch.autograd.Function):
    """``row_scale * loss`` (``[B]``, or its sum when ``reduce``) of ``s * hidden @ weight.T + bias``.

    ``impl`` is a route of :func:`plan`. ``"torch"`` and ``"triton_labels"``
    save the inputs and per-row statistics and recompute each label chunk's
    logits in the backward. ``"triton_rows"`` computes the gradients in the
    forward when the output is reduced (the backward scales them by
    ``grad_out``), and recomputes them in the backward for ``reduction="none"``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, scale, dense, indices, offsets, row_ids, values, class_weight, row_scale,
                label_smoothing, impl, chunk, reduce, amp):
        needs = ctx.needs_input_grad[:4]
        # which products the backward needs: dX (also for the logit scale's gradient) and dW
        ctx.need = dict(need_x=needs[0] or needs[3], need_w=needs[1])
        ctx.impl, ctx.reduce, ctx.chunk, ctx.label_smoothing = impl, reduce, chunk, label_smoothing
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias, scale)]  # the gradients' dtypes
        # under autocast the GEMMs take the autocast dtype, as F.linear's would (the gradients go back as they came)
        hidden, weight, bias = (_amp.cast(t, amp) for t in (hidden, weight, bias))
        if bias is not None and impl != "torch":
            bias = bias.to(hidden.dtype)  # the Triton routes add it in the GEMM (the torch route in fp32)
        ctx.dw_dtype = _amp.master_grad_dtype(ctx.dtypes[1], weight.dtype)
        if impl in ("triton_rows", "triton_rows_lean"):
            from .kernels import triton_linear

            ctx.eager = reduce and any(needs)
            loss, dx, dw, db, ds = triton_linear.run(
                hidden, weight, bias, scale, dense, indices, offsets, values, class_weight, row_scale,
                label_smoothing, chunk, need_grad=ctx.eager, **ctx.need, row_ids=row_ids,
                lean=impl == "triton_rows_lean",
            )
            if ctx.eager:  # in the parameters' dtypes now (one rounding; the fp32 dW accumulator is freed)
                ctx.save_for_backward(*(None if t is None else t.to(dt) for t, dt in zip((dx, dw, db, ds),
                                                                                           ctx.dtypes)))
            else:
                ctx.save_for_backward(hidden, weight, bias, scale, dense, indices, offsets, values, class_weight,
                                      row_scale, row_ids)
        else:
            xg = None
            if impl == "triton_labels":
                from .kernels import triton_linear

                loss, lse, coef, inv_mass, xg = triton_linear.labels_forward(
                    hidden, weight, bias, scale, dense, indices, row_ids, values, class_weight, label_smoothing, chunk
                )
            else:
                loss, lse, coef, inv_mass, _ = torch_linear.forward(
                    hidden, weight, bias, scale, dense, indices, row_ids, values, class_weight, label_smoothing, chunk
                )
            loss = loss * row_scale
            ctx.save_for_backward(hidden, weight, bias, scale, lse, coef, inv_mass, dense, indices, row_ids, values,
                                  class_weight, row_scale, xg)
        return loss.sum() if reduce else loss

    @staticmethod
    @_amp.off_in_backward
    def backward(ctx, grad):
        _check_first_order("the fused linear loss")
        needs = ctx.needs_input_grad[:4]
        rows_route = ctx.impl in ("triton_rows", "triton_rows_lean")
        if rows_route and ctx.eager:
            from .kernels import triton_loss

            _once(ctx)

            # scaled by grad_out in place, with no host sync: skipped inside the kernel when it is 1
            out = []
            for t, need in zip(ctx.saved_tensors, needs):
                if need and t.dim() == 2:
                    t = triton_loss.scale_rows_(t, grad.reshape(()))
                elif need:
                    t = t * grad.to(t.dtype)
                out.append(t if need else None)
            return tuple(out) + (None,) * 12
        if rows_route:
            from .kernels import triton_linear

            hidden, weight, bias, scale, dense, indices, offsets, values, cw, row_scale, row_ids = ctx.saved_tensors
            _, *grads = triton_linear.run(
                hidden, weight, bias, scale, dense, indices, offsets, values, cw, (row_scale * grad).float(),
                ctx.label_smoothing, ctx.chunk, need_grad=True, **ctx.need, row_ids=row_ids,
                lean=ctx.impl == "triton_rows_lean",
            )
        else:
            hidden, weight, bias, scale, lse, coef, inv_mass, dense, indices, row_ids, values, cw, row_scale, xg = (
                ctx.saved_tensors
            )
            g = row_scale * (grad.expand_as(row_scale) if ctx.reduce else grad)
            if ctx.impl == "triton_labels":
                from .kernels import triton_linear

                grads = triton_linear.labels_backward(
                    g, hidden, weight, bias, scale, lse, coef, inv_mass, xg, dense, indices, row_ids, values, cw,
                    ctx.label_smoothing, ctx.chunk, **ctx.need, dw_dtype=ctx.dw_dtype,
                )
            else:
                grads = torch_linear.backward(
                    g, hidden, weight, bias, scale, lse, coef, inv_mass, dense, indices, row_ids, values,
                    cw, ctx.label_smoothing, ctx.chunk, **ctx.need, dw_dtype=ctx.dw_dtype,
                )
        out = [g.to(dt) if (need and g is not None) else None for g, dt, need in zip(grads, ctx.dtypes, needs)]
        return tuple(out) + (None,) * 12


def _check_sizes(**sizes) -> None:
    """Each given size (``chunk_size=...``) is None or a positive int."""
    for name, val in sizes.items():
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"Expected `{name}` to be a positive int, but got {val!r}")


def _check_linear(hidden, weight, bias, weight_scale, amp: Optional[torch.dtype] = None) -> None:
    """The checks of the fused linear losses' classifier arguments; ``amp``: the autocast dtype, if on."""
    V.check_float_tensor("hidden", hidden)
    V.check_float_tensor("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("Expected `hidden` to have shape [..., D], but got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"Expected `weight` to have shape [K, {hidden.shape[-1]}] (D of `hidden`), but got {tuple(weight.shape)}"
        )
    hdt, wdt = _amp.compute_dtype(hidden, amp), _amp.compute_dtype(weight, amp)  # as the GEMMs take them
    if wdt != hdt:
        raise TypeError(f"Expected `weight` to have the dtype of `hidden` ({hdt}), but got {wdt}"
                        + (" (under autocast)" if amp is not None else ""))
    if weight.device != hidden.device:
        raise ValueError(f"Expected `weight` to be on {hidden.device} like `hidden`, but got {weight.device}")
    if bias is not None:
        V.check_float_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"Expected `bias` to have shape ({weight.shape[0]},), but got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"Expected `bias` to be on {hidden.device} like `hidden`, but got {bias.device}")
    if weight_scale is not None:
        if isinstance(weight_scale, Tensor):
            if weight_scale.numel() != 1 or not weight_scale.is_floating_point():
                raise ValueError(
                    "Expected `weight_scale` to be a float or a one-element float tensor, but got a tensor of "
                    f"shape {tuple(weight_scale.shape)} and dtype {weight_scale.dtype}"
                )
        elif isinstance(weight_scale, bool) or not isinstance(weight_scale, numbers.Real):
            raise TypeError(f"Expected `weight_scale` to be a float or a tensor, but got {type(weight_scale).__name__}")


def linear_multilabel_softmax_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Union[Tensor, Positives],
    *,
    bias: Optional[Tensor] = None,
    weight_scale: Union[float, Tensor, None] = None,
    class_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    empty: str = "ignore",
    label_smoothing: float = 0.0,
    sample_weight: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    impl: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""Multi-label softmax loss of a linear classifier, without the ``[B, K]`` logits.

    Equals ``multilabel_softmax_loss(s * hidden @ weight.T + bias, target, ...)``,
    with gradients for ``hidden``, ``weight``, ``bias`` and a tensor ``weight_scale``.

    .. math::
        \ell_i = \operatorname{logsumexp}_k(s\,h_i \cdot w_k + b_k)
                 - \operatorname{mean}_{k \in Y_i}(s\,h_i \cdot w_k + b_k)

    Args:
        hidden: ``[..., D]`` features.
        weight: ``[K, D]`` classifier weight (same dtype and device as ``hidden``;
            under ``torch.autocast`` both, and ``bias``, are cast to its dtype, as
            ``F.linear``'s inputs are, and their gradients come back in their
            own dtypes: an fp32 weight gets its fp32 gradient).
        target: ``Positives`` with one row per ``hidden`` row (the main form), or
            a dense ``[..., K]`` tensor.
        bias: ``[K]`` classifier bias.
        weight_scale: logit scale ``s`` (a float, or a one-element tensor that
            may require grad), e.g. the temperature of a cosine classifier.
        class_weight: ``[K]`` per-class weights (``weight`` of
            :func:`~mlsoftmax.multilabel_softmax_loss`).
        reduction, empty, label_smoothing, sample_weight, validate: as in
            :func:`~mlsoftmax.multilabel_softmax_loss` (a ``sample_weight``
            that requires grad gets its gradient, from per-row losses scaled
            outside the fused function: the fast Triton route then runs its
            GEMMs again in the backward; a ``class_weight`` or target that
            requires grad raises ``ValueError``).
        chunk_size: overrides the chunk of the route that :func:`plan` picks:
            classes per chunk (``impl="torch"``, and the lean Triton route) or
            rows per chunk (the fast Triton route, and the lean rows route).
        memory_budget: bytes of temporaries beyond the inputs and their
            gradients (default 256 MB on GPUs, 32 MB on the CPU). It sizes the
            chunks, and with ``impl="triton"`` picks the route: the fast one
            (three GEMMs, needs ``4 K D`` bytes for an fp32 ``dW`` accumulator
            in bf16) when it fits (fp16 GEMMs always take the labels route, whose
            gradient meets a loss scale before its fp16 rounding), else for a sparse target the lean rows
            route (three GEMMs, ``dW`` accumulated in its own dtype with the
            target terms apart; ``kernels.triton_linear.LEAN_ROWS``), else the
            labels route (four GEMMs; see :func:`plan`).
        impl: ``"auto"`` (Triton routes on CUDA, else torch), ``"torch"`` or ``"triton"``.

    Returns:
        A scalar, or ``[...]`` for ``reduction="none"``, in ``hidden``'s dtype
        (fp32 at least under ``torch.autocast``).

    Example:
        >>> import torch
        >>> from mlsoftmax import Positives, linear_multilabel_softmax_loss, multilabel_softmax_loss
        >>> h, w = torch.randn(4, 8), torch.randn(1000, 8)
        >>> y = Positives.from_lists([[1, 7], [3], [999], [0, 5, 6]], 1000)
        >>> fused = linear_multilabel_softmax_loss(h, w, y, chunk_size=128)
        >>> torch.allclose(fused, multilabel_softmax_loss(h @ w.T, y))
        True
    """
    amp = _amp.autocast_dtype(hidden.device)
    _check_linear(hidden, weight, bias, weight_scale, amp)
    if any(t is not None and _functorch_wrapped(t) for t in (hidden, weight, bias)):
        raise ValueError("Expected no torch.func transform around the fused linear loss (its autograd.Function "
                         "does not support them), but got one: compute the logits and use multilabel_softmax_loss")
    if weight.shape[0] == 0:  # (a shard of the sharded loss may hold no class; the whole classifier may not)
        raise ValueError(f"Expected `weight` to have shape [K, D] with K >= 1, but got {tuple(weight.shape)}")
    _check_options(reduction, empty, label_smoothing, impl)
    _check_sizes(chunk_size=chunk_size, memory_budget=memory_budget)
    d, k = hidden.shape[-1], weight.shape[0]
    shape = hidden.shape[:-1] + (k,)  # the logits' shape
    _check_weights(class_weight, sample_weight, hidden, validate, shape=shape)
    dense, indices, row_ids, values = _canonical_target(target, hidden, validate, shape=shape)
    _check_no_grad(_requiring_grad(target, class_weight, "class_weight"), "the fused linear loss")

    h = hidden.reshape(-1, d)  # [B, D]
    V.check_choice("impl", impl, LINEAR_IMPLS)
    chosen = resolve_impl(impl, h)
    chosen = "torch" if chosen == "compile" else chosen  # the label-chunked torch path is the CPU route
    cdt = _amp.compute_dtype(h, amp)  # the GEMMs' dtype
    acc = torch_chunked.acc_dtype(cdt)
    row_scale = _row_scale(dense, indices, row_ids, values, h.shape[0], acc, h.device, sample_weight, reduction,
                           empty)
    scale = None
    if weight_scale is not None:
        scale = (weight_scale if isinstance(weight_scale, Tensor) else torch.tensor(float(weight_scale)))
        scale = scale.to(device=h.device, dtype=acc).reshape(())
    route, chunk = plan(chosen, h.shape[0], d, k, cdt, budget=memory_budget, device=h.device, grad_dtype=weight.dtype,
                        nnz=None if indices is None else indices.numel())
    chunk = chunk_size or chunk
    offsets = target.offsets if isinstance(target, Positives) else None
    h, weight, bias, scale = _as_grad_mode_sees(h, weight, bias, scale)
    row_scale, outer = _split_row_scale(row_scale)
    reduce = reduction != "none" and outer is None  # a sample_weight to differentiate: per-row losses, scaled after
    with _amp.off(h.device):
        out = LinearMultiLabelSoftmaxFunction.apply(
            h, weight, bias, scale, dense, indices, offsets, row_ids, values, class_weight, row_scale,
            float(label_smoothing), route, chunk, reduce, amp,
        )
    if outer is not None:
        out = out * outer
        out = out.sum() if reduction != "none" else out
    out = out.to(_amp.result_dtype(hidden.dtype, amp))
    return out.reshape(shape[:-1]) if reduction == "none" else out


class LinearMultiLabelSoftmaxLoss(nn.Module):
    """A linear classifier ``[K, D]`` trained with the fused multi-label softmax loss.

    It owns ``weight`` (and ``bias``), initialised like ``nn.Linear``. Training
    calls :func:`linear_multilabel_softmax_loss`; :meth:`logits` returns the
    full ``[..., K]`` scores, and :meth:`top_k` predicts in label chunks, so
    prediction over millions of labels needs no ``[B, K]`` buffer either.

    Example:
        >>> import torch
        >>> from mlsoftmax import LinearMultiLabelSoftmaxLoss, Positives
        >>> head = LinearMultiLabelSoftmaxLoss(16, 10_000)
        >>> h = torch.randn(3, 16)
        >>> loss = head(h, Positives.from_lists([[1, 2], [9_999], [5]], 10_000))
        >>> loss.backward()
        >>> scores, labels = head.top_k(h, 5)
        >>> labels.shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = True,
        weight_scale: Optional[float] = None,
        class_weight: Optional[Tensor] = None,
        reduction: str = "mean",
        empty: str = "ignore",
        label_smoothing: float = 0.0,
        chunk_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        impl: str = "auto",
        validate: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_options(reduction, empty, label_smoothing, impl)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_classes, **kw)) if bias else None
        self.register_buffer("class_weight", class_weight)
        self.weight_scale = weight_scale
        self.reduction, self.empty, self.label_smoothing = reduction, empty, label_smoothing
        self.chunk_size, self.memory_budget, self.impl, self.validate = chunk_size, memory_budget, impl, validate
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: Tensor, target, sample_weight: Optional[Tensor] = None) -> Tensor:
        return linear_multilabel_softmax_loss(
            hidden, self.weight, target, bias=self.bias, weight_scale=self.weight_scale,
            class_weight=self.class_weight, reduction=self.reduction, empty=self.empty,
            label_smoothing=self.label_smoothing, sample_weight=sample_weight, chunk_size=self.chunk_size,
            memory_budget=self.memory_budget, impl=self.impl, validate=self.validate,
        )

    def logits(self, hidden: Tensor) -> Tensor:
        """The full scores ``[..., K]`` (materialised: use :meth:`top_k` for large ``K``)."""
        z = hidden @ self.weight.T  # [..., K]
        if self.weight_scale is not None:
            z = z * self.weight_scale
        return z if self.bias is None else z + self.bias

    def top_k(self, hidden: Tensor, k: int, *, chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """The ``k`` best scores and labels per row, ``([..., k], [..., k])``, computed in label chunks
        (:func:`chunked_top_k`). Memory is ``O(B * (chunk + k))``."""
        return chunked_top_k(hidden, self.weight, k, bias=self.bias, weight_scale=self.weight_scale,
                             chunk_size=chunk_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
                f"reduction={self.reduction!r}, impl={self.impl!r}")


@torch.no_grad()
def chunked_top_k(hidden: Tensor, weight: Tensor, k: int, *, bias: Optional[Tensor] = None,
                  weight_scale: Optional[float] = None, chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The ``k`` best scores and labels of ``s * hidden @ weight.T + bias`` per row, best first, in label chunks.

    No ``[B, K]`` buffer: each chunk's ``[B, C]`` scores are reduced to their top
    ``k`` and merged with the best so far. Memory is ``O(B * (C + k))``, with
    ``C`` from ``chunk_size`` or the memory budget (:func:`default_chunk`).

    Args:
        hidden: ``[..., D]`` features.
        weight: ``[K, D]`` classifier weight.
        k: how many labels per row, in ``[1, K]``.
        bias: ``[K]`` classifier bias.
        weight_scale: logit scale ``s``.
        chunk_size: classes per chunk.

    Returns:
        ``(scores [..., k], labels [..., k])``.

    Example:
        >>> import torch
        >>> h, w = torch.randn(3, 8), torch.randn(1000, 8)
        >>> v, i = chunked_top_k(h, w, 5, chunk_size=128)
        >>> torch.equal(i, torch.topk(h @ w.T, 5).indices)
        True
    """
    _check_linear(hidden, weight, bias, weight_scale, _amp.autocast_dtype(hidden.device))
    _check_sizes(chunk_size=chunk_size)
    num_classes = weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_classes:
        raise ValueError(f"Expected `k` in [1, {num_classes}], but got {k!r}")
    h = hidden.reshape(-1, weight.shape[1])  # [B, D]
    chunk = max(chunk_size or default_chunk(h.shape[0], num_classes, h.dtype, device=h.device), k)
    best_v = h.new_empty(h.shape[0], 0)  # [B, <=k]
    best_i = torch.empty(h.shape[0], 0, dtype=torch.long, device=h.device)
    for c0 in range(0, num_classes, chunk):
        c1 = min(num_classes, c0 + chunk)
        z = h @ weight[c0:c1].T  # [B, C]
        z = z if weight_scale is None else z * weight_scale
        z = z if bias is None else z + bias[c0:c1]
        v, i = z.topk(min(k, c1 - c0), dim=1, sorted=False)  # [B, <=k]
        v, i2 = torch.cat([best_v, v], 1), torch.cat([best_i, i + c0], 1)  # [B, <=2k] merge with the best so far
        top = v.topk(min(k, v.shape[1]), dim=1, sorted=False).indices
        best_v, best_i = v.gather(1, top), i2.gather(1, top)
    order = best_v.argsort(1, descending=True)
    shape = hidden.shape[:-1] + (k,)
    return best_v.gather(1, order).reshape(shape), best_i.gather(1, order).reshape(shape)
