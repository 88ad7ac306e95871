"""spruce.graph against PyG itself (torch_geometric, a test extra): gcn_norm, GCNConv
propagation and scatter."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import scatter

import spruce.graph as G


def _graph(n: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, e), generator=g)
    ei = ei[:, ei[0] != ei[1]]
    # one existing loop on two nodes (PyG keeps one of several duplicate loops, spruce sums
    # duplicates: the two agree on graphs without duplicate loops)
    return torch.cat([ei, torch.tensor([[2, 5], [2, 5]])], dim=1)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_sym_normalization_equals_gcn_norm(weighted):
    n = 50
    ei = _graph(n, 300, seed=0)
    w = torch.rand(ei.shape[1], dtype=torch.float64) + 0.1 if weighted else None
    pyg_ei, pyg_w = gcn_norm(ei, w, n, add_self_loops=True, dtype=torch.float64)
    want = torch.zeros(n, n, dtype=torch.float64).index_put(
        (pyg_ei[1], pyg_ei[0]), pyg_w, accumulate=True
    )
    g = G.from_edge_index(
        ei, n, self_loops="remaining", normalization="sym", edge_weight=w, dtype=torch.float64
    )
    torch.testing.assert_close(g.to_dense(), want, rtol=1e-12, atol=1e-14)
    # and the propagation PyG's GCNConv does: out[target] += w * x[source]
    x = torch.randn(n, 8, dtype=torch.float64)
    msg = pyg_w[:, None] * x[pyg_ei[0]]
    pyg_out = scatter(msg, pyg_ei[1], dim=0, dim_size=n, reduce="sum")
    torch.testing.assert_close(G.spmm(g, x), pyg_out, rtol=1e-12, atol=1e-12)


def test_without_self_loops_equals_gcn_norm():
    n = 30
    ei = _graph(n, 120, seed=1)
    pyg_ei, pyg_w = gcn_norm(ei, None, n, add_self_loops=False, dtype=torch.float64)
    want = torch.zeros(n, n, dtype=torch.float64).index_put(
        (pyg_ei[1], pyg_ei[0]), pyg_w, accumulate=True
    )
    g = G.from_edge_index(ei, n, self_loops="none", dtype=torch.float64)
    torch.testing.assert_close(g.to_dense(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
def test_scatter_equals_pyg_scatter(reduce):
    g = torch.Generator().manual_seed(2)
    src = torch.randn(200, 6, generator=g, dtype=torch.float64)
    index = torch.randint(0, 30, (200,), generator=g)
    want = scatter(src, index, dim=0, dim_size=35, reduce=reduce)
    torch.testing.assert_close(G.scatter_reduce(src, index, 35, reduce), want)
