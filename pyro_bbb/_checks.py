"""Argument and data validation shared by the public functions (clear ValueErrors)."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def as_inputs(x, dtype=None) -> Tensor:
    """x as a float tensor of shape (n, ...), finite."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(dtype or torch.get_default_dtype())
    elif dtype is not None:
        x = x.to(dtype)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have at least one row, got shape {tuple(x.shape)}")
    if x.dim() == 1:
        x = x[:, None]
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    return x


def model_data(model, x, y, dtype=None) -> tuple[Tensor, Tensor]:
    """Validated (x, y) for a pyro_bbb model: lengths match, finite, labels in range."""
    x = as_inputs(x, dtype)
    if y is None:
        raise ValueError("y is required")
    y = torch.as_tensor(y)
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(
            f"x and y must have the same number of rows, got {x.shape[0]} and "
            f"{y.shape[0] if y.dim() else 'a scalar'}"
        )
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError("y contains NaN or inf")
    check = getattr(model, "check_targets", None)
    y = check(y, x.shape[0]) if check else y
    if getattr(model, "task", None) == "classification":
        k = model.num_classes(x)
        if (y < 0).any() or (y >= k).any():
            raise ValueError(
                f"y: class labels must lie in [0, {k - 1}] for a network with {k} classes, "
                f"got range [{int(y.min())}, {int(y.max())}]"
            )
    elif y.is_floating_point():
        y = y.to(x.dtype)
    return x, y
