"""Butterfly products, the Walsh–Hadamard transform and the Fastfood projection."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._native import as_tensor, back, check_int
from ..errors import ArgumentError, ShapeError


def butterfly_multiply(
    twiddle: Any,
    x: Any,
    *,
    increasing_stride: bool = True,
    output_size: int | None = None,
    transpose: bool = False,
) -> Any:
    """Multiplies ``x`` by butterfly matrices in torch_butterfly's twiddle layout.

    ``twiddle`` has shape ``(nstacks, nblocks, log2(n), n / 2, 2, 2)``: per stack, ``nblocks``
    blocks of ``log2(n)`` factors. Factor ``idx`` of a block pairs positions ``(pos, pos + s)``
    with stride ``s = 2**idx`` (``increasing_stride``) or ``2**(log2(n) - 1 - idx)``; pair ``i``
    sits at ``low = i % s``, ``pos = 2 (i - low) + low`` and maps
    ``(x[pos], x[pos + s]) -> t[i] @ (x[pos], x[pos + s])``. Successive blocks alternate
    direction, as in torch_butterfly.

    ``x`` has shape ``(..., nstacks, in_size)`` (a stack dimension of 1 is broadcast to every
    stack without a copy). Each stack's input is zero-padded (or truncated) to ``n``; the result
    ``(..., nstacks, output_size)`` keeps the first ``output_size`` (default ``n``) outputs.
    With ``transpose`` the transposed matrix is applied (torch_butterfly's
    ``Butterfly.forward(transpose=True)``).

    The native kernel applies all ``nblocks * log2(n)`` factors to a tile of rows while it sits
    in cache (one pass over memory), in float32/float64, or bfloat16/float16 with float32
    arithmetic. Twiddle and ``x`` must share their dtype. Differentiable in both; the backward
    is deterministic (no atomics, the same result on every thread count). CPU tensors or NumPy.
    """
    tw, _ = as_tensor("butterfly_multiply", "twiddle", twiddle)
    t, np_in = as_tensor("butterfly_multiply", "x", x)
    if tw.dim() != 6:
        raise ShapeError(
            f"butterfly_multiply: twiddle has shape {tuple(tw.shape)}, expected "
            f"(nstacks, nblocks, log2(n), n / 2, 2, 2)"
        )
    if t.dim() < 2:
        raise ShapeError(
            f"butterfly_multiply: x has shape {tuple(t.shape)}, expected (..., nstacks, in_size)"
        )
    n = 1 << int(tw.shape[2])
    out = None
    if output_size is not None:
        out = check_int("butterfly_multiply", "output_size", output_size, lo=0, hi=n)
    lead = t.shape[:-2]
    x3 = t.reshape(-1, t.shape[-2], t.shape[-1])
    y = _ops.butterfly_multiply(tw, x3, bool(increasing_stride), out, bool(transpose))
    return back(y.reshape(*lead, y.shape[1], y.shape[2]), np_in)


def butterfly_twiddle(
    n: int,
    *,
    nstacks: int = 1,
    nblocks: int = 1,
    init: str = "randn",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A twiddle ``(nstacks, nblocks, log2(n), n / 2, 2, 2)`` for a power-of-two ``n``.

    ``init``: ``"randn"`` (N(0, 1/2) entries: every factor preserves the expected squared norm),
    ``"ortho"`` (random 2x2 rotations: an orthogonal product), ``"identity"`` or ``"hadamard"``
    (every factor ``[[1, 1], [1, -1]]``: Sylvester's Hadamard matrix, unnormalized).
    """
    n = check_int("butterfly_twiddle", "n", n, lo=1)
    if n & (n - 1):
        raise ArgumentError(f"butterfly_twiddle: n ({n}) must be a power of two")
    nstacks = check_int("butterfly_twiddle", "nstacks", nstacks, lo=1)
    nblocks = check_int("butterfly_twiddle", "nblocks", nblocks, lo=1)
    shape = (nstacks, nblocks, n.bit_length() - 1, n // 2, 2, 2)
    if init == "randn":
        return (
            torch.randn(shape, generator=generator, dtype=torch.float64)
            .mul_(math.sqrt(0.5))
            .to(dtype)
        )
    if init == "ortho":
        theta = torch.rand(shape[:4], generator=generator, dtype=torch.float64) * (2 * math.pi)
        c, s = torch.cos(theta), torch.sin(theta)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2).to(dtype)
    if init in ("identity", "hadamard"):
        unit = [[1.0, 0.0], [0.0, 1.0]] if init == "identity" else [[1.0, 1.0], [1.0, -1.0]]
        return torch.tensor(unit, dtype=dtype).expand(shape).contiguous()
    raise ArgumentError(
        f"butterfly_twiddle: init ({init!r}) must be 'randn', 'ortho', 'identity' or 'hadamard'"
    )


def butterfly_to_dense(
    twiddle: Tensor, *, increasing_stride: bool = True, transpose: bool = False
) -> Tensor:
    """The dense ``(nstacks, n, n)`` matrices of a twiddle (for inspection and tests)."""
    n = 1 << int(twiddle.shape[2])
    eye = torch.eye(n, dtype=twiddle.dtype).unsqueeze(1)
    y = butterfly_multiply(
        twiddle, eye, increasing_stride=increasing_stride, transpose=transpose
    )  # (n, nstacks, n): row j = M e_j
    return y.permute(1, 2, 0).contiguous()


def fwht(x: Any, *, normalized: bool = False) -> Any:
    """The Walsh–Hadamard transform along the last dimension (Sylvester order).

    ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]`` (``scipy.linalg.hadamard``); the last
    dimension must be a power of two (pad with zeros first). ``normalized`` scales by
    ``1/sqrt(n)``, making the transform orthonormal and its own inverse. One native pass over
    memory for all ``log2(n)`` stages; float32/float64, bfloat16/float16 with float32
    arithmetic. Differentiable (the adjoint is the transform itself).
    """
    t, np_in = as_tensor("fwht", "x", x)
    if t.dim() == 0:
        raise ShapeError("fwht: x has shape (), expected at least one dimension")
    return back(_ops.fwht(t, bool(normalized)), np_in)


def fastfood(x: Tensor, sign: Tensor, perm: Tensor, gauss: Tensor, scale: Tensor) -> Tensor:
    """The Fastfood projection ``S H G Π H B x`` (Le, Sarlós and Smola, 2013) along the last dim.

    ``sign`` (``B``, ±1 entries), ``gauss`` (``G``) and ``scale`` (``S``) are diagonals of length
    ``n`` (a power of two), ``perm`` (``Π``) an index permutation; ``H`` is the orthonormal
    Walsh–Hadamard transform, so ``H G Π H B`` has the row norms of ``G``. The paper's
    ``1 / (σ sqrt(n))`` with unnormalized ``H`` equals this with ``scale`` multiplied by
    ``sqrt(n) / σ``. Two native transforms and elementwise products: O(n log n) per row,
    differentiable in ``x``, ``sign``, ``gauss`` and ``scale``.
    """
    n = x.shape[-1]
    for name, v in (("sign", sign), ("perm", perm), ("gauss", gauss), ("scale", scale)):
        if v.shape != (n,):
            raise ShapeError(f"fastfood: {name} has shape {tuple(v.shape)}, expected ({n},)")
    h = fwht(x * sign, normalized=True)
    h = h.index_select(-1, perm) * gauss
    return fwht(h, normalized=True) * scale


def fastfood_params(
    n: int,
    *,
    sigma: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random ``(sign, perm, gauss, scale)`` for :func:`fastfood` approximating a Gaussian
    matrix of entries N(0, 1/σ²): the rows of ``S H G Π H B`` get chi-distributed norms, as in
    the paper (``scale = s_i / ‖G‖`` with ``s_i`` drawn from a chi distribution with n degrees of
    freedom, divided by σ)."""
    sign = torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1
    perm = torch.randperm(n, generator=generator)
    gauss = torch.randn(n, generator=generator, dtype=torch.float64)
    chi = torch.cat(
        [
            torch.randn(min(256, n - i), n, generator=generator, dtype=torch.float64).norm(dim=1)
            for i in range(0, n, 256)
        ]
    )
    scale = chi / gauss.norm() / sigma
    return sign, perm, gauss.to(dtype), scale.to(dtype)
