"""Selection and masks: spruce against the pure-torch baseline and the best existing tool.

Every case times spruce, the baselines, ``spruce.reference`` (the pure-torch oracle, when it is
installed) and one memory copy of the same input (the physical floor, and the bandwidth the
spruce kernels are compared with). float32, fixed seeds. Run with ``make bench``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import spruce
from spruce._measure import mem_available

ROWS, COLS = 4096, 11008  # a LLaMA-7B MLP weight
SPARSITY = 0.5
GLOBAL_TENSORS, GLOBAL_TOTAL = 200, 1 << 29
GIB = 1 << 30

# ---------------------------------------------------------------------------------------------
# inputs: generated once per session


@pytest.fixture(scope="session")
def matrix() -> torch.Tensor:
    """|randn| scores of a 4096 x 11008 weight."""
    torch.manual_seed(0)
    return torch.randn(ROWS, COLS).abs_()


@pytest.fixture(scope="session")
def matrix_mask(matrix: torch.Tensor) -> torch.Tensor:
    return spruce.topk_mask(matrix, SPARSITY, dim=-1)


@pytest.fixture(scope="session")
def vec25() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4096, 8192)  # 2^25 elements


@pytest.fixture(scope="session")
def vec24() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(4096, 4096)  # 2^24 elements


def global_shapes(total: int = GLOBAL_TOTAL, count: int = GLOBAL_TENSORS) -> list[tuple[int, ...]]:
    """``count`` varied shapes (matrices, conv kernels, vectors) of ``total`` elements in all."""
    rng = random.Random(0)
    weights = [rng.lognormvariate(0.0, 0.6) for _ in range(count - 1)]
    scale = total * 0.97 / sum(weights)
    shapes: list[tuple[int, ...]] = []
    for i, w in enumerate(weights):
        n = int(scale * w)
        if i % 10 == 9:
            shapes.append((n,))
        elif i % 10 == 8:
            cin = rng.choice([64, 128, 256])
            shapes.append((max(1, n // (cin * 9)), cin, 3, 3))
        else:
            cols = rng.choice([512, 1024, 2048, 4096, 11008])
            shapes.append((max(1, n // cols), cols))
    shapes.append((total - sum(math.prod(s) for s in shapes),))
    return shapes


@pytest.fixture(scope="session")
def global_scores() -> list[torch.Tensor]:
    """200 tensors of |randn| totalling 2^29 float32 (2 GiB), filled in place."""
    shapes = global_shapes()
    assert len(shapes) == GLOBAL_TENSORS and sum(math.prod(s) for s in shapes) == GLOBAL_TOTAL
    need = GLOBAL_TOTAL * (4 + 1) + GIB  # the input, spruce's masks, a margin
    avail = mem_available()
    if avail is not None and avail < need:
        pytest.skip(f"global case needs {need / GIB:.1f} GiB free, MemAvailable {avail / GIB:.1f}")
    g = torch.Generator().manual_seed(3)
    return [torch.empty(s).normal_(generator=g).abs_() for s in shapes]


@pytest.fixture(scope="session")
def global_baseline_skip(global_scores: list[torch.Tensor]) -> str | None:
    """Why the concatenating baseline cannot run here (None: it can). It holds the concatenated
    copy, torch.kthvalue's copy of it and int64 indices at once: about 4x the input."""
    need = 4 * GLOBAL_TOTAL * 4 + 2 * GIB
    avail = mem_available()
    if avail is not None and avail < need:
        return (
            f"skipped: needs about {need / GIB:.1f} GiB free (4x the input + margin), "
            f"MemAvailable was {avail / GIB:.1f} GiB"
        )
    return None


@pytest.fixture(scope="session")
def torch_quantile_refusal(vec25: torch.Tensor) -> str | None:
    """torch.quantile's error on 2^25 elements (older torch refuses > 2^24), or None."""
    try:
        torch.quantile(vec25, 0.5)
    except RuntimeError as e:
        return f"not timed: torch {torch.__version__} refuses 2^25 elements ({e})"
    return None


@pytest.fixture
def ref() -> Any:
    return pytest.importorskip("spruce.reference.masks", reason="spruce.reference.masks missing")


# ---------------------------------------------------------------------------------------------
# baselines, written plainly


def wanda_sort_mask(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's per-row selection: a stable sort of every row; the first int(cols * sparsity)
    indices are pruned (False scattered into an all-True mask)."""
    idx = torch.sort(x, dim=-1, stable=True).indices[:, : int(x.shape[1] * sparsity)]
    return torch.ones_like(x, dtype=torch.bool).scatter_(1, idx, False)


def topk_scatter_mask(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    idx = torch.topk(x, int(x.shape[1] * sparsity), dim=-1, largest=False).indices
    return torch.ones_like(x, dtype=torch.bool).scatter_(1, idx, False)


def kthvalue_threshold_mask(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    thr = torch.kthvalue(x, int(x.shape[1] * sparsity), dim=-1, keepdim=True).values
    return x > thr


def nm_topk_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = x.reshape(-1, m)
    idx = groups.topk(n, dim=1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True).reshape(x.shape)


def cat_kthvalue_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores])
    thr = torch.kthvalue(flat, int(sparsity * flat.numel())).values
    del flat
    return [s > thr for s in scores]


def randperm_mask(shape: tuple[int, ...], density: float, g: torch.Generator) -> torch.Tensor:
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: round(density * n)]] = True
    return mask.view(shape)


# ---------------------------------------------------------------------------------------------
# the cases: implementation id -> arguments of ``measure``

TIES_NOTE = "prunes every score equal to the threshold: not an exact count on ties"


def _run(measure: Any, specs: dict[str, dict[str, Any]], impl: str, **common: Any) -> None:
    spec = {**common, **specs[impl]}
    measure(spec.pop("fn"), **spec)


def _copy(fn: Callable[[], Any], nbytes: int) -> dict[str, Any]:
    return dict(
        fn=fn,
        impl="copy of the input (clone): the physical floor",
        role="copy",
        rounds=10,
        bytes_moved=2 * nbytes,
    )


GROUP_A = "a) per-row 50 % mask: 4096 x 11008 float32 |randn|, topk_mask(dim=-1)"


@pytest.mark.parametrize("impl", ["spruce", "copy", "sort", "topk", "kthvalue", "reference"])
def test_a_rowwise_mask(measure, matrix, impl, request):
    x, n = matrix, matrix.numel()
    r = request.getfixturevalue("ref") if impl == "reference" else None
    copy = _copy(lambda: x.clone(), 4 * n)
    copy.update(target="spruce <= 2x the copy time", target_speedup=0.5)
    specs = {
        "spruce": dict(
            fn=lambda: spruce.topk_mask(x, SPARSITY, dim=-1),
            impl="spruce.topk_mask",
            role="spruce",
            rounds=10,
        ),
        "sort": dict(
            fn=lambda: wanda_sort_mask(x, SPARSITY),
            impl="Wanda: stable torch.sort per row + scatter",
            role="baseline",
            rounds=3,
            target="spruce >= 15x faster",
            target_speedup=15.0,
        ),
        "topk": dict(
            fn=lambda: topk_scatter_mask(x, SPARSITY),
            impl="torch.topk(largest=False) + scatter",
            role="baseline",
            rounds=3,
            target="spruce >= 8x faster",
            target_speedup=8.0,
        ),
        "kthvalue": dict(
            fn=lambda: kthvalue_threshold_mask(x, SPARSITY),
            impl="torch.kthvalue per row + threshold",
            role="baseline",
            rounds=5,
            target="spruce >= 4x faster",
            target_speedup=4.0,
            note=TIES_NOTE,
        ),
        "copy": copy,
        "reference": dict(
            fn=lambda: r.topk_mask(x, SPARSITY, dim=-1),
            impl="spruce.reference.topk_mask (pure torch)",
            role="reference",
            rounds=1,
            warmup=0,
        ),
    }
    _run(measure, specs, impl, group=GROUP_A, bytes_moved=5 * n)


GROUP_B = "b) 2:4 mask: 4096 x 11008 float32 |randn|, nm_mask(2, 4)"


@pytest.mark.parametrize("impl", ["spruce", "copy", "topk", "reference"])
def test_b_two_four_mask(measure, matrix, impl, request):
    x, n = matrix, matrix.numel()
    r = request.getfixturevalue("ref") if impl == "reference" else None
    specs = {
        "spruce": dict(
            fn=lambda: spruce.nm_mask(x, 2, 4), impl="spruce.nm_mask", role="spruce", rounds=10
        ),
        "topk": dict(
            fn=lambda: nm_topk_mask(x, 2, 4),
            impl="torch: reshape(-1, 4).topk(2) + scatter",
            role="baseline",
            rounds=5,
            target="spruce >= 8x faster",
            target_speedup=8.0,
        ),
        "copy": _copy(lambda: x.clone(), 4 * n),
        "reference": dict(
            fn=lambda: r.nm_mask(x, 2, 4),
            impl="spruce.reference.nm_mask (pure torch)",
            role="reference",
            rounds=1,
            warmup=0,
        ),
    }
    _run(measure, specs, impl, group=GROUP_B, bytes_moved=5 * n)


GROUP_C = "c) global 50 % threshold: 200 tensors, 2^29 float32 (2 GiB), global_topk_masks"


@pytest.mark.parametrize("impl", ["spruce", "copy", "cat-kthvalue"])
def test_c_global_masks(measure, global_scores, global_baseline_skip, impl):
    ts, n = global_scores, GLOBAL_TOTAL
    baseline = "torch.cat + torch.kthvalue + threshold"
    if impl == "cat-kthvalue" and global_baseline_skip is not None:
        pytest.skip(global_baseline_skip)
    limit = int(0.05 * 4 * n)
    specs = {
        "spruce": dict(
            fn=lambda: spruce.global_topk_masks(ts, SPARSITY),
            impl="spruce.global_topk_masks",
            role="spruce",
            rounds=1,
            memory_limit=limit,
            memory_target=f"extra beyond the masks < 5 % of the input ({limit / 2**20:.0f} MiB)",
            untimed={baseline: global_baseline_skip} if global_baseline_skip else None,
        ),
        "cat-kthvalue": dict(
            fn=lambda: cat_kthvalue_masks(ts, SPARSITY),
            impl=baseline,
            role="baseline",
            rounds=1,
            warmup=0,
            note=TIES_NOTE,
        ),
        "copy": {
            **_copy(lambda: [t.clone() for t in ts], 4 * n),
            "rounds": 3,
        },
    }
    _run(measure, specs, impl, group=GROUP_C, bytes_moved=5 * n)


GROUP_D1 = "d1) kthvalue of 2^25 float32 randn, dim=None (k = n / 2)"


@pytest.mark.parametrize("impl", ["spruce", "copy", "torch", "reference"])
def test_d1_kthvalue(measure, vec25, impl, request):
    x, n = vec25, vec25.numel()
    k = n // 2
    r = request.getfixturevalue("ref") if impl == "reference" else None
    specs = {
        "spruce": dict(
            fn=lambda: spruce.kthvalue(x, k), impl="spruce.kthvalue", role="spruce", rounds=10
        ),
        "torch": dict(
            fn=lambda: torch.kthvalue(x.reshape(-1), k),
            impl="torch.kthvalue (flattened)",
            role="baseline",
            rounds=5,
        ),
        "copy": _copy(lambda: x.clone(), 4 * n),
        "reference": dict(
            fn=lambda: r.kthvalue(x, k),
            impl="spruce.reference.kthvalue (pure torch)",
            role="reference",
            rounds=1,
            warmup=0,
        ),
    }
    _run(measure, specs, impl, group=GROUP_D1, bytes_moved=4 * n)


GROUP_D2 = "d2) quantile(0.5) of 2^25 float32 randn, dim=None"
GROUP_D3 = "d3) quantile(0.5) of 2^24 float32 randn, dim=None (torch.quantile's historical limit)"


def _quantile_specs(x: torch.Tensor, r: Any, untimed: dict[str, str] | None) -> dict:
    return {
        "spruce": dict(
            fn=lambda: spruce.quantile(x, 0.5),
            impl="spruce.quantile",
            role="spruce",
            rounds=10,
            untimed=untimed,
        ),
        "torch": dict(
            fn=lambda: torch.quantile(x, 0.5), impl="torch.quantile", role="baseline", rounds=4
        ),
        "copy": _copy(lambda: x.clone(), 4 * x.numel()),
        "reference": dict(
            fn=lambda: r.quantile(x, 0.5),
            impl="spruce.reference.quantile (pure torch)",
            role="reference",
            rounds=1,
            warmup=0,
        ),
    }


@pytest.mark.parametrize("impl", ["spruce", "copy", "torch", "reference"])
def test_d2_quantile_2_25(measure, vec25, torch_quantile_refusal, impl, request):
    if impl == "torch" and torch_quantile_refusal is not None:
        pytest.skip(torch_quantile_refusal)
    r = request.getfixturevalue("ref") if impl == "reference" else None
    untimed = {"torch.quantile": torch_quantile_refusal} if torch_quantile_refusal else None
    specs = _quantile_specs(vec25, r, untimed)
    if torch_quantile_refusal is None:
        specs["torch"]["note"] = (
            f"torch {torch.__version__} accepts 2^25 elements (releases before it refuse > 2^24)"
        )
    _run(measure, specs, impl, group=GROUP_D2, bytes_moved=4 * vec25.numel())


@pytest.mark.parametrize("impl", ["spruce", "copy", "torch"])
def test_d3_quantile_2_24(measure, vec24, impl):
    specs = _quantile_specs(vec24, None, None)
    _run(measure, specs, impl, group=GROUP_D3, bytes_moved=4 * vec24.numel())


GROUP_E = "e) random mask: 4096 x 11008 at density 0.5, random_mask"


@pytest.mark.parametrize("impl", ["spruce", "copy", "rand", "randperm", "reference"])
def test_e_random_mask(measure, impl, request):
    shape, n = (ROWS, COLS), ROWS * COLS
    g = torch.Generator().manual_seed(4)
    r = request.getfixturevalue("ref") if impl == "reference" else None
    proto = torch.zeros(shape, dtype=torch.bool) if impl == "copy" else None
    specs = {
        "spruce": dict(
            fn=lambda: spruce.random_mask(shape, 0.5, seed=4),
            impl="spruce.random_mask (exact count, Philox)",
            role="spruce",
            rounds=5,
        ),
        "rand": dict(
            fn=lambda: torch.rand(shape, generator=g) < 0.5,
            impl="torch.rand(shape) < density",
            role="baseline",
            rounds=5,
            note="independent draws: the kept count is not exact",
        ),
        "randperm": dict(
            fn=lambda: randperm_mask(shape, 0.5, g),
            impl="torch.randperm: exact count",
            role="baseline",
            rounds=3,
        ),
        "copy": {**_copy(lambda: proto.clone(), n), "impl": "copy of a mask of that shape"},
        "reference": dict(
            fn=lambda: r.random_mask(shape, 0.5, seed=4),
            impl="spruce.reference.random_mask (pure torch)",
            role="reference",
            rounds=1,
            warmup=0,
        ),
    }
    _run(measure, specs, impl, group=GROUP_E, bytes_moved=n)


GROUP_F = "f) bit-pack a 4096 x 11008 mask along the last dim: pack_mask"


@pytest.mark.parametrize("impl", ["spruce", "copy", "numpy", "reference"])
def test_f_pack_mask(measure, matrix_mask, impl, request):
    m, n = matrix_mask, matrix_mask.numel()
    a = m.numpy()
    r = request.getfixturevalue("ref") if impl == "reference" else None
    specs = {
        "spruce": dict(
            fn=lambda: spruce.pack_mask(m), impl="spruce.pack_mask", role="spruce", rounds=30
        ),
        "numpy": dict(
            fn=lambda: np.packbits(a, axis=-1, bitorder="little"),
            impl='numpy.packbits(axis=-1, bitorder="little")',
            role="baseline",
            rounds=30,
        ),
        "copy": {**_copy(lambda: m.clone(), n), "rounds": 30},
        "reference": dict(
            fn=lambda: r.pack_mask(m),
            impl="spruce.reference.pack_mask (pure torch)",
            role="reference",
            rounds=3,
        ),
    }
    _run(measure, specs, impl, group=GROUP_F, bytes_moved=n + ROWS * math.ceil(COLS / 8))
