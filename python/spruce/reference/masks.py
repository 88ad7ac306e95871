"""Plain sort-based oracles of :mod:`spruce.masks`: the test oracles and the benchmark baselines.

Written for clarity, not speed. Every selection is a stable sort of the scores cast to float64
(exact for every supported dtype) with ``-0.0`` folded into ``+0.0``: the stable sort then ranks
by ``(score, index)`` ascending, and the first ``k`` of the order are the ``k`` pruned.

Torch tensors in, torch tensors out (CPU). Arguments are checked only as far as the semantics
need (the typed exceptions of :mod:`spruce.errors`); the thorough checks are spruce's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ArgumentError, NonFiniteError, ShapeError

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
    "philox4x32_10",
    "philox_words",
]

# ---------------------------------------------------------------------------------------------
# Helpers


def _check_fraction(op: str, arg: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ArgumentError(f"{op}: {arg} ({value}) must be a number in [0, 1]")
    return value


def _check_no_nan(op: str, arg: str, t: Tensor) -> None:
    if t.is_floating_point() and bool(torch.isnan(t).any()):
        raise NonFiniteError(f"{op}: {arg} contains NaN")


def _rank_keys(t: Tensor) -> Tensor:
    """The scores as float64 (exact) with -0.0 turned into +0.0: sorting these stably ranks by
    (score, index)."""
    x = t.to(torch.float64)
    return torch.where(x == 0, torch.zeros_like(x), x)


def _norm_dim(op: str, t: Tensor, dim: int) -> int:
    """A non-negative dim; a 0-D tensor accepts 0 and -1, as torch does."""
    nd = max(t.dim(), 1)
    if not -nd <= dim < nd:
        raise ArgumentError(
            f"{op}: dim ({dim}) must be in [{-nd}, {nd - 1}] for a tensor of shape {tuple(t.shape)}"
        )
    return dim % nd


def _prune_lowest(keys: Tensor, k: int) -> Tensor:
    """Keep-mask of the same shape as ``keys`` pruning, in every row of the last dimension, the
    ``k`` smallest by (key, index)."""
    order = torch.sort(keys, dim=-1, stable=True).indices
    keep = torch.ones(keys.shape, dtype=torch.bool)
    return keep.scatter(-1, order[..., :k], False)


def _rows_along(t: Tensor, dim: int | None) -> Tensor:
    """``t`` with the selected dimension moved last (``None``: flattened to one row)."""
    if dim is None or t.dim() == 0:
        return t.reshape(1, -1) if dim is None else t.reshape(1)
    return t.movedim(dim, -1)


def _from_rows(rows: Tensor, like: Tensor, dim: int | None) -> Tensor:
    if dim is None or like.dim() == 0:
        return rows.reshape(like.shape)
    return rows.movedim(-1, dim)


# ---------------------------------------------------------------------------------------------
# Top-k masks


def topk_mask(scores: Tensor, sparsity: float, *, dim: int | None = None) -> Tensor:
    """Keep-mask pruning exactly ``floor(sparsity * n)`` lowest-scoring entries of each slice
    along ``dim`` (``None``: of the whole tensor, ranked by row-major flat index)."""
    s = _check_fraction("topk_mask", "sparsity", sparsity)
    _check_no_nan("topk_mask", "scores", scores)
    d = None if dim is None else _norm_dim("topk_mask", scores, dim)
    rows = _rows_along(_rank_keys(scores), d)
    k = math.floor(s * rows.shape[-1])
    return _from_rows(_prune_lowest(rows, k), scores, d)


def global_topk_masks(scores: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """Keep-masks pruning exactly ``floor(sparsity * total)`` entries over all tensors at once,
    ties broken by tensor position, then flat index: one stable sort of the concatenation."""
    s = _check_fraction("global_topk_masks", "sparsity", sparsity)
    for t in scores:
        _check_no_nan("global_topk_masks", "scores", t)
    if not scores:
        return []
    flat = torch.cat([_rank_keys(t).reshape(-1) for t in scores])
    keep = _prune_lowest(flat, math.floor(s * flat.numel()))
    pieces = torch.split(keep, [t.numel() for t in scores])
    return [p.reshape(t.shape) for p, t in zip(pieces, scores, strict=True)]


def nm_mask(scores: Tensor, n: int, m: int, *, dim: int = -1) -> Tensor:
    """Keeps the ``n`` largest of every ``m`` consecutive entries along ``dim``: prunes the
    ``m - n`` smallest of each group by (value, index), so ties keep the higher index."""
    if m < 1:
        raise ArgumentError(f"nm_mask: m ({m}) must be >= 1")
    if not 0 <= n <= m:
        raise ArgumentError(f"nm_mask: n ({n}) must be in [0, m] = [0, {m}]")
    d = _norm_dim("nm_mask", scores, dim)
    _check_no_nan("nm_mask", "scores", scores)
    rows = _rows_along(_rank_keys(scores), d)
    length = rows.shape[-1]
    if length % m:
        raise ShapeError(
            f"nm_mask: scores has shape {tuple(scores.shape)}, expected a size divisible by "
            f"m ({m}) along dim {d}"
        )
    groups = rows.reshape(*rows.shape[:-1], length // m, m)
    keep = _prune_lowest(groups, m - n).reshape(rows.shape)
    return _from_rows(keep, scores, d)


def structured_mask(
    scores: Tensor,
    sparsity: float,
    *,
    dim: int = 0,
    group_size: int = 1,
    norm: float = 2,
) -> Tensor:
    """Keeps or prunes whole slices along ``dim`` in groups of ``group_size`` consecutive ones.

    Slice ``j``'s score, over every element with index ``j`` along ``dim``, in float64: L1 =
    sum |x|, L2 = sum x² (the squared norm ranks as the norm), inf = max |x|. A group's score is
    the sum (L1, L2) or the max (inf) of its slices'; the ``floor(sparsity * groups)`` lowest
    groups by (score, group index) are pruned.
    """
    s = _check_fraction("structured_mask", "sparsity", sparsity)
    if norm not in (1, 2, math.inf):
        raise ArgumentError(f"structured_mask: norm ({norm}) must be 1, 2 or inf")
    if group_size < 1:
        raise ArgumentError(f"structured_mask: group_size ({group_size}) must be >= 1")
    d = _norm_dim("structured_mask", scores, dim)
    _check_no_nan("structured_mask", "scores", scores)
    x = scores.to(torch.float64)
    x = x.reshape(1) if x.dim() == 0 else x
    length = x.shape[d]
    if length % group_size:
        raise ShapeError(
            f"structured_mask: scores has shape {tuple(scores.shape)}, expected a size "
            f"divisible by group_size ({group_size}) along dim {d}"
        )
    per_slice = x.movedim(d, 0).reshape(length, math.prod(x.shape) // max(length, 1))
    if norm == 1:
        slice_score = per_slice.abs().sum(dim=1)
    elif norm == 2:
        slice_score = (per_slice * per_slice).sum(dim=1)
    elif per_slice.shape[1] == 0:
        slice_score = torch.zeros(length, dtype=torch.float64)
    else:
        slice_score = per_slice.abs().amax(dim=1)
    grouped = slice_score.reshape(length // group_size, group_size)
    group_score = grouped.amax(dim=1) if norm == math.inf else grouped.sum(dim=1)
    n_groups = group_score.numel()
    keep_group = _prune_lowest(group_score, math.floor(s * n_groups))
    keep_slice = keep_group.repeat_interleave(group_size)
    view = [1] * x.dim()
    view[d] = length
    return keep_slice.reshape(view).expand(x.shape).reshape(scores.shape).clone()


# ---------------------------------------------------------------------------------------------
# Random masks (Philox4x32-10 in NumPy)

_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint64(0x9E3779B9)
_PHILOX_W1 = np.uint64(0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
    SC 2011), vectorized: ``ctr`` of shape ``(..., 4)`` and ``key`` of shape ``(..., 2)``
    (broadcast together), 32-bit words; returns ``(..., 4)`` uint32.

    One round: ``(hi0, lo0) = M0 * c0``, ``(hi1, lo1) = M1 * c2`` (64-bit products split into
    32-bit halves), then ``c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; between rounds the key
    is bumped by the Weyl constants ``(W0, W1)`` modulo 2^32. The arithmetic is done in uint64.
    """
    c = np.asarray(ctr, dtype=np.uint64)
    k = np.asarray(key, dtype=np.uint64)
    shape = np.broadcast_shapes(c.shape[:-1], k.shape[:-1])
    c0, c1, c2, c3 = (np.broadcast_to(c[..., i], shape).copy() for i in range(4))
    k0, k1 = (np.broadcast_to(k[..., i], shape).copy() for i in range(2))
    for r in range(10):
        if r > 0:
            k0 = (k0 + _PHILOX_W0) & _LOW32
            k1 = (k1 + _PHILOX_W1) & _LOW32
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _LOW32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _LOW32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def philox_words(n: int, seed: int) -> np.ndarray:
    """Element ``i``'s 32-bit word: output word ``i % 4`` of the Philox block with counter
    ``[b_lo, b_hi, 0, 0]`` (``b = i // 4``) and key ``[seed_lo32, seed_hi32]``."""
    blocks = np.arange((n + 3) // 4, dtype=np.uint64)
    ctr = np.zeros((blocks.size, 4), dtype=np.uint64)
    ctr[:, 0] = blocks & _LOW32
    ctr[:, 1] = blocks >> np.uint64(32)
    key = np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], dtype=np.uint64)
    return philox4x32_10(ctr, key).reshape(-1)[:n]


def random_mask(shape: Sequence[int] | torch.Size | int, density: float, *, seed: int) -> Tensor:
    """Keeps exactly ``round(density * n)`` entries (Python's round: ties to even): prunes the
    ``n - keep`` smallest Philox words by (word, index)."""
    d = _check_fraction("random_mask", "density", density)
    dims = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if any(s < 0 for s in dims):
        raise ArgumentError(f"random_mask: shape ({dims}) must have non-negative sizes")
    if seed < 0:
        raise ArgumentError(f"random_mask: seed ({seed}) must be >= 0")
    n = math.prod(dims)
    keep_count = round(d * n)
    words = philox_words(n, seed)
    order = np.argsort(words, kind="stable")
    keep = np.ones(n, dtype=bool)
    keep[order[: n - keep_count]] = False
    return torch.from_numpy(keep).reshape(dims)


# ---------------------------------------------------------------------------------------------
# Order statistics


def kthvalue(x: Tensor, k: int, *, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """The k-th smallest (1-based) by (value, index) and its index along ``dim`` (the flat index
    for ``None``), in the reduced shape (keepdim=False)."""
    d = None if dim is None else _norm_dim("kthvalue", x, dim)
    _check_no_nan("kthvalue", "input", x)
    rows = _rows_along(x, d)
    n = rows.shape[-1]
    if not 1 <= k <= n:
        raise ArgumentError(f"kthvalue: k ({k}) must be in [1, {n}]")
    order = torch.sort(_rank_keys(rows), dim=-1, stable=True).indices
    index = order[..., k - 1 : k]
    values = rows.gather(-1, index)
    out_shape = [] if d is None or x.dim() == 0 else [s for i, s in enumerate(x.shape) if i != d]
    return values.reshape(out_shape), index.reshape(out_shape)


def _round_once(v: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 -> ``dtype`` rounded once, to nearest, ties to even.

    float16 and bfloat16 go through float32 rounded to odd (truncate toward zero, then set the
    last bit when inexact): float32 keeps more than two extra bits, so the second rounding is
    exact. A plain ``.to(float32).to(dtype)`` would round twice.
    """
    if dtype in (torch.float32, torch.float64):
        return v.to(dtype)
    f = v.to(torch.float32)
    over = f.to(torch.float64).abs() > v.abs()
    f = torch.where(over, torch.nextafter(f, torch.zeros_like(f)), f)
    inexact = (f.to(torch.float64) != v).to(torch.int32)
    return (f.view(torch.int32) | inexact).view(torch.float32).to(dtype)


def quantile(
    x: Tensor, q: float | Sequence[float] | Tensor | np.ndarray, *, dim: int | None = None
) -> Tensor:
    """Linear-interpolation quantiles (torch's default rule), positions and interpolation in
    float64: ``pos = q (n - 1)``, ``a``/``b`` the order statistics at ``floor(pos)`` and
    ``min(ceil(pos), n - 1)``, ``a + (b - a)(pos - floor(pos))`` rounded once to the input dtype.

    A float ``q`` gives the reduced shape; a 1-D ``q`` a leading dimension of ``len(q)``.
    """
    if isinstance(q, np.ndarray):
        q = torch.from_numpy(q)
    if isinstance(q, Tensor):
        scalar, qs = q.dim() == 0, [float(v) for v in q.reshape(-1).tolist()]
    elif isinstance(q, Sequence):
        scalar, qs = False, [float(v) for v in q]
    else:
        scalar, qs = True, [float(q)]
    for v in qs:
        _check_fraction("quantile", "q", v)
    d = None if dim is None else _norm_dim("quantile", x, dim)
    _check_no_nan("quantile", "input", x)
    rows = _rows_along(x, d)
    n = rows.shape[-1]
    if n == 0:
        raise ShapeError(f"quantile: input has shape {tuple(x.shape)}, expected a non-empty dim")
    order = torch.sort(_rank_keys(rows), dim=-1, stable=True).indices
    ranked = rows.gather(-1, order).to(torch.float64)
    out_shape = [] if d is None or x.dim() == 0 else [s for i, s in enumerate(x.shape) if i != d]
    results = []
    for v in qs:
        pos = v * (n - 1)
        lo = math.floor(pos)
        hi = min(math.ceil(pos), n - 1)
        a, b = ranked[..., lo], ranked[..., hi]
        results.append(_round_once(a + (b - a) * (pos - lo), x.dtype).reshape(out_shape))
    if scalar:
        return results[0]
    return torch.stack(results) if results else x.new_empty((0, *out_shape))


# ---------------------------------------------------------------------------------------------
# Storage: packed bits and CSR


def pack_mask(mask: Tensor) -> Tensor:
    """Bits of each row of the last dimension, 8 per byte, bit ``j % 8`` of byte ``j // 8`` =
    ``mask[..., j]`` (little bit order), the last byte zero-padded. A 0-D mask is one row of 1."""
    m = mask.reshape(1) if mask.dim() == 0 else mask
    cols = m.shape[-1]
    nbytes = (cols + 7) // 8
    padded = torch.zeros(*m.shape[:-1], nbytes * 8, dtype=torch.int64)
    padded[..., :cols] = m.to(torch.int64)
    weights = 2 ** torch.arange(8, dtype=torch.int64)
    return (padded.reshape(*m.shape[:-1], nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_mask(packed: Tensor, shape: Sequence[int] | torch.Size) -> Tensor:
    """Inverts :func:`pack_mask` for a mask of ``shape`` (padding bits are ignored)."""
    dims = list(shape)
    rows_shape = dims[:-1] if dims else []
    cols = dims[-1] if dims else 1
    want = [*rows_shape, (cols + 7) // 8]
    if list(packed.shape) != want:
        raise ShapeError(
            f"unpack_mask: packed has shape {tuple(packed.shape)}, expected {tuple(want)} for a "
            f"mask of shape {tuple(dims)}"
        )
    bits = (packed.to(torch.int64)[..., None] >> torch.arange(8)) & 1
    flat_bits = bits.reshape(*rows_shape, want[-1] * 8)[..., :cols]
    return flat_bits.bool().reshape(dims)


def mask_to_csr(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CSR ``(crow_indices, col_indices, values)`` of the kept entries of a 2-D weight, in
    row-major order, kept zeros included."""
    if weight.dim() != 2:
        raise ShapeError(
            f"mask_to_csr: weight has shape {tuple(weight.shape)}, expected a 2-D matrix"
        )
    if mask.shape != weight.shape:
        raise ShapeError(
            f"mask_to_csr: mask has shape {tuple(mask.shape)}, expected {tuple(weight.shape)}"
        )
    counts = mask.sum(dim=1, dtype=torch.int64)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    cols = torch.nonzero(mask)[:, 1].to(torch.int64)
    return crow, cols, weight[mask]
