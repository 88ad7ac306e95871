"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon updates.

The dense linear algebra (Cholesky factorizations, the blocked updates) runs in torch on the
weight's device; every mask is chosen by spruce's exact selection (``topk_mask`` for the
unstructured per-block mask, ``nm_mask`` for N:M), on CPU.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .._native import check_float, check_int, check_number
from ..errors import ArgumentError, NonFiniteError, ShapeError
from ..masks import nm_mask, topk_mask

__all__ = ["sparsegpt_", "SparseGPTResult"]


class SparseGPTResult(NamedTuple):
    """What :func:`sparsegpt_` did: the keep-mask (``(out, in)`` bool, on the weight's device),
    the total reconstruction error ``sum((w - q)^2 / [H^-1]_ii) / 2`` over all columns, and the
    absolute damping added to the Hessian's diagonal."""

    mask: Tensor
    error: float
    damp: float


def _factor(h: Tensor, damp0: float, mean_diag: float, percdamp: float) -> tuple[Tensor, float]:
    """The upper Cholesky factor of ``(H + damp I)^-1``, raising the damping tenfold (with a
    warning) until both factorizations succeed; ArgumentError past 10x the mean diagonal."""
    pct = percdamp
    while True:
        damp = pct * mean_diag if pct > 0 else 0.0
        hd = h.clone()
        hd.diagonal().add_(damp)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                if pct != percdamp:
                    warnings.warn(
                        f"sparsegpt_: the Hessian is not positive definite with percdamp "
                        f"{percdamp}; used percdamp {pct:g} (damp {damp:g})",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return u, damp
        if pct >= 10.0:
            raise ArgumentError(
                f"sparsegpt_: hessian (mean diagonal {mean_diag:g}) must be positive definite "
                f"after damping; Cholesky failed even with percdamp {pct:g}"
            )
        pct = pct * 10.0 if pct > 0 else 0.01


def sparsegpt_(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | None = None,
    *,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> SparseGPTResult:
    """Prunes an ``(out, in)`` weight in place with SparseGPT; returns the mask and error.

    ``hessian`` is ``2/N sum x x^T`` over the layer's calibration inputs (``(in, in)``, e.g.
    ``ActivationStats(..., hessian=True)[name].hessian``); it is not modified. The algorithm:
    dead inputs (``H_dd = 0``) get ``H_dd = 1`` and their weights zeroed; ``percdamp`` times the
    mean diagonal is added to the diagonal; ``U = chol((H)^-1)`` (upper); columns are processed
    in blocks of ``block_size``. Unstructured: each block's mask prunes exactly
    ``floor(sparsity * rows * block_cols)`` entries with the lowest ``w^2 / U_ii^2`` (the original
    prunes one more, ``<= threshold``). N:M (``n`` kept of every ``m`` inputs, ``sparsity`` None
    or ``1 - n/m``): chosen at every ``m``-th column from the updated weights. Each pruned column
    spreads its error ``(w - q)/U_ii`` over the columns to its right.

    Work happens in float32 (float64 if the weight or the Hessian is float64) on the weight's
    device; the result is cast back to the weight's dtype. A Hessian that is not positive
    definite after damping is retried with ten times the damping (with a ``RuntimeWarning``) up
    to ``percdamp = 10``, then :class:`spruce.ArgumentError` is raised.
    """
    op = "sparsegpt_"
    check_float(op, "weight", weight)
    check_float(op, "hessian", hessian)
    if weight.dim() != 2:
        raise ShapeError(
            f"{op}: weight has shape {tuple(weight.shape)}, expected a 2-D (out, in) matrix"
        )
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ShapeError(
            f"{op}: hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols}) for a "
            f"weight with {cols} input features"
        )
    n = check_int(op, "n", n, lo=0)
    m = check_int(op, "m", m, lo=0)
    bs = check_int(op, "block_size", block_size, lo=1)
    pd = check_number(op, "percdamp", percdamp)
    if not (pd >= 0 and math.isfinite(pd)):
        raise ArgumentError(f"{op}: percdamp ({percdamp}) must be a finite number >= 0")
    if (n == 0) != (m == 0):
        raise ArgumentError(f"{op}: n ({n}) and m ({m}) must both be 0 (unstructured) or both > 0")
    if m:
        if n > m:
            raise ArgumentError(f"{op}: n ({n}) must be in [0, m] = [0, {m}]")
        if sparsity is not None and abs(float(sparsity) - (1 - n / m)) > 1e-9:
            raise ArgumentError(
                f"{op}: sparsity ({sparsity}) must be None or 1 - n/m = {1 - n / m} for {n}:{m}"
            )
        if bs % m or cols % m:
            raise ShapeError(
                f"{op}: weight has shape {tuple(weight.shape)}, expected in_features and "
                f"block_size ({bs}) divisible by m ({m})"
            )
        s = 0.0
    else:
        if sparsity is None:
            raise ArgumentError(f"{op}: sparsity (None) must be a number in [0, 1]")
        s = check_number(op, "sparsity", sparsity)
        if not 0.0 <= s <= 1.0:
            raise ArgumentError(f"{op}: sparsity ({sparsity}) must be a number in [0, 1]")
    dev = weight.device
    dt = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    h = hessian.detach().to(device=dev, dtype=dt).clone()
    if not bool(torch.isfinite(h).all()):
        raise NonFiniteError(f"{op}: hessian contains NaN or inf")
    w = weight.detach().to(dt).clone()
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError(f"{op}: weight contains NaN or inf")

    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    mean_diag = float(h.diagonal().mean()) if cols else 0.0
    u, damp = _factor(h, 0.0, mean_diag, pd) if cols else (h, 0.0)
    del h

    keep = torch.ones(rows, cols, dtype=torch.bool, device=dev)
    error = 0.0
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d = u1.diagonal()
        if m == 0:
            tmp = w1**2 / d.reshape(1, -1) ** 2
            keep1 = topk_mask(tmp.cpu(), s, dim=None).to(dev)
        else:
            keep1 = torch.ones(rows, count, dtype=torch.bool, device=dev)
        for i in range(count):
            col = w1[:, i]
            if m and i % m == 0:
                tmp = w1[:, i : i + m] ** 2 / d[i : i + m].reshape(1, -1) ** 2
                keep1[:, i : i + m] = nm_mask(tmp.cpu(), n, m).to(dev)
            q = col * keep1[:, i]
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1).matmul(u1[i, i:].unsqueeze(0))
            q1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = q1
        keep[:, i1:i2] = keep1
        error += float((err1**2).sum()) / 2
        w[:, i2:] -= err1.matmul(u[i1:i2, i2:])
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))
        # Pruned entries are exact zeros whatever the cast (and -0.0 becomes +0.0).
        weight.masked_fill_(~keep, 0)
    return SparseGPTResult(keep, error, damp)
