"""Implementations of the loss behind the ``impl=`` switch.

* ``"torch"``: pure PyTorch (:mod:`.torch_chunked`), always available.
* ``"triton"``: the fused Triton kernel (:mod:`.triton_loss`), on CUDA tensors,
  or on CPU tensors under ``TRITON_INTERPRET=1`` (for tests).
* ``"auto"``: ``"triton"`` on CUDA when Triton imports, else ``"torch"``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp64 uses the torch path


_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton is installed (found once, without importing it)."""
    return _TRITON


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_impls(device: torch.device) -> tuple[str, ...]:
    """The concrete implementations that can run on ``device``."""
    out = ["torch"]
    if triton_available() and (device.type == "cuda" or triton_interpreting()):
        out.append("triton")
    return tuple(out)


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """Map ``impl`` to a concrete implementation for tensor ``x``, or raise."""
    if impl not in IMPLS:
        raise ValueError(f"Expected `impl` to be one of {IMPLS}, but got {impl!r}")
    if impl == "auto":
        fused_ok = x.device.type == "cuda" and triton_available() and x.dtype in TRITON_DTYPES
        return "triton" if fused_ok else "torch"
    if impl not in available_impls(x.device):
        raise ValueError(
            f"Expected `impl` to be one of {available_impls(x.device)} for a tensor on {x.device}, but got {impl!r}"
            " (Triton needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU)"
        )
    if impl == "triton" and x.dtype not in TRITON_DTYPES:
        raise ValueError(f"Expected `logits` to be float32, bfloat16 or float16 for impl='triton', but got {x.dtype}")
    return impl
