"""Exact selection and masks.

Masks are ``torch.bool``, True = keep. ``sparsity`` is the fraction pruned, ``density`` the
fraction kept. Counts are exact: ``floor(sparsity * n)`` entries pruned per slice (computed in
float64). Ranking is total and deterministic: by ``(score, index)`` ascending, ``-0.0 == 0.0``,
the lowest pruned first, so ties prune the lower index first and the same input gives the same
mask on every thread count. NaN scores raise :class:`spruce.NonFiniteError`; ``±inf`` rank as
the extremes.

Every function takes torch tensors (CPU) or NumPy arrays (and then returns NumPy), in float32,
float64, float16 or bfloat16, read in place without upcasting copies. Strided inputs are made
contiguous once. Each is also ``torch.ops.spruce.<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import _ops
from ._native import as_tensor, back, check_int, check_number
from .errors import ArgumentError, ShapeError

__all__ = [
    "topk_mask",
    "global_topk_masks",
    "nm_mask",
    "structured_mask",
    "random_mask",
    "kthvalue",
    "quantile",
    "pack_mask",
    "unpack_mask",
    "mask_to_csr",
    "apply_mask_",
    "sparsity",
    "KthValue",
]


class KthValue(NamedTuple):
    """The result of :func:`kthvalue`: values and their indices (as ``torch.kthvalue``)."""

    values: Any
    indices: Any


def _dim(op: str, dim: Any) -> int | None:
    return None if dim is None else check_int(op, "dim", dim)


def _as_slice(t: Tensor, dim: int | None) -> Tensor:
    """A 0-D tensor as one slice of one element when ``dim`` is 0 or -1 (torch's convention)."""
    return t.reshape(1) if t.dim() == 0 and dim in (0, -1) else t


def topk_mask(scores: Any, sparsity: float, *, dim: int | None = None) -> Any:
    """Keep-mask pruning exactly ``floor(sparsity * n)`` lowest-scoring entries of each slice.

    ``dim=None`` ranks the whole tensor (index = row-major flat index); otherwise every 1-D slice
    along ``dim`` is ranked on its own (``dim=-1`` on a ``(out, in)`` weight compares within each
    output row, as Wanda does). O(n) radix selection, no sort and no size limit.

    >>> spruce.topk_mask(torch.tensor([[3., 1., 2., 1.]]), 0.5, dim=-1)
    tensor([[ True, False,  True, False]])
    """
    t, np_in = as_tensor("topk_mask", "scores", scores)
    s = check_number("topk_mask", "sparsity", sparsity)
    d = _dim("topk_mask", dim)
    return back(_ops.topk_mask(_as_slice(t, d), s, d).reshape(t.shape), np_in)


def global_topk_masks(scores: Sequence[Any], sparsity: float) -> list[Any]:
    """Keep-masks for many tensors under one threshold.

    Exactly ``floor(sparsity * total)`` entries are pruned over all tensors together (which may
    differ in shape and dtype), ties broken by tensor position, then flat index. The tensors are
    never concatenated: the extra memory is a few histograms, whatever the total size (2^31
    elements and beyond).
    """
    if isinstance(scores, (Tensor,)) or not isinstance(scores, Sequence):
        raise ArgumentError(
            f"global_topk_masks: scores ({type(scores).__name__}) must be a sequence of tensors"
        )
    pairs = [as_tensor("global_topk_masks", "scores", s) for s in scores]
    s = check_number("global_topk_masks", "sparsity", sparsity)
    masks = _ops.global_topk_masks([t for t, _ in pairs], s)
    return [back(m, np_in) for m, (_, np_in) in zip(masks, pairs, strict=True)]


def nm_mask(scores: Any, n: int, m: int, *, dim: int = -1) -> Any:
    """Keeps the ``n`` largest of every ``m`` consecutive entries along ``dim`` (2:4 keeps 2 of 4).

    On a ``(out, in)`` weight the default ``dim=-1`` groups along the input dimension, as
    NVIDIA's 2:4 sparse tensor cores and Wanda/SparseGPT expect. Ties keep the higher index. The
    size along ``dim`` must be divisible by ``m`` (else :class:`spruce.ShapeError`).
    """
    t, np_in = as_tensor("nm_mask", "scores", scores)
    n = check_int("nm_mask", "n", n)
    m = check_int("nm_mask", "m", m)
    d = check_int("nm_mask", "dim", dim)
    return back(_ops.nm_mask(_as_slice(t, d), n, m, d).reshape(t.shape), np_in)


def structured_mask(
    scores: Any,
    sparsity: float,
    *,
    dim: int = 0,
    group_size: int = 1,
    norm: float = 2,
) -> Any:
    """Keeps or prunes whole slices along ``dim`` (rows, columns, channels, heads).

    Slices are taken in groups of ``group_size`` consecutive ones (e.g. the rows of one attention
    head), each group ranked by the L1, L2 or L-inf norm (``norm`` = 1, 2 or ``inf``) of all its
    entries, accumulated in float64; exactly ``floor(sparsity * groups)`` groups are pruned. The
    mask has the shape of ``scores``.
    """
    t, np_in = as_tensor("structured_mask", "scores", scores)
    s = check_number("structured_mask", "sparsity", sparsity)
    gs = check_int("structured_mask", "group_size", group_size)
    p = check_number("structured_mask", "norm", norm)
    d = check_int("structured_mask", "dim", dim)
    return back(_ops.structured_mask(_as_slice(t, d), s, d, gs, p).reshape(t.shape), np_in)


def random_mask(
    shape: Sequence[int] | torch.Size,
    density: float,
    *,
    seed: int,
    device: str | torch.device = "cpu",
) -> Tensor:
    """A mask keeping exactly ``round(density * n)`` entries chosen at random.

    The choice is a pure function of ``(shape, density, seed)``: the entries with the largest
    Philox4x32-10 counter-based random words, so the same seed gives the same mask on any
    machine, thread count or chunking.
    """
    if isinstance(shape, int):
        shape = (shape,)
    dims = [check_int("random_mask", "shape", d, lo=0) for d in shape]
    d = check_number("random_mask", "density", density)
    sd = check_int("random_mask", "seed", seed, lo=0, hi=2**63 - 1)
    return _ops.random_mask(dims, d, sd, torch.device(device))


def kthvalue(x: Any, k: int, *, dim: int | None = None) -> KthValue:
    """The k-th smallest value (1-based, as ``torch.kthvalue``) and its index, exactly, in O(n).

    ``dim=None`` selects over the whole tensor (the index is then a flat index); otherwise per
    slice along ``dim`` (keepdim=False). Among equal values the lower index ranks first.
    Differentiable in ``x``.
    """
    t, np_in = as_tensor("kthvalue", "input", x)
    d = _dim("kthvalue", dim)
    v, i = _ops.kthvalue(_as_slice(t, d), check_int("kthvalue", "k", k), d)
    return KthValue(back(v, np_in), back(i, np_in))


def quantile(
    x: Any, q: float | Sequence[float] | Tensor | np.ndarray, *, dim: int | None = None
) -> Any:
    """Quantiles with linear interpolation (``torch.quantile``'s default), exact, no size limit.

    ``q`` is a float (result shaped like the reduction) or a 1-D sequence (a leading dimension of
    ``len(q)``). Positions ``q * (n - 1)`` and the interpolation are computed in float64
    (``torch.quantile`` uses the input dtype, so float32 results may differ in the last ulp).
    ``torch.quantile`` refuses inputs above 2^24 elements; this has no limit. Differentiable in
    ``x``.
    """
    t, np_in = as_tensor("quantile", "input", x)
    if isinstance(q, np.ndarray):
        q = torch.from_numpy(np.asarray(q, dtype=np.float64))
    scalar = not isinstance(q, (Sequence, Tensor))
    if isinstance(q, Tensor):
        if q.dim() > 1:
            raise ShapeError(f"quantile: q has shape {tuple(q.shape)}, expected a scalar or 1-D")
        scalar = q.dim() == 0
        qs = [float(v) for v in q.reshape(-1).tolist()]
    elif scalar:
        qs = [check_number("quantile", "q", q)]
    else:
        qs = [check_number("quantile", "q", v) for v in q]  # type: ignore[union-attr]
    d = _dim("quantile", dim)
    values, _, _ = _ops.quantile(_as_slice(t, d), qs, d)
    return back(values[0] if scalar else values, np_in)


def pack_mask(mask: Any) -> Any:
    """Packs a bool mask into bits along the last dimension: ``ceil(cols / 8)`` bytes per row,
    little bit order, equal to ``numpy.packbits(mask, axis=-1, bitorder="little")`` (the
    compressed-tensors "sparse-bitmask" layout)."""
    t, np_in = as_tensor("pack_mask", "mask", mask)
    return back(_ops.pack_mask(t), np_in)


def unpack_mask(packed: Any, shape: Sequence[int] | torch.Size) -> Any:
    """Inverts :func:`pack_mask` for a mask of ``shape``."""
    t, np_in = as_tensor("unpack_mask", "packed", packed)
    dims = [check_int("unpack_mask", "shape", d, lo=0) for d in shape]
    return back(_ops.unpack_mask(t, dims), np_in)


def mask_to_csr(weight: Any, mask: Any) -> tuple[Any, Any, Any]:
    """The kept entries of a 2-D weight as CSR ``(crow_indices, col_indices, values)``.

    Kept entries are stored even when their value is zero (``torch.Tensor.to_sparse_csr``
    drops zeros). ``torch.sparse_csr_tensor(*spruce.mask_to_csr(w, m), size=w.shape)`` builds
    the sparse tensor.
    """
    w, np_in = as_tensor("mask_to_csr", "weight", weight)
    m, _ = as_tensor("mask_to_csr", "mask", mask)
    return back(_ops.mask_to_csr(w, m), np_in)


def apply_mask_(tensor: Tensor, mask: Tensor) -> Tensor:
    """Zeroes ``tensor`` in place where ``mask`` is False; returns ``tensor``."""
    from ._native import check_bool

    if not isinstance(tensor, Tensor):
        raise ArgumentError(f"apply_mask_: tensor ({type(tensor).__name__}) must be a torch.Tensor")
    check_bool("apply_mask_", "mask", mask)
    if mask.shape != tensor.shape:
        raise ShapeError(
            f"apply_mask_: mask has shape {tuple(mask.shape)}, expected the tensor's shape "
            f"{tuple(tensor.shape)}"
        )
    _ops.apply_mask_(tensor, mask.to(tensor.device))
    return tensor


def sparsity(tensor_or_mask: Any) -> float:
    """The fraction of zeros of a tensor, or of False entries of a bool mask (0.0 when empty)."""
    t, _ = as_tensor("sparsity", "tensor_or_mask", tensor_or_mask)
    n = t.numel()
    if n == 0:
        return 0.0
    return 1.0 - int(torch.count_nonzero(t)) / n
