"""Merging: spruce against the stacked torch implementation PEFT and mergekit use, PEFT itself,
and the physical floor (copying, or reading, the inputs once).

a) TIES of 4 task vectors of a 4096 x 11008 float32 weight (a LLaMA-7B MLP matrix).
b) Streaming checkpoint merges of three generated bfloat16 models of about 1.06 B parameters
   (a base and two fine-tunes, 2.1 GB each), against reading the input files once. Generating
   the models takes a few minutes and about 7 GiB of temporary disk; the cases are skipped only
   where that disk space is missing, or when deselected with ``SPRUCE_BENCH_CHECKPOINT=0``.

Run with ``make bench``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.utils.merge_utils import ties as peft_merge_ties

from spruce._measure import mem_available
from spruce.io import CheckpointWriter, TensorSpec
from spruce.merge import merge_checkpoints, merge_tensors
from spruce.reference import merge as ref

ROWS, COLS, MODELS = 4096, 11008, 4
WEIGHTS = [1.0, 0.8, 0.6, 0.4]
DENSITY = 0.2
GIB = 1 << 30

# ---------------------------------------------------------------------------------------------
# a) one tensor


@pytest.fixture(scope="module")
def task_models() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base weight and four fine-tunes of it (base + 0.01 randn)."""
    _warm_up()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(ROWS, COLS, generator=g)
    return base, [base + 0.01 * torch.randn(ROWS, COLS, generator=g) for _ in range(MODELS)]


def _warm_up() -> None:
    """The first call of the merge ops loads lazily imported machinery: not inside a measurement."""
    x = torch.rand(4, 8)
    merge_tensors("ties", x, [x + 1, x - 1], density=0.5)


def peft_ties(base: torch.Tensor, fts: list[torch.Tensor]) -> torch.Tensor:
    """PEFT's merge_utils.ties on the task vectors (which it needs materialized), plus the base."""
    taus = [f - base for f in fts]
    return base + peft_merge_ties(taus, torch.tensor(WEIGHTS), DENSITY)


GROUP_A = (
    "a) TIES of 4 task vectors: 4096 x 11008 float32, density 0.2, merge_tensors(preset='mergekit')"
)
# The stacked baseline holds at least the 4 stacked task vectors: a third of that bounds the
# memory spruce may add beyond its output (the target: at most 1/3 of its peak).
STACK_BYTES = MODELS * ROWS * COLS * 4
SPRUCE_EXTRA_LIMIT = STACK_BYTES // 3 - ROWS * COLS * 4


@pytest.mark.parametrize("impl", ["spruce", "stacked", "peft", "copy"])
def test_a_ties(measure, task_models, impl):
    base, fts = task_models
    n = base.numel()
    specs: dict[str, dict[str, Any]] = {
        "spruce": dict(
            fn=lambda: merge_tensors(
                "ties", base, fts, weights=WEIGHTS, density=DENSITY, preset="mergekit"
            ),
            impl="spruce.merge.merge_tensors('ties')",
            role="spruce",
            rounds=5,
            memory_limit=SPRUCE_EXTRA_LIMIT,
            memory_target=(
                f"peak <= 1/3 of the stacked baseline's stacked task vectors alone "
                f"({STACK_BYTES / 3 / 2**20:.0f} MiB, output included)"
            ),
        ),
        "stacked": dict(
            fn=lambda: ref.ties_stacked(base, fts, WEIGHTS, DENSITY, convention="mergekit"),
            impl="stacked torch, topk per task vector (PEFT/mergekit style)",
            role="baseline",
            rounds=1,
            target="spruce >= 10x faster",
            target_speedup=10.0,
            note="ties at the trim threshold are broken by topk's order: a few entries differ",
        ),
        "peft": dict(
            fn=lambda: peft_ties(base, fts),
            impl="peft.utils.merge_utils.ties (task vectors materialized first)",
            role="baseline",
            rounds=1,
            note="PEFT's conventions: unweighted sign election, divide by the agreeing count",
        ),
        "copy": dict(
            fn=lambda: [t.clone() for t in (base, *fts)],
            impl="copy of the 5 inputs (clone): the physical floor",
            role="copy",
            rounds=3,
            bytes_moved=2 * 5 * 4 * n,
        ),
    }
    spec = {"bytes_moved": (MODELS + 2) * 4 * n, **specs[impl]}
    measure(spec.pop("fn"), group=GROUP_A, **spec)


# ---------------------------------------------------------------------------------------------
# b) checkpoints of about a billion parameters

VOCAB, DIM, FF, LAYERS = 32000, 2048, 5632, 18
BIG = os.environ.get("SPRUCE_BENCH_CHECKPOINT", "1") != "0"
BIG_REASON = "the 1 B-parameter checkpoint cases are deselected (SPRUCE_BENCH_CHECKPOINT=0)"


def llama_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, DIM))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            shapes.append((p + f"self_attn.{proj}_proj.weight", (DIM, DIM)))
        shapes += [
            (p + "mlp.gate_proj.weight", (FF, DIM)),
            (p + "mlp.up_proj.weight", (FF, DIM)),
            (p + "mlp.down_proj.weight", (DIM, FF)),
            (p + "input_layernorm.weight", (DIM,)),
            (p + "post_attention_layernorm.weight", (DIM,)),
        ]
    shapes += [("model.norm.weight", (DIM,)), ("lm_head.weight", (VOCAB, DIM))]
    return shapes


def _write_model(path: Path, seed: int, base: Path | None) -> None:
    """Writes one bfloat16 model tensor by tensor (a fine-tune: the base plus 0.01 randn)."""
    from spruce.io import open_checkpoint

    shapes = llama_shapes()
    g = torch.Generator().manual_seed(seed)
    src = open_checkpoint(base) if base is not None else None
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes]
    with CheckpointWriter(path, specs, max_shard_bytes=GIB) as w:
        for n, s in shapes:
            if src is None:
                t = torch.randn(*s, generator=g).mul_(0.02).to(torch.bfloat16)
            else:
                b = src[n].float()
                t = b.add_(torch.randn(*s, generator=g), alpha=0.002).to(torch.bfloat16)
                src.close()
            w.write(n, t)
            del t


@pytest.fixture(scope="module")
def big_models() -> Iterator[tuple[Path, list[Path]]]:
    if not BIG:
        pytest.skip(BIG_REASON)
    params = sum(torch.Size(s).numel() for _, s in llama_shapes())
    need = 4 * params * 2 + GIB
    _warm_up()
    root = Path(tempfile.mkdtemp(prefix="spruce-bench-merge-"))
    try:
        if shutil.disk_usage(root).free < need:
            pytest.skip(f"needs {need / GIB:.1f} GiB of free disk")
        base = root / "base"
        _write_model(base, 0, None)
        fts = [root / f"ft{k}" for k in range(2)]
        for k, p in enumerate(fts):
            _write_model(p, 1 + k, base)
        yield base, fts
    finally:
        shutil.rmtree(root, ignore_errors=True)


def read_once(paths: list[Path]) -> int:
    """Reads every byte of every safetensors file once, in 64 MiB blocks."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    for p in paths:
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    total += n
    return total


def _merge_fn(base: Path, fts: list[Path], method: str, out: Path) -> Callable[[], Any]:
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in fts],
        "max_shard_size": "2GB",
    }

    def run() -> Any:
        shutil.rmtree(out, ignore_errors=True)
        report = merge_checkpoints(config, out, progress=False)
        return report.parameters

    return run


_FRESH = (
    "import torch\n"
    "from spruce._measure import status_bytes\n"
    "from spruce.merge import merge_tensors\n"
    "x = torch.rand(4, 8)\n"
    "merge_tensors('ties', x, [x + 1, x - 1], density=0.5)\n"
    "print(status_bytes('VmRSS'))\n"
)


def fresh_process_rss() -> int:
    """The resident memory of a fresh process that imported spruce.merge and merged once: what
    ``spruce merge`` holds before its first tensor. This benchmark process also holds case a's
    tensors and the baselines' libraries, which a merge run on its own would not."""
    r = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1])


def _big_case(measure, big_models, impl: str, method: str, group: str) -> None:
    base, fts = big_models
    params = sum(torch.Size(s).numel() for _, s in llama_shapes())
    in_bytes = 3 * 2 * params
    out = base.parent / f"out-{method}"
    avail = mem_available()
    if avail is not None and avail < 4 * GIB:
        pytest.skip(f"needs about 4 GiB of free memory, MemAvailable {avail / GIB:.1f} GiB")
    rss = fresh_process_rss() if impl == "spruce" else 0
    specs: dict[str, dict[str, Any]] = {
        "spruce": dict(
            fn=_merge_fn(base, fts, method, out),
            impl=f"spruce.merge.merge_checkpoints('{method}'), streamed",
            role="spruce",
            rounds=1,
            warmup=0,
            memory_limit=max(0, 2 * 10**9 - rss),
            memory_target=(
                f"peak resident memory < 2 GB: a fresh process holds {rss / 2**20:.0f} MiB "
                "before merging"
            ),
            bytes_moved=in_bytes + 2 * params,
        ),
        "read": dict(
            fn=lambda: read_once([base, *fts]),
            impl="reading the three input checkpoints once (64 MiB reads)",
            role="copy",
            rounds=2,
            warmup=1,
            target="spruce <= 2x this time",
            target_speedup=0.5,
            bytes_moved=in_bytes,
        ),
    }
    spec = specs[impl]
    measure(spec.pop("fn"), group=group, **spec)


GROUP_B1 = (
    "b1) checkpoint task_arithmetic: base + 2 fine-tunes, 1.06 B parameters each, bfloat16 "
    "(6.4 GB read, 2.1 GB written)"
)
GROUP_B2 = "b2) checkpoint TIES (density 0.5): the same three bfloat16 checkpoints"


@pytest.mark.skipif(not BIG, reason=BIG_REASON)
@pytest.mark.parametrize("impl", ["read", "spruce"])
def test_b1_checkpoint_task_arithmetic(measure, big_models, impl):
    _big_case(measure, big_models, impl, "task_arithmetic", GROUP_B1)


@pytest.mark.skipif(not BIG, reason=BIG_REASON)
@pytest.mark.parametrize("impl", ["read", "spruce"])
def test_b2_checkpoint_ties(measure, big_models, impl):
    _big_case(measure, big_models, impl, "ties", GROUP_B2)
