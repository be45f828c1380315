"""Input checks shared by the public entry points (torchmetrics-style messages)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(name: str, value, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}")


def check_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value) -> Tensor:
    check_tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"Expected `{name}` to have a floating dtype in {[str(d) for d in FLOAT_DTYPES]}, but got {value.dtype}"
        )
    return value


def check_same_device(name: str, value: Tensor, ref: Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"Expected `{name}` to be on {ref.device} like `logits`, but got {value.device}")


def check_nonnegative_finite(name: str, value: Tensor) -> None:
    """Data-dependent (syncs): every entry finite and >= 0."""
    if value.numel() == 0:
        return
    v = value if value.is_floating_point() else value.float()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"Expected `{name}` to be finite, but got non-finite entries")
    if bool((v < 0).any()):
        raise ValueError(f"Expected `{name}` to be non-negative, but got a minimum of {float(v.min()):g}")
