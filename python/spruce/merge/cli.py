"""``spruce merge CONFIG.yaml -o OUT_DIR``: merge safetensors checkpoints from a configuration."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]

_EPILOG = """\
example configuration (YAML):

  merge_method: ties
  base_model: ./base
  models:
    - model: ./math
      parameters: {weight: 1.0, density: 0.5}
    - model: ./code
      parameters: {weight: 0.7, density: 0.5}
  parameters: {lambda: 1.0}
  preset: spruce          # spruce | mergekit | peft | paper
  dtype: bfloat16
  max_shard_size: 5GB
"""


def _cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import _check_output, _plan_tensors, _Sources, merge_checkpoints
    from .config import load_config, parse_size

    cfg = load_config(args.config)
    if args.dry_run:
        _check_output(cfg, Path(args.out))
        src = _Sources(cfg)
        try:
            items, skipped = _plan_tensors(cfg, src)
        finally:
            src.release()
        merged = [it for it in items if it.action == "merge"]
        copied = [it for it in items if it.action == "copy"]
        params = sum(it.spec.nbytes // max(1, it.spec.dtype.itemsize) for it in merged)
        print(
            f"{cfg.merge_method} (preset {cfg.preset}) of {len(cfg.models)} model(s): would merge "
            f"{len(merged)} tensor(s) ({params:,} parameters), copy {len(copied)}, skip "
            f"{len(skipped)}; nothing written"
        )
        return 0
    shard = None if args.max_shard_size is None else parse_size(args.max_shard_size)
    report = merge_checkpoints(
        cfg, args.out, progress=False if args.quiet else None, max_shard_bytes=shard
    )
    if not args.quiet:
        print(report.summary())
    return 0


def register(subparsers: Any) -> None:
    """Adds the ``merge`` subcommand."""
    p = subparsers.add_parser(
        "merge",
        help="merge safetensors checkpoints as a YAML configuration describes",
        description=(
            "Merge fine-tuned checkpoints (task arithmetic, TIES, DARE, DELLA, breadcrumbs, PCB, "
            "Fisher, SLERP, linear) one tensor at a time, in bounded memory, into sharded "
            "safetensors written atomically."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="the merge configuration (.yaml, .yml or .json)")
    p.add_argument(
        "-o", "--out", required=True, help="output directory (or a .safetensors file path)"
    )
    p.add_argument(
        "--max-shard-size",
        default=None,
        help="output shard size, e.g. 2GB (overrides the configuration's max_shard_size)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the configuration and every checkpoint's names, shapes and dtypes; write nothing",
    )
    p.set_defaults(func=_cmd_merge)


if __name__ == "__main__":  # pragma: no cover - `spruce merge` is the entry point
    parser = argparse.ArgumentParser(prog="spruce")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
