"""The ``spruce`` command.

Subcommands: ``spruce demo`` (a tour of every capability on embedded data, checked against the
references, with a timing table), ``spruce info`` (version, build, threads, accelerators).
Capability modules add their own subcommands through a ``register(subparsers)`` function listed
in ``_SUBCOMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from .errors import SpruceError

# Modules that contribute subcommands: each defines register(subparsers) which adds parsers whose
# `func` default takes the parsed namespace and returns an exit code.
_SUBCOMMAND_MODULES: list[str] = [
    "spruce.prune.cli",
    "spruce.merge.cli",
    "spruce.tn.cli",
    "spruce.distill.cli",
]


def _cmd_info(args: argparse.Namespace) -> int:
    from . import info

    facts = info()
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(len(k) for k in facts)
        for k, v in facts.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="spruce",
        description="Exact, fast sparse and structured compute for PyTorch.",
    )
    p.add_argument("--version", action="version", version=f"spruce {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="run every capability on embedded data, check it, time it")
    d.add_argument("--quick", action="store_true", help="small inputs (seconds, for smoke tests)")
    d.add_argument("--quiet", action="store_true", help="print only the table")
    d.set_defaults(func=_cmd_demo)

    i = sub.add_parser("info", help="version, build profile, threads, CUDA availability")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_info)

    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SpruceError as e:
        print(f"spruce: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spruce: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
