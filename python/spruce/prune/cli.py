"""``spruce prune``: data-free pruning of a safetensors checkpoint, streamed tensor by tensor.

    spruce prune IN.safetensors -o OUT.safetensors --method magnitude --sparsity 0.5
                 [--pattern 2:4|row|column] [--scope layer|row|global]
                 [--include REGEX ...] [--exclude REGEX ...] [--save-masks MASKS.safetensors]

``IN`` is a ``.safetensors`` file or a directory (sharded with ``model.safetensors.index.json``,
or single-file). Tensors are memory-mapped and processed one at a time: resident memory stays
around the largest tensor (plus its mask), and ``--scope global`` finds its exact threshold with
histograms over the memory-mapped tensors, never a concatenated copy. The output is written to
temporary files renamed into place at the end: an error leaves no partial output. When ``IN``
and ``OUT`` are directories, the other files of ``IN`` (config, tokenizer) are copied along.

Targets: floating tensors whose name ends in ``weight`` with at least 2 dimensions, minus names
matching ``--exclude`` (default: ``embed|wte|wpe|lm_head|shared``, the embeddings and output
heads pruning recipes leave dense). With ``--include``, exactly the tensors matching one of the
patterns (any float tensor). A tensor of shape ``(d0, d1, ...)`` is pruned as the
``(d0, d1 * ...)`` matrix: rows are output channels, N:M groups run along the flattened input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import _ops
from ..errors import CheckpointError, ConfigError
from ..io import INDEX_NAME, CheckpointWriter, TensorSpec, open_checkpoint
from ..masks import pack_mask, random_mask, structured_mask
from ..merge.checkpoint import output_overlaps, remove_stale_files

DEFAULT_EXCLUDE = r"embed|wte|wpe|lm_head|shared"
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB, 1048576)")
    unit = (m.group(2) or "").rstrip("b").rstrip("i")
    mult = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prune",
        help="prune a safetensors checkpoint (magnitude or random), streaming",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("input", help="a .safetensors file or a checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file or directory")
    p.add_argument("--method", choices=["magnitude", "random"], default="magnitude")
    p.add_argument("--sparsity", type=float, help="fraction pruned (implied by an N:M pattern)")
    p.add_argument(
        "--pattern",
        default="unstructured",
        help="unstructured (default), N:M such as 2:4, row or column",
    )
    p.add_argument(
        "--scope",
        choices=["layer", "row", "global"],
        default="layer",
        help="comparison group (default: each tensor)",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="REGEX",
        help="prune exactly the tensors matching (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help=f"skip matching tensors (repeatable; default {DEFAULT_EXCLUDE!r})",
    )
    p.add_argument(
        "--save-masks",
        metavar="PATH",
        help="also write the keep-masks as packed bitmasks (safetensors)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --method random")
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default=5 * 2**30,
        help="shard size of a directory output (default 5GB)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=run)


def _targets(ck: Any, include: list[str] | None, exclude: list[str] | None) -> list[str]:
    def compile_all(pats: list[str], arg: str) -> list[re.Pattern[str]]:
        out = []
        for pat in pats:
            try:
                out.append(re.compile(pat))
            except re.error as e:
                raise ConfigError(
                    f"prune: {arg} ({pat!r}) is not a valid regular expression: {e}"
                ) from e
        return out

    inc = compile_all(include or [], "--include")
    exc = compile_all(exclude if exclude is not None else [DEFAULT_EXCLUDE], "--exclude")
    names = []
    for n in ck.names:
        if any(p.search(n) for p in exc):
            continue
        if inc:
            if not any(p.search(n) for p in inc):
                continue
            if ck.dtype(n) not in FLOATS:
                raise CheckpointError(
                    f"{ck.path}: tensor {n!r} has dtype {ck.dtype(n)}, expected a float dtype to prune"
                )
            if len(ck.shape(n)) == 0:
                raise CheckpointError(
                    f"{ck.path}: tensor {n!r} is a scalar, expected at least one dimension"
                )
        elif not (n.endswith("weight") and len(ck.shape(n)) >= 2 and ck.dtype(n) in FLOATS):
            continue
        names.append(n)
    if not names:
        raise ConfigError(
            f"prune: no tensor of {ck.path} matched (include={include}, exclude={exclude})"
        )
    return names


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def _check_index(path: Path, ck: Any) -> None:
    index = path / INDEX_NAME if path.is_dir() else None
    if index is None or not index.exists():
        return
    listed = set(json.loads(index.read_text()).get("weight_map", {}))
    missing = sorted(listed - set(ck.names))
    if missing:
        raise CheckpointError(
            f"{index}: lists {len(missing)} tensor(s) no shard holds (first: {missing[0]!r})"
        )


def run(args: argparse.Namespace) -> int:
    from .model import _parse

    t_start = time.perf_counter()
    src, out = Path(args.input), Path(args.output)
    masks_out = Path(args.save_masks) if args.save_masks else None
    for what, path in (("output", out), ("--save-masks", masks_out)):
        if path is not None and output_overlaps(path, src):
            raise ConfigError(
                f"prune: {what} ({path}) must differ from the input {src} (the input is read "
                "while writing)"
            )
    if masks_out is not None and masks_out.resolve() == out.resolve():
        raise ConfigError(f"prune: --save-masks ({masks_out}) must differ from the output")
    cfg = _parse(args.method, args.sparsity, args.pattern, args.scope, None)
    if cfg.pattern == "head":
        raise ConfigError(
            "prune: pattern 'head' needs model structure; use spruce.prune.prune_model"
        )
    if args.method == "random" and args.scope != "layer":
        raise ConfigError("prune: --method random supports --scope layer only")
    ck = open_checkpoint(src)
    with ck:
        _check_index(src, ck)
        targets = _targets(ck, args.include, args.exclude)
        tset = set(targets)
        for n in targets:
            rows, cols = _matrix_shape(ck.shape(n))
            if cfg.pattern == "N:M" and cols % cfg.m:
                raise ConfigError(
                    f"prune: tensor {n!r} {ck.shape(n)}: {cols} inputs not divisible by M = {cfg.m} (exclude it)"
                )
        value, ties = None, 0
        if cfg.scope == "global":
            views = [ck.get_tensor(n).reshape(_matrix_shape(ck.shape(n))) for n in targets]
            v, t = _ops.score_threshold(
                views, [None] * len(views), [False] * len(views), float(cfg.sparsity)
            )
            value, ties = float(v), int(t)
            del views
            ck.close()  # drop the mappings: their pages leave the process
        specs = [ck.spec(n) for n in ck.names]
        params = {
            "method": args.method,
            "sparsity": cfg.sparsity,
            "pattern": cfg.label,
            "scope": cfg.scope,
            **({"seed": args.seed} if args.method == "random" else {}),
        }
        meta = {k: v for k, v in ck.metadata.items() if k != "format"}
        meta["spruce.prune"] = json.dumps(params)
        summary: list[dict[str, Any]] = []
        from tqdm.auto import tqdm

        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(
                CheckpointWriter(out, specs, max_shard_bytes=args.max_shard_size, metadata=meta)
            )
            mask_writer = None
            if args.save_masks:
                mspecs = []
                for n in targets:
                    shape = list(ck.shape(n)) or [1]
                    shape[-1] = (shape[-1] + 7) // 8
                    mspecs.append(TensorSpec(n, torch.uint8, tuple(shape)))
                mmeta = {
                    "spruce.prune": json.dumps(params),
                    "spruce.mask_shapes": json.dumps({n: list(ck.shape(n)) for n in targets}),
                }
                mask_writer = stack.enter_context(
                    CheckpointWriter(args.save_masks, mspecs, metadata=mmeta)
                )
            total_bytes = sum(s.nbytes for s in specs)
            bar = stack.enter_context(
                tqdm(
                    total=total_bytes,
                    unit="B",
                    unit_scale=True,
                    desc="prune",
                    disable=True if args.quiet else None,
                )
            )
            for i, n in enumerate(ck.names):
                t = ck.get_tensor(n)
                if n in tset:
                    w = t.clone()
                    w2 = w.reshape(_matrix_shape(tuple(w.shape)))
                    keep, pruned, ties = _prune_one(
                        w2, cfg, args, value, ties, mask_writer is not None, i
                    )
                    writer.write(n, w)
                    if mask_writer is not None and keep is not None:
                        mask_writer.write(n, pack_mask(keep.reshape(w.shape)))
                    numel = w.numel()
                    summary.append(
                        {
                            "name": n,
                            "shape": list(w.shape),
                            "dtype": str(w.dtype).replace("torch.", ""),
                            "pruned": pruned,
                            "sparsity": 1 - int(torch.count_nonzero(w)) / numel if numel else 0.0,
                        }
                    )
                    del w, w2, keep
                else:
                    writer.write(n, t)
                bar.update(ck.nbytes(n))
                del t
                ck.close()  # one tensor resident at a time: the mapping is reopened lazily
        remove_stale_files(out, writer.shard_paths)
        if mask_writer is not None:
            remove_stale_files(Path(args.save_masks), mask_writer.shard_paths)
        if src.is_dir() and out.suffix != ".safetensors":
            _copy_side_files(src, out)
    total = sum(math.prod(s["shape"]) for s in summary)
    pruned = sum(s["pruned"] for s in summary)
    report = {
        **params,
        "input": str(src),
        "output": str(out),
        "tensors": summary,
        "total_params": total,
        "total_pruned": pruned,
        "seconds": time.perf_counter() - t_start,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        _print_table(report)
    return 0


def _prune_one(
    w2: torch.Tensor,
    cfg: Any,
    args: argparse.Namespace,
    value: float | None,
    ties: int,
    want_mask: bool,
    index: int,
) -> tuple[torch.Tensor | None, int, int]:
    """Prunes one ``(rows, cols)`` view in place; returns (keep-mask or None, pruned, ties left)."""
    s = float(cfg.sparsity)
    if args.method == "random":
        n = w2.numel()
        k = math.floor(s * n)
        keep = random_mask(
            tuple(w2.shape), (n - k) / n if n else 1.0, seed=(args.seed * 1_000_003 + index) % 2**63
        )
    elif cfg.pattern == "N:M":
        keep = _ops.wanda_mask(w2, None, 0.0, cfg.n, cfg.m)
    elif cfg.pattern in ("row", "column"):
        keep = structured_mask(w2, s, dim=cfg.dim, norm=2)
    elif cfg.scope == "row":
        keep = _ops.wanda_mask(w2, None, s, 0, 0)
    else:
        if cfg.scope == "layer":
            v, t = _ops.score_threshold([w2], [None], [False], s)
            value, ties_here = float(v), int(t)
        else:
            ties_here = ties
        assert value is not None
        if want_mask:
            keep, used = _ops.threshold_mask(w2, None, False, value, ties_here)
            w2.masked_fill_(~keep, 0)
            pruned = keep.numel() - int(keep.sum())
        else:
            pr, used_t = _ops.threshold_prune_(w2, None, False, value, ties_here)
            keep, pruned, used = None, int(pr), int(used_t)
        return keep, pruned, ties - int(used) if cfg.scope == "global" else ties
    w2.masked_fill_(~keep, 0)
    return keep, keep.numel() - int(keep.sum()), ties


def _copy_side_files(src: Path, out: Path) -> None:
    """Copies the non-weight files of a checkpoint directory (config, tokenizer ...)."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_NAME:
            tmp = out / f".{f.name}.tmp"
            shutil.copyfile(f, tmp)
            tmp.replace(out / f.name)


def _print_table(report: dict[str, Any]) -> None:
    rows = [
        [
            t["name"],
            "x".join(map(str, t["shape"])),
            t["dtype"],
            f"{t['pruned']:,}",
            f"{t['sparsity']:.4f}",
        ]
        for t in report["tensors"]
    ]
    head = ["tensor", "shape", "dtype", "pruned", "sparsity"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    out = sys.stdout
    print(
        f"spruce prune: {report['method']} sparsity={report['sparsity']} pattern={report['pattern']} "
        f"scope={report['scope']} -> {report['output']}",
        file=out,
    )
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)), file=out)
    tp = report["total_params"]
    print(
        f"total: {report['total_pruned']:,} of {tp:,} weights pruned in {len(rows)} tensors "
        f"({100 * report['total_pruned'] / tp if tp else 0:.2f} %), {report['seconds']:.2f} s",
        file=out,
    )
