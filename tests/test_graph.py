"""spruce.graph: construction and normalization against dense references, SpMM and its
gradients against dense matmuls, segment/scatter reductions against torch.scatter_reduce,
validation, opcheck, gradcheck (float64), torch.compile(fullgraph=True), thread independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spruce
import spruce.graph as G
from spruce.reference import graph as R

OPS = torch.ops.spruce


def _edges(n: int, e: int, seed: int, *, loops: bool = True, dupes: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, e), generator=g)
    if not loops:
        ei = ei[:, ei[0] != ei[1]]
    if dupes:
        ei = torch.cat([ei, ei[:, : e // 5]], dim=1)
    return ei


SELF_LOOPS = ["add", "remaining", "none"]
NORMS = ["sym", "rw", "none"]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("loops", SELF_LOOPS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_graph_equals_dense_reference(loops, norm, weighted):
    n = 40
    ei = _edges(n, 150, seed=1)  # duplicates, a few existing loops, isolated nodes likely
    ei = torch.cat([ei, torch.tensor([[3, 3], [3, 3]])], dim=1)  # a doubled loop
    w = torch.rand(ei.shape[1], dtype=torch.float64) + 0.1 if weighted else None
    g = G.from_edge_index(
        ei, n, self_loops=loops, normalization=norm, edge_weight=w, dtype=torch.float64
    )
    want = R.dense_adjacency(ei, n, self_loops=loops, normalization=norm, edge_weight=w)
    torch.testing.assert_close(g.to_dense(), want, rtol=1e-12, atol=1e-14)
    # CSR invariants: sorted unique columns per row, transpose consistent
    for r in range(n):
        cols = g.indices[g.indptr[r] : g.indptr[r + 1]]
        assert torch.all(cols[1:] > cols[:-1])
    assert torch.equal(g.values[g.t_perm][g.t_inv], g.values)
    dense_t = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(n), g.t_indptr.diff())
    dense_t[rows, g.t_indices] = g.values[g.t_perm]
    assert torch.equal(dense_t, g.to_dense().T)


def test_sparse_csr_and_edge_index_views():
    ei = _edges(10, 30, seed=2)
    g = G.from_edge_index(ei, 10)
    torch.testing.assert_close(g.to_sparse_csr().to_dense(), g.to_dense())
    src, dst = g.edge_index()
    assert torch.equal(dst, torch.repeat_interleave(torch.arange(10), g.indptr.diff()))
    assert "num_nodes=10" in repr(g)
    assert g.num_edges == g.indices.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_spmm_equals_dense_matmul(dtype):
    n, f = 200, 33
    ei = _edges(n, 2000, seed=3)
    g = G.from_edge_index(ei, n, dtype=torch.float64)
    x = torch.randn(n, f, dtype=torch.float64)
    want = g.to_dense() @ x
    got = G.spmm(g, x.to(dtype))
    assert got.dtype == dtype and got.shape == (n, f)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-2, torch.bfloat16: 5e-2}[
        dtype
    ]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # 1-D and 3-D features
    torch.testing.assert_close(G.spmm(g, x[:, 0]), want[:, 0], rtol=1e-12, atol=1e-12)
    x3 = x[:, :32].reshape(n, 4, 8)
    torch.testing.assert_close(G.spmm(g, x3), (g.to_dense() @ x[:, :32]).reshape(n, 4, 8))


def test_spmm_gradients_equal_dense():
    n, f = 50, 7
    ei = _edges(n, 300, seed=4)
    w = (torch.rand(ei.shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    g = G.from_edge_index(ei, n, edge_weight=w, self_loops="remaining")
    x = torch.randn(n, f, dtype=torch.float64, requires_grad=True)
    up = torch.randn(n, f, dtype=torch.float64)
    (G.spmm(g, x) * up).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    a = R.dense_adjacency(ei, n, self_loops="remaining", edge_weight=w2)
    ((a @ x2) * up).sum().backward()
    torch.testing.assert_close(gx, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, w2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_spmm_and_normalization(norm):
    n = 9
    ei = _edges(n, 25, seed=5)
    w = (torch.rand(ei.shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    x = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)

    def f(w, x):
        g = G.from_edge_index(ei, n, normalization=norm, edge_weight=w, self_loops="add")
        return G.spmm(g, x)

    assert torch.autograd.gradcheck(f, (w, x), eps=1e-6, atol=1e-8)
    # second order in x through the transposed product
    g = G.from_edge_index(ei, n, normalization=norm, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda x: G.spmm(g, x), (x,), eps=1e-6, atol=1e-8)


def test_propagate_low_and_high_pass():
    n = 30
    ei = _edges(n, 100, seed=6, loops=False)
    g = G.from_edge_index(ei, n, self_loops="none", dtype=torch.float64)
    a = R.dense_adjacency(ei, n, self_loops="none")
    x = torch.randn(n, 5, dtype=torch.float64)
    torch.testing.assert_close(G.propagate(g, x, 3), a @ (a @ (a @ x)))
    torch.testing.assert_close(G.propagate(g, x, 0), x)
    torch.testing.assert_close(G.low_pass(g, x), a @ x)
    torch.testing.assert_close(G.high_pass(g, x), x - a @ x)
    # NumPy in, NumPy out
    out = G.spmm(g, x.numpy())
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, (a @ x).numpy(), rtol=1e-12)


REDUCES = ["sum", "mean", "max", "min"]


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scatter_and_segment_equal_torch(reduce, dtype):
    g = torch.Generator().manual_seed(7)
    n, size = 300, 40  # some slots stay empty
    src = torch.randn(n, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    index = torch.randint(0, size - 5, (n,), generator=g)
    got = G.scatter_reduce(src, index, size, reduce)
    want = R.scatter_reduce(src.double(), index, size, reduce)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # along another dim
    got1 = G.scatter_reduce(src.transpose(0, 1), index, size, reduce, dim=1)
    torch.testing.assert_close(got1.transpose(0, 1).double(), want, rtol=tol, atol=tol)
    # segments: sorted index -> offsets
    counts = torch.bincount(index.sort().values, minlength=size)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    srt = src[index.argsort(stable=True)]
    got_s = G.segment_reduce(srt, indptr, reduce)
    torch.testing.assert_close(got_s.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(
        got_s.double(), R.segment_reduce(srt.double(), indptr, reduce), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("reduce", REDUCES)
def test_reduction_gradients(reduce):
    g = torch.Generator().manual_seed(8)
    n, size = 60, 12
    # distinct values: max/min select one element, as torch's (which splits ties)
    # (no zero: torch counts the zero it starts from as a tie)
    src = ((torch.randperm(n * 2, generator=g).double() + 1) / 7).reshape(n, 2).requires_grad_()
    index = torch.randint(0, size - 2, (n,), generator=g)
    assert torch.autograd.gradcheck(
        lambda s: G.scatter_reduce(s, index, size, reduce), (src,), eps=1e-6, atol=1e-8
    )
    up = torch.randn(size, 2, dtype=torch.float64, generator=g)
    (G.scatter_reduce(src, index, size, reduce) * up).sum().backward()
    s2 = src.detach().clone().requires_grad_()
    (R.scatter_reduce(s2, index, size, reduce) * up).sum().backward()
    torch.testing.assert_close(src.grad, s2.grad)
    counts = torch.bincount(index.sort().values, minlength=size)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    srt = src.detach()[index.argsort(stable=True)].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: G.segment_reduce(s, indptr, reduce), (srt,), eps=1e-6, atol=1e-8
    )


def test_bad_inputs_raise_clear_errors():
    ei = torch.tensor([[0, 1, 5], [1, 2, 0]])
    with pytest.raises(
        spruce.ArgumentError, match=r"edge_index \(5 at \[0, 2\]\) must be a node index in \[0, 4\)"
    ):
        G.from_edge_index(ei, 4)
    with pytest.raises(spruce.ArgumentError, match="must be a node index"):
        G.from_edge_index(torch.tensor([[0, -1], [1, 1]]), 4)
    with pytest.raises(spruce.DTypeError, match="expected int64"):
        G.from_edge_index(ei.int(), 6)
    with pytest.raises(spruce.ShapeError, match=r"expected \(2, E\)"):
        G.from_edge_index(ei[0], 6)
    with pytest.raises(spruce.ArgumentError, match="self_loops"):
        G.from_edge_index(ei, 6, self_loops="both")
    with pytest.raises(spruce.ArgumentError, match="normalization"):
        G.from_edge_index(ei, 6, normalization="left")
    with pytest.raises(spruce.ShapeError, match=r"expected \(3,\)"):
        G.from_edge_index(ei, 6, edge_weight=torch.ones(4))
    with pytest.raises(spruce.ArgumentError, match="num_nodes"):
        G.from_edge_index(ei, -1)
    g = G.from_edge_index(ei, 6)
    with pytest.raises(spruce.ShapeError, match="expected 6 rows"):
        G.spmm(g, torch.ones(5, 2))
    with pytest.raises(spruce.DTypeError):
        G.spmm(g, torch.ones(6, 2, dtype=torch.int32))
    with pytest.raises(spruce.ArgumentError, match="graph"):
        G.spmm(ei, torch.ones(6, 2))
    with pytest.raises(
        spruce.ArgumentError,
        match=r"index \(7 at position 1\) must be in \[0, dim_size\) = \[0, 3\)",
    ):
        G.scatter_reduce(torch.ones(2, 2), torch.tensor([0, 7]), 3)
    with pytest.raises(spruce.ArgumentError, match="reduce"):
        G.scatter_reduce(torch.ones(2, 2), torch.tensor([0, 1]), 3, "prod")
    with pytest.raises(
        spruce.ArgumentError, match=r"indptr\[-1\] \(2\) must be the number of rows of src \(3\)"
    ):
        G.segment_reduce(torch.ones(3, 2), torch.tensor([0, 2]))
    with pytest.raises(spruce.ArgumentError, match="non-decreasing"):
        G.segment_reduce(torch.ones(3, 2), torch.tensor([0, 2, 1, 3]))
    # the raw op validates a hand-made CSR too
    with pytest.raises(spruce.ArgumentError, match="indices"):
        OPS.spmm(
            torch.tensor([0, 1]),
            torch.tensor([4]),
            torch.ones(1),
            torch.tensor([0, 1]),
            torch.tensor([0]),
            torch.tensor([0]),
            torch.tensor([0]),
            torch.ones(1, 2),
        )


def test_inputs_are_not_modified_and_results_are_thread_independent():
    n = 3000
    ei = _edges(n, 60_000, seed=9)
    before = ei.clone()
    g = G.from_edge_index(ei, n)
    x = torch.randn(n, 64)
    xb = x.clone()
    out = G.spmm(g, x)
    red = G.scatter_reduce(x, ei[1, :n], n, "mean")
    assert torch.equal(ei, before) and torch.equal(x, xb)
    spruce.set_num_threads(1)
    try:
        g1 = G.from_edge_index(ei, n)
        assert torch.equal(g1.indices, g.indices) and torch.equal(g1.values, g.values)
        assert torch.equal(G.spmm(g1, x), out)
        assert torch.equal(G.scatter_reduce(x, ei[1, :n], n, "mean"), red)
    finally:
        spruce.set_num_threads(0)


def _structure_sample():
    ei = _edges(8, 20, seed=10)
    return ei


def _graph_op_samples():
    n = 8
    ei = _structure_sample()
    g = G.from_edge_index(ei, n, dtype=torch.float64)
    x = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    vals = g.values.detach().clone().requires_grad_()
    src = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 2, 2, 1, 0, 4, 4, 4, 1, 0])
    indptr = torch.tensor([0, 3, 3, 7, 10])
    samples = [
        (OPS.graph_structure, (ei, n, "add")),
        (OPS.graph_structure, (ei, n, "none")),
        (OPS.graph_norm, (vals, g.indptr, g.indices, "sym")),
        (OPS.graph_norm, (vals, g.indptr, g.indices, "rw")),
        (
            OPS.spmm,
            (g.indptr, g.indices, vals, g.t_indptr, g.t_indices, g.t_perm, g.t_inv, x),
        ),
        (OPS.spmm_grad_values, (g.indptr, g.indices, x.detach(), torch.randn(n, 3).double())),
    ]
    for r in REDUCES:
        samples.append((OPS.scatter_reduce, (src, index, 6, r)))
        samples.append((OPS.segment_reduce, (src, indptr, r)))
    return samples


@pytest.mark.parametrize("i", range(len(_graph_op_samples())))
def test_opcheck(i):
    op, args = _graph_op_samples()[i]
    if op is OPS.graph_structure:
        # a data-dependent output size: the AOT-dispatch check needs dynamic output shapes
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(op, args, test_utils=utils)
    else:
        torch.library.opcheck(op, args)


def _pipeline(graph: G.Graph, x: torch.Tensor, index: torch.Tensor, indptr: torch.Tensor):
    h = G.spmm(graph, x)
    h = G.high_pass(graph, torch.relu(h))
    s = G.scatter_reduce(h, index, 7, "max")
    m = G.segment_reduce(h, indptr, "mean")
    return G.propagate(graph, h, 2).sum() + s.sum() + m.square().sum()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_with_backward(backend):
    n = 12
    ei = _edges(n, 40, seed=11)
    g = G.from_edge_index(ei, n, dtype=torch.float64)
    index = torch.arange(n) % 7
    indptr = torch.tensor([0, 4, 4, 9, n])
    x = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    (ge,) = torch.autograd.grad(_pipeline(g, x, index, indptr), x)
    torch._dynamo.reset()
    fn = torch.compile(_pipeline, backend=backend, fullgraph=True)
    out = fn(g, x, index, indptr)
    (gc,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, _pipeline(g, x, index, indptr))
    torch.testing.assert_close(gc, ge)
