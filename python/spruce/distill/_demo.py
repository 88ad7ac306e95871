"""``spruce demo`` rows for graphs and GNN-to-MLP distillation."""

from __future__ import annotations

import torch

from ..demo import DemoRow, measure


def demo_rows(quick: bool) -> list[DemoRow]:
    """The fused FF-G2M loss (forward + backward) against the gather + kl_div formulation,
    SpMM against torch.sparse.mm, and one teacher -> student distillation on a CSBM graph."""
    import spruce.distill as D
    import spruce.graph as G
    from spruce.graph.datasets import csbm
    from spruce.reference import graph as R

    g = torch.Generator().manual_seed(0)
    n, c, e = (10_000, 40, 50_000) if quick else (100_000, 40, 1_000_000)
    s = torch.randn(n, c, generator=g, requires_grad=True)
    t = torch.randn(n, c, generator=g)
    ei = torch.randint(0, n, (2, e), generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    m = torch.rand(n, generator=g) < 0.1

    def fused():
        s.grad = None
        loss = D.ffg2m_loss(s, t, ei, y, m, lam=0.3, tau=1.2)
        loss.backward()
        return loss.detach(), s.grad.clone()

    def plain():
        s.grad = None
        loss = R.ffg2m_loss(s, t, ei, y, m, 0.3, 1.2)
        loss.backward()
        return loss.detach(), s.grad.clone()

    def close(got, want):
        ok = torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-6) and torch.allclose(
            got[1], want[1], rtol=1e-3, atol=1e-8
        )
        return ok, "loss and gradient match the reference" if ok else "DIFFERS from reference"

    rows = [
        measure(
            "distillation",
            f"FF-G2M loss fwd+bwd, {e / 1e6:g}M edges x {c} classes",
            "gather + kl_div",
            fused,
            plain,
            close,
            repeat=2,
        )
    ]
    nodes, edges, f = (10_000, 100_000, 64) if quick else (100_000, 2_000_000, 128)
    ei2 = torch.randint(0, nodes, (2, edges), generator=g)
    graph = G.from_edge_index(ei2, nodes)
    x = torch.randn(nodes, f, generator=g)
    csr = graph.to_sparse_csr()

    def close_mm(got, want):
        ok = torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        return ok, "matches torch.sparse.mm" if ok else "DIFFERS from torch.sparse.mm"

    rows.append(
        measure(
            "graphs",
            f"SpMM {edges / 1e6:g}M edges x {f} features",
            "torch.sparse.mm (CSR)",
            lambda: G.spmm(graph, x),
            lambda: torch.sparse.mm(csr, x),
            close_mm,
        )
    )
    data = csbm(600 if quick else 2000, 4, 64, 0.8, seed=0, feature_signal=1.5)
    epochs = 40 if quick else 200
    base = D.Distiller(
        "gcn",
        None,
        data.edge_index,
        data.features,
        data.labels,
        data.masks,
        loss="mlp",
        epochs=epochs,
        teacher_epochs=epochs,
        lam=0.0,
        progress=False,
    )
    r_mlp = base.run()
    student = D.Distiller(
        base.soft_labels,
        None,
        data.edge_index,
        data.features,
        data.labels,
        data.masks,
        loss="ffg2m",
        epochs=epochs,
        lam=0.0,
        progress=False,
    )
    acc = student.train_student()[1]

    def accuracy_check(got, want):
        ok = acc > r_mlp.student_test and bool(torch.isfinite(got).all())
        return ok, (
            f"test acc: MLP {100 * r_mlp.student_test:.1f}% -> FF-G2M MLP {100 * acc:.1f}% "
            f"(GCN teacher {100 * r_mlp.teacher_test:.1f}%)"
        )

    def infer_student():
        with torch.no_grad():
            return student.student(data.features)

    def infer_teacher():
        with torch.no_grad():
            return base.teacher(data.features, base.teacher_graph)

    rows.append(
        measure(
            "distillation",
            f"GCN -> MLP (FF-G2M) on CSBM h=0.8, {data.num_nodes} nodes: inference",
            "GCN inference",
            infer_student,
            infer_teacher,
            accuracy_check,
        )
    )
    return rows
