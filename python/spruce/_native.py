"""Crossing into the native module: dtype and device checks, zero-copy views, NumPy in and out."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .errors import ArgumentError, DeviceError, DTypeError

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FLOAT_NAMES = "float32, float64, float16 or bfloat16"


def check_float(op: str, arg: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(
            f"{op}: {arg} must be a torch.Tensor or numpy.ndarray, got {type(t).__name__}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise DTypeError(
            f"{op}: {arg} has dtype {str(t.dtype).replace('torch.', '')}, expected {_FLOAT_NAMES}"
        )


def check_bool(op: str, arg: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(
            f"{op}: {arg} must be a torch.Tensor or numpy.ndarray, got {type(t).__name__}"
        )
    if t.dtype != torch.bool:
        raise DTypeError(
            f"{op}: {arg} has dtype {str(t.dtype).replace('torch.', '')}, expected bool"
        )


def check_cpu(op: str, arg: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise DeviceError(
            f"{op}: {arg} is on {t.device}, expected a CPU tensor: this build of spruce has no "
            f"{t.device.type} kernel for {op}; move the tensor with .cpu()"
        )


def to_numpy(op: str, arg: str, t: torch.Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor (one contiguous copy if it is strided).

    bfloat16 crosses as the ``uint16`` bits of the same memory; the native side reads them as
    bfloat16.
    """
    check_cpu(op, arg, t)
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor over a native result without copying; ``dtype=bfloat16`` reinterprets uint16."""
    t = torch.from_numpy(a)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t


def as_tensor(op: str, arg: str, x: Any) -> tuple[torch.Tensor, bool]:
    """Accepts a tensor or a NumPy array; returns the tensor and whether the caller gave NumPy."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only arrays: spruce never writes to inputs
            return torch.from_numpy(x), True
    if isinstance(x, torch.Tensor):
        return x, False
    raise DTypeError(f"{op}: {arg} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def back(x: Any, as_numpy: bool) -> Any:
    """Returns results as NumPy when the input was NumPy (recursing into tuples and lists)."""
    if not as_numpy:
        return x
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return x.float().numpy()
        return x.numpy()
    if isinstance(x, tuple):
        return tuple(back(v, True) for v in x)
    if isinstance(x, list):
        return [back(v, True) for v in x]
    return x


def check_int(op: str, arg: str, v: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ArgumentError(f"{op}: {arg} ({v!r}) must be an integer")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ArgumentError(f"{op}: {arg} ({v}) must be {rng}")
    return v


def check_number(op: str, arg: str, v: Any) -> float:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"{op}: {arg} ({v!r}) must be a real number")
    return float(v)
