"""Kronecker products applied to activations, never materialized."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._native import as_tensor, back
from ..errors import ArgumentError, ShapeError


def kron_matmul(factors: Sequence[Any], x: Any) -> Any:
    """``x @ torch.kron(F_1, ..., F_k).T`` without forming the Kronecker product.

    ``factors`` are ``k >= 1`` matrices ``(out_i, in_i)`` of any shapes; ``x`` has shape
    ``(..., prod(in_i))`` and the result ``(..., prod(out_i))`` (torch.kron's row-major order:
    ``kron(A, B)[i1 m2 + i2, j1 n2 + j2] = A[i1, j1] B[i2, j2]``). ``x`` is viewed as
    ``(rows, in_1, ..., in_k)`` and each factor applied along its own axis by one GEMM (a
    batched GEMM for inner axes). The backward computes the factor gradients as reshaped GEMMs
    of the same partial products and keeps only the inputs for it: extra memory is O(rows *
    prod(max(in_i, out_i))) activations, never O(prod(in_i) * prod(out_i)).

    These are GEMM-bound, so they run on torch's BLAS (the algorithm is the reshaping).
    Differentiable in every factor and ``x``; float32/float64/bfloat16/float16, CPU.
    """
    if isinstance(factors, Tensor) or not isinstance(factors, Sequence):
        raise ArgumentError(
            f"kron_matmul: factors ({type(factors).__name__}) must be a sequence of matrices"
        )
    fs = [as_tensor("kron_matmul", "factors", f)[0] for f in factors]
    t, np_in = as_tensor("kron_matmul", "x", x)
    if len(fs) == 0:
        raise ShapeError("kron_matmul: factors (an empty list) must hold at least one matrix")
    n = math.prod([int(f.shape[-1]) for f in fs if f.dim() == 2])
    if t.dim() < 1 or t.shape[-1] != n:
        raise ShapeError(
            f"kron_matmul: x has shape {tuple(t.shape)}, expected (..., {n}) (the product of "
            f"the factors' input sizes)"
        )
    lead = t.shape[:-1]
    y = _ops.kron_matmul(fs, t.reshape(-1, n))
    return back(y.reshape(*lead, y.shape[-1]), np_in)


def kron_sum_matmul(As: Any, Bs: Any, x: Any) -> Any:
    """``x @ (sum_i kron(A_i, B_i)).T`` without forming any Kronecker product.

    ``As``: a sequence of ``(out_a, in_a)`` matrices or a stacked ``(s, out_a, in_a)`` tensor;
    ``Bs`` likewise ``(s, out_b, in_b)``; ``x`` ``(..., in_a * in_b)``. This is Compacter's
    parameterized hypercomplex layer. Three GEMMs forward: ``x`` as ``(rows in_a, in_b)`` times
    the stacked ``B`` gives ``T[b, i, s, q]``, then one GEMM with ``A`` rearranged to
    ``(out_a, in_a s)``. Differentiable in ``As``, ``Bs`` and ``x``.
    """
    a = _stack("kron_sum_matmul", "As", As)
    b = _stack("kron_sum_matmul", "Bs", Bs)
    t, np_in = as_tensor("kron_sum_matmul", "x", x)
    n = int(a.shape[2] * b.shape[2])
    if t.dim() < 1 or t.shape[-1] != n:
        raise ShapeError(f"kron_sum_matmul: x has shape {tuple(t.shape)}, expected (..., {n})")
    lead = t.shape[:-1]
    y = _ops.kron_sum_matmul(a, b, t.reshape(-1, n))
    return back(y.reshape(*lead, y.shape[-1]), np_in)


def _stack(op: str, name: str, v: Any) -> Tensor:
    if isinstance(v, Sequence) and not isinstance(v, Tensor):
        mats = [as_tensor(op, name, m)[0] for m in v]
        if not mats:
            raise ShapeError(f"{op}: {name} (an empty list) must hold at least one matrix")
        return torch.stack(mats)
    t = as_tensor(op, name, v)[0]
    if t.dim() != 3:
        raise ShapeError(f"{op}: {name} has shape {tuple(t.shape)}, expected (s, out, in)")
    return t


def kron_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LoKr's split of ``dimension`` into ``(m, dimension / m)``.

    With ``factor > 0`` dividing ``dimension``: ``(factor, dimension / factor)`` as given.
    Otherwise ``m`` is the largest divisor of ``dimension`` with ``m <= sqrt(dimension)`` and
    ``m <= factor`` (``factor = -1``: no bound, the split closest to a square), so that
    ``m <= dimension / m``. Matches ``peft.tuners.lokr.layer.factorization``.
    """
    if dimension < 1:
        raise ArgumentError(f"kron_factorization: dimension ({dimension}) must be >= 1")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    for k in range(1, math.isqrt(dimension) + 1):
        if dimension % k == 0 and k <= bound:
            m = k
    return m, dimension // m
