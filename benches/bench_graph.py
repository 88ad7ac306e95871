"""Graphs and distillation: spruce against the plain PyTorch formulation and torch.sparse.

- ``ffg2m_loss`` forward + backward on a 1M-edge, 40-class graph (100k nodes) against the gather
  + ``F.kl_div`` formulation of ``spruce.reference.graph`` (the reference code's approach: one
  ``E x C`` tensor per intermediate). Targets: >= 3x faster, extra memory below one ``E x C``
  float32 tensor (the baseline allocates several: >= 4x lower).
- ``spmm`` on a random 100k-node graph for 1M and 10M edges x 64 and 256 features against
  ``torch.sparse.mm`` with the same CSR matrix. Target: at least as fast.

float32, fixed seeds. Run with ``make bench``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import spruce.distill as D
import spruce.graph as G
from spruce.reference import graph as R

N_LOSS, C_LOSS, E_LOSS = 100_000, 40, 1_000_000
N_MM = 100_000


@pytest.fixture(scope="module")
def loss_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(
        s=torch.randn(N_LOSS, C_LOSS, generator=g).requires_grad_(),
        t=torch.randn(N_LOSS, C_LOSS, generator=g),
        ei=torch.randint(0, N_LOSS, (2, E_LOSS), generator=g),
        y=torch.randint(0, C_LOSS, (N_LOSS,), generator=g),
        m=torch.rand(N_LOSS, generator=g) < 0.1,
    )


GROUP_LOSS = "a) ffg2m_loss forward + backward: 100k nodes, 1M edges, 40 classes, float32"


@pytest.mark.parametrize("impl", ["spruce", "gather"])
def test_a_ffg2m_loss(measure: Any, loss_inputs: dict[str, torch.Tensor], impl: str) -> None:
    s, t, ei, y, m = (loss_inputs[k] for k in ("s", "t", "ei", "y", "m"))

    def fused() -> torch.Tensor:
        s.grad = None
        D.ffg2m_loss(s, t, ei, y, m, lam=0.3, tau=1.2).backward()
        return s.grad

    def gather() -> torch.Tensor:
        s.grad = None
        R.ffg2m_loss(s, t, ei, y, m, 0.3, 1.2).backward()
        return s.grad

    one_exc = E_LOSS * C_LOSS * 4
    bytes_moved = 2 * N_LOSS * C_LOSS * 4 + 2 * E_LOSS * 8
    if impl == "spruce":
        measure(
            fused,
            group=GROUP_LOSS,
            impl="spruce.distill.ffg2m_loss (fused native kernels)",
            role="spruce",
            rounds=5,
            bytes_moved=bytes_moved,
            memory_limit=one_exc,
            memory_target="extra < one E x C float32 tensor (160 MB)",
        )
    else:
        measure(
            gather,
            group=GROUP_LOSS,
            impl="gather rows per edge + F.kl_div (spruce.reference.graph)",
            role="baseline",
            rounds=2,
            bytes_moved=bytes_moved,
            target="spruce >= 3x faster",
            target_speedup=3.0,
        )


CASES = [(1_000_000, 64), (1_000_000, 256), (10_000_000, 64), (10_000_000, 256)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0] // 10**6}M-edges-x{c[1]}")
def mm_inputs(request: Any) -> tuple[G.Graph, torch.Tensor, torch.Tensor, int, int]:
    e, f = request.param
    g = torch.Generator().manual_seed(1)
    ei = torch.randint(0, N_MM, (2, e), generator=g)
    graph = G.from_edge_index(ei, N_MM, self_loops="none", normalization="none")
    x = torch.randn(N_MM, f, generator=g)
    return graph, graph.to_sparse_csr(), x, e, f


@pytest.mark.parametrize("impl", ["spruce", "torch.sparse.mm"])
def test_b_spmm(measure: Any, mm_inputs: Any, impl: str) -> None:
    graph, csr, x, e, f = mm_inputs
    group = f"b) spmm: {N_MM // 1000}k nodes, {e // 10**6}M edges x {f} features, float32"
    bytes_moved = graph.num_edges * (12 + 4 * f) + 2 * N_MM * f * 4
    rounds = 5 if e * f <= 256 * 10**6 else 3
    if impl == "spruce":
        measure(
            lambda: G.spmm(graph, x),
            group=group,
            impl="spruce.graph.spmm",
            role="spruce",
            rounds=rounds,
            bytes_moved=bytes_moved,
        )
    else:
        measure(
            lambda: torch.sparse.mm(csr, x),
            group=group,
            impl="torch.sparse.mm (CSR)",
            role="baseline",
            rounds=rounds,
            bytes_moved=bytes_moved,
            target="spruce at least as fast",
            target_speedup=1.0,
        )
