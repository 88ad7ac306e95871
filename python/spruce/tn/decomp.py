"""Tensor-train (TT), matrix-product-operator (MPO) and Tucker decompositions, in torch.

Everything runs with ``torch.linalg`` on the input's device and dtype (no detour through the
CPU) and is differentiable where the underlying factorizations are.

* :func:`tt_svd` (Oseledets' TT-SVD): cores ``(r_k, n_k, r_{k+1})`` with ``r_0 = r_d = 1``. With
  ``eps`` every step truncates at ``eps / sqrt(d - 1) * ||T||_F``, which guarantees
  ``||T - TT||_F <= eps * ||T||_F``; ``max_rank`` caps the ranks on top of that.
* :func:`tt_round`: re-truncates an existing TT (orthogonalize right to left, truncated SVDs
  left to right) with the same guarantee relative to the TT's norm.
* :func:`mpo_decompose`: a ``(out, in)`` matrix as an MPO / TT-matrix with cores
  ``(r_k, in_k, out_k, r_{k+1})`` (``in_features = prod(in_modes)``, row-major).
* :func:`tucker`: HOSVD, optionally refined by HOOI sweeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ArgumentError, ShapeError

__all__ = [
    "tt_svd",
    "tt_to_tensor",
    "tt_round",
    "tt_ranks",
    "mpo_decompose",
    "mpo_to_matrix",
    "tucker",
    "tucker_to_tensor",
    "balanced_modes",
]


def _ranks_arg(op: str, max_rank: Any, d: int) -> list[int | None]:
    """Per-bond caps (``d - 1`` bonds)."""
    if max_rank is None:
        return [None] * (d - 1)
    if isinstance(max_rank, int) and not isinstance(max_rank, bool):
        if max_rank < 1:
            raise ArgumentError(f"{op}: max_rank ({max_rank}) must be >= 1")
        return [max_rank] * (d - 1)
    ranks = list(max_rank)
    if len(ranks) == d + 1 and ranks[0] == 1 and ranks[-1] == 1:
        ranks = ranks[1:-1]
    if len(ranks) != d - 1 or any(not isinstance(r, int) or r < 1 for r in ranks):
        raise ArgumentError(
            f"{op}: max_rank ({max_rank!r}) must be an int >= 1 or {d - 1} such ints "
            f"(one per bond), optionally framed by the boundary ranks 1"
        )
    return ranks


def _eps_arg(op: str, eps: Any) -> float | None:
    if eps is None:
        return None
    e = float(eps)
    if not (math.isfinite(e) and e >= 0):
        raise ArgumentError(f"{op}: eps ({eps!r}) must be a finite number >= 0")
    return e


def _truncate(s: torch.Tensor, delta: float | None, cap: int | None) -> int:
    """Smallest rank whose discarded tail has norm <= delta, then capped."""
    r = s.numel()
    if delta is not None and r > 0:
        tail = torch.cumsum(s.flip(0) ** 2, 0).flip(0)  # tail[i] = sum_{j >= i} s_j^2
        ok = (tail <= delta**2).nonzero()
        r = int(ok[0]) if ok.numel() else r
        r = max(r, 1)
    if cap is not None:
        r = min(r, cap)
    return max(r, 1)


def _check_float(op: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ArgumentError(f"{op}: tensor must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ArgumentError(f"{op}: tensor has dtype {t.dtype}, expected a floating dtype")
    return t


def tt_svd(
    tensor: torch.Tensor, *, max_rank: Any = None, eps: float | None = None
) -> list[torch.Tensor]:
    """TT-SVD: cores ``(r_k, n_k, r_{k+1})`` whose contraction approximates ``tensor``.

    With ``eps`` the relative Frobenius error is at most ``eps``; ``max_rank`` (an int or one
    per bond) caps the ranks (the guarantee then holds only if the cap does not bind). Neither:
    exact (ranks limited only by the matrix sizes). Half-precision inputs are factored in float32
    and the cores returned in the input dtype.
    """
    t = _check_float("tt_svd", tensor)
    if t.dim() < 1:
        raise ShapeError("tt_svd: tensor must have at least one dimension")
    d = t.dim()
    caps = _ranks_arg("tt_svd", max_rank, d)
    e = _eps_arg("tt_svd", eps)
    work = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    delta = None if e is None else e / math.sqrt(max(d - 1, 1)) * float(torch.linalg.norm(work))
    shape = list(t.shape)
    cores = []
    rem = work.reshape(1, -1)
    r = 1
    for k in range(d - 1):
        mat = rem.reshape(r * shape[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        rk = _truncate(s, delta, caps[k])
        cores.append(u[:, :rk].reshape(r, shape[k], rk))
        rem = s[:rk, None] * vh[:rk]
        r = rk
    cores.append(rem.reshape(r, shape[-1], 1))
    return [c.to(t.dtype) for c in cores]


def _check_cores(op: str, cores: Sequence[torch.Tensor], ndim: int) -> None:
    if len(cores) == 0:
        raise ArgumentError(f"{op}: cores must be a non-empty sequence of tensors")
    prev = 1
    for k, c in enumerate(cores):
        if not isinstance(c, torch.Tensor) or c.dim() != ndim:
            raise ShapeError(f"{op}: core {k} must be a {ndim}-d tensor")
        if c.shape[0] != prev:
            raise ShapeError(
                f"{op}: core {k} has shape {tuple(c.shape)}, expected leading rank {prev}"
            )
        prev = c.shape[-1]
    if prev != 1:
        raise ShapeError(f"{op}: the last core has trailing rank {prev}, expected 1")


def tt_ranks(cores: Sequence[torch.Tensor]) -> list[int]:
    """``[1, r_1, ..., r_{d-1}, 1]``."""
    return [int(cores[0].shape[0])] + [int(c.shape[-1]) for c in cores]


def tt_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contracts TT cores ``(r_k, n_k, r_{k+1})`` into the full tensor."""
    _check_cores("tt_to_tensor", cores, 3)
    out = cores[0].reshape(cores[0].shape[1], -1)
    shape = [cores[0].shape[1]]
    for c in cores[1:]:
        out = (out @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
        shape.append(c.shape[1])
    return out.reshape(shape)


def tt_round(
    cores: Sequence[torch.Tensor], *, max_rank: Any = None, eps: float | None = None
) -> list[torch.Tensor]:
    """Re-truncates a TT: relative error (to the TT) at most ``eps``; ranks capped by ``max_rank``."""
    _check_cores("tt_round", cores, 3)
    d = len(cores)
    caps = _ranks_arg("tt_round", max_rank, d)
    e = _eps_arg("tt_round", eps)
    cs = [c.clone() for c in cores]
    # Right-to-left orthogonalization: every core but the first becomes right-orthogonal.
    for k in range(d - 1, 0, -1):
        r0, n, r1 = cs[k].shape
        q, rr = torch.linalg.qr(cs[k].reshape(r0, n * r1).mT)
        cs[k] = q.mT.reshape(-1, n, r1)
        cs[k - 1] = torch.tensordot(cs[k - 1], rr.mT, dims=([2], [0]))
    norm = float(torch.linalg.norm(cs[0]))
    delta = None if e is None else e / math.sqrt(max(d - 1, 1)) * norm
    for k in range(d - 1):
        r0, n, r1 = cs[k].shape
        u, s, vh = torch.linalg.svd(cs[k].reshape(r0 * n, r1), full_matrices=False)
        rk = _truncate(s, delta, caps[k])
        cs[k] = u[:, :rk].reshape(r0, n, rk)
        cs[k + 1] = torch.tensordot(s[:rk, None] * vh[:rk], cs[k + 1], dims=([1], [0]))
    return cs


def balanced_modes(n: int, d: int) -> list[int]:
    """Splits ``n`` into ``d`` factors as equal as possible (descending), e.g. 4096, 3 -> [16, 16, 16]."""
    if n < 1 or d < 1:
        raise ArgumentError(f"balanced_modes: n ({n}) and d ({d}) must be >= 1")
    primes = []
    m, p = n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    modes = [1] * d
    for q in sorted(primes, reverse=True):
        i = min(range(d), key=lambda j: modes[j])
        modes[i] *= q
    return sorted(modes, reverse=True)


def _modes_arg(op: str, name: str, modes: Sequence[int], n: int) -> list[int]:
    ms = [int(m) for m in modes]
    if any(m < 1 for m in ms) or math.prod(ms) != n:
        raise ShapeError(f"{op}: {name} {ms} must be positive and multiply to {n}")
    return ms


def mpo_decompose(
    weight: torch.Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    *,
    max_rank: Any = None,
    eps: float | None = None,
) -> list[torch.Tensor]:
    """An ``(out, in)`` matrix (``nn.Linear.weight`` layout) as MPO cores ``(r_k, in_k, out_k, r_{k+1})``.

    ``weight[o, i]`` with ``o`` and ``i`` row-major over ``out_modes`` and ``in_modes``. The
    decomposition is a TT-SVD of the tensor with paired modes ``(in_k, out_k)``, so ``eps`` and
    ``max_rank`` behave as in :func:`tt_svd` (relative Frobenius error of the matrix).
    """
    w = _check_float("mpo_decompose", weight)
    if w.dim() != 2:
        raise ShapeError(f"mpo_decompose: weight has shape {tuple(w.shape)}, expected (out, in)")
    im = _modes_arg("mpo_decompose", "in_modes", in_modes, w.shape[1])
    om = _modes_arg("mpo_decompose", "out_modes", out_modes, w.shape[0])
    if len(im) != len(om):
        raise ShapeError(
            f"mpo_decompose: in_modes {im} and out_modes {om} must have the same length"
        )
    d = len(im)
    t = w.reshape(om + im)
    perm = [x for k in range(d) for x in (d + k, k)]
    t = t.permute(perm).reshape([im[k] * om[k] for k in range(d)])
    cores = tt_svd(t, max_rank=max_rank, eps=eps)
    return [c.reshape(c.shape[0], im[k], om[k], c.shape[-1]) for k, c in enumerate(cores)]


def mpo_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``(out, in)`` matrix of MPO cores ``(r_k, in_k, out_k, r_{k+1})``."""
    _check_cores("mpo_to_matrix", cores, 4)
    d = len(cores)
    im = [c.shape[1] for c in cores]
    om = [c.shape[2] for c in cores]
    t = tt_to_tensor([c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores])
    t = t.reshape([x for k in range(d) for x in (im[k], om[k])])
    t = t.permute([2 * k + 1 for k in range(d)] + [2 * k for k in range(d)])
    return t.reshape(math.prod(om), math.prod(im))


def _mode_product(t: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """Multiplies mode ``mode`` of ``t`` by ``m`` (shape (new, old))."""
    return torch.movedim(torch.tensordot(m, t, dims=([1], [mode])), 0, mode)


def _leading_vectors(t: torch.Tensor, mode: int, r: int) -> torch.Tensor:
    unf = torch.movedim(t, mode, 0).reshape(t.shape[mode], -1)
    u, _, _ = torch.linalg.svd(unf, full_matrices=False)
    return u[:, :r]


def tucker(
    tensor: torch.Tensor, ranks: Sequence[int], *, n_iter: int = 0, tol: float = 0.0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Tucker decomposition: ``(core, factors)`` with ``tensor ≈ core ×_k factors[k]``.

    HOSVD (leading left singular vectors of each unfolding), then ``n_iter`` HOOI sweeps
    (alternating updates; stops early when the core's norm improves by less than ``tol``
    relative). Factors have orthonormal columns, shape ``(n_k, r_k)``; a rank of ``n_k``
    keeps the mode whole.
    """
    t = _check_float("tucker", tensor)
    rs = [int(r) for r in ranks]
    if len(rs) != t.dim() or any(r < 1 or r > n for r, n in zip(rs, t.shape, strict=True)):
        raise ArgumentError(
            f"tucker: ranks {rs} must have one entry in [1, n_k] per mode of shape {tuple(t.shape)}"
        )
    work = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    factors = [_leading_vectors(work, k, r) for k, r in enumerate(rs)]
    prev = None
    for _ in range(int(n_iter)):
        for k in range(work.dim()):
            y = work
            for j, f in enumerate(factors):
                if j != k:
                    y = _mode_product(y, f.mT, j)
            factors[k] = _leading_vectors(y, k, rs[k])
        core = work
        for j, f in enumerate(factors):
            core = _mode_product(core, f.mT, j)
        norm = float(torch.linalg.norm(core))
        if prev is not None and abs(norm - prev) <= tol * max(prev, 1e-30):
            break
        prev = norm
    core = work
    for j, f in enumerate(factors):
        core = _mode_product(core, f.mT, j)
    return core.to(t.dtype), [f.to(t.dtype) for f in factors]


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``core ×_k factors[k]``."""
    if len(factors) != core.dim():
        raise ShapeError(f"tucker_to_tensor: {len(factors)} factors for a {core.dim()}-d core")
    out = core
    for k, f in enumerate(factors):
        out = _mode_product(out, f, k)
    return out
