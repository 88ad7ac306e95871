"""KS-Lottery: the batched two-sample Kolmogorov–Smirnov test and the row selection it drives.

KS-Lottery (Yuan et al., 2024) compares each embedding row before and after fine-tuning with the
two-sample KS test; the rows whose distribution changed significantly are the "winning tickets"
(the paper finds a handful of tokens suffice for translation). :func:`ks_test` runs one test per
slice along ``dim`` in Rust, in parallel, equal to ``scipy.stats.ks_2samp`` on every slice:

- statistic: ``max |F_before - F_after|`` over all data points (ECDF differences ``i/n1 - j/n2``
  in float64);
- p-value, two-sided, with scipy's ``method``: ``"auto"`` (exact when both samples have at most
  10000 values, else asymptotic), ``"exact"`` (the lattice-path count; the statistic is then the
  nearest multiple of ``1/lcm(n1, n2)``, as scipy returns it) or ``"asymp"`` (the distribution
  of the one-sample statistic at ``n = round(n1 n2 / (n1 + n2))``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _ops
from .._native import as_tensor, back, check_int, check_number
from ..errors import ArgumentError, ShapeError
from ..masks import topk_mask

__all__ = ["ks_test", "ks_lottery", "KSResult", "KSLottery"]

_METHODS = ("auto", "exact", "asymp")


class KSResult(NamedTuple):
    """Per-slice KS statistic and two-sided p-value (float64)."""

    statistic: Any
    pvalue: Any


class KSLottery(NamedTuple):
    """KS-Lottery's selection: ``selected`` is a bool mask over the slices (True = a ticket:
    the test rejects at ``alpha``), with the statistics and p-values it was decided on."""

    selected: Any
    statistic: Any
    pvalue: Any


def _rows(op: str, t: Tensor, dim: int) -> tuple[Tensor, list[int]]:
    if t.dim() == 0:
        raise ShapeError(f"{op}: input has shape (), expected at least one dimension")
    d = dim % t.dim()
    moved = t.movedim(d, -1)
    lead = list(moved.shape[:-1])
    return moved.reshape(-1, moved.shape[-1]), lead


def ks_test(before: Any, after: Any, *, dim: int = -1, method: str = "auto") -> KSResult:
    """The two-sample KS test of every slice of ``before`` against the same slice of ``after``.

    Slices run along ``dim`` (``dim=-1`` on a ``(vocab, hidden)`` embedding tests every token's
    row). The shapes must agree except along ``dim`` (the two samples may differ in size). Any
    float dtype, read in place; values compare exactly in the wider of the two dtypes. NaN raises
    :class:`spruce.NonFiniteError`. Returns float64 ``statistic`` and ``pvalue`` of the reduced
    shape.
    """
    op = "ks_test"
    a, np_in = as_tensor(op, "before", before)
    b, _ = as_tensor(op, "after", after)
    if method not in _METHODS:
        raise ArgumentError(f"{op}: method ({method!r}) must be one of {', '.join(_METHODS)}")
    nd = max(a.dim(), 1)
    d = check_int(op, "dim", dim, lo=-nd, hi=nd - 1)
    if a.dim() != b.dim():
        raise ShapeError(
            f"{op}: after has shape {tuple(b.shape)}, expected {a.dim()} dimensions like before "
            f"{tuple(a.shape)}"
        )
    ra, lead = _rows(op, a, d)
    rb, lead_b = _rows(op, b, d)
    if lead != lead_b:
        raise ShapeError(
            f"{op}: after has shape {tuple(b.shape)}, expected before's shape {tuple(a.shape)} "
            f"except along dim {d % nd}"
        )
    stat, p = _ops.ks_2samp(ra, rb, method)
    return KSResult(back(stat.reshape(lead), np_in), back(p.reshape(lead), np_in))


def ks_lottery(
    before: Any,
    after: Any,
    *,
    alpha: float = 0.05,
    max_rows: int | None = None,
    dim: int = -1,
    method: str = "auto",
) -> KSLottery:
    """Selects the slices (token rows) whose distribution changed: p-value ``< alpha``.

    With ``max_rows``, at most that many are kept: those with the largest statistics (for equal
    sample sizes the p-value falls as the statistic grows, and unlike p-values the statistics do
    not underflow to ties at 0); ties keep the higher index (spruce's ranking).
    """
    op = "ks_lottery"
    a = check_number(op, "alpha", alpha)
    if not 0.0 < a <= 1.0:
        raise ArgumentError(f"{op}: alpha ({alpha}) must be in (0, 1]")
    res = ks_test(before, after, dim=dim, method=method)
    stat = torch.as_tensor(res.statistic)
    p = torch.as_tensor(res.pvalue)
    selected = p < a
    if max_rows is not None:
        k = check_int(op, "max_rows", max_rows, lo=0)
        total = selected.numel()
        if int(selected.sum()) > k:
            score = torch.where(selected, stat, torch.tensor(float("-inf"), dtype=stat.dtype))
            # prune exactly total - k: floor((total - k + 0.5) / total * total) == total - k
            s = (total - k + 0.5) / total
            selected = topk_mask(score.reshape(-1), min(s, 1.0)).reshape(selected.shape)
    as_np = not isinstance(res.statistic, Tensor)
    return KSLottery(back(selected, as_np), res.statistic, res.pvalue)
