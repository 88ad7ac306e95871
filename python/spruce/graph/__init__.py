"""Graph ops: normalized CSR graphs, SpMM and propagation, segment and scatter reductions.

A :class:`Graph` is stored by *target*: row ``i`` lists the sources ``j`` of the edges
``j -> i`` of PyG's ``edge_index`` (``edge_index[0]`` = source, ``edge_index[1]`` = target), so
:func:`spmm` computes ``out[i] = sum_j w_ji x[j]`` (PyG's "source to target" flow). The graph
keeps its transpose, which the backward pass of :func:`spmm` multiplies by.

Every op runs in parallel in Rust and is deterministic (each output element is reduced by one
thread in a fixed order: results do not depend on the thread count). Sizes are explicit, so
nothing syncs the host and every op works under ``torch.compile(fullgraph=True)``. Each is also
a ``torch.ops.spruce`` op. Index tensors are int64; CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._native import as_tensor, back, check_int
from ..errors import ArgumentError, DTypeError, ShapeError

__all__ = [
    "Graph",
    "from_edge_index",
    "spmm",
    "propagate",
    "low_pass",
    "high_pass",
    "segment_reduce",
    "scatter_reduce",
]

_REDUCES = ("sum", "mean", "max", "min")


@dataclass(frozen=True, eq=False)
class Graph:
    """A weighted graph in CSR by target, with its transpose.

    ``values[k]`` is the weight of slot ``k`` (row = target, ``indices[k]`` = source). The
    transposed CSR ``(t_indptr, t_indices)`` reads ``values[t_perm]``; ``t_inv`` inverts
    ``t_perm``. Build one with :func:`from_edge_index`; ``values`` may require grad (the
    weights then learn through :func:`spmm`).
    """

    num_nodes: int
    indptr: Tensor
    indices: Tensor
    values: Tensor
    t_indptr: Tensor
    t_indices: Tensor
    t_perm: Tensor
    t_inv: Tensor

    @property
    def num_edges(self) -> int:
        """The number of stored (coalesced) edges, self-loops included."""
        return int(self.indices.shape[0])

    def with_values(self, values: Tensor) -> Graph:
        """The same structure with other edge weights (one per stored edge)."""
        if values.shape != self.values.shape:
            raise ShapeError(
                f"Graph.with_values: values has shape {tuple(values.shape)}, expected "
                f"{tuple(self.values.shape)}"
            )
        return Graph(
            self.num_nodes,
            self.indptr,
            self.indices,
            values,
            self.t_indptr,
            self.t_indices,
            self.t_perm,
            self.t_inv,
        )

    def edge_index(self) -> Tensor:
        """The stored edges as a ``(2, num_edges)`` (source, target) edge_index."""
        rows = _ops._rows_of(self.indptr, self.num_edges)
        return torch.stack([self.indices, rows])

    def to_dense(self) -> Tensor:
        """The ``(n, n)`` matrix ``A`` with ``A[target, source] = weight`` (so ``A @ x`` is
        :func:`spmm`)."""
        a = self.values.new_zeros(self.num_nodes, self.num_nodes)
        rows = _ops._rows_of(self.indptr, self.num_edges)
        return a.index_put((rows, self.indices), self.values, accumulate=True)

    def to_sparse_csr(self) -> Tensor:
        """The graph as a ``torch.sparse_csr_tensor`` (target rows, source columns)."""
        return torch.sparse_csr_tensor(
            self.indptr,
            self.indices,
            self.values.detach(),
            (self.num_nodes, self.num_nodes),
            check_invariants=False,
        )

    def __repr__(self) -> str:
        return (
            f"Graph(num_nodes={self.num_nodes}, num_edges={self.num_edges}, "
            f"dtype={str(self.values.dtype).replace('torch.', '')})"
        )


def _edge_index(op: str, edge_index: Any) -> Tensor:
    t, _ = as_tensor(op, "edge_index", edge_index)
    if t.dtype != torch.int64:
        raise DTypeError(
            f"{op}: edge_index has dtype {str(t.dtype).replace('torch.', '')}, expected int64 "
            "(convert with .long())"
        )
    if t.dim() != 2 or t.shape[0] != 2:
        raise ShapeError(f"{op}: edge_index has shape {tuple(t.shape)}, expected (2, E)")
    return t


def from_edge_index(
    edge_index: Any,
    num_nodes: int,
    *,
    self_loops: str = "add",
    normalization: str = "sym",
    edge_weight: Any = None,
    dtype: torch.dtype | None = None,
) -> Graph:
    """Builds a :class:`Graph` from PyG's ``(2, E)`` int64 ``edge_index``.

    - Duplicate edges are coalesced, their weights summed.
    - ``self_loops``: ``"add"`` adds one loop of weight 1 per node (added to an existing loop's
      weight, as PyG's ``add_self_loops`` followed by a sum); ``"remaining"`` adds a loop of
      weight 1 only where a node has none, existing loops keep their weight (PyG's
      ``add_remaining_self_loops``; where a node has several duplicate loops spruce sums them,
      PyG keeps one); ``"none"``.
    - ``normalization``: ``"sym"`` gives ``w_ji / sqrt(d_i d_j)`` with ``d`` the weighted
      in-degree and ``0^-1/2 = 0`` (with ``self_loops="remaining"`` this is exactly PyG's
      ``gcn_norm``); ``"rw"`` gives ``w_ji / d_i`` (the mean over in-neighbours);
      ``"none"`` keeps the weights.
    - ``edge_weight``: ``(E,)`` weights (default 1), in the dtype of the graph's values; when it
      requires grad, the gradient flows back to it through the normalization.

    GLNN's feature propagation ``(D^-1/2 A D^-1/2)^k X`` is ``propagate(graph, X, k)`` on a graph
    built with ``self_loops="none"``.
    """
    op = "from_edge_index"
    ei = _edge_index(op, edge_index)
    n = check_int(op, "num_nodes", num_nodes, lo=0)
    if self_loops not in ("add", "remaining", "none"):
        raise ArgumentError(
            f"{op}: self_loops ({self_loops!r}) must be one of 'add', 'remaining', 'none'"
        )
    if normalization not in ("sym", "rw", "none"):
        raise ArgumentError(
            f"{op}: normalization ({normalization!r}) must be one of 'sym', 'rw', 'none'"
        )
    indptr, indices, edge_slot, fill, t_indptr, t_indices, t_perm, t_inv = _ops.graph_structure(
        ei, n, self_loops
    )
    if edge_weight is None:
        dt = dtype or torch.float32
        w = torch.ones(ei.shape[1], dtype=dt)
    else:
        w, _ = as_tensor(op, "edge_weight", edge_weight)
        if not w.is_floating_point():
            raise DTypeError(
                f"{op}: edge_weight has dtype {str(w.dtype).replace('torch.', '')}, expected a "
                "floating dtype"
            )
        if w.shape != (ei.shape[1],):
            raise ShapeError(
                f"{op}: edge_weight has shape {tuple(w.shape)}, expected ({ei.shape[1]},) "
                "(one per edge)"
            )
        if dtype is not None:
            w = w.to(dtype)
    raw = w.new_zeros(indices.shape[0]).index_add(0, edge_slot, w) + fill.to(w.dtype)
    values = _ops.graph_norm(raw, indptr, indices, normalization)
    return Graph(n, indptr, indices, values, t_indptr, t_indices, t_perm, t_inv)


def _check_graph(op: str, graph: Any) -> Graph:
    if not isinstance(graph, Graph):
        raise ArgumentError(
            f"{op}: graph ({type(graph).__name__}) must be a spruce.graph.Graph "
            "(build one with spruce.graph.from_edge_index)"
        )
    return graph


def _spmm(graph: Graph, x: Tensor) -> Tensor:
    if x.shape[0] != graph.num_nodes:
        raise ShapeError(
            f"spmm: x has shape {tuple(x.shape)}, expected {graph.num_nodes} rows (one per node)"
        )
    flat = x.reshape(x.shape[0], -1) if x.dim() != 2 else x
    out = _ops.spmm(
        graph.indptr,
        graph.indices,
        graph.values.to(x.dtype),
        graph.t_indptr,
        graph.t_indices,
        graph.t_perm,
        graph.t_inv,
        flat.contiguous(),
    )
    return out.reshape(x.shape) if x.dim() != 2 else out


def spmm(graph: Graph, x: Any) -> Any:
    """``A x``: ``out[i] = sum_j w_ji x[j]`` for ``x`` of shape ``(num_nodes, *features)``.

    Differentiable in ``x`` (through the stored transpose) and in ``graph.values``. The graph's
    weights are cast to ``x``'s dtype (float32, float64, float16 or bfloat16; halves accumulate
    in float32). Each output row is summed by one thread in edge order: deterministic.
    """
    g = _check_graph("spmm", graph)
    t, np_in = as_tensor("spmm", "x", x)
    return back(_spmm(g, t), np_in)


def propagate(graph: Graph, x: Any, k: int = 1) -> Any:
    """``A^k x`` (``k`` >= 0 products; GLNN's feature propagation on a sym-normalized graph)."""
    g = _check_graph("propagate", graph)
    k = check_int("propagate", "k", k, lo=0)
    t, np_in = as_tensor("propagate", "x", x)
    for _ in range(k):
        t = _spmm(g, t)
    return back(t, np_in)


def low_pass(graph: Graph, x: Any) -> Any:
    """The low-pass filter ``A x`` (smooths features over neighbours)."""
    return spmm(graph, x)


def high_pass(graph: Graph, x: Any) -> Any:
    """The high-pass filter ``(I - A) x`` (each node minus its neighbourhood)."""
    g = _check_graph("high_pass", graph)
    t, np_in = as_tensor("high_pass", "x", x)
    return back(t - _spmm(g, t), np_in)


def _reduce_name(op: str, reduce: str) -> str:
    if reduce not in _REDUCES:
        raise ArgumentError(f"{op}: reduce ({reduce!r}) must be one of 'sum', 'mean', 'max', 'min'")
    return reduce


def segment_reduce(src: Any, indptr: Any, reduce: str = "sum") -> Any:
    """Reduces consecutive rows of ``src`` (``(N, *features)``): segment ``s`` is rows
    ``indptr[s]:indptr[s + 1]``, with ``indptr[0] == 0``, non-decreasing, ``indptr[-1] == N``.

    ``reduce`` is ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``; empty segments give 0 (as
    ``scatter_reduce(..., include_self=False)`` on zeros). Differentiable: max/min send the
    gradient to the first selected element (torch splits it among ties).
    """
    op = "segment_reduce"
    r = _reduce_name(op, reduce)
    t, np_in = as_tensor(op, "src", src)
    p, _ = as_tensor(op, "indptr", indptr)
    if t.dim() == 0:
        raise ShapeError(f"{op}: src has shape (), expected at least one dimension")
    flat = t.reshape(t.shape[0], -1)
    out, _arg = _ops.segment_reduce(flat, p, r)
    return back(out.reshape((p.shape[0] - 1, *t.shape[1:])), np_in)


def scatter_reduce(
    src: Any, index: Any, dim_size: int, reduce: str = "sum", *, dim: int = 0
) -> Any:
    """``out[index[i]] = reduce(src[i], ...)`` along ``dim`` into ``dim_size`` slots.

    ``index`` is 1-D int64 with one entry per slice of ``src`` along ``dim``; ``dim_size`` is
    explicit (nothing reads ``index.max()`` on the host), every index must lie in
    ``[0, dim_size)``. Empty slots give 0. Equal to
    ``torch.zeros(...).scatter_reduce(dim, index (broadcast), src, reduce, include_self=False)``
    (``"max"``/``"min"`` = ``"amax"``/``"amin"``); elements are reduced in index order, so the
    result is deterministic. Differentiable in ``src``.
    """
    op = "scatter_reduce"
    r = _reduce_name(op, reduce)
    t, np_in = as_tensor(op, "src", src)
    ix, _ = as_tensor(op, "index", index)
    size = check_int(op, "dim_size", dim_size, lo=0)
    if t.dim() == 0:
        raise ShapeError(f"{op}: src has shape (), expected at least one dimension")
    d = check_int(op, "dim", dim, lo=-t.dim(), hi=t.dim() - 1) % t.dim()
    if ix.dim() != 1 or ix.shape[0] != t.shape[d]:
        raise ShapeError(
            f"{op}: index has shape {tuple(ix.shape)}, expected ({t.shape[d]},) (one per slice "
            f"of src along dim {d})"
        )
    moved = t.movedim(d, 0)
    flat = moved.reshape(moved.shape[0], -1)
    out, _arg = _ops.scatter_reduce(flat, ix, size, r)
    out = out.reshape((size, *moved.shape[1:])).movedim(0, d)
    return back(out, np_in)
