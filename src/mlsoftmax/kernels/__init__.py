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
        return "triton" if (x.device.type == "cuda" and triton_available()) else "torch"
    if impl not in available_impls(x.device):
        raise ValueError(
            f"Expected `impl` to be one of {available_impls(x.device)} for a tensor on {x.device}, but got {impl!r}"
            " (Triton needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU)"
        )
    return impl
