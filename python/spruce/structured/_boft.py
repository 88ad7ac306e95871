"""Orthogonal butterfly rotations (BOFT) and block-diagonal orthogonal rotations (OFT).

Conventions (``convention=``), as the established tools define them:

- ``"peft_boft"``: parameters ``(m + 1, nblocks, b, b)`` (PEFT's ``boft_R``); each block
  ``A`` becomes ``S = (A - A^T) / 2`` and the Cayley map ``(I - S)(I + S)^-1``. The rotation is
  ``R = F_m ... F_0``, ``F_i = P_i blockdiag(blocks_i) P_i^T`` with PEFT's butterfly
  permutations (:func:`boft_permutation`), applied on the input side: ``x @ R``.
- ``"peft_oft"``: parameters ``(r, b (b - 1) / 2)`` (PEFT OFT's ``oft_R.weight``), the strict
  upper triangle in ``torch.triu_indices`` order; ``Q = U - U^T`` (no 1/2), exact Cayley
  ``(I - Q)(I + Q)^-1``; one block-diagonal factor, input side.
- ``"lycoris"``: parameters ``(nblocks, b, b)`` (LyCORIS's ``oft_blocks``); ``Q = A - A^T``,
  ``(I + Q)(I - Q)^-1``; one factor, applied on the output side by :class:`spruce.nn.OFT`.

``parameterization="neumann"`` replaces the inverse by PEFT's truncated series with
``neumann_terms`` terms ``I + 2 M + 2 M^2 + ... + 2 M^(T-2) + M^(T-1)`` (for ``T = 3`` PEFT's
loop gives ``I + 2M + 2M^2 + M^3``, reproduced here). For ``peft_oft`` ``M = Q``, exactly PEFT's
default, which approximates the *transpose* of its exact Cayley map; for ``peft_boft``
``M = -S`` and for ``lycoris`` ``M = Q``, which approximate their exact maps. Neumann blocks are
only approximately orthogonal. ``"none"`` uses the blocks as given.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._native import as_tensor, back, check_int
from .._ops import boft_permutation
from ..errors import ArgumentError, ShapeError

CONVENTIONS = ("peft_boft", "peft_oft", "lycoris")
PARAMETERIZATIONS = ("cayley", "neumann", "none")

__all__ = [
    "CONVENTIONS",
    "PARAMETERIZATIONS",
    "boft_permutation",
    "orthogonal_blocks",
    "boft_apply",
    "boft_rotate",
    "boft_merge",
    "boft_unmerge",
    "skew_from_triu",
]


def _check_convention(op: str, convention: str, parameterization: str) -> None:
    if convention not in CONVENTIONS:
        raise ArgumentError(f"{op}: convention ({convention!r}) must be one of {CONVENTIONS}")
    if parameterization not in PARAMETERIZATIONS:
        raise ArgumentError(
            f"{op}: parameterization ({parameterization!r}) must be one of {PARAMETERIZATIONS}"
        )


def skew_from_triu(vec: Tensor, block_size: int) -> Tensor:
    """``U - U^T`` for ``U`` strictly upper triangular holding ``vec`` (``(..., b (b-1) / 2)``)
    in ``torch.triu_indices(b, b, 1)`` order."""
    b = block_size
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    u = vec.new_zeros((*vec.shape[:-1], b, b))
    u = _place(u, rows, cols, vec)
    return u - u.transpose(-1, -2)


def _place(u: Tensor, rows: Tensor, cols: Tensor, vec: Tensor) -> Tensor:
    b = u.shape[-1]
    flat = u.reshape(*u.shape[:-2], b * b)
    flat = flat.index_copy(-1, rows * b + cols, vec)
    return flat.reshape(u.shape)


def _neumann(m: Tensor, terms: int) -> Tensor:
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand(m.shape)
    out = eye.clone()
    if terms <= 1:
        return out
    out = out + 2 * m
    if terms == 2:
        return out
    power = m @ m
    out = out + 2 * power
    for _ in range(3, terms - 1):
        power = power @ m
        out = out + 2 * power
    return out + power @ m


def orthogonal_blocks(
    params: Tensor,
    *,
    convention: str = "peft_boft",
    parameterization: str = "cayley",
    neumann_terms: int = 5,
    block_size: int | None = None,
) -> Tensor:
    """The rotation blocks ``(..., b, b)`` of a convention's parameters (see the module doc).

    Exact Cayley maps are batched linear solves (``torch.linalg.solve``), differentiable by
    torch; in float64 the blocks are orthogonal to rounding (``||B B^T - I|| ~ 1e-15``).
    """
    _check_convention("orthogonal_blocks", convention, parameterization)
    if parameterization == "none":
        return params
    if convention == "peft_oft":
        e = params.shape[-1]
        b = block_size if block_size is not None else int(round((1 + (1 + 8 * e) ** 0.5) / 2))
        if b * (b - 1) // 2 != e:
            raise ShapeError(
                f"orthogonal_blocks: params has shape {tuple(params.shape)}, expected a last "
                f"dimension b (b - 1) / 2 for block size {b}"
            )
        q = skew_from_triu(params, b)
        m, minus, plus = q, -q, q  # exact: (I - Q)(I + Q)^-1
    else:
        if params.dim() < 2 or params.shape[-1] != params.shape[-2]:
            raise ShapeError(
                f"orthogonal_blocks: params has shape {tuple(params.shape)}, expected (..., b, b)"
            )
        a = params - params.transpose(-1, -2)
        if convention == "peft_boft":
            s = 0.5 * a
            m, minus, plus = -s, -s, s  # exact: (I - S)(I + S)^-1
        else:
            m, minus, plus = a, a, -a  # exact: (I + Q)(I - Q)^-1
    if parameterization == "neumann":
        terms = check_int("orthogonal_blocks", "neumann_terms", neumann_terms, lo=1)
        return _neumann(m, terms)
    eye = torch.eye(params.shape[-1] if convention != "peft_oft" else q.shape[-1], dtype=m.dtype)
    eye = eye.to(m.device).expand(m.shape)
    # X (I + plus) = (I + minus)  ->  X = (I + minus)(I + plus)^-1
    return torch.linalg.solve(eye + plus, eye + minus, left=False)


def boft_apply(x: Any, blocks: Any, *, transpose: bool = False) -> Any:
    """``x @ R`` (``x @ R^T`` with ``transpose``) for ``R = F_m ... F_0``,
    ``F_i = P_i blockdiag(blocks[i]) P_i^T`` (PEFT's order and permutations), without any dense
    ``n x n`` matrix.

    ``blocks`` ``(m + 1, nblocks, b, b)`` are used as given (see :func:`orthogonal_blocks`);
    ``x`` ``(..., nblocks b)``. Each factor is one row gather and one batched GEMM of
    ``(b x b)`` blocks: O(rows n b (m + 1)) work. Differentiable in ``x`` and ``blocks``.
    """
    t, np_in = as_tensor("boft_apply", "x", x)
    bl = as_tensor("boft_apply", "blocks", blocks)[0]
    if t.dim() < 1:
        raise ShapeError("boft_apply: x has shape (), expected (..., n)")
    lead = t.shape[:-1]
    y = _ops.boft_apply(t.reshape(-1, t.shape[-1]), bl, bool(transpose))
    return back(y.reshape(*lead, y.shape[-1]), np_in)


def _as_levels(op: str, params: Tensor, convention: str, n_butterfly_factors: int | None) -> Tensor:
    """Parameters with a leading level axis: ``(m + 1, nblocks, ...)``."""
    if convention == "peft_boft":
        if params.dim() != 4:
            raise ShapeError(
                f"{op}: params has shape {tuple(params.shape)}, expected (m + 1, nblocks, b, b)"
            )
        if n_butterfly_factors is not None and params.shape[0] != n_butterfly_factors:
            raise ShapeError(
                f"{op}: params has shape {tuple(params.shape)}, expected "
                f"{n_butterfly_factors} butterfly factors along dim 0"
            )
        return params
    if n_butterfly_factors not in (None, 1):
        raise ArgumentError(
            f"{op}: n_butterfly_factors ({n_butterfly_factors}) must be 1 for convention "
            f"{convention!r} (one block-diagonal factor)"
        )
    want = 2 if convention == "peft_oft" else 3
    if params.dim() != want:
        shape = "(r, b (b - 1) / 2)" if convention == "peft_oft" else "(nblocks, b, b)"
        raise ShapeError(f"{op}: params has shape {tuple(params.shape)}, expected {shape}")
    return params.unsqueeze(0)


def boft_rotate(
    x: Any,
    params: Any,
    *,
    n_butterfly_factors: int | None = None,
    block_size: int | None = None,
    convention: str = "peft_boft",
    parameterization: str = "cayley",
    neumann_terms: int = 5,
) -> Any:
    """Rotates activations by the orthogonal (butterfly) matrix of a convention's parameters:
    ``x @ R`` with the blocks of :func:`orthogonal_blocks` and the factors of
    :func:`boft_apply`. ``n_butterfly_factors`` (m + 1) and ``block_size`` are checked against
    the parameters' shape when given (``peft_oft`` needs no ``block_size``: it follows from the
    packed length). Differentiable in ``x`` and ``params``.
    """
    t, np_in = as_tensor("boft_rotate", "x", x)
    p = as_tensor("boft_rotate", "params", params)[0]
    _check_convention("boft_rotate", convention, parameterization)
    levels = _as_levels("boft_rotate", p, convention, n_butterfly_factors)
    blocks = orthogonal_blocks(
        levels,
        convention=convention,
        parameterization=parameterization,
        neumann_terms=neumann_terms,
        block_size=block_size,
    )
    if block_size is not None and blocks.shape[-1] != block_size:
        raise ShapeError(
            f"boft_rotate: params has shape {tuple(p.shape)}, expected blocks of size {block_size}"
        )
    return back(boft_apply(t, blocks), np_in)


def boft_merge(
    weight: Tensor,
    blocks: Tensor,
    *,
    side: str = "input",
    bias: Tensor | None = None,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The weight (and bias) of a linear layer with a rotation folded in, in
    O(out n b (m + 1)) work and no dense rotation.

    ``side="input"`` (PEFT): the layer computes ``((x R) W^T) * scale + bias``, so
    ``W' = scale[:, None] * (W R^T)``, bias unchanged. ``side="output"`` (LyCORIS): it computes
    ``(x W^T + bias) R``, so ``W' = R^T W`` and ``bias' = bias R``. Returns ``(W', bias')``.
    """
    if side == "input":
        w = boft_apply(weight, blocks, transpose=True)
        if scale is not None:
            w = w * scale.reshape(-1, 1)
        return w, bias
    if side == "output":
        w = boft_apply(weight.t(), blocks).t().contiguous()
        b = None if bias is None else boft_apply(bias.unsqueeze(0), blocks)[0]
        return w, b
    raise ArgumentError(f"boft_merge: side ({side!r}) must be 'input' or 'output'")


def boft_unmerge(
    weight: Tensor,
    blocks: Tensor,
    *,
    side: str = "input",
    bias: Tensor | None = None,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Inverts :func:`boft_merge` exactly (up to rounding): with ``R^-T`` the chain of the
    blocks' inverse transposes (each block inverted on its own), ``W = (W' / scale) R^-T`` on the
    input side, ``W = R^-T W'`` and ``bias = bias' R^-1`` on the output side. Works for
    non-orthogonal (Neumann) blocks too."""
    inv_t = torch.linalg.inv(blocks).transpose(-1, -2)
    if side == "input":
        w = weight if scale is None else weight / scale.reshape(-1, 1)
        return boft_apply(w, inv_t), bias
    if side == "output":
        w = boft_apply(weight.t(), inv_t, transpose=True).t().contiguous()
        b = None if bias is None else boft_apply(bias.unsqueeze(0), inv_t, transpose=True)[0]
        return w, b
    raise ArgumentError(f"boft_unmerge: side ({side!r}) must be 'input' or 'output'")
