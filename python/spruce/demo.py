"""``spruce demo``: every landed capability on embedded default data, checked and timed.

Each capability contributes rows through a ``demo_rows(quick: bool) -> list[DemoRow]`` function
in the module named in ``TOUR``. A row runs spruce and the pure-Python baseline on the same
input, checks spruce against its reference implementation, and reports time, peak extra memory
and the ratio. The demo exits non-zero if any check fails.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._measure import best_time, fmt_bytes, fmt_time, peak_extra

#: Modules providing ``demo_rows(quick)``, in tour order.
TOUR: list[str] = [
    "spruce.demo",
    "spruce.prune._demo",
    "spruce.merge._demo",
    "spruce.structured._demo",
    "spruce.tn._demo",
    "spruce.distill._demo",
]


@dataclass
class DemoRow:
    capability: str
    task: str
    baseline: str
    spruce_s: float
    baseline_s: float
    spruce_mem: int | None
    baseline_mem: int | None
    check: str
    ok: bool

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.spruce_s if self.spruce_s > 0 else float("inf")


def measure(
    capability: str,
    task: str,
    baseline: str,
    run_spruce: Callable[[], Any],
    run_baseline: Callable[[], Any],
    check: Callable[[Any, Any], tuple[bool, str]],
    *,
    repeat: int = 3,
) -> DemoRow:
    """Checks spruce's result, then measures both sides' peak extra memory (after that first,
    warming call, so one-time set-up such as the thread pool does not count) and times them."""
    ok, detail = check(run_spruce(), run_baseline())
    _, mem_s = peak_extra(run_spruce)
    _, mem_b = peak_extra(run_baseline)
    t_s = best_time(run_spruce, repeat=repeat, warmup=0)
    t_b = best_time(run_baseline, repeat=max(1, repeat - 1), warmup=0)
    return DemoRow(capability, task, baseline, t_s, t_b, mem_s, mem_b, detail, ok)


def equal_check(got: Any, want: Any) -> tuple[bool, str]:
    if isinstance(got, (list, tuple)):
        ok = len(got) == len(want) and all(
            torch.equal(a, b) for a, b in zip(got, want, strict=True)
        )
    else:
        ok = torch.equal(got, want)
    return ok, "identical to reference" if ok else "DIFFERS from reference"


def demo_rows(quick: bool) -> list[DemoRow]:
    """Selection and masks."""
    import spruce
    from spruce import reference as ref

    g = torch.Generator().manual_seed(0)
    rows, cols = (256, 1024) if quick else (4096, 11008)
    w = torch.randn(rows, cols, generator=g).abs_()
    out = [
        measure(
            "selection",
            f"per-row 50% mask, {rows}x{cols} fp32",
            "torch.sort (Wanda)",
            lambda: spruce.topk_mask(w, 0.5, dim=-1),
            lambda: ref.topk_mask(w, 0.5, dim=-1),
            equal_check,
        ),
        measure(
            "selection",
            f"2:4 mask, {rows}x{cols} fp32",
            "reshape/sort/scatter",
            lambda: spruce.nm_mask(w, 2, 4),
            lambda: ref.nm_mask(w, 2, 4),
            equal_check,
        ),
    ]
    n_t = 20 if quick else 200
    sizes = [int(s) for s in torch.randint(1000, 50_000 if quick else 500_000, (n_t,), generator=g)]
    ts = [torch.randn(s, generator=g) for s in sizes]
    out.append(
        measure(
            "selection",
            f"global 50% over {n_t} tensors, {sum(sizes) / 1e6:.1f}M elements",
            "concatenate + sort",
            lambda: spruce.global_topk_masks(ts, 0.5),
            lambda: ref.global_topk_masks(ts, 0.5),
            equal_check,
            repeat=2,
        )
    )
    return out


def run_demo(*, quick: bool = False, quiet: bool = False) -> int:
    import spruce

    rows: list[DemoRow] = []
    for name in TOUR:
        mod = importlib.import_module(name)
        if not quiet:
            print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(mod.demo_rows(quick))
    info = spruce.info()
    print(
        f"spruce {info['spruce']} ({info['build profile']}), torch {info['torch']}, "
        f"{info['threads']} threads"
    )
    header = [
        "capability",
        "task",
        "spruce",
        "baseline",
        "time",
        "speedup",
        "mem spruce",
        "mem baseline",
        "check",
    ]
    table = [
        [
            r.capability,
            r.task,
            fmt_time(r.spruce_s),
            r.baseline,
            fmt_time(r.baseline_s),
            f"{r.speedup:.1f}x",
            fmt_bytes(r.spruce_mem),
            fmt_bytes(r.baseline_mem),
            ("ok: " if r.ok else "FAIL: ") + r.check,
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
        return 1
    return 0
