"""Turns a pytest-benchmark JSON file into benches/RESULTS.md (and the README's table).

    python benches/report.py benches/results/latest.json [--out benches/RESULTS.md]
                             [--readme README.md]

One header line names the machine the benchmarks ran on, then one table per benchmark group:
implementation, median time, spruce's speed-up over it, peak extra memory (with and without the
outputs), effective bandwidth against a plain copy of the same input, the target and whether it
is met. The facts come from each benchmark's ``extra_info`` (see ``benches/conftest.py``).

With ``--readme`` the same text replaces everything between the lines ``<!-- bench:start -->``
and ``<!-- bench:end -->``; if those markers are missing the README is left alone and the script
exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ROLE_ORDER = {"spruce": 0, "baseline": 1, "reference": 2, "copy": 3}


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.0f} B"


def fmt_ratio(r: float) -> str:
    return f"{r:.1f}x" if r >= 0.95 else f"{r:.2f}x"


def _machine_now() -> dict[str, Any]:
    """Fallback when the JSON lacks the facts: the machine running this script."""
    info: dict[str, Any] = {"cpu_model": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["ram_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    return info


def header(data: dict[str, Any]) -> str:
    m = data.get("machine_info", {}).get("spruce_bench") or _machine_now()
    parts = [
        f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores",
        f"{fmt_bytes(m.get('ram_bytes'))} RAM",
        f"torch {m.get('torch', '?')}",
    ]
    if "spruce" in m:
        parts.append(f"spruce {m['spruce']} ({m.get('spruce_threads', '?')} threads)")
    date = m.get("date") or data.get("datetime", "?")[:16].replace("T", " ")
    return f"Measured on {', '.join(parts)}, {date}."


def _median(b: dict[str, Any]) -> float:
    return float(b["stats"]["median"])


def _bandwidth(b: dict[str, Any]) -> float | None:
    n = b["extra_info"].get("bytes")
    return n / _median(b) if n else None


def group_table(name: str, benches: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The markdown lines of one group, and the targets it missed."""
    rows = sorted(benches, key=lambda b: ROLE_ORDER.get(b["extra_info"].get("role"), 9))
    spruce_rows = [b for b in rows if b["extra_info"].get("role") == "spruce"]
    copies = [b for b in rows if b["extra_info"].get("role") == "copy"]
    base = spruce_rows[0] if spruce_rows else None
    copy_bw = _bandwidth(copies[0]) if copies else None
    lines = [
        f"### {name}",
        "",
        "| implementation | median (rounds) | spruce speed-up | peak extra memory "
        "| without outputs | bandwidth | target | met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    notes: list[str] = []
    missed: list[str] = []
    for b in rows:
        info = b["extra_info"]
        role = info.get("role")
        impl = info.get("impl", b["name"])
        med = _median(b)
        ratio = _median(b) / _median(base) if base is not None and b is not base else None
        peak = info.get("peak_extra")
        out = info.get("output_bytes")
        # pages are 4 KiB: a result of a few bytes can exceed a peak rounded down to 0
        without = max(0, peak - out) if peak is not None and out is not None else None
        bw = ""
        if role == "spruce" and copy_bw and _bandwidth(b):
            pct = 100 * _bandwidth(b) / copy_bw
            pct_s = f"{pct:.0f}" if pct >= 10 else f"{pct:.1f}"
            bw = f"{_bandwidth(b) / 1e9:.1f} GB/s = {pct_s} % of copy"
        elif role == "copy" and copy_bw:
            bw = f"{copy_bw / 1e9:.1f} GB/s (read + write)"
        target, met = "", ""
        if info.get("target_speedup") is not None and ratio is not None:
            target = info.get("target", f"spruce >= {info['target_speedup']}x faster")
            ok = ratio >= float(info["target_speedup"])
            met = "yes" if ok else "**no**"
            if not ok:
                missed.append(f"{name} vs {impl}: {target}, got {fmt_ratio(ratio)}")
        if info.get("memory_limit") is not None and without is not None:
            mem_target = info.get("memory_target", f"extra < {fmt_bytes(info['memory_limit'])}")
            ok = without < int(info["memory_limit"])
            target = f"{target}; {mem_target}" if target else mem_target
            met = ("yes" if ok else "**no**") if not met else f"{met}; {'yes' if ok else '**no**'}"
            if not ok:
                missed.append(
                    f"{name.split(')')[0]}) {impl}: {mem_target}, got {fmt_bytes(without)}"
                )
        lines.append(
            f"| {impl} | {fmt_time(med)} ({b['stats']['rounds']}) "
            f"| {fmt_ratio(ratio) if ratio is not None else '—'} | {fmt_bytes(peak)} "
            f"| {fmt_bytes(without)} | {bw} | {target} | {met} |"
        )
        if info.get("note"):
            notes.append(f"{impl}: {info['note']}.")
        for other, why in (info.get("untimed") or {}).items():
            lines.append(f"| {other} | not timed | | | | | | |")
            notes.append(f"{other}: {why}.")
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    lines.append("")
    return lines, missed


def _suite(b: dict[str, Any]) -> str:
    """``masks`` for ``benches/bench_masks.py::test_...``."""
    stem = Path(b.get("fullname", "").split("::")[0]).stem
    return stem.removeprefix("bench_") or "benchmarks"


def render(data: dict[str, Any]) -> str:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    suites: list[str] = []
    for b in data.get("benchmarks", []):
        suite = _suite(b)
        if suite not in suites:
            suites.append(suite)
        groups.setdefault((suite, b.get("group") or b["name"]), []).append(b)
    body: list[str] = []
    missed: list[str] = []
    for suite, name in sorted(groups, key=lambda k: (suites.index(k[0]), k[1])):
        title = f"{suite}, {name}" if len(suites) > 1 else name
        lines, miss = group_table(title, groups[suite, name])
        body += lines
        missed += miss
    targets = sum(
        (b["extra_info"].get("target_speedup") is not None)
        + (b["extra_info"].get("memory_limit") is not None)
        for g in groups.values()
        for b in g
    )
    out = [
        header(data),
        "",
        "Median wall time; speed-up = the implementation's median / spruce's (above 1: spruce "
        "is faster). Peak extra memory = the peak resident memory one call adds, outputs "
        "included. Bandwidth = the bytes the operation must read and write / median time.",
        "",
        f"Targets met: {targets - len(missed)} of {targets}."
        + ("" if not missed else " Missed: " + "; ".join(missed) + "."),
        "",
        *body,
    ]
    return "\n".join(out).rstrip() + "\n"


def replace_between_markers(readme: str, content: str) -> str | None:
    lines = readme.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        return None
    return "".join(lines[: starts[0] + 1]) + content + "".join(lines[ends[0] :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    p.add_argument("--readme", type=Path, help="README to update between the bench markers")
    args = p.parse_args(argv)
    data = json.loads(args.json.read_text())
    if not data.get("benchmarks"):
        print(f"report.py: {args.json} holds no benchmarks", file=sys.stderr)
        return 1
    content = render(data)
    args.out.write_text(content)
    print(f"wrote {args.out}")
    if args.readme is not None:
        updated = replace_between_markers(args.readme.read_text(), content)
        if updated is None:
            print(
                f"report.py: {args.readme} needs exactly one line '{START}' followed by one line "
                f"'{END}'; README left unchanged",
                file=sys.stderr,
            )
            return 2
        args.readme.write_text(updated)
        print(f"updated {args.readme} between {START} and {END}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
