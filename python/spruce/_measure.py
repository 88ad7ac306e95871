"""Timing and peak-memory measurement shared by ``spruce demo`` and the benchmarks.

Peak memory is measured as resident memory (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``), since native allocations are invisible to ``tracemalloc``. Where that
interface is missing the peak is reported as ``None``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Resets the process's peak resident memory; False where the OS does not support it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra(fn: Callable[[], T]) -> tuple[T, int | None]:
    """Runs ``fn`` once; returns its result and the peak resident memory it added, in bytes."""
    gc.collect()
    ok = reset_peak()
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    if not ok or before is None or peak is None:
        return result, None
    return result, max(0, peak - before) * 1024


def best_time(fn: Callable[[], Any], *, repeat: int = 3, warmup: int = 1) -> float:
    """The best wall time of ``repeat`` runs of ``fn`` after ``warmup`` runs, in seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"
