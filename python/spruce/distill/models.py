"""Teacher GNNs built on :mod:`spruce.graph` and the MLP student."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..graph import Graph, from_edge_index, spmm

__all__ = ["MLP", "GCN", "GraphSAGE"]


class MLP(nn.Module):
    """``layers`` linear layers with ReLU and dropout between them (the student)."""

    def __init__(
        self, in_dim: int, hidden: int, out_dim: int, *, layers: int = 2, dropout: float = 0.5
    ):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.lins = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.dropout = dropout

    def forward(self, x: Tensor, graph: Any = None) -> Tensor:
        for i, lin in enumerate(self.lins):
            if i:
                x = nn.functional.dropout(torch.relu(x), self.dropout, self.training)
            x = lin(x)
        return x


class GCN(nn.Module):
    """Kipf & Welling's GCN: ``H' = A_hat H W`` with ``A_hat = D^-1/2 (A + I) D^-1/2``."""

    def __init__(
        self, in_dim: int, hidden: int, out_dim: int, *, layers: int = 2, dropout: float = 0.5
    ):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.lins = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.dropout = dropout

    @staticmethod
    def make_graph(edge_index: Tensor, num_nodes: int) -> Graph:
        return from_edge_index(edge_index, num_nodes, self_loops="remaining", normalization="sym")

    def forward(self, x: Tensor, graph: Graph) -> Tensor:
        for i, lin in enumerate(self.lins):
            if i:
                x = torch.relu(x)
            x = nn.functional.dropout(x, self.dropout, self.training)
            x = spmm(graph, lin(x))
        return x


class GraphSAGE(nn.Module):
    """GraphSAGE with the mean aggregator: ``H' = H W_self + mean_{j -> i}(H_j) W_neigh``."""

    def __init__(
        self, in_dim: int, hidden: int, out_dim: int, *, layers: int = 2, dropout: float = 0.5
    ):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        pairs = list(zip(dims[:-1], dims[1:], strict=True))
        self.self_lins = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        self.neigh_lins = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairs)
        self.dropout = dropout

    @staticmethod
    def make_graph(edge_index: Tensor, num_nodes: int) -> Graph:
        return from_edge_index(edge_index, num_nodes, self_loops="none", normalization="rw")

    def forward(self, x: Tensor, graph: Graph) -> Tensor:
        for i, (ls, ln) in enumerate(zip(self.self_lins, self.neigh_lins, strict=True)):
            if i:
                x = torch.relu(x)
            x = nn.functional.dropout(x, self.dropout, self.training)
            x = ls(x) + spmm(graph, ln(x))
        return x
