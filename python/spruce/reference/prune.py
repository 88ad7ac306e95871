"""Plain pure-torch formulas of spruce.prune: the oracles of the tests and the baselines of the
benchmarks. Written for clarity, not speed.

Includes re-derivations of the original Wanda and SparseGPT algorithms (sort-based selection),
with their selection rules kept as documented switches where they differ from spruce's exact
counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Selection by sorting


def keep_lowest_pruned(scores: Tensor, k: int) -> Tensor:
    """Keep-mask pruning the ``k`` lowest of a 1-D tensor by (score, index): a stable sort."""
    order = torch.sort(scores.reshape(-1).to(torch.float64), stable=True).indices
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.reshape(scores.shape)


def topk_keep(scores: Tensor, sparsity: float, dim: int | None = None) -> Tensor:
    """Exact ``floor(sparsity * n)`` pruned per slice along ``dim`` (None: whole tensor)."""
    if dim is None:
        return keep_lowest_pruned(scores, math.floor(sparsity * scores.numel()))
    moved = scores.movedim(dim, -1)
    n = moved.shape[-1]
    k = math.floor(sparsity * n)
    rows = moved.reshape(-1, n)
    keep = torch.stack([keep_lowest_pruned(r, k) for r in rows]) if rows.shape[0] else rows.bool()
    return keep.reshape(moved.shape).movedim(-1, dim)


def nm_keep(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive entries of each row (ties keep the
    higher index, i.e. prune the lowest by (score, index))."""
    rows, cols = scores.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g in range(0, cols, m):
            keep[r, g : g + m] = keep_lowest_pruned(scores[r, g : g + m], m - n)
    return keep


# ---------------------------------------------------------------------------------------------
# Scores


def magnitude_scores(w: Tensor) -> Tensor:
    return w.abs()


def wanda_scores(w: Tensor, stat: Tensor) -> Tensor:
    """``|W| * sqrt(s)``, with torch's type promotion (float32 for half weights)."""
    return w.abs() * stat.to(torch.float32).sqrt().reshape(1, -1)


def movement_scores(ws: Iterable[Tensor], gs: Iterable[Tensor]) -> Tensor:
    return -sum((w.double() * g.double() for w, g in zip(ws, gs, strict=True)), torch.zeros(()))


def snip_scores(ws: Iterable[Tensor], gs: Iterable[Tensor]) -> Tensor:
    return sum(
        ((w.double() * g.double()).abs() for w, g in zip(ws, gs, strict=True)), torch.zeros(())
    )


def snip_momentum_scores(ws: Iterable[Tensor], gs: Iterable[Tensor], beta: float = 0.9) -> Tensor:
    s = torch.zeros(())
    for w, g in zip(ws, gs, strict=True):
        s = beta * s + (w.double() * g.double()).abs()
    return s


def fisher_scores(gs: Iterable[Tensor]) -> Tensor:
    return sum((g.double() ** 2 for g in gs), torch.zeros(()))


def taylor_scores(ws: Iterable[Tensor], gs: Iterable[Tensor]) -> Tensor:
    return sum(
        ((w.double() * g.double()) ** 2 for w, g in zip(ws, gs, strict=True)), torch.zeros(())
    )


# ---------------------------------------------------------------------------------------------
# Calibration statistics, as the original repositories accumulate them


def _samples(x: Tensor) -> tuple[Tensor, int]:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    return x.reshape(-1, x.shape[-1]), int(x.shape[0])


def wanda_statistic(batches: Sequence[Tensor]) -> Tensor:
    """Wanda's running statistic: ``s *= n/(n+b); n += b; s += ||X_j||^2 / n`` in float32."""
    s = None
    n = 0
    for x in batches:
        x2, b = _samples(x)
        xt = x2.t().to(torch.float32)
        if s is None:
            s = torch.zeros(xt.shape[0], dtype=torch.float32)
        s *= n / (n + b)
        n += b
        s += torch.norm(xt, p=2, dim=1) ** 2 / n
    assert s is not None
    return s


def sparsegpt_hessian(batches: Sequence[Tensor]) -> Tensor:
    """SparseGPT's ``H *= n/(n+b); n += b; X = sqrt(2/n) X; H += X X^T`` in float32."""
    h = None
    n = 0
    for x in batches:
        x2, b = _samples(x)
        xt = x2.t().to(torch.float32)
        if h is None:
            h = torch.zeros(xt.shape[0], xt.shape[0], dtype=torch.float32)
        h *= n / (n + b)
        n += b
        xt = math.sqrt(2 / n) * xt
        h += xt.matmul(xt.t())
    assert h is not None
    return h


# ---------------------------------------------------------------------------------------------
# The original selection code paths


def wanda_mask_repo(w: Tensor, stat: Tensor, sparsity: float, n: int = 0, m: int = 0) -> Tensor:
    """The Wanda repository's path: score, then a stable sort of every row and the first
    ``int(cols * sparsity)`` indices scattered as pruned (or, N:M, ``topk(largest=False)`` of
    ``m - n`` per group). Returns the keep-mask."""
    metric = wanda_scores(w, stat)
    pruned = torch.zeros_like(metric, dtype=torch.bool)
    if m:
        for g in range(0, metric.shape[1], m):
            tmp = metric[:, g : g + m].float()
            idx = torch.topk(tmp, m - n, dim=1, largest=False)[1]
            pruned.scatter_(1, g + idx, True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        pruned.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    return ~pruned


def magnitude_mask_repo(w: Tensor, sparsity: float) -> Tensor:
    """The Wanda repository's magnitude baseline: ``thr = sort(|W|)[int(numel * s)]`` and every
    ``|W| <= thr`` pruned, which prunes one entry more than ``floor(s * numel)`` on distinct
    values. Kept to document the difference: spruce prunes exactly ``floor(s * numel)``."""
    a = w.abs()
    thr = torch.sort(a.flatten())[0][int(a.numel() * sparsity)]
    return ~(a <= thr)


def magnitude_mask(w: Tensor, sparsity: float) -> Tensor:
    """Exact per-layer magnitude: ``floor(s * numel)`` lowest ``|W|`` pruned (ties: lower index)."""
    return topk_keep(w.abs(), sparsity)


def global_magnitude_masks(ws: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """Exact global magnitude over several tensors (concatenated, then a stable sort)."""
    flat = torch.cat([w.abs().reshape(-1).double() for w in ws])
    keep = keep_lowest_pruned(flat, math.floor(sparsity * flat.numel()))
    out, off = [], 0
    for w in ws:
        out.append(keep[off : off + w.numel()].reshape(w.shape))
        off += w.numel()
    return out


def sparsegpt(
    w: Tensor,
    h: Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    percdamp: float = 0.01,
    exact: bool = True,
) -> tuple[Tensor, Tensor]:
    """SparseGPT re-derived (float32 work, same order of operations as the paper's algorithm).
    Returns ``(pruned weight, keep-mask)``.

    Unstructured selection per block of columns on ``w^2 / U_ii^2`` pooled over the block's rows:
    ``exact=True`` prunes ``floor(sparsity * numel)`` by a stable sort (spruce's rule);
    ``exact=False`` is the original ``<= sort(...)[int(numel * sparsity)]`` rule (one more). N:M
    (``n`` kept of ``m``) at every ``m``-th column by the same score, ties pruning the lower index.
    """
    w = w.clone().float()
    h = h.clone().float()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    diag = torch.arange(cols)
    h[diag, diag] += damp
    hinv = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(hinv)
    hinv = torch.linalg.cholesky(hinv, upper=True)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if m == 0:
            tmp = w1**2 / d.reshape(1, -1) ** 2
            if exact:
                keep1 = topk_keep(tmp, sparsity)
            else:
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                keep1 = ~(tmp <= thresh)
        else:
            keep1 = torch.ones(rows, count, dtype=torch.bool)
        for i in range(count):
            col = w1[:, i]
            if m and i % m == 0:
                tmp = w1[:, i : i + m] ** 2 / d[i : i + m].reshape(1, -1) ** 2
                keep1[:, i : i + m] = nm_keep(tmp, n, m)
            q = col * keep1[:, i]
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            q1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = q1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    w[~keep] = 0
    return w, keep


# ---------------------------------------------------------------------------------------------
# Allocation, schedules, groups


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """OWL: the fraction of all scores above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    r = torch.tensor(ratios, dtype=torch.float64)
    if r.max() == r.min():
        return [sparsity] * len(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - r.mean() + (1 - sparsity)
    return [min(1.0, max(0.0, float(v))) for v in 1 - r]


def cubic_sparsity(t: int, final: float, initial: float, t0: int, n_dt: int, dt: int) -> float:
    if t < t0:
        return initial
    if t >= t0 + n_dt:
        return final
    t = t0 + (t - t0) // dt * dt
    return final + (initial - final) * (1 - (t - t0) / n_dt) ** 3


def group_norms(x: Tensor, dim: int, group_size: int, p: float) -> Tensor:
    moved = x.movedim(dim, 0).double()
    g = moved.reshape(moved.shape[0] // group_size, -1)
    return torch.linalg.vector_norm(g, p, dim=1)
