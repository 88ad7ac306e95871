"""Pure-PyTorch merging: the oracle of ``spruce.merge`` and the baselines of its benchmarks.

``merge(...)`` restates every method and preset plainly, one model at a time, in the order of
operations spruce documents (accumulator float32, or float64 for float64 inputs), so the native
results can be compared exactly. It sorts to rank, so it is slow and holds several copies of
every task vector. The random methods (DARE, DELLA) take their keep-masks as an argument.

``ties_stacked`` and ``task_arithmetic_stacked`` are written the way PEFT's and mergekit's torch
code work: stack every task vector, prune each with ``topk``, mask, reduce over the stack. They are
the baselines the benchmarks time spruce against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "CONVENTIONS",
    "merge",
    "trim_mask",
    "outlier_mask",
    "della_probabilities",
    "ties_stacked",
    "task_arithmetic_stacked",
]

# How each method combines and sparsifies.
_METHODS = {
    "linear": ("linear", None),
    "task_arithmetic": ("sum", None),
    "ties": ("ties", "magnitude"),
    "magnitude_prune": ("sum", "magnitude"),
    "dare_linear": ("sum", "random"),
    "dare_ties": ("ties", "random"),
    "della": ("ties", "rank"),
    "della_ties": ("ties", "rank"),
    "della_linear": ("sum", "rank"),
    "breadcrumbs": ("sum", "outliers"),
    "breadcrumbs_ties": ("ties", "outliers"),
    "pcb": ("pcb", None),
    "fisher": ("fisher", None),
    "slerp": ("slerp", None),
    "transfer": ("transfer", None),
}

#: What each preset means, written out.
CONVENTIONS = {
    # sign election on w*u, a tie elects nothing, divide by the agreeing weights; DARE keeps
    # exactly floor(d n) and rescales by n / K; DELLA p = (d - eps) + 2 eps r / n, rescale 1 / p
    "spruce": dict(
        weighted=True, zero_positive=False, divisor="weight", random="exact", rescale="inverse",
        rank="paper", eps=0.1, normalize=(),
    ),
    # mergekit: weighted election, +1 on ties, divisor = agreeing weights when normalizing,
    # Bernoulli drops, L1 rescale, DELLA ranks min-max scaled, eps 0.15, per-method normalize
    "mergekit": dict(
        weighted=True, zero_positive=True, divisor="weight", random="bernoulli", rescale="l1",
        rank="minmax", eps=0.15, normalize=("ties", "della", "della_ties"),
    ),
    # PEFT: unweighted election, +1 on ties, divide by the agreeing count, Bernoulli, 1 / d
    "peft": dict(
        weighted=False, zero_positive=True, divisor="count", random="bernoulli", rescale="inverse",
        rank="paper", eps=0.1, normalize=(),
    ),
    # the papers: unweighted election, sgn(0) = 0, disjoint mean (count), 1 / keep probability
    "paper": dict(
        weighted=False, zero_positive=False, divisor="count", random="bernoulli", rescale="inverse",
        rank="paper", eps=0.1, normalize=(),
    ),
}  # fmt: skip


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def trim_mask(tau: Tensor, density: float) -> Tensor:
    """Keeps the ``floor(density * n)`` largest ``|tau|``; among equal magnitudes the lower flat
    index is dropped first (a stable ascending sort)."""
    flat = tau.abs().reshape(-1)
    n = flat.numel()
    keep = min(n, math.floor(density * n))
    order = torch.sort(flat, stable=True).indices
    mask = torch.ones(n, dtype=torch.bool)
    mask[order[: n - keep]] = False
    return mask.reshape(tau.shape)


def outlier_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model breadcrumbs: drop the ``floor(gamma n)`` largest and the smallest ``|tau|`` so that
    ``floor(density n)`` remain (fewer outliers when the two overlap)."""
    flat = tau.abs().reshape(-1)
    n = flat.numel()
    keep = min(n, math.floor(density * n))
    n_top = min(n, math.floor(gamma * n))
    n_bot = n - keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = torch.sort(flat, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot : n - n_top]] = True
    return mask.reshape(tau.shape)


def della_probabilities(tau: Tensor, density: float, epsilon: float, rule: str) -> Tensor:
    """DELLA's keep probabilities (float64): within each row of the last dimension (the whole
    tensor for 0-D/1-D), rank ``r`` of ``|tau|`` (0 = smallest, ties by index) gives
    ``(d - eps) + 2 eps * q``, ``q = r / len`` (paper) or ``r / (len - 1)`` (minmax)."""
    rows = tau.reshape(1, -1) if tau.dim() <= 1 else tau.reshape(-1, tau.shape[-1])
    length = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(length).expand_as(order))
    denom = float(length) if rule == "paper" else max(float(length) - 1.0, 1.0)
    p = (density - epsilon) + (2.0 * epsilon) * (ranks.to(torch.float64) / denom)
    return p.reshape(tau.shape)


def _sparsified(
    kind: str | None,
    tau: Tensor,
    d: float,
    conv: dict,
    mask: Tensor | None,
    gamma: float,
    eps: float,
    rescale: str,
) -> tuple[Tensor, Tensor]:
    """``(u, mult)``: the sparsified task vector ``tau * mult`` and its multipliers."""
    acc = tau.dtype
    n = tau.numel()
    zeros = torch.zeros_like(tau)
    if kind is None:
        return tau * torch.ones_like(tau), torch.ones_like(tau)
    if d == 0.0:
        return tau * zeros, zeros
    kept = min(n, math.floor(d * n))
    if kind in ("magnitude", "outliers"):
        m = trim_mask(tau, d) if kind == "magnitude" else outlier_mask(tau, d, gamma)
        if mask is not None:
            m = mask
        if kept == 0:
            return tau * zeros, zeros
        f = n / kept if rescale == "inverse" else 1.0
    elif kind == "random":
        if mask is None:
            if d == 1.0:
                mask = torch.ones(tau.shape, dtype=torch.bool)
            else:
                raise ValueError("the reference needs the keep-masks of the random methods")
        m = mask
        if conv["random"] == "exact":
            if kept == 0:
                return tau * zeros, zeros
            f = n / kept if rescale == "inverse" else 1.0
        else:
            f = 1.0 / d if rescale == "inverse" else 1.0
    elif kind == "rank":
        if d == 1.0:
            m = torch.ones(tau.shape, dtype=torch.bool) if mask is None else mask
            f = 1.0
        else:
            if mask is None:
                raise ValueError("the reference needs the keep-masks of the random methods")
            m = mask
            if rescale == "inverse":
                p = della_probabilities(tau, d, eps, conv["rank"])
                mult = torch.where(m, (1.0 / p).to(acc), torch.zeros((), dtype=acc))
                return tau * mult, mult
            f = 1.0
    else:
        raise ValueError(kind)
    if rescale == "l1":
        before = float(tau.abs().to(torch.float64).sum())
        after = float((tau.abs() * m).to(torch.float64).sum())
        f = 1.0 if (before < 1e-7 or after < 1e-7) else before / after
    mult = torch.where(m, torch.tensor(f, dtype=acc), torch.zeros((), dtype=acc))
    return tau * mult, mult


def _pcb(base: Tensor, taus: list[Tensor], ratios: list[float], weights: list[float]) -> Tensor:
    """PCB-merging of one tensor in float64 (see ``spruce_core::merge::merge``)."""
    n, d = len(taus), taus[0].numel()
    flat = [t.reshape(-1).to(torch.float64) for t in taus]
    total = torch.zeros(d, dtype=torch.float64)
    for t in flat:
        total = total + t
    num = torch.zeros(d, dtype=torch.float64)
    den = torch.zeros(d, dtype=torch.float64)
    for t, r, w in zip(flat, ratios, weights, strict=True):
        mag = t.abs()
        srt = torch.sort(mag).values
        lo = srt[min(int(d * 1e-4), d - 1)]
        hi = srt[min(max(int(d * (1 - 1e-4) - 1), 0), d - 1)]
        span = hi - lo
        x = (mag.clamp(lo, hi) - lo) / span if span > 0 else torch.zeros_like(mag)
        beta = torch.exp(n * (x * x)) * torch.tanh(t * total)
        idx = int(d * (1 - r))
        if idx >= d:
            s = torch.zeros_like(beta)
        else:
            sb = torch.sort(beta).values
            blo, bhi = sb[idx], sb[d - 1]
            s = (beta.clamp(min=blo) - blo) / (bhi - blo) if bhi > blo else torch.zeros_like(beta)
        clipped = torch.where(t == 0, torch.zeros_like(t), t.sign() * mag.clamp(lo, hi))
        num = num + clipped * w * s
        den = den + s
    return num / den.clamp(min=1e-12)


def merge(
    method: str,
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    *,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    preset: str = "spruce",
    masks: Sequence[Tensor] | None = None,
    fisher: Sequence[Tensor] | None = None,
    gamma: float = 0.01,
    epsilon: float | None = None,
    t: float = 0.5,
    fisher_floor: float = 1e-6,
    normalize: bool | None = None,
) -> Tensor:
    """The merged tensor, computed plainly (see the module docstring)."""
    combine, kind = _METHODS[method]
    conv = CONVENTIONS[preset]
    n = len(finetuned)
    ws = [1.0] * n if weights is None else [float(w) for w in weights]
    ds = [float(density)] * n if isinstance(density, (int, float)) else [float(d) for d in density]
    ref = base if base is not None else finetuned[0]
    acc = _acc(ref)
    out_dtype = ref.dtype
    models = [m.to(acc) for m in finetuned]
    w = [torch.tensor(x, dtype=acc) for x in ws]
    lam = torch.tensor(scale, dtype=acc)
    if combine == "linear":
        s = torch.zeros_like(models[0])
        for wk, m in zip(w, models, strict=True):
            s = s + wk * m
        wsum = torch.zeros((), dtype=acc)
        for wk in w:
            wsum = wsum + wk
        norm = True if normalize is None else normalize
        return (s / wsum if norm else s).to(out_dtype)
    if combine == "fisher":
        assert fisher is not None
        num = torch.zeros_like(models[0])
        den = torch.zeros_like(models[0])
        floor = torch.tensor(fisher_floor, dtype=acc)
        for wk, m, f in zip(w, models, fisher, strict=True):
            a = wk * torch.maximum(f.to(acc), floor)
            num = num + a * m
            den = den + a
        return (num / den).to(out_dtype)
    assert base is not None
    b = base.to(acc)
    if combine == "slerp":
        x, y = b.to(torch.float64).reshape(-1), models[0].to(torch.float64).reshape(-1)
        na, nb = float(x.norm()), float(y.norm())
        na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
        dot = float((x * y).sum()) / (na * nb)
        if abs(dot) > 0.9995:
            c0, c1 = 1.0 - t, t
        else:
            th = math.acos(dot)
            c0, c1 = math.sin(th - th * t) / math.sin(th), math.sin(th * t) / math.sin(th)
        return (torch.tensor(c0, dtype=acc) * b + torch.tensor(c1, dtype=acc) * models[0]).to(
            out_dtype
        )
    if combine == "transfer":
        return (b + lam * (models[0] - models[1])).to(out_dtype)
    taus = [m - b for m in models]
    if combine == "pcb":
        merged = _pcb(b, taus, ds, ws)
        return (b.to(torch.float64) + scale * merged.reshape(b.shape)).to(out_dtype)
    if kind == "random":
        rescale = conv["rescale"]
    elif kind == "rank":
        rescale = conv["rescale"]
    else:
        rescale = "none"
    eps = epsilon
    if kind == "rank" and eps is None:
        eps = min([conv["eps"], *[min(d, 1 - d) for d in ds if 0 < d < 1]])
    us, _ = zip(
        *[
            _sparsified(
                kind, tau, d, conv, None if masks is None else masks[k], gamma, eps or 0.0, rescale
            )
            for k, (tau, d) in enumerate(zip(taus, ds, strict=True))
        ],
        strict=True,
    )
    if combine == "sum":
        norm = bool(normalize) if normalize is not None else method in conv["normalize"]
        s = torch.zeros_like(b)
        for wk, u in zip(w, us, strict=True):
            s = s + wk * u
        if norm:
            wsum = torch.zeros((), dtype=acc)
            for wk in w:
                wsum = wsum + wk
            if abs(float(wsum)) < 1e-8:
                wsum = torch.ones((), dtype=acc)
            s = s / wsum
        return (b + lam * s).to(out_dtype)
    # TIES: elect, agree, disjoint mean
    votes = [wk * u if conv["weighted"] else u for wk, u in zip(w, us, strict=True)]
    total = torch.zeros_like(b)
    for v in votes:
        total = total + v
    g = torch.sign(total)
    if conv["zero_positive"]:
        g = torch.where(g == 0, torch.ones_like(g), g)
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    cnt = torch.zeros_like(b)
    for wk, u, v in zip(w, us, votes, strict=True):
        agree = (torch.sign(v) == g) & (g != 0)
        num = num + torch.where(agree, wk * u, torch.zeros_like(u))
        den = den + torch.where(agree, wk, torch.zeros_like(u))
        cnt = cnt + agree.to(acc)
    divisor = conv["divisor"]
    if normalize is False:
        divisor = "none"
    if preset == "mergekit":
        norm = method in conv["normalize"] if normalize is None else normalize
        divisor = "weight" if norm else "none"
    if divisor == "count":
        delta = num / cnt.clamp(min=1)
    elif divisor == "weight":
        delta = num / torch.where(den == 0, torch.ones_like(den), den)
    else:
        delta = num
    delta = torch.where(g == 0, torch.zeros_like(delta), delta)
    return (b + lam * delta).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Baselines written the way PEFT and mergekit write them


def _topk_prune(tau: Tensor, density: float) -> Tensor:
    """PEFT's magnitude pruning: ``topk`` of ``|tau|`` and a scattered mask."""
    k = int(density * tau.numel())
    mask = torch.zeros_like(tau).reshape(-1)
    idx = torch.topk(tau.abs().reshape(-1), k=k, largest=True).indices
    mask[idx] = 1
    return tau * mask.reshape(tau.shape)


def ties_stacked(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    density: float,
    *,
    convention: str = "mergekit",
) -> Tensor:
    """TIES as the tools compute it: stack the task vectors, prune each with ``topk``, elect on
    the stack, reduce. ``convention``: ``"mergekit"`` (weighted election, divide by the agreeing
    weights) or ``"peft"`` (unweighted election, divide by the agreeing count)."""
    deltas = torch.stack([_topk_prune(m - base, density) for m in finetuned], dim=0)
    w = torch.tensor(list(weights), dtype=deltas.dtype).view(-1, *([1] * base.dim()))
    weighted = deltas * w
    elect_on = weighted if convention == "mergekit" else deltas
    sign = torch.where(elect_on.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    mask = elect_on.sign() == sign
    mixed = (weighted * mask).sum(dim=0)
    if convention == "mergekit":
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        divisor = mask.sum(dim=0).clamp(min=1)
    return (base + mixed / divisor).to(base.dtype)


def task_arithmetic_stacked(
    base: Tensor, finetuned: Sequence[Tensor], weights: Sequence[float], scale: float = 1.0
) -> Tensor:
    """Task arithmetic as the tools compute it: stack, weight, sum."""
    deltas = torch.stack([m - base for m in finetuned], dim=0)
    w = torch.tensor(list(weights), dtype=deltas.dtype).view(-1, *([1] * base.dim()))
    return (base + scale * (deltas * w).sum(dim=0)).to(base.dtype)
