"""The benchmark suites' shared machinery.

Every benchmark goes through the ``measure`` fixture, which times one implementation of one case
with pytest-benchmark and attaches the facts ``benches/report.py`` turns into tables
(``benchmark.extra_info``):

- ``impl``, ``role`` (``spruce``, ``baseline``, ``reference`` or ``copy``), ``case``;
- ``bytes``: the bytes the operation must read and write at the least (for a copy: read + write);
- ``peak_extra`` and ``output_bytes``: the peak resident memory one call added, outputs included,
  and the bytes of those outputs (see ``spruce._measure``);
- optionally ``target`` (text) with ``target_speedup`` (spruce must be at least that many times
  faster than this row; 0.5 = "at most twice its time"), ``memory_limit`` (bytes spruce may use
  beyond its outputs), ``note``, and ``untimed`` (implementations not timed, with the reason).

Benchmark files are named ``bench_*.py`` (collected here, so ``make test`` never runs them).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
import torch

import spruce
from spruce._measure import PeakMeter, nbytes, peak_extra


def pytest_collect_file(parent: pytest.Collector, file_path: Any) -> pytest.Module | None:
    # A file named on the command line is collected by pytest itself: do not collect it twice.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """The facts ``report.py`` prints in its header line, recorded where the benchmarks ran."""
    import numpy

    machine_info["spruce_bench"] = {
        "cpu_model": _cpu_model(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "ram_bytes": _mem_total(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "spruce": spruce.__version__,
        "spruce_threads": spruce.num_threads(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


@pytest.fixture(scope="session", autouse=True)
def _warm_up_torch_op_machinery() -> None:
    """The first call of a torch custom op loads lazily imported machinery (well over 100 MiB of
    resident memory, once per process): pay it here, not inside a measurement."""
    x = torch.rand(4, 8)
    spruce.topk_mask(x, 0.5, dim=-1)
    spruce.global_topk_masks([x], 0.5)
    spruce.nm_mask(x, 2, 4)
    spruce.kthvalue(x, 2)
    spruce.quantile(x, 0.5)
    spruce.random_mask((4, 8), 0.5, seed=0)
    spruce.unpack_mask(spruce.pack_mask(x > 0.5), (4, 8))


class Measure:
    """Times one implementation of one case and records its facts (see the module docstring)."""

    def __init__(self, benchmark: Any) -> None:
        self.benchmark = benchmark

    def __call__(
        self,
        fn: Callable[[], Any],
        *,
        group: str,
        impl: str,
        role: str,
        bytes_moved: int,
        rounds: int,
        warmup: int = 1,
        target: str | None = None,
        target_speedup: float | None = None,
        memory_limit: int | None = None,
        memory_target: str | None = None,
        note: str | None = None,
        untimed: dict[str, str] | None = None,
    ) -> None:
        """Runs ``fn`` ``warmup`` times untimed, then measures its memory and times ``rounds``
        calls. With ``rounds=1`` (slow cases) the memory is read in the single timed call (its
        preparation runs in pytest-benchmark's untimed ``setup``)."""
        b = self.benchmark
        b.group = group
        info = b.extra_info
        info.update(impl=impl, role=role, bytes=int(bytes_moved))
        for key, value in (
            ("target", target),
            ("target_speedup", target_speedup),
            ("memory_limit", memory_limit),
            ("memory_target", memory_target),
            ("note", note),
            ("untimed", untimed),
        ):
            if value is not None:
                info[key] = value
        for _ in range(warmup):
            fn()
        if rounds == 1:
            meter = PeakMeter()
            result, peak = b.pedantic(
                lambda: (fn(), meter.stop()), setup=meter.start, rounds=1, iterations=1
            )
            out = nbytes(result)
        else:
            result, peak = peak_extra(fn)
            out = nbytes(result)
            del result  # not alive while the timed rounds run
            b.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        info.update(peak_extra=peak, output_bytes=out)


@pytest.fixture
def measure(benchmark: Any) -> Measure:
    return Measure(benchmark)
