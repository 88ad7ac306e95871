"""Timing and peak-memory measurement shared by ``spruce demo``, the tests and the benchmarks.

Rust (and most of torch's) allocations are invisible to ``tracemalloc``, so peak memory is the
process's resident set: ``/proc/self/clear_refs`` (write ``5``) resets the peak ``VmHWM`` to the
current ``VmRSS``; the peak reached while a callable runs, minus ``VmRSS`` before it, is the
extra memory it needed (its outputs included, since they are alive when the peak is read).

Before each measurement freed heap memory is handed back to the OS (``malloc_trim(0)``):
otherwise an allocation could reuse pages that an earlier, freed result left resident and
would not show in the peak. Peaks are ``None`` where the interface is missing (not Linux).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

try:
    _LIBC: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _MALLOC_TRIM = _LIBC.malloc_trim
except (OSError, AttributeError):
    _MALLOC_TRIM = None


def status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM`` ...) in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Resets the peak resident memory (``VmHWM``) to the current one; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collects garbage and returns the allocator's free pages to the OS."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class PeakMeter:
    """``start()`` before the work, ``stop()`` right after it: the peak extra bytes in between.

    Split in two so that the preparation (garbage collection, trimming) can stay outside a timed
    region while the single read of the peak stays inside it.
    """

    def __init__(self) -> None:
        self._ok = False
        self._before: int | None = None

    def start(self) -> None:
        release_free_memory()
        self._ok = reset_peak()
        self._before = status_bytes("VmRSS")

    def stop(self) -> int | None:
        peak = status_bytes("VmHWM")
        if not self._ok or self._before is None or peak is None:
            return None
        return max(0, peak - self._before)


def peak_extra(fn: Callable[[], T]) -> tuple[T, int | None]:
    """Runs ``fn`` once; returns its result and the peak resident memory it added, in bytes."""
    meter = PeakMeter()
    meter.start()
    result = fn()
    return result, meter.stop()


def nbytes(obj: object) -> int:
    """The bytes held by the tensors and arrays in ``obj`` (recursing into tuples and lists)."""
    if hasattr(obj, "untyped_storage") and hasattr(obj, "element_size"):  # torch.Tensor
        return obj.numel() * obj.element_size()  # type: ignore[attr-defined]
    if hasattr(obj, "nbytes") and hasattr(obj, "dtype"):  # numpy.ndarray
        return int(obj.nbytes)  # type: ignore[attr-defined]
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(v) for v in obj)
    return 0


def mem_available() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo``, in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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
