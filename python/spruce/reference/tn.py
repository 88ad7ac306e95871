"""Pure-Python references for tensor networks: the cost model of a path, network generators.

Written for clarity: the tests check spruce's native path search and its costs against these.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = [
    "symbol",
    "path_cost",
    "random_regular_network",
    "lattice_network",
    "chain_network",
]


def symbol(i: int) -> str:
    """Index symbol number ``i``: 52 ASCII letters, then code points from 192 (no surrogates)."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    if i < 52:
        return letters[i]
    return chr(i + 2048) if i >= 55296 else chr(i + 140)


def path_cost(
    eq: str, shapes: Sequence[Sequence[int]], path: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """``(cost, largest intermediate)`` of a linear path under the cost model, without ellipses.

    A step over the index set ``I`` joining ``k`` operands costs
    ``prod(size(I)) * (max(1, k - 1) + [an index is summed away])``.
    """
    lhs, out = eq.split("->")
    terms = [set(t) for t in lhs.split(",")]
    sizes: dict[str, int] = {}
    for t, s in zip(lhs.split(","), shapes, strict=True):
        for c, d in zip(t, s, strict=True):
            sizes[c] = max(sizes.get(c, 1), int(d))
    total, largest = 0, 1
    for step in path:
        picked = [terms[p] for p in step]
        for p in sorted(step, reverse=True):
            terms.pop(p)
        idx = set().union(*picked)
        needed = set(out).union(*terms)
        new = idx & needed
        factor = max(1, len(step) - 1) + (1 if idx - new else 0)
        total += math.prod(sizes[c] for c in idx) * factor
        largest = max(largest, math.prod(sizes[c] for c in new))
        terms.append(new)
    return total, largest


def _network(edges: list[tuple[int, int]], n: int, bond: int, phys: dict[int, int] | None = None):
    terms: list[list[str]] = [[] for _ in range(n)]
    shapes: list[list[int]] = [[] for _ in range(n)]
    k = 0
    for a, b in edges:
        s = symbol(k)
        k += 1
        for v in (a, b):
            terms[v].append(s)
            shapes[v].append(bond)
    out = []
    for v, d in (phys or {}).items():
        s = symbol(k)
        k += 1
        terms[v].append(s)
        shapes[v].append(d)
        out.append(s)
    eq = ",".join("".join(t) for t in terms) + "->" + "".join(out)
    return eq, [tuple(s) for s in shapes]


def random_regular_network(
    n: int, degree: int = 3, bond: int = 4, seed: int = 0
) -> tuple[str, list[tuple[int, ...]]]:
    """A random ``degree``-regular graph on ``n`` tensors (configuration model, no loops or
    multi-edges), each edge a bond of size ``bond``, scalar output."""
    if (n * degree) % 2 or degree >= n:
        raise ValueError(f"no {degree}-regular graph on {n} vertices")
    rng = random.Random(seed)
    while True:
        stubs = [v for v in range(n) for _ in range(degree)]
        rng.shuffle(stubs)
        edges = set()
        ok = True
        for a, b in zip(stubs[::2], stubs[1::2], strict=True):
            e = (min(a, b), max(a, b))
            if a == b or e in edges:
                ok = False
                break
            edges.add(e)
        if ok:
            return _network(sorted(edges), n, bond)


def lattice_network(rows: int, cols: int, bond: int = 2) -> tuple[str, list[tuple[int, ...]]]:
    """A ``rows x cols`` square lattice of tensors (open boundaries), scalar output."""
    edges = []
    for r in range(rows):
        for c in range(cols):
            v = r * cols + c
            if c + 1 < cols:
                edges.append((v, v + 1))
            if r + 1 < rows:
                edges.append((v, v + cols))
    return _network(edges, rows * cols, bond)


def chain_network(n: int, bond: int = 8, phys: int = 2) -> tuple[str, list[tuple[int, ...]]]:
    """A matrix-product state: ``n`` tensors in a chain, each with an open physical index."""
    edges = [(v, v + 1) for v in range(n - 1)]
    return _network(edges, n, bond, {v: phys for v in range(n)})
