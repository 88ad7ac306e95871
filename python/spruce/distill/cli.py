"""``spruce distill``: train a teacher GNN and distill it into an MLP, on a CSBM graph or on
files the user has (``.npz`` or Planetoid raw files)."""

from __future__ import annotations

import argparse
import json


def _load(args: argparse.Namespace):
    from ..graph import datasets

    if args.npz:
        return datasets.load_npz(args.npz, seed=args.seed)
    if args.planetoid:
        return datasets.load_planetoid(args.root, args.planetoid)
    return datasets.csbm(
        args.nodes,
        args.classes,
        args.features,
        args.homophily,
        seed=args.seed,
        feature_signal=args.signal,
    )


def _cmd_distill(args: argparse.Namespace) -> int:
    from . import Distiller

    data = _load(args)
    common = dict(
        lam=args.lam,
        tau=args.tau,
        hidden=args.hidden,
        epochs=args.epochs,
        teacher_epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        progress=False if args.quiet or args.json else None,
    )
    losses = ["mlp", args.loss] if args.loss != "mlp" else ["mlp"]
    base = Distiller(
        args.teacher,
        None,
        data.edge_index,
        data.features,
        data.labels,
        data.masks,
        loss="mlp",
        **common,
    )
    reports = [base.run()]
    for loss in losses[1:]:
        d = Distiller(
            base.soft_labels,
            None,
            data.edge_index,
            data.features,
            data.labels,
            data.masks,
            loss=loss,
            **common,
        )
        r = d.run()
        r.teacher, r.teacher_val, r.teacher_test = args.teacher, base.teacher_val, base.teacher_test
        r.teacher_latency_s = reports[0].teacher_latency_s
        reports.append(r)
    if args.json:
        print(json.dumps({"data": repr(data), "runs": [r.as_dict() for r in reports]}, indent=2))
        return 0
    t = reports[0]
    print(repr(data))
    print(f"edge homophily {data.homophily():.3f}")
    header = ["model", "val acc", "test acc", "inference (full graph)"]
    rows = [
        [
            f"{args.teacher.upper()} teacher",
            f"{100 * t.teacher_val:.1f}",
            f"{100 * t.teacher_test:.1f}",
            f"{1e3 * t.teacher_latency_s:.2f} ms",
        ]
    ]
    names = {"mlp": "MLP (labels only)", "glnn": "MLP + GLNN", "ffg2m": "MLP + FF-G2M"}
    for r in reports:
        rows.append(
            [
                names[r.loss],
                f"{100 * r.student_val:.1f}",
                f"{100 * r.student_test:.1f}",
                f"{1e3 * r.student_latency_s:.2f} ms ({r.speedup:.1f}x faster)",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distill a teacher GNN into an MLP (CSBM graph, .npz or Planetoid files)",
        description=(
            "Trains a GCN or GraphSAGE teacher on the labelled nodes, then an MLP on labels only "
            "and an MLP distilled with the chosen loss (GLNN or FF-G2M), and reports validation "
            "and test accuracy and full-graph inference latency. Without --npz/--planetoid the "
            "graph is a contextual stochastic block model generated from the options below."
        ),
    )
    src = p.add_argument_group("data (default: a generated CSBM graph)")
    src.add_argument(
        "--npz", default=None, help=".npz file (edge_index or adj_*, features, labels)"
    )
    src.add_argument("--planetoid", default=None, help="Planetoid name (cora, citeseer, pubmed)")
    src.add_argument("--root", default=".", help="directory of the Planetoid raw files")
    src.add_argument("--nodes", type=int, default=2000, help="CSBM nodes (default 2000)")
    src.add_argument("--classes", type=int, default=4, help="CSBM classes (default 4)")
    src.add_argument("--features", type=int, default=64, help="CSBM feature dim (default 64)")
    src.add_argument("--homophily", type=float, default=0.8, help="CSBM homophily (default 0.8)")
    src.add_argument("--signal", type=float, default=1.5, help="CSBM class-mean norm (default 1.5)")
    p.add_argument("--teacher", choices=["gcn", "sage"], default="gcn")
    p.add_argument("--loss", choices=["ffg2m", "glnn", "mlp"], default="ffg2m")
    p.add_argument("--lam", type=float, default=0.0, help="weight of the label loss (default 0)")
    p.add_argument("--tau", type=float, default=1.0, help="FF-G2M temperature (default 1)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_distill)
