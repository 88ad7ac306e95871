"""Executing a contraction path with torch: pairwise batched matrix products, cached plans.

``spruce.tn.einsum`` finds the path once per (equation, shapes, optimizer, memory limit) and keeps
the plan; every later call with the same key only runs the steps. Each two-operand step is one
``torch.bmm`` between permuted views (indices needed by neither the other operand nor the result
are summed first, repeated indices become diagonals, size-1 broadcast axes are squeezed), so it
differentiates with autograd and runs on any device. Steps joining more than two operands (a
memory limit forced them) and one-operand reductions use ``torch.einsum`` on that step alone.
The only intermediates are the results of the planned steps.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError, ShapeError
from .paths import PathInfo, contract_path

__all__ = ["einsum", "contract_expression", "ContractExpression", "clear_plan_cache"]

_CACHE_SIZE = 512
_cache: OrderedDict[tuple, _Plan] = OrderedDict()
_lock = threading.Lock()


class _Plan:
    def __init__(self, eq: str, shapes: list[tuple[int, ...]], optimize: Any, memory_limit: Any):
        path, info = contract_path(
            eq, *shapes, optimize=optimize, memory_limit=memory_limit, shapes=True
        )
        self.info: PathInfo = info
        self.path = path
        self.shapes = shapes
        self.steps: list[tuple[list[int], list[str], str]] = []
        for step in info.steps:
            ins, out = step.einsum.split("->")
            self.steps.append((sorted(step.positions, reverse=True), ins.split(","), out))

    def run(self, operands: Sequence[torch.Tensor]) -> torch.Tensor:
        ops = list(operands)
        for positions, terms, out in self.steps:
            xs = [ops.pop(p) for p in positions]
            if len(xs) == 2:
                ops.append(_pair(xs[0], terms[0], xs[1], terms[1], out))
            else:
                ops.append(torch.einsum(f"{','.join(terms)}->{out}", *xs))
        return ops[0]


def _reduce(x: torch.Tensor, term: str, needed: set[str]) -> tuple[torch.Tensor, str]:
    """Sums indices nobody else needs, takes diagonals of repeated ones, squeezes size-1 axes
    that broadcast against a larger partner (recorded by dropping them from the term)."""
    keep = "".join(dict.fromkeys(c for c in term if c in needed))
    if keep != term:
        x = torch.einsum(f"{term}->{keep}", x)
    return x, keep


def _pair(a: torch.Tensor, ta: str, b: torch.Tensor, tb: str, out: str) -> torch.Tensor:
    a, ta = _reduce(a, ta, set(tb) | set(out))
    b, tb = _reduce(b, tb, set(ta) | set(out))
    # Broadcasting: an index of size 1 on one side and larger on the other is squeezed away.
    for c in set(ta) & set(tb):
        da, db = a.shape[ta.index(c)], b.shape[tb.index(c)]
        if da != db:
            if da == 1:
                a = a.squeeze(ta.index(c))
                ta = ta.replace(c, "")
            else:
                b = b.squeeze(tb.index(c))
                tb = tb.replace(c, "")
    batch = [c for c in ta if c in tb and c in out]
    con = [c for c in ta if c in tb and c not in out]
    a_only = [c for c in ta if c not in tb]
    b_only = [c for c in tb if c not in ta]
    sa = dict(zip(ta, a.shape, strict=True))
    sb = dict(zip(tb, b.shape, strict=True))
    nb = math.prod(sa[c] for c in batch)
    m = math.prod(sa[c] for c in a_only)
    k = math.prod(sa[c] for c in con)
    n = math.prod(sb[c] for c in b_only)
    am = a.permute([ta.index(c) for c in batch + a_only + con]).reshape(nb, m, k)
    bm = b.permute([tb.index(c) for c in batch + con + b_only]).reshape(nb, k, n)
    r = torch.bmm(am, bm)
    rterm = batch + a_only + b_only
    r = r.reshape([sa[c] for c in batch + a_only] + [sb[c] for c in b_only])
    # An output index present on neither operand cannot occur (each step's result indices
    # come from its operands); reorder to the planned result order.
    perm = [rterm.index(c) for c in out]
    return r.permute(perm) if perm != list(range(len(perm))) else r


def _key_optimize(optimize: Any) -> Any:
    if isinstance(optimize, str):
        return optimize.lower()
    if isinstance(optimize, Sequence):
        return tuple(tuple(int(i) for i in step) for step in optimize)
    raise ArgumentError(f"einsum: optimize ({optimize!r}) must be an optimizer name or a path")


def _plan(eq: str, shapes: list[tuple[int, ...]], optimize: Any, memory_limit: Any) -> _Plan:
    key = (eq, tuple(shapes), _key_optimize(optimize), memory_limit)
    with _lock:
        plan = _cache.get(key)
        if plan is not None:
            _cache.move_to_end(key)
            return plan
    plan = _Plan(eq, shapes, optimize, memory_limit)
    with _lock:
        _cache[key] = plan
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return plan


def clear_plan_cache() -> None:
    """Forgets every cached contraction plan."""
    with _lock:
        _cache.clear()


def _as_tensors(op: str, operands: Sequence[Any]) -> tuple[list[torch.Tensor], bool]:
    ts, np_in = [], False
    for x in operands:
        if isinstance(x, np.ndarray):
            ts.append(torch.from_numpy(np.ascontiguousarray(x)))
            np_in = True
        elif isinstance(x, torch.Tensor):
            ts.append(x)
        else:
            raise ArgumentError(
                f"{op}: operands must be torch tensors or numpy arrays, got {type(x).__name__}"
            )
    return ts, np_in


def einsum(
    eq: str, *operands: Any, optimize: Any = "auto", memory_limit: int | str | None = None
) -> Any:
    """``torch.einsum`` with a planned, cached contraction order.

    The path is found once per (equation, shapes, optimizer, memory limit) and reused; each
    step is a batched matrix product, so gradients flow and any device works. NumPy inputs give a
    NumPy result.

    >>> a, b, c = torch.randn(8, 16), torch.randn(16, 32), torch.randn(32, 4)
    >>> torch.allclose(spruce.tn.einsum("ij,jk,kl->il", a, b, c), a @ b @ c, atol=1e-5)
    True
    """
    ts, np_in = _as_tensors("einsum", operands)
    if not ts:
        raise ArgumentError("einsum: at least one operand is required")
    plan = _plan(eq, [tuple(t.shape) for t in ts], optimize, memory_limit)
    out = plan.run(ts)
    return out.detach().numpy() if np_in else out


class ContractExpression:
    """A contraction planned for fixed shapes; call it with operands of those shapes."""

    def __init__(self, eq: str, shapes: list[tuple[int, ...]], optimize: Any, memory_limit: Any):
        self.eq = eq
        self.shapes = shapes
        self._plan = _plan(eq, shapes, optimize, memory_limit)

    @property
    def path(self) -> list[tuple[int, ...]]:
        return self._plan.path

    @property
    def info(self) -> PathInfo:
        return self._plan.info

    def __call__(self, *operands: Any) -> Any:
        ts, np_in = _as_tensors("contract_expression", operands)
        if len(ts) != len(self.shapes):
            raise ArgumentError(
                f"contract_expression: got {len(ts)} operands, expected {len(self.shapes)}"
            )
        for i, (t, s) in enumerate(zip(ts, self.shapes, strict=True)):
            if tuple(t.shape) != s:
                raise ShapeError(
                    f"contract_expression: operand {i} has shape {tuple(t.shape)}, expected {s}"
                )
        out = self._plan.run(ts)
        return out.detach().numpy() if np_in else out

    def __repr__(self) -> str:
        return f"<ContractExpression({self.eq!r}, opt_cost={self.info.opt_cost})>"


def contract_expression(
    eq: str, *shapes: Sequence[int], optimize: Any = "auto", memory_limit: int | str | None = None
) -> ContractExpression:
    """Plans ``eq`` for operands of the given shapes; returns a callable that contracts them."""
    return ContractExpression(
        eq, [tuple(int(d) for d in s) for s in shapes], optimize, memory_limit
    )
