"""spruce.prune scores, statistics, SparseGPT, allocation, schedules and the KS test against
their reference formulas (spruce.reference.prune), torch.nn.utils.prune and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import spruce
import spruce.prune as sp
from spruce.reference import prune as ref

OPS = torch.ops.spruce
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _w(rows: int, cols: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, cols, generator=_gen(seed)).to(dtype)


def _acts(cols: int, seed: int = 1, batches: int = 3) -> list[torch.Tensor]:
    g = _gen(seed)
    scale = torch.rand(cols, generator=g) * 3  # unequal column norms
    return [torch.randn(2 + i, 5, cols, generator=g) * scale for i in range(batches)]


# ---------------------------------------------------------------------------------------------
# Scores


@pytest.mark.parametrize("dtype", DTYPES)
def test_wanda_scores_equal_torch_promotion(dtype):
    w = _w(16, 40, dtype=dtype)
    stat = ref.wanda_statistic(_acts(40))
    got = sp.wanda_scores(w, stat)
    want = ref.wanda_scores(w, stat)
    assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # spruce's sqrt is correctly rounded (numpy's); torch's vectorized float32 sqrt may be 1 ulp off
    exact_sqrt = torch.from_numpy(np.sqrt(stat.numpy()))
    assert torch.equal(got, w.abs().to(got.dtype) * exact_sqrt.to(got.dtype).reshape(1, -1))
    torch.testing.assert_close(got, want, rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_wanda_mask_equals_the_repos_sort_path(dtype, sparsity):
    w = _w(24, 77, seed=2, dtype=dtype)
    stat = ref.wanda_statistic(_acts(77, seed=3))
    keep = sp.wanda_mask(w, stat, sparsity)
    assert torch.equal(keep, ref.wanda_mask_repo(w, stat, sparsity))
    # exact count in every row
    assert (keep.logical_not().sum(1) == math.floor(sparsity * 77)).all()


def test_wanda_mask_ties_and_nm():
    w = torch.randint(-3, 4, (12, 32), generator=_gen(4)).float()  # many ties
    stat = torch.ones(32)
    keep = sp.wanda_mask(w, stat, 0.5)
    assert torch.equal(keep, ref.topk_keep(w.abs(), 0.5, dim=-1))
    nm = sp.wanda_mask(w, stat, n=2, m=4)
    assert torch.equal(nm, ref.nm_keep(w.abs(), 2, 4))
    assert torch.equal(nm, spruce.nm_mask(w.abs(), 2, 4))
    w2 = _w(8, 64, seed=5)
    stat2 = ref.wanda_statistic(_acts(64, seed=6))
    assert torch.equal(
        sp.wanda_mask(w2, stat2, 0.5, n=2, m=4), ref.wanda_mask_repo(w2, stat2, 0.5, 2, 4)
    )
    # stat=None: per-row magnitude
    assert torch.equal(sp.wanda_mask(w2, None, 0.25), ref.topk_keep(w2.abs(), 0.25, dim=-1))


def test_wanda_numpy_in_numpy_out_and_inputs_untouched():
    w = _w(6, 16)
    before = w.clone()
    stat = torch.rand(16, generator=_gen(7))
    keep = sp.wanda_mask(w.numpy(), stat.numpy(), 0.5)
    assert isinstance(keep, np.ndarray) and keep.dtype == np.bool_
    assert np.array_equal(keep, sp.wanda_mask(w, stat, 0.5).numpy())
    assert torch.equal(w, before)
    assert isinstance(sp.wanda_scores(w.numpy(), stat.numpy()), np.ndarray)


def test_wanda_bad_inputs():
    w = _w(4, 8)
    with pytest.raises(spruce.ShapeError, match=r"wanda_mask: stat has shape \(3,\)"):
        sp.wanda_mask(w, torch.ones(3), 0.5)
    with pytest.raises(spruce.ArgumentError, match="finite and >= 0"):
        sp.wanda_mask(w, -torch.ones(8), 0.5)
    with pytest.raises(spruce.ArgumentError, match=r"sparsity \(1.5\)"):
        sp.wanda_mask(w, torch.ones(8), 1.5)
    with pytest.raises(spruce.ShapeError, match="divisible by m"):
        sp.wanda_mask(_w(4, 6), torch.ones(6), n=2, m=4)
    with pytest.raises(spruce.ArgumentError, match="1 - n/m"):
        sp.wanda_mask(w, torch.ones(8), 0.7, n=2, m=4)
    with pytest.raises(spruce.ShapeError, match="2-D"):
        sp.wanda_mask(torch.ones(2, 2, 2), torch.ones(2), 0.5)
    bad = w.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(spruce.NonFiniteError):
        sp.wanda_mask(bad, torch.ones(8), 0.5)
    with pytest.raises(spruce.DTypeError):
        sp.wanda_mask(w.int(), torch.ones(8), 0.5)


def test_gradient_scores_accumulate_like_the_formulas():
    g = _gen(8)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ws, gs = {n: [] for n in ("0", "2")}, {n: [] for n in ("0", "2")}
    accs = {m: sp.GradientScores(model, m) for m in sp.GRADIENT_METHODS}
    for _ in range(3):
        x = torch.randn(4, 6, generator=g)
        model.zero_grad()
        model(x).pow(2).sum().backward()
        for a in accs.values():
            a.accumulate()
        for n in ("0", "2"):
            ws[n].append(model.get_submodule(n).weight.detach().clone())
            gs[n].append(model.get_submodule(n).weight.grad.clone())
        with torch.no_grad():  # the weights move between steps, as in training
            for p in model.parameters():
                p -= 0.1 * p.grad
    for n in ("0", "2"):
        torch.testing.assert_close(accs["movement"][n].double(), ref.movement_scores(ws[n], gs[n]))
        torch.testing.assert_close(accs["snip"][n].double(), ref.snip_scores(ws[n], gs[n]))
        torch.testing.assert_close(
            accs["snip_momentum"][n].double(), ref.snip_momentum_scores(ws[n], gs[n])
        )
        torch.testing.assert_close(accs["fisher"][n].double(), ref.fisher_scores(gs[n]))
        torch.testing.assert_close(accs["taylor"][n].double(), ref.taylor_scores(ws[n], gs[n]))
    assert accs["snip"].steps == 3
    w, gr = ws["0"][0], gs["0"][0]
    torch.testing.assert_close(sp.snip_scores(w, gr), (w * gr).abs())
    torch.testing.assert_close(sp.movement_scores(w, gr), -(w * gr))
    torch.testing.assert_close(sp.fisher_scores(gr), gr * gr)
    torch.testing.assert_close(sp.taylor_scores(w, gr), (w * gr) ** 2)
    with pytest.raises(spruce.ConfigError, match="method"):
        sp.GradientScores(model, "hessian")
    model.zero_grad(set_to_none=True)
    with pytest.raises(spruce.ArgumentError, match="no gradient"):
        accs["snip"].accumulate()


def test_group_scores_and_torch_ln_structured():
    w = _w(12, 10, seed=9)
    torch.testing.assert_close(sp.group_scores(w, dim=0), ref.group_norms(w, 0, 1, 2))
    torch.testing.assert_close(sp.group_scores(w, dim=1, reduce="l1"), ref.group_norms(w, 1, 1, 1))
    torch.testing.assert_close(sp.group_scores(w, dim=0, group_size=4), ref.group_norms(w, 0, 4, 2))
    assert sp.group_scores(w, dim=0, group_size=3, reduce="max").shape == (4,)
    with pytest.raises(spruce.ShapeError, match="divisible by group_size"):
        sp.group_scores(w, dim=0, group_size=5)
    # torch_prune.ln_structured(n=2, dim=0) keeps the rows with the largest L2 norms;
    # with an integral amount * rows the counts agree: the same mask as structured_mask.
    lin = nn.Linear(10, 12)
    with torch.no_grad():
        lin.weight.copy_(w)
    torch_prune.ln_structured(lin, "weight", amount=0.25, n=2, dim=0)
    keep = spruce.structured_mask(w, 0.25, dim=0, norm=2)
    assert torch.equal(keep, lin.weight_mask.bool())


def test_magnitude_against_torch_prune_and_the_repo_off_by_one():
    w = _w(30, 20, seed=10)
    seg = [w]
    value, ties = OPS.score_threshold(seg, [None], [False], 0.4)
    keep, used = OPS.threshold_mask(w, None, False, float(value), int(ties))
    assert int(used) == int(ties)
    assert torch.equal(keep, ref.magnitude_mask(w, 0.4))
    lin = nn.Linear(20, 30)
    with torch.no_grad():
        lin.weight.copy_(w)
    torch_prune.l1_unstructured(lin, "weight", amount=0.4)  # round(0.4 * 600) = 240
    assert torch.equal(keep, lin.weight_mask.bool())
    # The Wanda repo's magnitude baseline prunes one more than asked (distinct values).
    assert int((~ref.magnitude_mask_repo(w, 0.4)).sum()) == 241
    assert int((~keep).sum()) == 240


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_threshold_in_place_equals_concatenated_sort(dtype):
    ws = [
        _w(16, 24, seed=11, dtype=dtype),
        _w(40, 8, seed=12, dtype=dtype),
        _w(5, 32, seed=13, dtype=dtype),
    ]
    stats = [torch.rand(24, generator=_gen(1)), None, torch.rand(5, generator=_gen(2))]
    transposed = [False, False, True]  # the third is stored (in, out) like Conv1D
    value, ties = OPS.score_threshold(ws, stats, transposed, 0.55)
    scores = []
    for w, s, t in zip(ws, stats, transposed, strict=True):
        if s is None:
            scores.append(w.abs().double())
        else:
            ss = s.sqrt().reshape(-1, 1) if t else s.sqrt().reshape(1, -1)
            scores.append(
                (w.float().abs() * ss).double() if dtype != torch.float64 else w.abs() * ss.double()
            )
    want = ref.global_magnitude_masks(scores, 0.55)
    ties_left = int(ties)
    for w, s, t, k in zip(ws, stats, transposed, want, strict=True):
        c = w.clone()
        pruned, used = OPS.threshold_prune_(c, s, t, float(value), ties_left)
        ties_left -= int(used)
        assert torch.equal(c, torch.where(k, w, torch.zeros((), dtype=dtype)))
        assert int(pruned) == int((~k).sum())
    assert ties_left == 0


def test_global_magnitude_with_ties_is_exact():
    ws = [torch.randint(0, 4, (10, 10), generator=_gen(14)).float() for _ in range(3)]
    value, ties = OPS.score_threshold(ws, [None] * 3, [False] * 3, 0.5)
    left = int(ties)
    masks = []
    for w in ws:
        k, used = OPS.threshold_mask(w, None, False, float(value), left)
        left -= int(used)
        masks.append(k)
    assert masks == masks and sum(int((~k).sum()) for k in masks) == 150
    for k, want in zip(masks, ref.global_magnitude_masks(ws, 0.5), strict=True):
        assert torch.equal(k, want)
    for k, want in zip(masks, spruce.global_topk_masks([w.abs() for w in ws], 0.5), strict=True):
        assert torch.equal(k, want)


# ---------------------------------------------------------------------------------------------
# Calibration statistics


class Conv1D(nn.Module):
    """A stand-in for Hugging Face's Conv1D: weight (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.c = Conv1D(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.c(torch.relu(self.inp(x)))))


def test_activation_stats_stream_the_running_statistics():
    torch.manual_seed(0)
    model = Tiny()
    batches = _acts(12, seed=15, batches=4)
    batches.append(torch.randn(7, 12, generator=_gen(16)))  # a 2-D batch counts as one sample
    inputs = {"inp": [], "c": [], "out": []}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: inputs[n].append(a[0].detach())
        )
        for n in inputs
    ]
    stats = sp.ActivationStats(model, wanda=True, hessian=True).collect(batches)
    for h in hooks:
        h.remove()
    assert list(stats) == ["inp", "c", "out"]
    for n in inputs:
        st = stats[n]
        assert st.nsamples == 2 + 3 + 4 + 5 + 1
        torch.testing.assert_close(st.col_sq, ref.wanda_statistic(inputs[n]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            st.hessian, ref.sparsegpt_hessian(inputs[n]), rtol=1e-4, atol=1e-4
        )
    assert stats["c"].col_sq.shape == (16,)
    # hooks are gone after collect
    model(batches[0])
    assert stats["inp"].nsamples == 15


def test_activation_stats_selection_and_errors():
    model = Tiny()
    st = sp.ActivationStats(model, include=r"^(inp|out)$")
    assert list(st) == ["inp", "out"]
    assert list(sp.ActivationStats(model, exclude="c")) == ["inp", "out"]
    assert list(sp.ActivationStats(model, layers=["out"])) == ["out"]
    with pytest.raises(spruce.ConfigError, match="layers"):
        sp.ActivationStats(model, layers=["nope"])
    with pytest.raises(spruce.ConfigError, match="regular expression"):
        sp.ActivationStats(model, include="(")
    ls = sp.LayerStats("x", 4)
    with pytest.raises(spruce.ArgumentError, match="last dimension of 4"):
        ls.add(torch.ones(3, 5))


def test_feed_rules():
    seen = []

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, *args, **kwargs):
            seen.append((args, kwargs))

    m = M()
    x = torch.ones(2)
    sp.feed(m, {"a": x})
    sp.feed(m, (x, x))
    sp.feed(m, [x])
    sp.feed(m, x)
    assert [len(a) for a, _ in seen] == [0, 2, 1, 1] and list(seen[0][1]) == ["a"]


# ---------------------------------------------------------------------------------------------
# SparseGPT


@pytest.mark.parametrize(
    ("sparsity", "n", "m", "bs"),
    [(0.5, 0, 0, 32), (0.7, 0, 0, 128), (None, 2, 4, 16), (None, 1, 4, 32)],
)
def test_sparsegpt_equals_the_rederived_algorithm(sparsity, n, m, bs):
    w = _w(48, 96, seed=17)
    h = ref.sparsegpt_hessian(_acts(96, seed=18))
    got = w.clone()
    res = sp.sparsegpt_(got, h, sparsity, n=n, m=m, block_size=bs)
    want, keep = ref.sparsegpt(w, h, sparsity if sparsity is not None else 1 - n / m, n, m, bs)
    assert torch.equal(res.mask, keep)
    assert torch.equal(got, want)
    assert res.damp == pytest.approx(0.01 * float(torch.diag(h).mean()))
    if m:
        assert (res.mask.reshape(48, -1, m).sum(-1) == n).all()
    else:
        # exact per block: floor(s * 48 * bs) per block
        per_block = [int((~res.mask[:, i : i + bs]).sum()) for i in range(0, 96, bs)]
        assert per_block == [math.floor(sparsity * 48 * min(bs, 96 - i)) for i in range(0, 96, bs)]
    assert (got[~res.mask] == 0).all()


def test_sparsegpt_repo_rule_prunes_one_more_per_block():
    w = _w(16, 64, seed=19)
    h = ref.sparsegpt_hessian(_acts(64, seed=20))
    _, exact = ref.sparsegpt(w, h, 0.5, block_size=32, exact=True)
    _, repo = ref.sparsegpt(w, h, 0.5, block_size=32, exact=False)
    assert int((~repo).sum()) == int((~exact).sum()) + 2


def test_sparsegpt_dead_columns_half_weights_and_damping_fallback():
    w = _w(8, 32, seed=21)
    acts = _acts(32, seed=22)
    for a in acts:
        a[..., 5] = 0  # a dead input
    h = ref.sparsegpt_hessian(acts)
    bf = w.bfloat16()
    res = sp.sparsegpt_(bf, h, 0.5, block_size=16)
    assert bf.dtype == torch.bfloat16 and (bf[:, 5] == 0).all()
    assert (bf[~res.mask] == 0).all()
    # a rank-deficient Hessian without damping: retried with more damping, with a warning
    x = torch.randn(3, 32, generator=_gen(23))
    h2 = 2 * x.t() @ x / 3
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        res2 = sp.sparsegpt_(w.clone(), h2, 0.5, percdamp=0.0)
    assert res2.damp > 0
    with pytest.raises(spruce.ArgumentError, match="positive definite"):
        sp.sparsegpt_(w.clone(), -torch.eye(32), 0.5)
    with pytest.raises(spruce.ShapeError, match=r"expected \(32, 32\)"):
        sp.sparsegpt_(w.clone(), torch.eye(31), 0.5)
    with pytest.raises(spruce.NonFiniteError):
        sp.sparsegpt_(w.clone(), torch.full((32, 32), float("nan")), 0.5)
    with pytest.raises(spruce.ShapeError, match="divisible by m"):
        sp.sparsegpt_(w.clone(), h, None, n=2, m=4, block_size=6)
    with pytest.raises(spruce.ArgumentError, match="1 - n/m"):
        sp.sparsegpt_(w.clone(), h, 0.3, n=2, m=4)


# ---------------------------------------------------------------------------------------------
# OWL and schedules


def test_owl_allocation_and_outlier_ratio():
    ratios = [0.01, 0.05, 0.02, 0.08]
    got = sp.owl_sparsities(ratios, 0.7, 0.08)
    want = ref.owl_sparsities(ratios, 0.7, 0.08)
    assert got == pytest.approx(want)
    assert sum(got) / 4 == pytest.approx(0.7)
    assert max(got) - min(got) == pytest.approx(0.16)
    assert got.index(min(got)) == 3  # the most outliers: the lowest sparsity
    assert sp.owl_sparsities([0.3, 0.3], 0.5) == [0.5, 0.5]
    ws = [_w(8, 16, seed=24), _w(4, 16, seed=25)]
    stats = [torch.rand(16, generator=_gen(26)) * 4, torch.rand(16, generator=_gen(27))]
    got_r = sp.outlier_ratio(ws, stats, m=2.0)
    want_r = ref.outlier_ratio(
        [ref.wanda_scores(w, s) for w, s in zip(ws, stats, strict=True)], 2.0
    )
    assert got_r == pytest.approx(want_r)
    assert sp.outlier_ratio(ws, m=0.0) == 1.0


def test_cubic_schedule():
    sch = sp.CubicSchedule(final=0.8, initial=0.1, start=10, end=110, every=10)
    for t in [0, 9, 10, 15, 20, 55, 100, 109, 110, 500]:
        assert sch(t) == pytest.approx(ref.cubic_sparsity(t, 0.8, 0.1, 10, 100, 10))
    assert sch(10) == pytest.approx(0.1) and sch(110) == pytest.approx(0.8)
    assert sch.steps()[0] == 10 and sch.steps()[-1] == 110
    with pytest.raises(spruce.ArgumentError):
        sp.CubicSchedule(final=0.5, start=5, end=5)
    with pytest.raises(spruce.ArgumentError):
        sp.CubicSchedule(final=1.5, end=5)


# ---------------------------------------------------------------------------------------------
# KS test


def _ks_cases():
    g = np.random.default_rng(0)
    yield "equal-n", g.normal(size=(6, 200)), g.normal(0.1, 1.0, size=(6, 200))
    yield "unequal-n", g.normal(size=(5, 150)), g.normal(0.2, 1.3, size=(5, 97))
    yield (
        "ties",
        g.integers(0, 5, size=(4, 60)).astype(np.float64),
        g.integers(0, 6, size=(4, 45)).astype(np.float64),
    )
    yield "identical", np.tile(np.arange(30.0), (2, 1)), np.tile(np.arange(30.0), (2, 1))
    yield "disjoint", g.normal(size=(2, 40)), g.normal(10, 1, size=(2, 40))
    yield "tiny", g.normal(size=(3, 1)), g.normal(size=(3, 2))


@pytest.mark.parametrize("method", ["auto", "exact", "asymp"])
def test_ks_test_equals_scipy_per_row(method):
    from scipy import stats

    for name, a, b in _ks_cases():
        st, p = sp.ks_test(a, b, method=method)
        assert isinstance(st, np.ndarray) and st.dtype == np.float64
        for i in range(a.shape[0]):
            want = stats.ks_2samp(a[i], b[i], method=method)
            assert st[i] == pytest.approx(want.statistic, rel=1e-12, abs=1e-15), (name, i)
            tol = 1e-12 if method != "asymp" else 1e-9
            assert p[i] == pytest.approx(want.pvalue, rel=tol, abs=1e-300), (name, i, method)


def test_ks_asymptotic_regime_over_10000_samples():
    from scipy import stats

    g = np.random.default_rng(1)
    a = g.normal(size=(2, 10_001)).astype(np.float32)
    b = np.stack([g.normal(size=10_050), g.normal(0.05, 1, size=10_050)]).astype(np.float32)
    st, p = sp.ks_test(torch.from_numpy(a), torch.from_numpy(b))
    for i in range(2):
        want = stats.ks_2samp(a[i], b[i])
        assert float(st[i]) == pytest.approx(want.statistic, rel=1e-12)
        assert float(p[i]) == pytest.approx(want.pvalue, rel=1e-8)


def test_kstwo_sf_equals_scipy_in_every_regime():
    from scipy import stats

    from spruce import _core

    for n in (3, 60, 140, 141, 1000, 6144, 150_000):
        for x in (
            0.4 / n,
            0.8 / n,
            1.5 / n,
            0.004,
            0.01,
            0.03,
            0.05,
            0.1,
            0.2,
            0.45,
            0.6,
            1 - 0.5 / n,
        ):
            want = float(stats.kstwo.sf(x, n))
            assert _core.kstwo_sf(n, x) == pytest.approx(want, rel=1e-8, abs=1e-300), (n, x)


def test_ks_dims_dtypes_and_errors():
    from scipy import stats

    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 50, 4, generator=g)
    b = torch.randn(3, 40, 4, generator=g).bfloat16()
    st, p = sp.ks_test(a, b, dim=1)
    assert st.shape == (3, 4) and p.dtype == torch.float64
    want = stats.ks_2samp(a[1, :, 2].double().numpy(), b[1, :, 2].double().numpy())
    assert float(p[1, 2]) == pytest.approx(want.pvalue, rel=1e-12)
    with pytest.raises(spruce.ShapeError, match="except along dim"):
        sp.ks_test(torch.randn(3, 5), torch.randn(4, 5))
    with pytest.raises(spruce.ArgumentError, match="method"):
        sp.ks_test(a, a, method="fast")
    bad = a.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(spruce.NonFiniteError):
        sp.ks_test(bad, a)


def test_ks_lottery_selects_changed_rows():
    g = torch.Generator().manual_seed(3)
    before = torch.randn(20, 256, generator=g)
    after = before.clone()
    changed = [2, 7, 11]
    for r in changed:
        after[r] = after[r] * 3 + 1
    res = sp.ks_lottery(before, after, alpha=0.01)
    assert res.selected.nonzero().flatten().tolist() == changed
    top = sp.ks_lottery(before, after, alpha=0.01, max_rows=2)
    assert int(top.selected.sum()) == 2
    assert set(top.selected.nonzero().flatten().tolist()) <= set(changed)


# ---------------------------------------------------------------------------------------------
# torch integration


def _opcheck_samples():
    w = _w(6, 8)
    s = torch.rand(8, generator=_gen(30))
    yield "wanda_scores", (w, s)
    yield "wanda_scores", (w.bfloat16(), None)
    yield "wanda_mask", (w, s, 0.5, 0, 0)
    yield "wanda_mask", (w.double(), s, 0.0, 2, 4)
    yield "score_threshold", ([w, w.half()], [s, None], [False, False], 0.3)
    yield "threshold_mask", (w, s, False, 0.5, 3)
    yield "threshold_prune_", (w.clone(), None, False, 0.5, 1)
    yield "threshold_prune_", (w.clone().t(), torch.rand(8), True, 0.5, 1)
    yield "outlier_count", ([w, w], [s, None], [False, False], 2.0)
    yield "ks_2samp", (torch.randn(3, 10), torch.randn(3, 7).double(), "auto")


@pytest.mark.parametrize(("op", "args"), list(_opcheck_samples()))
def test_opcheck(op, args):
    torch.library.opcheck(getattr(OPS, op).default, args)


def test_thread_count_does_not_change_results():
    w = _w(64, 300, seed=31)
    s = torch.rand(300, generator=_gen(32))
    spruce.set_num_threads(1)
    try:
        a = sp.wanda_mask(w, s, 0.5)
        t1 = OPS.score_threshold([w, w.t().contiguous()], [s, None], [False, False], 0.5)
    finally:
        spruce.set_num_threads(0)
    assert torch.equal(a, sp.wanda_mask(w, s, 0.5))
    t2 = OPS.score_threshold([w, w.t().contiguous()], [s, None], [False, False], 0.5)
    assert [float(t) for t in t1] == [float(t) for t in t2]
