"""Monarch matrices (block-diagonal, permutation, block-diagonal) in fly's layout."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ops
from .._native import as_tensor, back, check_int
from ..errors import ShapeError


def monarch_multiply(x: Any, w1: Any, w2: Any) -> Any:
    """``x`` times a Monarch matrix, with fly's conventions.

    ``w1`` ``(k, q, p)`` and ``w2`` ``(l, s, r)`` with ``k p = n`` (``x`` is ``(..., n)``) and
    ``l r = k q``: ``out1 = blockdiag(w1) x`` (block ``k`` maps ``x[k p:(k+1) p]``), the
    ``k q`` values read as ``(r, l)`` are regrouped as ``(l, r)``, ``out2 = blockdiag(w2)
    out1``, and the result is read as ``(s, l)``: shape ``(..., l s)``. Two batched GEMMs on
    torch's BLAS and one regrouping copy; the backward recomputes the middle instead of keeping
    it. Differentiable in ``x``, ``w1`` and ``w2``.
    """
    t, np_in = as_tensor("monarch_multiply", "x", x)
    a = as_tensor("monarch_multiply", "w1", w1)[0]
    b = as_tensor("monarch_multiply", "w2", w2)[0]
    if t.dim() < 1:
        raise ShapeError("monarch_multiply: x has shape (), expected (..., n)")
    lead = t.shape[:-1]
    y = _ops.monarch_multiply(t.reshape(-1, t.shape[-1]), a, b)
    return back(y.reshape(*lead, y.shape[-1]), np_in)


def monarch_shapes(in_features: int, out_features: int, nblocks: int) -> tuple[tuple, tuple]:
    """fly's ``MonarchLinear`` factor shapes for a layer: ``(w1 shape, w2 shape)``.

    Blocks of ``ceil(in / nblocks)`` inputs and ``ceil(out / nblocks)`` outputs (the layer
    pads its input and truncates its output); the middle width is the smaller of the two
    padded sizes.
    """
    nb = check_int("monarch_shapes", "nblocks", nblocks, lo=1)
    ib = math.ceil(in_features / nb)
    ob = math.ceil(out_features / nb)
    if ib * nb < ob * nb:
        return (nb, ib, ib), (nb, ob, ib)
    return (nb, ob, ib), (nb, ob, ob)


def monarch_project(weight: Tensor, nblocks: int) -> tuple[Tensor, Tensor]:
    """Projects a dense ``(out, in)`` weight onto the Monarch matrices of
    :func:`monarch_shapes` (Frobenius-nearest), returning ``(w1, w2)``.

    Entry ``(s l + l0, k p + p0)`` of a Monarch matrix only sums products
    ``w2[l0, s, r] w1[k, q, p0]`` over the ``q`` with ``(k q_total + q) mod l == l0``, and every
    ``(k, q)`` belongs to exactly one ``(k, l0)`` block: the parameters of different blocks are
    disjoint. So the projection is a truncated SVD of each ``(l0, k)`` block (strided rows,
    contiguous columns) at the rank its number of ``q`` allows, all blocks in one batched SVD.
    A Monarch matrix round-trips exactly (up to rounding). The weight is zero-padded to the
    padded sizes. Differentiable through ``torch.linalg.svd`` where the singular values differ.
    """
    if weight.dim() != 2:
        raise ShapeError(
            f"monarch_project: weight has shape {tuple(weight.shape)}, expected (out, in)"
        )
    out_f, in_f = weight.shape
    (k, q, p), (nl, s, r) = monarch_shapes(in_f, out_f, nblocks)
    w = F.pad(weight, (0, k * p - in_f, 0, nl * s - out_f))
    # blocks[l0, k0] = rows s0 * l + l0, columns k0 * p + p0
    blocks = w.reshape(s, nl, k, p).permute(1, 2, 0, 3)
    u, sv, vh = torch.linalg.svd(
        blocks, full_matrices=False
    )  # (l, k, s, K), (l, k, K), (l, k, K, p)
    rank = sv.shape[-1]
    kk = torch.arange(k).view(k, 1).expand(k, q)
    qq = torch.arange(q).view(1, q).expand(k, q)
    flat = kk * q + qq
    ll, rr = flat % nl, flat // nl
    jj = qq // nl
    ok = (jj < rank).to(weight.dtype)
    jc = jj.clamp(max=rank - 1)
    root = sv[ll, kk, jc].clamp(min=0).sqrt() * ok  # (k, q)
    w1 = vh[ll, kk, jc] * root.unsqueeze(-1)  # (k, q, p)
    cols = u[ll, kk, :, jc] * root.unsqueeze(-1)  # (k, q, s): column r0 of w2[l0]
    w2t = weight.new_zeros((nl, r, s)).index_put(
        (ll.reshape(-1), rr.reshape(-1)), cols.reshape(-1, s)
    )  # (l, r, s): every (l0, r0) is written by exactly one (k, q)
    return w1.contiguous(), w2t.permute(0, 2, 1).contiguous()


def monarch_to_dense(w1: Tensor, w2: Tensor) -> Tensor:
    """The dense ``(l s, k p)`` matrix of ``(w1, w2)``."""
    n = w1.shape[0] * w1.shape[2]
    eye = torch.eye(n, dtype=w1.dtype)
    return monarch_multiply(eye, w1, w2).t().contiguous()
