"""spruce's selection and masks against the sort-based oracles of ``spruce.reference.masks``
and, where they apply, against the real tools: ``numpy.packbits``, ``torch.kthvalue``,
``torch.quantile`` and ``torch.nn.utils.prune``.

Every case draws fresh inputs (four float dtypes; empty, one-element, odd, 1-D to 3-D shapes;
every dim; planted ties and signed zeros; strided views), checks the exact counts, and checks
that the inputs were left untouched.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from conftest import FLOAT_DTYPES, KINDS, Snapshot, make_scores, same_bits, strided
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spruce
from spruce import reference as R

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYOUTS = ("contiguous", "transposed", "step")
#: Longer than spruce's single-slice parallel threshold (2^18) and several 2^16 work items.
BIG = 2**18 + 1001

# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def score_tensors(draw, min_dims: int = 0, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A fresh score tensor: random shape (sides 0..7), dtype, kind of values and layout."""
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 7), min_size=min_dims, max_size=3)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    return strided(make_scores(shape, dtype, seed, kind), draw(st.sampled_from(LAYOUTS)))


def dims(x: torch.Tensor, none: bool = True) -> st.SearchStrategy:
    """``None`` (if allowed) or any valid dim of ``x``, negative ones included."""
    options = [st.integers(-x.dim(), x.dim() - 1)] if x.dim() else []
    if none:
        options.append(st.none())
    return st.one_of(*options)


SPARSITIES = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))

#: Explicit shapes every op sees in every dtype (besides the random ones).
EDGE_SHAPES = [(0,), (0, 5), (5, 0), (1,), (), (7,), (3, 5), (2, 3, 5), (4, 1, 3)]
EDGE_IDS = ["x".join(map(str, s)) or "0d" for s in EDGE_SHAPES]


def all_dims(x: torch.Tensor) -> list[int | None]:
    return [None, *range(-x.dim(), x.dim())]


def kept_per_slice(mask: torch.Tensor, dim: int | None) -> torch.Tensor:
    """How many entries each slice along ``dim`` keeps (None: the whole tensor)."""
    return mask.sum() if dim is None else mask.sum(dim)


def ulp_apart(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and dtype, and every element equal or one representable step apart."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ia, ib = (t.contiguous().view(torch.int16).to(torch.int64) for t in (a, b))
    same_sign = (ia < 0) == (ib < 0)
    return bool(((ia == ib) | (same_sign & ((ia - ib).abs() <= 1))).all())


# ---------------------------------------------------------------------------------------------
# checks shared by the random and the explicit cases


def check_topk(x: torch.Tensor, s: float, dim: int | None) -> torch.Tensor:
    snap = Snapshot(x)
    got = spruce.topk_mask(x, s, dim=dim)
    snap.assert_unchanged()
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got, R.topk_mask(x, s, dim=dim)), (x, s, dim)
    n = x.numel() if dim is None else x.shape[dim]
    kept = kept_per_slice(got, dim)
    assert (kept == n - math.floor(s * n)).all()
    return got


def check_global(ts: list[torch.Tensor], s: float) -> list[torch.Tensor]:
    snap = Snapshot(*ts)
    got = spruce.global_topk_masks(ts, s)
    snap.assert_unchanged()
    want = R.global_topk_masks(ts, s)
    assert len(got) == len(ts)
    for g, w, t in zip(got, want, ts, strict=True):
        assert g.dtype == torch.bool and g.shape == t.shape
        assert torch.equal(g, w)
    total = sum(t.numel() for t in ts)
    assert sum(int(g.sum()) for g in got) == total - math.floor(s * total)
    return got


def check_nm(x: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    snap = Snapshot(x)
    got = spruce.nm_mask(x, n, m, dim=dim)
    snap.assert_unchanged()
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got, R.nm_mask(x, n, m, dim=dim)), (x, n, m, dim)
    assert (got.movedim(dim, -1).reshape(-1, m).sum(dim=1) == n).all()
    return got


def check_structured(
    x: torch.Tensor, s: float, dim: int, group_size: int, norm: float
) -> torch.Tensor:
    snap = Snapshot(x)
    got = spruce.structured_mask(x, s, dim=dim, group_size=group_size, norm=norm)
    snap.assert_unchanged()
    assert got.dtype == torch.bool and got.shape == x.shape
    want = R.structured_mask(x, s, dim=dim, group_size=group_size, norm=norm)
    assert torch.equal(got, want), (x, s, dim, group_size, norm)
    if x.numel():
        per_slice = got.movedim(dim, 0).reshape(x.shape[dim], -1)
        assert (per_slice == per_slice[:, :1]).all(), "slices are kept or pruned whole"
        groups = x.shape[dim] // group_size
        kept_groups = per_slice[::group_size, 0].sum()
        assert kept_groups == groups - math.floor(s * groups)
    return got


def check_kthvalue(x: torch.Tensor, k: int, dim: int | None) -> None:
    snap = Snapshot(x)
    got = spruce.kthvalue(x, k, dim=dim)
    snap.assert_unchanged()
    values, indices = R.kthvalue(x, k, dim=dim)
    assert same_bits(got.values, values), (x, k, dim)
    assert indices.dtype == got.indices.dtype == torch.int64
    assert torch.equal(got.indices, indices)
    if got.values.numel():
        flat, d = (x.reshape(-1), 0) if dim is None else (x, dim)
        expected = torch.kthvalue(flat, k, dim=d)
        assert torch.equal(got.values, expected.values)  # torch's index may differ on ties
        picked = flat.gather(d, got.indices.unsqueeze(d)).squeeze(d)
        assert same_bits(picked, got.values)


def check_quantile(x: torch.Tensor, q, dim: int | None) -> None:
    snap = Snapshot(x)
    got = spruce.quantile(x, q, dim=dim)
    snap.assert_unchanged()
    want = R.quantile(x, q, dim=dim)
    if x.dtype in (torch.float32, torch.float64):
        assert same_bits(got, want), (x, q, dim)
    else:
        # half types: spruce's float64 -> half cast may miss correct rounding by one step (see
        # test_quantile_rounds_once_to_half_types); everything else must be exact.
        assert ulp_apart(got, want), (x, q, dim)
    if x.dtype in (torch.float32, torch.float64) and x.numel():
        qt = torch.tensor(q, dtype=x.dtype)
        expected = torch.quantile(x, qt) if dim is None else torch.quantile(x, qt, dim=dim)
        tol = dict(rtol=4e-6, atol=1e-6) if x.dtype == torch.float32 else {}
        torch.testing.assert_close(got, expected, **tol)


# ---------------------------------------------------------------------------------------------
# Philox


def test_philox_known_answers_from_random123() -> None:
    ctr = np.array(
        [[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]]
    )
    key = np.array([[0, 0], [0xFFFFFFFF] * 2, [0xA4093822, 0x299F31D0]])
    want = np.array(
        [
            [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ],
        dtype=np.uint32,
    )
    got = R.philox4x32_10(ctr, key)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, want)
    # one block at a time gives the same words as the vectorized call
    for i in range(3):
        np.testing.assert_array_equal(R.philox4x32_10(ctr[i], key[i]), want[i])


def test_philox_words_layout() -> None:
    seed = 0x1234_5678_9ABC_DEF0
    words = R.philox_words(10, seed)
    key = np.array([0x9ABC_DEF0, 0x1234_5678])
    for i in range(10):
        block = R.philox4x32_10(np.array([i // 4, 0, 0, 0]), key)
        assert words[i] == block[i % 4]


# ---------------------------------------------------------------------------------------------
# topk_mask


@SETTINGS
@given(data=st.data())
def test_topk_mask_random(data) -> None:
    x = data.draw(score_tensors())
    check_topk(x, data.draw(SPARSITIES), data.draw(dims(x)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=EDGE_IDS)
def test_topk_mask_edge_shapes(shape, dtype) -> None:
    for seed, kind in enumerate(KINDS):
        x = make_scores(shape, dtype, seed, kind)
        for dim in all_dims(x):
            for s in (0.0, 0.3, 0.5, 1.0):
                check_topk(x, s, dim)


def test_topk_mask_planted_ties_prune_lower_index_first() -> None:
    x = torch.tensor([[2.0, 1.0, 1.0, 1.0, 3.0], [0.0, -0.0, 0.0, -0.0, 0.0]])
    got = check_topk(x, 0.4, -1)
    assert got.tolist() == [
        [True, False, False, True, True],
        [False, False, True, True, True],
    ]
    # infinities rank as the extremes
    y = torch.tensor([float("inf"), -1.0, float("-inf"), 5.0])
    assert check_topk(y, 0.5, None).tolist() == [True, False, False, True]


def test_topk_mask_docstring_example() -> None:
    got = spruce.topk_mask(torch.tensor([[3.0, 1.0, 2.0, 1.0]]), 0.5, dim=-1)
    assert got.tolist() == [[True, False, True, False]]


def test_topk_mask_counts_use_floor_in_float64() -> None:
    # 0.29 * 100 = 28.999999999999996 in float64: floor gives 28, round would give 29
    x = make_scores((100,), seed=3)
    assert math.floor(0.29 * 100) == 28
    assert int((~spruce.topk_mask(x, 0.29)).sum()) == 28
    check_topk(x, 0.29, None)


def test_zero_dim_tensors_accept_dim_0_and_minus_1_as_torch() -> None:
    """torch treats a 0-D tensor as one slice of one element for dim 0 / -1 (as
    ``torch.kthvalue(torch.tensor(3.), 1, dim=0)``); spruce's dim check accepts that range."""
    x = torch.tensor(3.0)
    for dim in (0, -1):
        assert torch.equal(spruce.topk_mask(x, 1.0, dim=dim), torch.tensor(False))
        assert torch.equal(spruce.nm_mask(x, 1, 1, dim=dim), torch.tensor(True))
        assert torch.equal(spruce.structured_mask(x, 0.0, dim=dim), torch.tensor(True))
        values, indices = spruce.kthvalue(x, 1, dim=dim)
        assert values.item() == 3.0 and indices.item() == 0 and values.dim() == 0
        assert spruce.quantile(x, 0.5, dim=dim).item() == 3.0


# ---------------------------------------------------------------------------------------------
# global_topk_masks


@SETTINGS
@given(data=st.data())
def test_global_topk_masks_random(data) -> None:
    ts = data.draw(st.lists(score_tensors(), min_size=0, max_size=5))
    check_global(ts, data.draw(SPARSITIES))


def test_global_topk_masks_compare_exact_values_across_dtypes() -> None:
    # 0.1 in float64 and float32(0.1) differ; the bf16 1.0 ties the float64 1.0 (position
    # breaks the tie); -0.0 ties +0.0 across tensors
    a = torch.tensor([0.1, 1.0, -0.0], dtype=torch.float64)
    b = torch.tensor([0.1, 0.0], dtype=torch.float32)
    c = torch.tensor([1.0, 0.5], dtype=torch.bfloat16)
    for s in (i / 14 for i in range(15)):
        check_global([a, b, c], s)
    # ranking: a[2] (-0.0), b[1] (0.0), a[0] (0.1), b[0] (float32(0.1) = 0.10000000149...),
    # c[1] (0.5), a[1] (1.0), c[0] (1.0: after a[1], its tensor comes later)
    got = spruce.global_topk_masks([a, b, c], 3.5 / 7)
    assert [m.tolist() for m in got] == [[False, True, False], [True, False], [True, True]]
    got = spruce.global_topk_masks([a, b, c], 4.5 / 7)
    assert [m.tolist() for m in got] == [[False, True, False], [False, False], [True, True]]
    got = spruce.global_topk_masks([a, b, c], 6.5 / 7)
    assert [m.tolist() for m in got] == [[False, False, False], [False, False], [True, False]]


def test_global_topk_masks_edge_cases() -> None:
    assert spruce.global_topk_masks([], 0.5) == []
    empty = [torch.empty(0), torch.empty(0, 3, dtype=torch.float64)]
    check_global(empty, 0.5)
    check_global([torch.tensor(2.0), torch.empty(0), torch.tensor([1.0, 2.0])], 0.5)
    # tuples are sequences too
    got = spruce.global_topk_masks((torch.tensor([1.0, 0.0]),), 0.5)
    assert got[0].tolist() == [True, False]


# ---------------------------------------------------------------------------------------------
# nm_mask


@SETTINGS
@given(data=st.data())
def test_nm_mask_random(data) -> None:
    m = data.draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 24, 33, 40]))
    n = data.draw(st.integers(0, m))
    nd = data.draw(st.integers(1, 3))
    shape = list(data.draw(st.lists(st.integers(0, 4), min_size=nd, max_size=nd)))
    dim = data.draw(st.integers(-nd, nd - 1))
    shape[dim] = m * data.draw(st.integers(0, 3))
    x = data.draw(score_tensors(shape=tuple(shape)))
    check_nm(x, n, m, dim)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nm_mask_two_four_and_dims(dtype) -> None:
    for seed, kind in enumerate(KINDS):
        x = make_scores((4, 8, 12), dtype, seed, kind)
        for dim in range(-3, 3):
            for n, m in ((2, 4), (1, 4), (0, 2), (4, 4), (3, 4)):
                check_nm(x, n, m, dim)
        check_nm(strided(x, "transposed"), 2, 4, -1)
        check_nm(strided(x, "step"), 2, 4, 1)


def test_nm_mask_ties_keep_the_higher_index() -> None:
    x = torch.tensor([1.0, 4.0, 3.0, 2.0, 5.0, 5.0, 5.0, 5.0, -1.0, 0.0, -0.0, 7.0])
    got = check_nm(x, 2, 4, -1)
    expected = [False, True, True, False, False, False, True, True, False, False, True, True]
    assert got.tolist() == expected


# ---------------------------------------------------------------------------------------------
# structured_mask


@SETTINGS
@given(data=st.data())
def test_structured_mask_random(data) -> None:
    gs = data.draw(st.sampled_from([1, 1, 2, 3]))
    nd = data.draw(st.integers(1, 3))
    shape = list(data.draw(st.lists(st.integers(0, 5), min_size=nd, max_size=nd)))
    dim = data.draw(st.integers(-nd, nd - 1))
    shape[dim] = gs * data.draw(st.integers(0, 4))
    x = data.draw(score_tensors(shape=tuple(shape)))
    norm = data.draw(st.sampled_from([1, 2, math.inf, 1.0, 2.0, float("inf")]))
    check_structured(x, data.draw(SPARSITIES), dim, gs, norm)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_structured_mask_dims_groups_norms(dtype) -> None:
    for seed, kind in enumerate(KINDS):
        x = make_scores((6, 4, 6), dtype, seed, kind)
        for dim in range(-3, 3):
            for gs in (1, 2):
                for norm in (1, 2, math.inf):
                    for s in (0.0, 0.5, 1.0, 0.34):
                        check_structured(x, s, dim, gs, norm)
        check_structured(strided(x, "transposed"), 0.5, 0, 3, 2)
        check_structured(strided(x, "step"), 0.5, -1, 2, 1)
    for shape in ((0, 4), (4, 0), (1,), (5,)):
        x = make_scores(shape, dtype)
        for dim in range(-len(shape), len(shape)):
            check_structured(x, 0.5, dim, 1, 2)


def test_structured_mask_norms_rank_as_documented() -> None:
    # rows: L1 = 4, 3, 3.5, 3 ; L2^2 = 16, 5, 12.25, 5 ; inf = 4, 2, 3.5, 2
    x = torch.tensor([[4.0, 0.0], [2.0, 1.0], [3.5, 0.0], [-1.0, -2.0]])
    assert check_structured(x, 0.5, 0, 1, 1)[:, 0].tolist() == [True, False, True, False]
    assert check_structured(x, 0.25, 0, 1, 2)[:, 0].tolist() == [True, False, True, True]
    assert check_structured(x, 0.75, 0, 1, math.inf)[:, 0].tolist() == [True, False, False, False]
    # groups of 2 rows: L1 sums 7 and 6.5 ; inf takes max 4 and 3.5
    assert check_structured(x, 0.5, 0, 2, 1)[:, 0].tolist() == [True, True, False, False]
    # equal groups: the lower group index is pruned
    y = torch.ones(4, 3)
    assert check_structured(y, 0.5, 0, 1, 2)[:, 0].tolist() == [False, False, True, True]


# ---------------------------------------------------------------------------------------------
# random_mask


@pytest.mark.parametrize(
    ("shape", "density"),
    [((10,), 0.3), ((5,), 0.5), ((7,), 0.5), ((10,), 0.25), ((3, 4, 5), 0.9), ((0,), 0.5)]
    + [((), 0.5), ((2, 0, 3), 1.0), ((1,), 1.0), ((17,), 0.0), ((1000,), 0.123)],
)
def test_random_mask_exact_count_and_reference(shape, density) -> None:
    n = math.prod(shape)
    for seed in (0, 1, 2**32 + 7, 2**63 - 1):
        got = spruce.random_mask(shape, density, seed=seed)
        assert got.dtype == torch.bool and got.shape == torch.Size(shape)
        assert got.device.type == "cpu"
        assert int(got.sum()) == round(density * n)
        assert torch.equal(got, R.random_mask(shape, density, seed=seed))


def test_random_mask_keep_count_rounds_half_to_even() -> None:
    assert int(spruce.random_mask(5, 0.5, seed=3).sum()) == 2  # 2.5 -> 2
    assert int(spruce.random_mask(7, 0.5, seed=3).sum()) == 4  # 3.5 -> 4
    assert int(spruce.random_mask(10, 0.25, seed=3).sum()) == 2  # 2.5 -> 2
    assert int(spruce.random_mask(6, 0.25, seed=3).sum()) == 2  # 1.5 -> 2


def test_random_mask_seeds_and_shapes() -> None:
    a = spruce.random_mask((40, 25), 0.5, seed=11)
    assert torch.equal(a, spruce.random_mask((40, 25), 0.5, seed=11))
    assert not torch.equal(a, spruce.random_mask((40, 25), 0.5, seed=12))
    # the mask is a function of (numel, density, seed): shapes only reshape it
    assert torch.equal(spruce.random_mask(1000, 0.5, seed=11), a.reshape(-1))
    assert torch.equal(spruce.random_mask(torch.Size([40, 25]), 0.5, seed=11), a)
    assert torch.equal(spruce.random_mask([40, 25], 0.5, seed=11), a)
    assert torch.equal(spruce.random_mask((np.int64(40), 25), 0.5, seed=np.int64(11)), a)
    assert spruce.random_mask(7, 0.5, seed=0).shape == (7,)
    assert spruce.random_mask((), 1.0, seed=0).shape == ()


def test_random_mask_big_matches_reference(restore_threads) -> None:
    spruce.set_num_threads(1)
    one = spruce.random_mask(BIG, 0.37, seed=2024)
    spruce.set_num_threads(2)
    two = spruce.random_mask(BIG, 0.37, seed=2024)
    assert torch.equal(one, two)
    assert int(one.sum()) == round(0.37 * BIG)
    assert torch.equal(one, R.random_mask(BIG, 0.37, seed=2024))


# ---------------------------------------------------------------------------------------------
# kthvalue and quantile


@SETTINGS
@given(data=st.data())
def test_kthvalue_random(data) -> None:
    x = data.draw(score_tensors())
    dim = data.draw(dims(x))
    n = x.numel() if dim is None else x.shape[dim]
    if n == 0:
        with pytest.raises(spruce.ArgumentError):
            spruce.kthvalue(x, 1, dim=dim)
        return
    check_kthvalue(x, data.draw(st.integers(1, n)), dim)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=EDGE_IDS)
def test_kthvalue_edge_shapes(shape, dtype) -> None:
    for seed, kind in enumerate(KINDS):
        x = make_scores(shape, dtype, seed, kind)
        for dim in all_dims(x):
            if x.dim() == 0 and dim is not None:
                continue  # see test_zero_dim_tensors_accept_dim_0_and_minus_1_as_torch
            n = x.numel() if dim is None else x.shape[dim]
            if n == 0:
                continue  # refused: test_bad_input
            for k in sorted({1, (n + 1) // 2, n}):
                check_kthvalue(x, k, dim)


def test_kthvalue_ties_pick_the_lower_index() -> None:
    x = torch.tensor([[2.0, 1.0, 1.0, 0.0], [-0.0, 0.0, -0.0, 0.0]])
    got = spruce.kthvalue(x, 2, dim=1)
    assert got.indices.tolist() == [1, 1]
    assert same_bits(got.values, torch.tensor([1.0, 0.0]))
    got = spruce.kthvalue(x, 3, dim=1)
    assert got.indices.tolist() == [2, 2]
    assert same_bits(got.values, torch.tensor([1.0, -0.0]))
    # flat: the zeros rank first in index order (flat 3, 4, 5, 6, 7)
    assert spruce.kthvalue(x, 2).indices.item() == 4
    assert same_bits(spruce.kthvalue(x, 2).values, torch.tensor(-0.0))
    check_kthvalue(x, 4, None)


@SETTINGS
@given(data=st.data())
def test_quantile_random(data) -> None:
    x = data.draw(score_tensors())
    dim = data.draw(dims(x))
    q = data.draw(
        st.one_of(
            st.floats(0.0, 1.0),
            st.sampled_from([0.0, 0.5, 1.0]),
            st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
        )
    )
    n = x.numel() if dim is None else x.shape[dim]
    if n == 0:
        with pytest.raises(spruce.ShapeError):
            spruce.quantile(x, q, dim=dim)
        return
    check_quantile(x, q, dim)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=EDGE_IDS)
def test_quantile_edge_shapes(shape, dtype) -> None:
    for seed, kind in enumerate(KINDS):
        x = make_scores(shape, dtype, seed, kind)
        for dim in all_dims(x):
            if x.dim() == 0 and dim is not None:
                continue  # see test_zero_dim_tensors_accept_dim_0_and_minus_1_as_torch
            n = x.numel() if dim is None else x.shape[dim]
            if n == 0:
                continue  # refused: test_bad_input
            for q in (0.0, 0.25, 0.5, 1.0, [0.1, 0.9, 0.5], 1 / 3):
                check_quantile(x, q, dim)


def test_quantile_q_forms() -> None:
    x = make_scores((4, 9), torch.float64, 5)
    want = R.quantile(x, [0.2, 0.7], dim=1)
    assert want.shape == (2, 4)
    assert same_bits(spruce.quantile(x, [0.2, 0.7], dim=1), want)
    assert same_bits(spruce.quantile(x, (0.2, 0.7), dim=1), want)
    assert same_bits(spruce.quantile(x, torch.tensor([0.2, 0.7], dtype=torch.float64), dim=1), want)
    scalar = spruce.quantile(x, torch.tensor(0.2, dtype=torch.float64), dim=1)
    assert same_bits(scalar, R.quantile(x, 0.2, dim=1)) and scalar.shape == (4,)
    assert spruce.quantile(x, 0.5).shape == ()
    assert spruce.quantile(x, [0.5]).shape == (1,)
    assert spruce.quantile(x, [], dim=0).shape == (0, 9)


def test_quantile_accepts_numpy_q() -> None:
    """A 1-D ``numpy.ndarray`` q is a 1-D q (as in ``numpy.quantile``), NumPy input or not."""
    x = make_scores((4, 9), torch.float64, 5)
    want = R.quantile(x, [0.2, 0.7], dim=1)
    assert same_bits(spruce.quantile(x, np.array([0.2, 0.7]), dim=1), want)
    got = spruce.quantile(x.numpy(), np.array([0.2, 0.7]), dim=1)
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize(
    ("dtype", "upper", "q", "rounded"),
    [
        # 1 + 2^-8 + 2^-22 is above the midpoint of 1 and 1 + 2^-7: it rounds up
        (torch.bfloat16, 1 + 2**-7, 0.5 + 2**-15, 1 + 2**-7),
        # 1 + 2^-11 + 2^-40 is above the midpoint of 1 and 1 + 2^-10: it rounds up
        (torch.float16, 1 + 2**-10, 0.5 + 2**-30, 1 + 2**-10),
    ],
)
def test_quantile_rounds_once_to_half_types(dtype, upper, q, rounded) -> None:
    """The float64 interpolation is rounded once to the dtype, to nearest."""
    x = torch.tensor([1.0, upper], dtype=dtype)
    exact = 1 + (upper - 1) * q
    assert exact != 1 + (upper - 1) / 2  # the value is not a tie
    assert R.quantile(x, q).item() == rounded
    assert spruce.quantile(x, q).item() == rounded


# ---------------------------------------------------------------------------------------------
# The huge case: parallel paths (a single slice > 2^18, dim=None > 2^18, many tensors)


def _big_ties(shape: tuple[int, ...], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Many exact ties (64 levels), so ties straddle the 2^16-element work items."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-32, 32, shape, generator=g).to(torch.float64) / 8).to(dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_huge_single_slices(threads, restore_threads) -> None:
    spruce.set_num_threads(threads)
    x = _big_ties((2, BIG), seed=1)
    check_topk(x, 0.3, -1)
    check_topk(x, 0.7, None)
    check_topk(x.t(), 0.45, 0)  # slices along an outer dim: gathered
    check_kthvalue(x, BIG // 3, -1)
    check_kthvalue(x, BIG + 5, None)
    check_quantile(x, [0.0, 0.25, 0.5, 0.999, 1.0], -1)
    check_quantile(x, 0.37, None)
    y = _big_ties((BIG,), seed=2, dtype=torch.float64)
    check_topk(y, 0.5, 0)
    check_kthvalue(y, 1, None)
    check_kthvalue(y, BIG, 0)


def test_huge_global_many_small_and_one_big(restore_threads) -> None:
    g = torch.Generator().manual_seed(3)
    ts = []
    for i in range(300):
        shape = tuple(int(v) for v in torch.randint(1, 6, (int(i % 3) + 1,), generator=g))
        ts.append(_big_ties(shape, seed=100 + i, dtype=FLOAT_DTYPES[i % 4]))
    ts.insert(150, _big_ties((BIG,), seed=4))
    results = []
    for threads in (1, 2):
        spruce.set_num_threads(threads)
        results.append(check_global(ts, 0.55))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Thread-count independence


def test_results_do_not_depend_on_the_thread_count(restore_threads) -> None:
    x = _big_ties((96, 1024), seed=7)
    x64 = _big_ties((96, 1024), seed=8, dtype=torch.float64)
    mask = x > 0

    def run() -> list:
        return [
            spruce.topk_mask(x, 0.5, dim=-1),
            spruce.topk_mask(x, 0.5, dim=0),
            spruce.topk_mask(x64, 0.3),
            *spruce.global_topk_masks([x, x64], 0.4),
            spruce.nm_mask(x, 2, 4),
            spruce.nm_mask(x, 3, 8, dim=0),
            spruce.structured_mask(x, 0.5, dim=1, group_size=4, norm=1),
            spruce.random_mask((96, 1024), 0.3, seed=5),
            *spruce.kthvalue(x, 100, dim=-1),
            spruce.quantile(x, [0.1, 0.5], dim=0),
            spruce.pack_mask(mask),
            *spruce.mask_to_csr(x, mask),
        ]

    spruce.set_num_threads(1)
    one = run()
    spruce.set_num_threads(2)
    two = run()
    assert spruce.num_threads() == 2
    for a, b in zip(one, two, strict=True):
        assert same_bits(a, b)


# ---------------------------------------------------------------------------------------------
# pack / unpack / CSR


PACK_SHAPES = [(0,), (3, 0), (0, 5), (), (1,), (8,), (9,), (3, 11), (2, 3, 13), (4, 16)]


@pytest.mark.parametrize("shape", PACK_SHAPES, ids=["x".join(map(str, s)) for s in PACK_SHAPES])
def test_pack_mask_equals_numpy_packbits(shape) -> None:
    g = torch.Generator().manual_seed(len(shape))
    mask = torch.rand(shape, generator=g) < 0.4
    snap = Snapshot(mask)
    got = spruce.pack_mask(mask)
    snap.assert_unchanged()
    want = np.packbits(mask.numpy().reshape(shape or (1,)), axis=-1, bitorder="little")
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), want)
    assert got.shape == want.shape
    assert torch.equal(R.pack_mask(mask), got)
    # round trip, and the NumPy path
    assert torch.equal(spruce.unpack_mask(got, shape), mask)
    assert torch.equal(R.unpack_mask(got, shape), mask)
    np_packed = spruce.pack_mask(mask.numpy())
    assert isinstance(np_packed, np.ndarray)
    np.testing.assert_array_equal(np_packed, want)
    np_mask = spruce.unpack_mask(want, shape)
    assert isinstance(np_mask, np.ndarray) and np_mask.dtype == np.bool_
    np.testing.assert_array_equal(np_mask, mask.numpy())


def test_unpack_mask_ignores_padding_bits_and_strides() -> None:
    mask = torch.rand(5, 11, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = spruce.pack_mask(mask)
    dirty = packed.clone()
    dirty[:, -1] |= 0b1111_1000  # bits 11..15 of each row are padding
    assert torch.equal(spruce.unpack_mask(dirty, (5, 11)), mask)
    assert torch.equal(R.unpack_mask(dirty, (5, 11)), mask)
    assert torch.equal(spruce.unpack_mask(packed, torch.Size([5, 11])), mask)
    # a strided packed tensor and a strided mask
    wide = torch.zeros(5, 4, dtype=torch.uint8)
    wide[:, ::2] = packed
    assert torch.equal(spruce.unpack_mask(wide[:, ::2], (5, 11)), mask)
    assert torch.equal(spruce.pack_mask(mask.t().contiguous().t()), packed)
    assert torch.equal(spruce.pack_mask(strided(mask, "step")), packed)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mask_to_csr(dtype) -> None:
    for shape in ((4, 7), (1, 1), (0, 5), (5, 0), (6, 3)):
        for seed, kind in enumerate(KINDS):
            w = make_scores(shape, dtype, seed, kind)
            mask = make_scores(shape, torch.float32, seed + 10) > 0
            for layout in LAYOUTS:
                ws, ms = strided(w, layout), strided(mask, layout)
                snap = Snapshot(ws, ms)
                crow, col, val = spruce.mask_to_csr(ws, ms)
                snap.assert_unchanged()
                rcrow, rcol, rval = R.mask_to_csr(w, mask)
                assert crow.dtype == col.dtype == torch.int64 and val.dtype == dtype
                assert torch.equal(crow, rcrow) and torch.equal(col, rcol)
                assert same_bits(val, rval)
                assert crow.shape == (shape[0] + 1,) and int(crow[-1]) == int(mask.sum())
                dense = torch.sparse_csr_tensor(crow, col, val, size=shape).to_dense()
                assert torch.equal(dense, torch.where(mask, w, torch.zeros_like(w)))


def test_mask_to_csr_keeps_kept_zeros() -> None:
    w = torch.tensor([[0.0, 1.0, -0.0], [2.0, 0.0, 3.0]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    crow, col, val = spruce.mask_to_csr(w, mask)
    assert crow.tolist() == [0, 2, 4]
    assert col.tolist() == [0, 2, 1, 2]
    assert same_bits(val, torch.tensor([0.0, -0.0, 0.0, 3.0]))


# ---------------------------------------------------------------------------------------------
# apply_mask_ and sparsity


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_apply_mask_in_place(dtype) -> None:
    for layout in LAYOUTS:
        t = strided(make_scores((5, 6), dtype, 1) + 3, layout)
        before = t.clone()
        mask = make_scores((5, 6), seed=2) > 0
        mask_before = mask.clone()
        out = spruce.apply_mask_(t, mask)
        assert out is t
        assert torch.equal(mask, mask_before)
        assert torch.equal(t[mask], before[mask])
        assert (t[~mask] == 0).all()
    empty = torch.empty(0, 3, dtype=dtype)
    assert spruce.apply_mask_(empty, torch.empty(0, 3, dtype=torch.bool)) is empty


def test_sparsity() -> None:
    assert spruce.sparsity(torch.tensor([0.0, 1.0, -0.0, 2.0])) == 0.5
    assert spruce.sparsity(torch.tensor([[True, False, False]])) == pytest.approx(2 / 3)
    assert spruce.sparsity(torch.ones(3, dtype=torch.bool)) == 0.0
    assert spruce.sparsity(torch.zeros(4, 5)) == 1.0
    assert spruce.sparsity(torch.empty(0)) == 0.0
    assert spruce.sparsity(torch.empty(0, 3, dtype=torch.bool)) == 0.0
    assert spruce.sparsity(np.array([0.0, 1.0, 0.0, 0.0])) == 0.75
    x = make_scores((40, 50), seed=9)
    mask = spruce.topk_mask(x, 0.3)
    assert spruce.sparsity(mask) == pytest.approx(math.floor(0.3 * 2000) / 2000)
    assert spruce.sparsity(spruce.apply_mask_(x.clone(), mask)) == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# NumPy in, NumPy out


NP_DTYPES = (torch.float32, torch.float64, torch.float16)


@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_numpy_inputs_give_numpy_outputs(dtype) -> None:
    x = make_scores((6, 8), dtype, 4, "ties")
    a = x.numpy()
    a_before = a.copy()
    mask = x > 0
    cases = [
        (lambda v: spruce.topk_mask(v, 0.5, dim=-1), x, a),
        (lambda v: spruce.topk_mask(v, 0.3), x, a),
        (lambda v: spruce.global_topk_masks([v, v[:2]], 0.4), x, a),
        (lambda v: spruce.nm_mask(v, 2, 4), x, a),
        (lambda v: spruce.structured_mask(v, 0.5, dim=1, norm=1), x, a),
        (lambda v: spruce.kthvalue(v, 3, dim=0), x, a),
        (lambda v: spruce.kthvalue(v, 7), x, a),
        (lambda v: spruce.quantile(v, [0.25, 0.75], dim=1), x, a),
        (lambda v: spruce.quantile(v, 0.5), x, a),
        (lambda v: spruce.mask_to_csr(v, mask.numpy()), x, a),
        (lambda v: spruce.pack_mask(v), mask, mask.numpy()),
    ]
    for fn, t_in, np_in in cases:
        from_torch, from_numpy = fn(t_in), fn(np_in)
        flat_t = from_torch if isinstance(from_torch, (tuple, list)) else (from_torch,)
        flat_n = from_numpy if isinstance(from_numpy, (tuple, list)) else (from_numpy,)
        assert len(flat_t) == len(flat_n)
        for t_out, n_out in zip(flat_t, flat_n, strict=True):
            assert isinstance(t_out, torch.Tensor)
            assert isinstance(n_out, np.ndarray)
            assert same_bits(torch.from_numpy(n_out.copy()), t_out)
    np.testing.assert_array_equal(a, a_before)
    kth = spruce.kthvalue(a, 3, dim=0)
    assert isinstance(kth, spruce.KthValue)
    assert isinstance(kth.values, np.ndarray) and isinstance(kth.indices, np.ndarray)
    # a read-only, non-contiguous array
    ro = np.asarray(a.T)
    ro.flags.writeable = False
    np.testing.assert_array_equal(spruce.topk_mask(ro, 0.5, dim=0), R.topk_mask(x.T, 0.5, dim=0))


# ---------------------------------------------------------------------------------------------
# torch.nn.utils.prune: the masks of the real tool where its count convention (round) coincides
# with spruce's (floor) and there are no ties


def _distinct_weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Weights whose magnitudes are all distinct: a shuffled ramp with random signs."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    magnitude = (torch.randperm(n, generator=g).double() + 1) / n
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (magnitude * sign).float().reshape(shape)


@pytest.mark.parametrize("amount", [0.0, 0.25, 0.3, 0.5, 0.75, 1.0])
def test_l1_unstructured_mask(amount) -> None:
    lin = torch.nn.Linear(20, 10, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_distinct_weights((10, 20), seed=int(amount * 100)))
    n = lin.weight.numel()
    assert math.floor(amount * n) == round(amount * n)  # the two conventions coincide here
    scores = lin.weight.detach().abs()
    torch_prune.l1_unstructured(lin, "weight", amount=amount)
    got = spruce.topk_mask(scores, amount)
    assert torch.equal(got, lin.weight_mask.bool())
    assert int((~got).sum()) == round(amount * n)


@pytest.mark.parametrize("norm", [1, 2, math.inf])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_ln_structured_mask(norm, dim) -> None:
    conv = torch.nn.Conv2d(8, 8, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(_distinct_weights((8, 8, 3, 3), seed=5))
    weight = conv.weight.detach().clone()
    size = weight.shape[dim]
    amount = 0.25 if size == 8 else 1 / 3  # 2 of 8 or 1 of 3 channels
    assert math.floor(amount * size) == round(amount * size)  # the two conventions coincide
    torch_prune.ln_structured(conv, "weight", amount=amount, n=norm, dim=dim)
    got = spruce.structured_mask(weight, amount, dim=dim, norm=norm)
    assert torch.equal(got, conv.weight_mask.bool())


def test_global_unstructured_mask() -> None:
    layers = [torch.nn.Linear(12, 7), torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)]
    with torch.no_grad():
        ramp = _distinct_weights((84 + 35 + 15,), seed=6)
        for layer, piece in zip(layers, ramp.split([84, 35, 15]), strict=True):
            layer.weight.copy_(piece.reshape(layer.weight.shape))
    scores = [layer.weight.detach().abs() for layer in layers]
    total = sum(s.numel() for s in scores)
    amount = 0.5
    assert math.floor(amount * total) == round(amount * total)
    torch_prune.global_unstructured(
        [(layer, "weight") for layer in layers],
        pruning_method=torch_prune.L1Unstructured,
        amount=amount,
    )
    got = spruce.global_topk_masks(scores, amount)
    for g, layer in zip(got, layers, strict=True):
        assert torch.equal(g, layer.weight_mask.bool())
