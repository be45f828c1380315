"""Autocast (automatic mixed precision) for the losses, as PyTorch's own layers and losses behave under it.

Under ``torch.autocast`` PyTorch runs ``F.linear`` in the low dtype and ``F.cross_entropy`` in fp32. The losses
here follow suit without the fp32 copy: their kernels already read low-precision logits and accumulate in fp32,
so the logits stay as they are and only the result is fp32. The fused linear loss casts ``hidden``, ``weight``
and ``bias`` to the autocast dtype, as ``F.linear`` would, and returns the gradients in the dtypes they came in
(an fp32 master weight gets its gradient straight from the fp32 accumulator). Inside, autocast is switched off,
so that no op of ours is recast behind the kernels' back.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype that autocast gives a matmul on ``device`` now, or ``None`` where autocast is off."""
    try:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    except RuntimeError:  # a device type that autocast does not know
        return None
    except (TypeError, AttributeError):  # a PyTorch without the per-device-type forms: the CPU/CUDA ones
        if device.type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device.type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def compute_dtype(t: Tensor, amp: Optional[torch.dtype]) -> torch.dtype:
    """The dtype ``t`` takes in a matmul under autocast ``amp`` (``None``: off): fp64 stays, as autocast leaves it."""
    return t.dtype if amp is None or t.dtype == torch.float64 else amp


def cast(t: Optional[Tensor], amp: Optional[torch.dtype]) -> Optional[Tensor]:
    """``t`` as autocast hands it to a matmul (``None`` passes through)."""
    return t if t is None else t.to(compute_dtype(t, amp))


def master_grad_dtype(dtype: torch.dtype, gemm_dtype: torch.dtype) -> Optional[torch.dtype]:
    """fp32 for the gradient of an fp32 tensor that the GEMMs take in a lower dtype (taken unrounded from the GEMM's
    fp32 result), else ``None``: the GEMM's own dtype."""
    return torch.float32 if dtype == torch.float32 and gemm_dtype != dtype else None


def result_dtype(dtype: torch.dtype, amp: Optional[torch.dtype]) -> torch.dtype:
    """The loss's dtype: the input's, or at least fp32 under autocast (as ``F.cross_entropy`` gives)."""
    return dtype if amp is None else torch.promote_types(dtype, torch.float32)


def off(device: torch.device):
    """A context with autocast off on ``device`` (a no-op context where it is off already)."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def off_in_backward(backward):
    """Decorates an autograd Function's ``backward``: it runs with autocast off on its gradient's device.

    (A CPU backward runs on the caller's thread, so a ``loss.backward()`` inside
    an autocast region would otherwise recast its matmuls.)
    """

    @functools.wraps(backward)
    def run(ctx, *grads):
        grad = next(g for g in grads if isinstance(g, Tensor))
        with off(grad.device):
            return backward(ctx, *grads)

    return run
