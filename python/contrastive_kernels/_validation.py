"""Argument checks shared by the public functions: every bad input gets a
ValueError or TypeError naming the argument and what was seen."""
from __future__ import annotations

import math
import numbers

import torch

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def matrix(name: str, x, *, min_rows: int = 1) -> Tensor:
    """A 2-D floating tensor (N, D) with N >= min_rows and D >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (or float64 on the reference backend), "
                        f"got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)} (the batch and the feature dimension must be "
                         "non-empty)")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got shape {tuple(x.shape)}")
    return x


def same_device_dtype(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n0} and {n} must be on the same device, got {n0} on {t0.device} and {n} on {t.device}")
        if t.dtype != t0.dtype:
            raise ValueError(f"{n0} and {n} must have the same dtype, got {n0} {t0.dtype} and {n} {t.dtype}")


def same_dim(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.shape[1] != t0.shape[1]:
            raise ValueError(f"{n0} and {n} must have the same feature dimension D, got {n0} {tuple(t0.shape)} "
                             f"and {n} {tuple(t.shape)}")


def same_shape(**tensors) -> None:
    items = list(tensors.items())
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.shape != t0.shape:
            raise ValueError(f"{n0} and {n} must have the same shape (N, D), got {tuple(t0.shape)} and "
                             f"{tuple(t.shape)}")


def scalar(name: str, value, *, positive: bool = False, nonzero: bool = False, finite: bool = True,
           device=None, lower=None, upper=None):
    """A Python number or a one-element tensor; tensor values are checked outside torch.compile."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if device is not None and value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
        if _compiling():
            return value
        v = float(value.detach().reshape(()).item())
    else:
        v = float(value)
    if finite and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonzero and v == 0:
        raise ValueError(f"{name} must be non-zero, got {v}")
    if lower is not None and v < lower:
        raise ValueError(f"{name} must be >= {lower}, got {v}")
    if upper is not None and v >= upper:
        raise ValueError(f"{name} must be < {upper}, got {v}")
    return value


def labels(name: str, lab, n: int, device, *, rows_name: str = "embeddings") -> Tensor:
    if not isinstance(lab, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor, got {type(lab).__name__}")
    if lab.dtype.is_floating_point or lab.dtype.is_complex or lab.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {lab.dtype}")
    if lab.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(lab.shape)}")
    if lab.shape[0] != n:
        raise ValueError(f"{name} must have one entry per row of {rows_name} (length {n}), got length "
                         f"{lab.shape[0]}")
    if lab.device != device:
        raise ValueError(f"{name} is on {lab.device} but {rows_name} is on {device}")
    return lab.long()


def index(name: str, idx, n: int, m: int, device) -> Tensor:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
    if idx.dim() != 1 or idx.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (one key index per query), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the queries are on {device}")
    if not _compiling() and n > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= m:
            raise ValueError(f"{name} must index the {m} keys (0 <= index < {m}), got values in [{lo}, {hi}]")
    return idx.long()


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value
