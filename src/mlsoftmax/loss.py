"""The multi-label softmax cross-entropy: functional API, autograd and nn.Module.

Layers, from the bottom:

* ``mlsoftmax.kernels``: the implementations (pure torch, Triton);
* two ``torch.library`` custom ops (``mlsoftmax::msl_forward`` and
  ``mlsoftmax::msl_backward``) so that ``torch.compile`` sees opaque, fakeable ops;
* one ``torch.autograd.Function`` (:class:`MultiLabelSoftmaxFunction`);
* the public :func:`multilabel_softmax_loss` (validation, target forms,
  reductions) and the thin :class:`MultiLabelSoftmaxLoss` module.
"""

# no `from __future__ import annotations` here: torch 2.4's custom_op reads the signatures' annotations as
# objects (string annotations fail its schema inference; later versions resolve them)
import contextlib
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _amp, _validation as V
from .kernels import torch_chunked
from .kernels import resolve_impl, IMPLS, small_path
from .targets import Positives

__all__ = ["multilabel_softmax_loss", "MultiLabelSoftmaxLoss", "MultiLabelSoftmaxFunction"]

REDUCTIONS = ("mean", "sum", "none")
EMPTY_MODES = ("ignore", "error")


# --------------------------------------------------------------------------- custom ops
def _msl_forward_impl(
    logits: Tensor,
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    row_ids: Optional[Tensor],
    values: Optional[Tensor],
    weight: Optional[Tensor],
    label_smoothing: float,
    triton: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row statistics (see ``kernels.torch_chunked.row_stats``), its sums in torch or in one Triton pass."""
    sums = None
    if triton:
        from .kernels import triton_loss

        sums = triton_loss.partial_sums
    return torch_chunked.row_stats(logits, dense, indices, row_ids, values, weight, label_smoothing, sums=sums)


_msl_forward = torch.library.custom_op("mlsoftmax::msl_forward", _msl_forward_impl, mutates_args=())


@_msl_forward.register_fake
def _(logits, dense, indices, row_ids, values, weight, label_smoothing, triton=False):
    acc = torch_chunked.acc_dtype(logits.dtype)
    b = logits.shape[0]
    return tuple(logits.new_empty(b, dtype=acc) for _ in range(5))


def _msl_backward_impl(
    grad_rows: Tensor,
    logits: Tensor,
    lse: Tensor,
    coef: Tensor,
    inv_mass: Tensor,
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    row_ids: Optional[Tensor],
    values: Optional[Tensor],
    weight: Optional[Tensor],
    label_smoothing: float,
    triton: bool = False,
) -> Tensor:
    """The gradient (see ``kernels.torch_chunked.backward``), in torch or in one Triton pass."""
    kern = torch_chunked
    if triton:
        from .kernels import triton_loss as kern
    return kern.backward(grad_rows, logits, lse, coef, inv_mass, dense, indices, row_ids, values, weight,
                         label_smoothing)


_msl_backward = torch.library.custom_op("mlsoftmax::msl_backward", _msl_backward_impl, mutates_args=())


@_msl_backward.register_fake
def _(grad_rows, logits, lse, coef, inv_mass, dense, indices, row_ids, values, weight, label_smoothing, triton=False):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("mlsoftmax::msl_triton_forward", mutates_args=())
def _msl_triton_forward(
    logits: Tensor,
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    offsets: Optional[Tensor],
    values: Optional[Tensor],
    weight: Optional[Tensor],
    row_scale: Tensor,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    from .kernels import triton_loss

    return triton_loss.forward(logits, dense, indices, offsets, values, weight, row_scale, label_smoothing, compute_grad)


@_msl_triton_forward.register_fake
def _(logits, dense, indices, offsets, values, weight, row_scale, label_smoothing, compute_grad):
    b = logits.shape[0]
    g = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0, 0))
    return logits.new_empty(b, dtype=torch.float32), g


@torch.library.custom_op("mlsoftmax::msl_triton_forward_inplace", mutates_args=("logits",))
def _msl_triton_forward_inplace(
    logits: Tensor,
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    offsets: Optional[Tensor],
    values: Optional[Tensor],
    weight: Optional[Tensor],
    row_scale: Tensor,
    label_smoothing: float,
) -> Tensor:
    from .kernels import triton_loss

    return triton_loss.forward(logits, dense, indices, offsets, values, weight, row_scale, label_smoothing, True, True)[0]


@_msl_triton_forward_inplace.register_fake
def _(logits, dense, indices, offsets, values, weight, row_scale, label_smoothing):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _msl_triton_backward_impl_(
    grad_rows: Tensor,
    logits: Tensor,
    lse: Tensor,
    coef: Tensor,
    inv_mass: Tensor,
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    row_ids: Optional[Tensor],
    values: Optional[Tensor],
    weight: Optional[Tensor],
    label_smoothing: float,
) -> None:
    """fp16's second Triton pass in place: the gradient written over the logits (``inplace=True``)."""
    from .kernels import triton_loss

    triton_loss.backward(grad_rows, logits, lse, coef, inv_mass, dense, indices, row_ids, values, weight,
                         label_smoothing, out=logits)


_msl_triton_backward_ = torch.library.custom_op("mlsoftmax::msl_triton_backward_", _msl_triton_backward_impl_,
                                                mutates_args=("logits",))


@_msl_triton_backward_.register_fake
def _(grad_rows, logits, lse, coef, inv_mass, dense, indices, row_ids, values, weight, label_smoothing):
    return None


@torch.library.custom_op("mlsoftmax::msl_triton_scale_", mutates_args=("grad",))
def _msl_triton_scale_(grad: Tensor, grad_out: Tensor) -> None:
    from .kernels import triton_loss

    triton_loss.scale_rows_(grad, grad_out)


@_msl_triton_scale_.register_fake
def _(grad, grad_out):
    return None


def _msl_compiled_forward_impl(
    logits: Tensor,
    dense: Optional[Tensor],
    indices: Optional[Tensor],
    row_ids: Optional[Tensor],
    values: Optional[Tensor],
    weight: Optional[Tensor],
    row_scale: Tensor,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The fused CPU kernel (see ``kernels.compiled_loss``): row-scaled loss and gradient."""
    from .kernels import compiled_loss

    return compiled_loss.forward(logits, dense, indices, row_ids, values, weight, row_scale, label_smoothing,
                                 compute_grad)


_msl_compiled_forward = torch.library.custom_op("mlsoftmax::msl_compiled_forward", _msl_compiled_forward_impl,
                                                mutates_args=())


@_msl_compiled_forward.register_fake
def _(logits, dense, indices, row_ids, values, weight, row_scale, label_smoothing, compute_grad):
    g = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0, 0))
    return logits.new_empty(logits.shape[0], dtype=torch_chunked.acc_dtype(logits.dtype)), g


def _msl_scale_rows_impl(grad: Tensor, grad_rows: Tensor) -> None:
    from .kernels import compiled_loss

    compiled_loss.scale_rows_(grad, grad_rows)


_msl_scale_rows_ = torch.library.custom_op("mlsoftmax::msl_scale_rows_", _msl_scale_rows_impl, mutates_args=("grad",))


@_msl_scale_rows_.register_fake
def _(grad, grad_rows):
    return None


def _once(ctx) -> None:
    """The fused paths scale the gradient they stored in the forward in place, and fp16's in-place second pass
    overwrites the logits it reads: a second backward through the same graph (``retain_graph=True``) would scale
    twice or read a gradient as logits, so it raises instead."""
    if getattr(ctx, "spent", False):
        raise RuntimeError(
            "Expected one backward through this loss, but got a second one (retain_graph=True): the fused "
            "paths compute the gradient in the forward and scale it in place (fp16 with inplace=True overwrites "
            "the logits); use impl='torch' to backpropagate twice"
        )
    ctx.spent = True


def _check_first_order(what: str) -> None:
    """Raise in a backward run with ``create_graph=True`` (grad mode on inside it) when ``what`` computes its
    gradient with ops that autograd cannot differentiate again: a second-order gradient would miss this loss's
    curvature without a word (a Hessian-vector product through a model in front of it would come out wrong)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"Expected a first-order backward through {what}, but got create_graph=True: its gradient is not "
            "differentiable again. For double backward (Hessian-vector products, meta-learning), use "
            "multilabel_softmax_loss on the logits with impl='torch' or 'auto' on small inputs"
        )


def _as_grad_mode_sees(*tensors):
    """The inputs as grad mode sees them: detached where it is off (``torch.no_grad``, ``inference_mode``).

    ``ctx.needs_input_grad`` follows ``requires_grad`` whatever the grad mode, and the fused paths compute the
    gradient in their forward: without this, an evaluation under ``no_grad`` with a parameter (or logits) that
    requires grad would compute and hold a gradient that no backward takes.
    """
    if torch.is_grad_enabled():
        return tensors
    return tuple(t.detach() if isinstance(t, Tensor) and t.requires_grad else t for t in tensors)


def _requiring_grad(target, weight, weight_name: str = "weight") -> Optional[str]:
    """The name of the first of ``target`` (dense, or a ``Positives``' soft ``values``) and ``weight`` whose
    gradient autograd would take (``None`` when none is, or grad mode is off).

    The fused kernels differentiate the logits only: such inputs need PyTorch's own composition, or an error.
    """
    if not torch.is_grad_enabled():
        return None
    named = ((("target.values", target.values) if isinstance(target, Positives) else ("target", target)),
             (weight_name, weight))
    for name, t in named:  # a loop, not next(generator, None), which torch 2.4's Dynamo cannot trace
        if isinstance(t, Tensor) and t.requires_grad:
            return name
    return None


def _check_no_grad(name: Optional[str], what: str) -> None:
    """Raise when ``name`` (from :func:`_requiring_grad`) needs a gradient that ``what`` does not compute."""
    if name is not None:
        raise ValueError(
            f"Expected `{name}` not to require grad with {what}, which differentiates only the logits and what "
            "makes them, but it does: detach it, or use multilabel_softmax_loss on the logits with impl='auto' or "
            "'torch', whose PyTorch composition differentiates it"
        )


def _functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...)."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace the query (and traces no functorch wrapper here)
        return False
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped is not None and is_wrapped(t))


def _checks_under(func: bool):
    """Under a ``torch.func`` transform, turn ``vmap``'s refusal of a data-dependent check into a ``ValueError``
    that names the way out; otherwise no context at all (torch 2.4's Dynamo cannot trace a generator's)."""
    return _vmap_checks() if func else contextlib.nullcontext()


@contextlib.contextmanager
def _vmap_checks():
    try:
        yield
    except RuntimeError as e:
        if "vmap" in str(e):
            raise ValueError("Expected validate=False under torch.func.vmap, but got validate=True: the checks "
                             "read the data, which vmap cannot") from e
        raise


def _split_row_scale(row_scale: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """``(the row scale the kernels fold in, the one to multiply their rows by after)``.

    The kernels fold the reduction's row weights into the gradient and do not differentiate them. Where they carry
    a ``sample_weight`` that requires grad (example reweighting learns them), the kernels take ones and the rows
    are scaled outside, through autograd.
    """
    if torch.is_grad_enabled() and row_scale.requires_grad:
        return torch.ones_like(row_scale), row_scale
    return row_scale, None


# AOTAutograd traces a backward's write into a graph input (fp16's second pass over the logits, inplace=True) from
# torch 2.12 on (pytorch/pytorch#178622). Before, tracing it raised "a leaf Variable that requires grad is being used
# in an in-place operation"; there, under torch.compile, that pass writes the gradient to a new buffer instead.
_COMPILED_BACKWARD_WRITES_INPUT = torch.__version__ >= "2.12"


def _two_pass(impl: str, dtype: torch.dtype) -> bool:
    """Whether fp16 under ``impl="triton"`` takes the two Triton passes that form the gradient in the backward."""
    return impl == "triton" and dtype == torch.float16


class MultiLabelSoftmaxFunction(torch.autograd.Function):
    """Per-row ``row_scale * loss`` ``[B]`` from logits ``[B, K]``.

    ``impl="torch"``: the forward saves the logits (by reference), the per-row
    log-sum-exp and two per-row scalars, and the target, but no ``[B, K]`` float
    buffer; the backward writes ``(c softmax - T) * g`` once.

    ``impl="triton"``: one kernel computes the loss and the gradient (already
    scaled by ``row_scale``) in the forward; the backward scales it by
    ``grad_out`` in place, skipping rows whose ``grad_out`` is 1. With
    ``inplace=True`` the gradient overwrites the logits.

    ``impl="compile"``: the same design on the CPU, with one Inductor-generated
    C++ kernel (``kernels.compiled_loss``).

    fp16 with ``impl="triton"``: the torch path's design, its two passes in
    Triton (``triton_loss.partial_sums``, then ``triton_loss.backward``, over the
    logits with ``inplace=True``): the gradient is formed in the backward, after
    the upstream gradient (a loss scale) has reached it, and rounded to fp16 once.
    Formed in the forward, its small entries would round to fp16 before the scale
    and underflow.
    """

    @staticmethod
    def forward(ctx, logits, dense, indices, offsets, row_ids, values, weight, row_scale, label_smoothing, impl,
                inplace):
        two_pass = _two_pass(impl, logits.dtype)
        if two_pass and inplace and logits.stride(-1) != 1:  # as the fused kernel's
            raise ValueError("Expected `logits` to be contiguous in its last dim for inplace=True, but it is not")
        impl = "torch" if two_pass else impl  # fp16: the torch path's design, with Triton's passes
        ctx.impl, ctx.label_smoothing, ctx.two_pass, ctx.inplace = impl, label_smoothing, two_pass, inplace
        # The ops are called through the dispatcher only under torch.compile, where they must be opaque
        # and fakeable; in eager mode their bodies run directly (the op layer costs ~0.1 ms a call).
        eager = not torch.compiler.is_compiling()
        if impl == "triton":
            from .kernels import triton_loss

            if eager:
                rows, grad = triton_loss.forward(logits, dense, indices, offsets, values, weight, row_scale,
                                                 label_smoothing, bool(ctx.needs_input_grad[0]) or inplace, inplace)
            elif inplace:
                rows = torch.ops.mlsoftmax.msl_triton_forward_inplace(
                    logits, dense, indices, offsets, values, weight, row_scale, label_smoothing
                )
                grad = logits
            else:
                rows, grad = torch.ops.mlsoftmax.msl_triton_forward(
                    logits, dense, indices, offsets, values, weight, row_scale, label_smoothing,
                    bool(ctx.needs_input_grad[0]),
                )
            ctx.save_for_backward(grad)
            return rows
        if impl == "compile":
            fwd = _msl_compiled_forward_impl if eager else torch.ops.mlsoftmax.msl_compiled_forward
            rows, grad = fwd(logits, dense, indices, row_ids, values, weight, row_scale, label_smoothing,
                             bool(ctx.needs_input_grad[0]))
            ctx.save_for_backward(grad)
            return rows
        fwd = _msl_forward_impl if eager else torch.ops.mlsoftmax.msl_forward
        loss, lse, coef, inv_mass, _mass = fwd(logits, dense, indices, row_ids, values, weight, label_smoothing,
                                               two_pass)
        ctx.save_for_backward(logits, lse, coef, inv_mass, dense, indices, row_ids, values, weight, row_scale)
        return loss * row_scale

    @staticmethod
    @_amp.off_in_backward
    def backward(ctx, grad_rows):
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        if ctx.impl in ("triton", "compile"):
            _check_first_order(f"impl={ctx.impl!r}")
            _once(ctx)
        if ctx.impl == "triton":
            from .kernels import triton_loss

            (grad,) = ctx.saved_tensors
            if torch.compiler.is_compiling():
                torch.ops.mlsoftmax.msl_triton_scale_(grad, grad_rows)
            else:
                triton_loss.scale_rows_(grad, grad_rows)
        elif ctx.impl == "compile":
            (grad,) = ctx.saved_tensors
            scale = _msl_scale_rows_impl if not torch.compiler.is_compiling() else torch.ops.mlsoftmax.msl_scale_rows_
            scale(grad, grad_rows.contiguous())
        elif torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True: a gradient that autograd differentiates again, through PyTorch's composition
            logits, lse, coef, inv_mass, dense, indices, row_ids, values, weight, row_scale = ctx.saved_tensors
            rows = torch_chunked.small_rows(logits, dense, indices, row_ids, values, weight, ctx.label_smoothing)
            (grad,) = torch.autograd.grad(rows, logits, grad_rows * row_scale, create_graph=True)
        elif ctx.two_pass and ctx.inplace and (_COMPILED_BACKWARD_WRITES_INPUT or not torch.compiler.is_compiling()):
            _once(ctx)  # fp16's second pass writes the gradient over the logits
            logits, lse, coef, inv_mass, dense, indices, row_ids, values, weight, row_scale = ctx.saved_tensors
            compiling = torch.compiler.is_compiling()
            bwd_ = torch.ops.mlsoftmax.msl_triton_backward_ if compiling else _msl_triton_backward_impl_
            bwd_((grad_rows * row_scale).contiguous(), logits, lse, coef, inv_mass, dense, indices, row_ids, values,
                 weight, ctx.label_smoothing)
            grad = logits
        else:
            logits, lse, coef, inv_mass, dense, indices, row_ids, values, weight, row_scale = ctx.saved_tensors
            bwd = _msl_backward_impl if not torch.compiler.is_compiling() else torch.ops.mlsoftmax.msl_backward
            grad = bwd(
                (grad_rows * row_scale).contiguous(), logits, lse, coef, inv_mass, dense, indices, row_ids, values,
                weight, ctx.label_smoothing, ctx.two_pass,
            )
        return (grad,) + (None,) * 10


# --------------------------------------------------------------------------- validation
def _check_options(reduction, empty, label_smoothing, impl) -> None:
    V.check_choice("reduction", reduction, REDUCTIONS)
    V.check_choice("empty", empty, EMPTY_MODES)
    V.check_choice("impl", impl, IMPLS)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"Expected `label_smoothing` to be a float, but got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"Expected `label_smoothing` to be in [0, 1], but got {label_smoothing}")


def _canonical_target(target, logits: Tensor, validate: bool, shape=None, row_ids: bool = True):
    """Return ``(dense [B, K] | None, indices, row_ids, values)`` for logits of ``shape`` ``[..., K]``.

    ``row_ids=False`` leaves a ``Positives`` target's row ids out (``None``): a few kernel launches saved.

    ``shape`` defaults to ``logits.shape``; the fused linear loss passes the
    shape of the logits it never builds, and its ``hidden`` for the device.
    """
    shape = logits.shape if shape is None else torch.Size(shape)
    k = shape[-1]
    b = shape.numel() // k if k else 0
    if isinstance(target, Positives):
        if target.num_classes is not None and target.num_classes != k:
            raise ValueError(
                f"Expected `target` to have num_classes == {k} (the logits' last dim), but got {target.num_classes}"
            )
        if target.batch_size != b:
            raise ValueError(f"Expected `target` to have {b} rows like `logits`, but got {target.batch_size}")
        V.check_same_device("target", target.indices, logits)
        if validate:
            _validate_positives(target, k)
        values = target.values
        return None, target.indices, target.row_ids() if row_ids else None, values
    if isinstance(target, Tensor):
        if target.shape != shape:
            raise ValueError(
                f"Expected `target` to have the shape of `logits` {tuple(shape)}, but got {tuple(target.shape)}"
            )
        if target.is_complex():
            raise TypeError(f"Expected `target` to be a bool, integer or real tensor, but got {target.dtype}")
        V.check_same_device("target", target, logits)
        if validate:
            V.check_nonnegative_finite("target", target)
        return target.reshape(b, k), None, None, None
    raise TypeError(
        f"Expected `target` to be a dense tensor [..., K] or mlsoftmax.Positives, but got {type(target).__name__}"
    )


def _validate_positives(t: Positives, k: int) -> None:
    offs, idx = t.offsets, t.indices
    if int(offs[0]) != 0 or int(offs[-1]) != idx.numel() or bool((offs[1:] < offs[:-1]).any()):
        raise ValueError(
            "Expected `target.offsets` to start at 0, be non-decreasing and end at nnz="
            f"{idx.numel()}, but got offsets[0]={int(offs[0])}, offsets[-1]={int(offs[-1])}"
        )
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"Expected `target` class indices in [0, {k}), but got indices in [{lo}, {hi}]")
        key = t.row_ids() * k + idx
        if torch.unique(key).numel() != key.numel():
            raise ValueError("Expected `target` to have unique class indices within each row, but got duplicates")
    if t.values is not None:
        V.check_nonnegative_finite("target.values", t.values)


def _check_weights(weight, sample_weight, logits: Tensor, validate: bool, shape=None):
    shape = logits.shape if shape is None else torch.Size(shape)
    k = shape[-1]
    if weight is not None:
        V.check_float_tensor("weight", weight)
        if weight.shape != (k,):
            raise ValueError(f"Expected `weight` to have shape ({k},), but got {tuple(weight.shape)}")
        V.check_same_device("weight", weight, logits)
        if validate:
            V.check_nonnegative_finite("weight", weight)
    if sample_weight is not None:
        V.check_float_tensor("sample_weight", sample_weight)
        batch = shape[:-1]
        if sample_weight.shape != batch and sample_weight.shape != (batch.numel(),):
            raise ValueError(
                f"Expected `sample_weight` to have shape {tuple(batch)}, but got {tuple(sample_weight.shape)}"
            )
        V.check_same_device("sample_weight", sample_weight, logits)
        if validate:
            V.check_nonnegative_finite("sample_weight", sample_weight)


def _row_scale(dense, indices, row_ids, values, b: int, acc, device, sample_weight, reduction: str, empty: str,
               offsets=None):
    """Each row's weight in the reduction ``[B]`` (acc dtype), from which rows have a target.

    Folding the reduction into the kernel lets a fused backward skip the
    rescaling pass. ``empty="error"`` raises here (it syncs). A sparse target
    without ``row_ids`` needs its CSR ``offsets`` (and no ``values``): a row has a
    target when it has a positive (one comparison, the fewest launches).
    """
    if dense is not None:
        nonempty = dense.sum(-1, dtype=acc) > 0  # [B]
    elif row_ids is None:
        nonempty = offsets[1:] > offsets[:-1]  # [B]
    else:
        v = torch.ones_like(indices, dtype=acc) if values is None else values.to(acc)
        nonempty = torch.zeros(b, dtype=acc, device=device).index_add_(0, row_ids, v) > 0  # [B]
    if empty == "error":
        bad = torch.nonzero(~nonempty).flatten()
        if bad.numel():
            raise ValueError(
                f"Expected every row of `target` to have a positive, but got {bad.numel()} empty rows "
                f"(first: {bad[:10].tolist()})"
            )
    if sample_weight is None:  # the common case in few launches: 1, or 1 / (rows with a target)
        if reduction != "mean":
            return torch.ones(b, dtype=acc, device=device)
        return nonempty.sum(dtype=acc).clamp_min_(1).reciprocal_().expand(b).contiguous()
    row_scale = sample_weight.reshape(-1).to(acc)
    if reduction == "mean":
        denom = (row_scale * nonempty).sum()
        row_scale = row_scale / torch.where(denom > 0, denom, torch.ones_like(denom))  # all empty: 0, not NaN
    return row_scale.contiguous()


# --------------------------------------------------------------------------- public API
def multilabel_softmax_loss(
    logits: Tensor,
    target: Union[Tensor, Positives],
    *,
    weight: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    empty: str = "ignore",
    label_smoothing: float = 0.0,
    impl: str = "auto",
    inplace: bool = False,
    validate: bool = True,
) -> Tensor:
    r"""Multi-label softmax cross-entropy: cross-entropy of ``softmax(logits)`` against ``Y / |Y|``.

    .. math::
        \ell_i = -\sum_k \frac{Y_{ik}}{|Y_i|}\log\operatorname{softmax}(S_i)_k
               = \operatorname{logsumexp}(S_i) - \operatorname{mean}_{k \in Y_i} S_{ik},
        \qquad \frac{\partial \ell_i}{\partial S_{ik}} = P_{ik} - \frac{Y_{ik}}{|Y_i|}

    Args:
        logits: ``[..., K]`` scores, float16/bfloat16/float32/float64. Accumulation
            is fp32 (fp64 for fp64); the result has the logits' dtype, or fp32
            under ``torch.autocast`` (as ``F.cross_entropy``'s, but without an
            fp32 copy of the logits).
        target: a dense ``[..., K]`` tensor (bool/int/float multi-hot, or
            non-negative soft weights, normalised per row), or a
            :class:`~mlsoftmax.Positives` with one row per logits row.
        weight: ``[K]`` per-class weights, with ``F.cross_entropy``'s meaning for
            soft targets (``-sum_k w_k t_k log p_k``).
        sample_weight: ``[...]`` per-row weights; the mean becomes a weighted
            mean. Every ``impl`` differentiates it when it requires grad.
            A dense ``target``, a target's ``values`` or ``weight`` that
            requires grad is differentiated by PyTorch's composition
            (``F.cross_entropy`` on the normalised target, a few ``[B, K]``
            fp32 temporaries) with ``impl="auto"`` or ``"torch"``; the fused
            kernels raise ``ValueError`` for them.
        reduction: ``"mean"`` (over rows that have a target), ``"sum"`` or
            ``"none"`` (per-row ``[...]``).
        empty: rows with no positive: ``"ignore"`` (loss 0, gradient 0, left out
            of the mean) or ``"error"`` (``ValueError`` naming the rows; syncs).
        label_smoothing: ``eps`` in ``[0, 1]`` (as ``F.cross_entropy``): the target becomes
            ``(1 - eps) Y/|Y| + eps/K`` on rows with a target.
        impl: ``"auto"``, ``"torch"``, ``"triton"`` or ``"compile"``. ``"auto"``
            picks Triton on CUDA when a Triton >= 3.4 is installed; on the CPU it picks the fused
            ``torch.compile`` kernel (``"compile"``) for problems of at least
            2^18 logits when a C++ compiler is found, else the pure-torch path.
            Small problems (under 2^15 logits on the CPU, 2^26 on CUDA), whose
            time is the host's cost per op, go to PyTorch's own
            ``F.cross_entropy`` on the dense target. fp16 forms its gradient
            in the backward, after a loss scale has reached it: two Triton
            passes on CUDA, the torch path under ``"auto"`` on the CPU.
        inplace: Triton only: write the gradient over ``logits`` (no extra
            ``[B, K]`` memory). This destroys the logits: do not use them after
            the call (fp16 overwrites them in the backward, the other dtypes in
            the forward). Under ``torch.compile`` before torch 2.12, whose
            tracer cannot write into an input in the backward, fp16 writes its
            gradient to a new buffer and leaves the logits as they were.
        validate: run the data-dependent checks (they sync with the device).

    Returns:
        A scalar, or ``[...]`` for ``reduction="none"``.

    Note:
        Double backward (``create_graph=True``) works on the torch path (and
        on ``"auto"``'s small path); ``torch.func`` transforms run PyTorch's
        composition under ``impl="auto"`` or ``"torch"`` (under ``vmap`` with
        ``validate=False``). The fused kernels raise in both cases.

    Example:
        >>> import torch
        >>> from mlsoftmax import multilabel_softmax_loss
        >>> logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
        >>> y = torch.tensor([[1, 0, 1], [0, 1, 0]])
        >>> round(multilabel_softmax_loss(logits, y).item(), 4)
        0.5013
    """
    V.check_float_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"Expected `logits` to have shape [..., K] with K >= 1, but got {tuple(logits.shape)}")
    _check_options(reduction, empty, label_smoothing, impl)
    func = _functorch_wrapped(logits)  # under a torch.func transform: PyTorch's composition, which they support
    with _checks_under(func):
        _check_weights(weight, sample_weight, logits, validate)
    k = logits.shape[-1]
    batch_shape = logits.shape[:-1]
    x = logits.reshape(-1, k)  # [B, K]
    chosen = resolve_impl(impl, x)
    if impl == "auto" and chosen == "compile" and x.dtype == torch.float16:
        # fp16: the fused CPU kernel rounds the gradient it forms in the forward to fp16 before the upstream
        # gradient (a GradScaler's loss scale) reaches it, so its small entries underflow; the torch path forms it
        # in the backward, scaled first, as PyTorch's own loss does (and fp16 "triton" does, in Triton passes)
        chosen = "torch"
    if inplace and chosen != "triton":
        raise ValueError(f"Expected impl='triton' (a CUDA tensor) for inplace=True, but got impl={chosen!r}")
    if func and impl in ("triton", "compile"):
        raise ValueError(f"Expected impl='auto' or 'torch' under a torch.func transform (the fused kernels' "
                         f"autograd.Function does not support them), but got impl={impl!r}")
    grad_of = _requiring_grad(target, weight)  # a target or class weights to differentiate: the composition
    if grad_of is not None and (impl in ("triton", "compile") or inplace):
        _check_no_grad(grad_of, f"impl={impl!r}" + (" with inplace=True" if inplace else ""))
    small = func or grad_of is not None or small_path(impl, chosen, x, inplace)
    # the fused Triton kernel reads the CSR offsets; row ids only for the other paths (fp16's two Triton passes
    # among them) or soft values' row sums
    need_rows = (small or chosen != "triton" or _two_pass(chosen, x.dtype)
                 or isinstance(target, Positives) and target.values is not None)
    acc = torch_chunked.acc_dtype(x.dtype)
    offsets = target.offsets if isinstance(target, Positives) else None
    with _checks_under(func):
        dense, indices, row_ids, values = _canonical_target(target, logits, validate, row_ids=need_rows)
        row_scale = _row_scale(dense, indices, row_ids, values, x.shape[0], acc, x.device, sample_weight, reduction,
                               empty, offsets=offsets)
    out_dtype = _amp.result_dtype(logits.dtype, _amp.autocast_dtype(x.device))  # fp32 at least under autocast
    with _amp.off(x.device):  # the logits as they are: the paths accumulate in fp32 already
        if small:
            # small problems: the host's fixed cost per op is the time, so PyTorch's own loss on the dense target
            rows = torch_chunked.small_rows(x, dense, indices, row_ids, values, weight, label_smoothing) * row_scale
        else:
            (x,) = _as_grad_mode_sees(x)
            row_scale, outer = _split_row_scale(row_scale)
            rows = MultiLabelSoftmaxFunction.apply(
                x, dense, indices, offsets, row_ids, values, weight, row_scale, float(label_smoothing), chosen,
                inplace,
            )  # [B] row_scale * loss, accumulation dtype
            rows = rows if outer is None else rows * outer
    if reduction == "none":
        return rows.reshape(batch_shape).to(out_dtype)
    return rows.sum().to(out_dtype)


class MultiLabelSoftmaxLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`multilabel_softmax_loss` with the same options.

    Shapes: ``logits`` ``[..., K]``, ``target`` ``[..., K]`` or ``Positives``.

    Example:
        >>> import torch
        >>> from mlsoftmax import MultiLabelSoftmaxLoss
        >>> crit = MultiLabelSoftmaxLoss(reduction="sum")
        >>> crit(torch.zeros(2, 4), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]])).item() > 0
        True
    """

    def __init__(
        self,
        *,
        weight: Optional[Tensor] = None,
        reduction: str = "mean",
        empty: str = "ignore",
        label_smoothing: float = 0.0,
        impl: str = "auto",
        inplace: bool = False,
        validate: bool = True,
    ) -> None:
        super().__init__()
        _check_options(reduction, empty, label_smoothing, impl)
        self.register_buffer("weight", weight)
        self.reduction, self.empty, self.label_smoothing = reduction, empty, label_smoothing
        self.impl, self.inplace, self.validate = impl, inplace, validate

    def forward(self, logits: Tensor, target, sample_weight: Optional[Tensor] = None) -> Tensor:
        return multilabel_softmax_loss(
            logits, target, weight=self.weight, sample_weight=sample_weight, reduction=self.reduction,
            empty=self.empty, label_smoothing=self.label_smoothing, impl=self.impl, inplace=self.inplace,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, empty={self.empty!r}, label_smoothing={self.label_smoothing}, impl={self.impl!r}"
