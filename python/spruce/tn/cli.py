"""``spruce compress``: MPO-compress the linear weights of a safetensors checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress import compress_checkpoint
    from .layers import PerformanceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PerformanceWarning)
        reports = compress_checkpoint(
            args.input,
            args.output,
            max_rank=args.max_rank,
            eps=args.eps,
            include=args.include,
            num_cores=args.cores,
            min_features=args.min_features,
            progress=False if args.quiet else None,
        )
    noted = False
    for w in caught:
        if issubclass(w.category, PerformanceWarning):
            noted = True
            print(f"spruce: note: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if args.json:
        print(json.dumps([{**r.__dict__, "ratio": r.ratio} for r in reports], indent=2))
        return 0
    if not reports:
        if not noted:
            print("no tensor matched (2-D *.weight, both dims >= --min-features, --include)")
        else:
            print("no layer compressed (see the note above)")
        return 0
    header = ["layer", "shape", "ranks", "params", "kept", "rel. error", "MACs/row"]
    rows = [
        [
            r.name,
            "x".join(map(str, r.shape)),
            "-".join(map(str, r.ranks[1:-1])),
            f"{r.params_before} -> {r.params_after}",
            f"{100 * r.ratio:.1f}%",
            f"{r.rel_error:.2e}",
            f"{r.flops_before} -> {r.flops_after}",
        ]
        for r in reports
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    before = sum(r.params_before for r in reports)
    after = sum(r.params_after for r in reports)
    print(f"{len(reports)} layer(s): {before} -> {after} parameters ({100 * after / before:.1f}%)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress",
        help="MPO-compress linear weights of a safetensors checkpoint",
        description=(
            "Stores every matching 2-D '<name>.weight' as MPO cores '<name>.cores.<k>' (the "
            "state-dict keys of spruce.nn.MPOLinear) and copies every other tensor; reports "
            "parameters, relative error and multiply-adds per layer."
        ),
    )
    p.add_argument("input", help="input .safetensors file or sharded directory")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file or directory")
    g = p.add_argument_group("truncation (at least one)")
    g.add_argument("--max-rank", type=int, default=None, help="largest bond dimension")
    g.add_argument("--eps", type=float, default=None, help="relative Frobenius error per layer")
    p.add_argument("--include", default=r".*", help="regex on tensor names (default: all)")
    p.add_argument("--cores", type=int, default=3, help="number of MPO cores (default 3)")
    p.add_argument(
        "--min-features", type=int, default=64, help="skip layers with a smaller dim (default 64)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compress)
