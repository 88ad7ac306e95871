"""spruce.merge at tensor level: every method and preset against the plain reference, PEFT's
merge_utils as an oracle, the worked TIES example, statistics of the random drops, the torch
contract (opcheck, gradcheck, torch.compile) and bad inputs."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import spruce
from spruce.merge import merge_coefficients, merge_plan, merge_tensors
from spruce.reference import merge as ref

peft_merge = importlib.import_module("peft.utils.merge_utils")

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def models(n: int = 3, shape=(24, 40), dtype=F32, seed: int = 0, spread: float = 0.02):
    """A base and ``n`` fine-tunes near it (drawn in float64, then cast)."""
    g = _gen(seed)
    base = torch.randn(*shape, generator=g, dtype=F64)
    fts = [base + spread * torch.randn(*shape, generator=g, dtype=F64) for _ in range(n)]
    return base.to(dtype), [f.to(dtype) for f in fts]


W3 = [0.5, 1.0, 0.3]

# ---------------------------------------------------------------------------------------------
# the worked TIES example of REFERENCES.md


TAU1 = torch.tensor([1.0, -0.5, 0.3, 0.0])
TAU2 = torch.tensor([-0.6, 0.4, -0.2, 0.9])


def test_worked_ties_example_peft_and_mergekit():
    base = torch.zeros(4)
    peft = merge_tensors("ties", base, [TAU1, TAU2], weights=[0.2, 1.0], preset="peft")
    mk = merge_tensors("ties", base, [TAU1, TAU2], weights=[0.2, 1.0], preset="mergekit")
    torch.testing.assert_close(peft, torch.tensor([0.2, -0.1, 0.06, 0.9]), rtol=0, atol=1e-7)
    assert torch.equal(mk, torch.tensor([-0.6, 0.4, -0.2, 0.9]))
    # the installed PEFT computes the same
    want = peft_merge.ties([TAU1, TAU2], torch.tensor([0.2, 1.0]), 1.0)
    torch.testing.assert_close(peft, want, rtol=0, atol=1e-7)
    # spruce's default elects on the weighted sum too, so it agrees with mergekit here
    assert torch.equal(merge_tensors("ties", base, [TAU1, TAU2], weights=[0.2, 1.0]), mk)


# ---------------------------------------------------------------------------------------------
# exact agreement with the plain reference


DETERMINISTIC = ["task_arithmetic", "ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties"]


@pytest.mark.parametrize("preset", spruce.merge.PRESETS)
@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16])
def test_deterministic_methods_equal_reference(method, preset, dtype):
    if method not in ref_methods(preset):
        with pytest.raises(spruce.ArgumentError, match="is not a"):
            merge_tensors(method, *models(dtype=dtype), preset=preset)
        return
    base, fts = models(dtype=dtype, seed=1)
    kw = dict(weights=W3, density=[0.3, 0.5, 0.2], scale=0.9)
    got = merge_tensors(method, base, fts, preset=preset, **kw)
    want = ref.merge(method, base, fts, preset=preset, **kw)
    assert got.dtype == dtype and got.shape == base.shape
    assert torch.equal(got, want)


def ref_methods(preset: str) -> set[str]:
    return {m for m in spruce.merge.METHODS if _supported(m, preset)}


def _supported(method: str, preset: str) -> bool:
    try:
        merge_plan(method, preset=preset)
    except spruce.ArgumentError:
        return False
    return True


def keep_masks(method: str, base, fts, **kw) -> list[torch.Tensor]:
    """The keep-masks spruce draws, read off the linear variant's coefficients."""
    linear = {"dare_ties": "dare_linear", "della": "della_linear", "della_ties": "della_linear"}
    # the drop does not depend on the rescale rule; L1 rescaling has no coefficients
    c = merge_coefficients(linear.get(method, method), base, fts, rescale="none", **kw)
    return [c[k] != 0 for k in range(len(fts))]


RANDOM = ["dare_linear", "dare_ties", "della", "della_ties", "della_linear"]


@pytest.mark.parametrize("preset", ["spruce", "mergekit", "peft", "paper"])
@pytest.mark.parametrize("method", RANDOM)
@pytest.mark.parametrize("dtype", [F32, F64, BF16])
def test_random_methods_equal_reference_with_their_own_masks(method, preset, dtype):
    if not _supported(method, preset):
        return
    base, fts = models(dtype=dtype, seed=2)
    kw = dict(weights=W3, density=[0.4, 0.6, 0.3], seed=11, preset=preset)
    masks = keep_masks(method, base, fts, **kw)
    got = merge_tensors(method, base, fts, **kw)
    kw.pop("seed")
    want = ref.merge(method, base, fts, masks=masks, **kw)
    if preset == "mergekit":  # the L1 factor's float64 sums are ordered differently
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("method", RANDOM + ["ties", "breadcrumbs"])
def test_injected_masks_replace_the_draw(method):
    base, fts = models(seed=3)
    g = _gen(5)
    masks = [torch.rand(base.shape, generator=g) < 0.5 for _ in fts]
    got = merge_tensors(method, base, fts, weights=W3, density=0.5, masks=masks)
    want = ref.merge(method, base, fts, weights=W3, density=0.5, masks=masks)
    assert torch.equal(got, want)


def test_linear_fisher_transfer_exact_slerp_pcb_close():
    base, fts = models(seed=4)
    assert torch.equal(
        merge_tensors("linear", None, fts, weights=W3), ref.merge("linear", None, fts, weights=W3)
    )
    soup = merge_tensors("linear", None, fts)
    torch.testing.assert_close(soup, torch.stack(fts).mean(0), rtol=1e-6, atol=1e-6)
    g = _gen(6)
    fis = [torch.rand(base.shape, generator=g) for _ in fts]
    assert torch.equal(
        merge_tensors("fisher", None, fts, weights=W3, fisher=fis),
        ref.merge("fisher", None, fts, weights=W3, fisher=fis),
    )
    tr = merge_tensors("transfer", base, fts[:2], scale=0.7)
    assert torch.equal(tr, ref.merge("transfer", base, fts[:2], scale=0.7))
    for t in (0.0, 0.3, 1.0):
        s = merge_tensors("slerp", base, fts[:1], t=t)
        torch.testing.assert_close(s, ref.merge("slerp", base, fts[:1], t=t), rtol=1e-6, atol=1e-6)
    # a wide angle (not the nearly-colinear fallback)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    torch.testing.assert_close(
        merge_tensors("slerp", a, [b], t=0.25),
        ref.merge("slerp", a, [b], t=0.25),
        rtol=1e-6,
        atol=1e-6,
    )
    for d in (0.1, 0.5, 1.0):
        p = merge_tensors("pcb", base, fts, density=d, weights=W3, scale=1.2)
        torch.testing.assert_close(
            p, ref.merge("pcb", base, fts, density=d, weights=W3, scale=1.2), rtol=1e-6, atol=1e-6
        )


def test_coefficients_reproduce_the_merge():
    base, fts = models(seed=7, dtype=F64)
    for method in [
        "ties",
        "dare_ties",
        "della",
        "breadcrumbs",
        "task_arithmetic",
        "magnitude_prune",
    ]:
        kw = dict(weights=W3, density=0.4, scale=0.8, seed=3)
        out = merge_tensors(method, base, fts, **kw)
        c = merge_coefficients(method, base, fts, **kw)
        assert c.shape == (3, *base.shape) and c.dtype == F64
        rebuilt = base + sum(c[k] * (fts[k] - base) for k in range(3))
        torch.testing.assert_close(out, rebuilt, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# PEFT's merge_utils as the oracle (fixed masks for the random methods)


def _peft_weights(ws):
    return torch.tensor(ws, dtype=F32)


def test_peft_task_arithmetic_and_magnitude_prune():
    _, taus = models(seed=8)
    zero = torch.zeros_like(taus[0])
    got = merge_tensors("task_arithmetic", zero, taus, weights=W3, preset="peft")
    torch.testing.assert_close(
        got, peft_merge.task_arithmetic(taus, _peft_weights(W3)), rtol=1e-6, atol=1e-7
    )
    for d in (0.2, 0.5, 0.99):
        got = merge_tensors("magnitude_prune", zero, taus, weights=W3, density=d, preset="peft")
        want = peft_merge.magnitude_prune(taus, _peft_weights(W3), d)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("votes", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.7, 1.0])
def test_peft_ties(votes, density):
    _, taus = models(n=4, seed=9)
    zero = torch.zeros_like(taus[0])
    ws = [0.4, 1.0, 0.7, 0.2]
    got = merge_tensors(
        "ties", zero, taus, weights=ws, density=density, preset="peft",
        votes="sum" if votes == "total" else "count",
    )  # fmt: skip
    want = peft_merge.ties(taus, _peft_weights(ws), density, majority_sign_method=votes)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_peft_dare_with_fixed_masks(method, monkeypatch):
    _, taus = models(n=3, seed=10)
    zero = torch.zeros_like(taus[0])
    d = 0.3
    g = _gen(12)
    masks = [torch.rand(zero.shape, generator=g) < d for _ in taus]
    queue = [m.to(F32) for m in masks]

    def fixed_bernoulli(p, *args, **kwargs):
        assert torch.all(p == d)
        return queue.pop(0)

    monkeypatch.setattr(torch, "bernoulli", fixed_bernoulli)
    want = getattr(peft_merge, method)(taus, _peft_weights(W3), d)
    monkeypatch.undo()
    assert not queue
    got = merge_tensors(method, zero, taus, weights=W3, density=d, preset="peft", masks=masks)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# the random drops: exact counts, unbiasedness, reproducibility


def test_dare_exact_count_and_unbiased():
    n = 4000
    tau = torch.randn(n, generator=_gen(13)) + 2.0
    zero = torch.zeros(n)
    d = 0.25
    kept = math.floor(d * n)
    acc = torch.zeros(n, dtype=F64)
    seeds = 300
    for s in range(seeds):
        out = merge_tensors("dare_linear", zero, [tau], density=d, seed=s)
        assert int((out != 0).sum()) == kept  # exact count
        assert torch.all((out == 0) | (out == tau * (n / kept)))
        acc += out.to(F64)
    mean = acc / seeds
    # per entry: mean of `seeds` draws of tau * (n/K) * Bernoulli-like(K/n); check the average
    # bias over all entries (its standard error is tiny) and a loose per-entry bound
    rel = (mean - tau.to(F64)) / tau.to(F64)
    assert abs(float(rel.mean())) < 0.01
    sd = math.sqrt((1 - d) / d / seeds)
    assert float(rel.abs().max()) < 6 * sd


def test_bernoulli_presets_keep_about_density():
    n = 100_000
    zero = torch.zeros(n)
    one = torch.ones(n)
    for d in (0.1, 0.5):
        out = merge_tensors("dare_linear", zero, [one], density=d, preset="peft", seed=1)
        frac = float((out != 0).float().mean())
        assert abs(frac - d) < 5 * math.sqrt(d * (1 - d) / n)
        assert torch.all((out == 0) | (out == torch.tensor(1 / d, dtype=F32)))


def test_della_keeps_large_magnitudes_more_often():
    rows, cols = 200, 64
    tau = torch.arange(1, cols + 1, dtype=F32).repeat(rows, 1)
    zero = torch.zeros_like(tau)
    out = merge_tensors("della_linear", zero, [tau], density=0.5, epsilon=0.4, seed=3)
    kept = (out != 0).float().mean(0)
    assert kept[:8].mean() < 0.25 and kept[-8:].mean() > 0.75
    # kept entries are divided by their own keep probability (paper and spruce presets)
    p = ref.della_probabilities(tau, 0.5, 0.4, "paper")
    k = out != 0
    assert torch.equal(out[k], tau[k] * (1.0 / p[k]).to(F32))


def test_masks_do_not_depend_on_threads_chunking_or_shape():
    base, fts = models(n=2, shape=(300, 700), seed=14)
    kw = dict(density=0.3, seed=5)
    old = spruce.num_threads()
    try:
        spruce.set_num_threads(1)
        one = merge_tensors("dare_ties", base, fts, **kw)
        t1 = merge_tensors("ties", base, fts, **kw)
        spruce.set_num_threads(3)
        three = merge_tensors("dare_ties", base, fts, **kw)
        t3 = merge_tensors("ties", base, fts, **kw)
    finally:
        spruce.set_num_threads(old)
    assert torch.equal(one, three) and torch.equal(t1, t3)
    # the draw is keyed by the flat index: reshaping the inputs reshapes the result
    flat = merge_tensors("dare_ties", base.reshape(-1), [f.reshape(-1) for f in fts], **kw)
    assert torch.equal(flat, one.reshape(-1))
    assert not torch.equal(one, merge_tensors("dare_ties", base, fts, density=0.3, seed=6))


@pytest.mark.parametrize(
    "method", ["ties", "dare_linear", "dare_ties", "della", "breadcrumbs", "magnitude_prune"]
)
@pytest.mark.parametrize("preset", ["spruce", "peft", "mergekit", "paper"])
def test_density_zero_and_one_have_no_nan(method, preset):
    if not _supported(method, preset):
        return
    base, fts = models(seed=15)
    zero = merge_tensors(method, base, fts, density=0.0, preset=preset)
    assert torch.equal(zero, base)
    full = merge_tensors(method, base, fts, density=1.0, preset=preset)
    assert torch.isfinite(full).all()
    if method in ("dare_linear", "magnitude_prune"):
        assert torch.equal(full, merge_tensors("task_arithmetic", base, fts, preset=preset))


def test_breadcrumbs_does_not_zero_the_task_vector_without_outliers():
    # gamma * n < 1: no outlier is dropped. mergekit's slice [n_bot:-0] would keep nothing.
    base, fts = models(n=1, shape=(50,), seed=16)
    out = merge_tensors("breadcrumbs", base, fts, density=0.4, gamma=0.01)
    tau = fts[0] - base
    assert int((out != base).sum()) == 20
    assert torch.equal(out, merge_tensors("magnitude_prune", base, fts, density=0.4))
    assert torch.equal(out, base + tau * ref.outlier_mask(tau, 0.4, 0.01))


def test_trim_ties_drop_the_lower_index_first():
    base = torch.zeros(6)
    tau = torch.tensor([1.0, -1.0, 2.0, 1.0, -1.0, 0.5])
    out = merge_tensors("magnitude_prune", base, [tau], density=0.5)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 2.0, 1.0, -1.0, 0.0]))


def test_spruce_preset_is_symmetric_and_weight_scale_invariant():
    base, fts = models(seed=17)
    a = merge_tensors("ties", base, fts, weights=W3, density=0.5)
    b = merge_tensors("ties", base, fts, weights=[3 * w for w in W3], density=0.5)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    neg = merge_tensors("ties", base, [2 * base - f for f in fts], weights=W3, density=0.5)
    torch.testing.assert_close(neg - base, -(a - base), rtol=1e-6, atol=1e-7)
    # a tied vote elects no sign under spruce and paper, +1 under the tools
    z = torch.zeros(1)
    tie = [torch.tensor([1.0]), torch.tensor([-1.0])]
    assert float(merge_tensors("ties", z, tie)) == 0.0
    assert float(merge_tensors("ties", z, tie, preset="peft")) == 1.0


# ---------------------------------------------------------------------------------------------
# the conventions table


def test_merge_plan_states_each_presets_conventions():
    s = merge_plan("ties")
    assert (s["election"], s["divisor"], s["zero_sign"]) == ("weighted", "weight", "zero")
    p = merge_plan("ties", preset="peft")
    assert (p["election"], p["divisor"], p["zero_sign"]) == ("unweighted", "count", "positive")
    assert merge_plan("ties", preset="paper")["trim_scope"] == "model"
    assert (
        merge_plan("dare_ties", preset="mergekit")["divisor"] == "none"
    )  # mergekit normalize=False
    assert merge_plan("dare_ties", preset="mergekit")["rescale"] == "l1"
    assert merge_plan("dare_linear")["sparsify"] == "random_exact"
    assert merge_plan("dare_linear", preset="peft")["sparsify"] == "bernoulli"
    assert merge_plan("della", preset="mergekit")["rank_rule"] == "minmax"
    assert merge_plan("ties", rescale=True, preset="mergekit")["rescale"] == "l1"
    assert merge_plan("della_ties") == {**merge_plan("della"), "method": "della_ties"}


# ---------------------------------------------------------------------------------------------
# inputs and errors


def test_numpy_in_numpy_out_and_inputs_untouched():
    base, fts = models(seed=18)
    keep = [base.clone()] + [f.clone() for f in fts]
    got = merge_tensors("ties", base.numpy(), [f.numpy() for f in fts], density=0.5)
    assert isinstance(got, np.ndarray)
    assert np.array_equal(got, merge_tensors("ties", base, fts, density=0.5).numpy())
    for a, b in zip(keep, [base, *fts], strict=True):
        assert torch.equal(a, b)


def test_strided_inputs():
    base, fts = models(shape=(40, 24), seed=19)
    got = merge_tensors("ties", base.t(), [f.t() for f in fts], density=0.5)
    want = merge_tensors(
        "ties", base.t().contiguous(), [f.t().contiguous() for f in fts], density=0.5
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda b, f: merge_tensors("nope", b, f), spruce.ArgumentError, "method"),
        (lambda b, f: merge_tensors("ties", b, f, preset="x"), spruce.ArgumentError, "preset"),
        (
            lambda b, f: merge_tensors("ties", b, f, colour=1),
            spruce.ArgumentError,
            "unknown option",
        ),
        (
            lambda b, f: merge_tensors("ties", b, f, density=1.5),
            spruce.ArgumentError,
            r"density \(1.5\)",
        ),
        (
            lambda b, f: merge_tensors("ties", b, f, density=[0.5]),
            spruce.ArgumentError,
            "one per model",
        ),
        (
            lambda b, f: merge_tensors("ties", b, f, weights=[1, 2]),
            spruce.ArgumentError,
            "one per model",
        ),
        (lambda b, f: merge_tensors("ties", None, f), spruce.ArgumentError, "needs a base"),
        (lambda b, f: merge_tensors("linear", b, f), spruce.ArgumentError, "base must be None"),
        (lambda b, f: merge_tensors("slerp", b, f), spruce.ArgumentError, "exactly 1"),
        (lambda b, f: merge_tensors("linear", None, f, scale=2.0), spruce.ArgumentError, "scale"),
        (lambda b, f: merge_tensors("ties", b, []), spruce.ArgumentError, "empty"),
        (lambda b, f: merge_tensors("ties", b, f[0]), spruce.ArgumentError, "sequence"),
        (lambda b, f: merge_tensors("ties", b, [f[0], f[1][:2]]), spruce.ShapeError, "shape"),
        (
            lambda b, f: merge_tensors("ties", b, [f[0], f[1].double()]),
            spruce.DTypeError,
            "float64",
        ),
        (lambda b, f: merge_tensors("ties", b.int(), f), spruce.DTypeError, "int32"),
        (lambda b, f: merge_tensors("ties", b, f, seed=-1), spruce.ArgumentError, "seed"),
        (
            lambda b, f: merge_tensors("della", b, f, density=0.5, epsilon=0.7),
            spruce.ArgumentError,
            "epsilon",
        ),
        (lambda b, f: merge_tensors("ties", b, f, masks=[b > 0]), spruce.ArgumentError, "masks"),
        (
            lambda b, f: merge_tensors("task_arithmetic", b, f, masks=[b > 0] * 3),
            spruce.ArgumentError,
            "masks",
        ),
        (lambda b, f: merge_tensors("fisher", None, f), spruce.ArgumentError, "fisher"),
        (
            lambda b, f: merge_tensors("ties", b.to("meta"), [x.to("meta") for x in f]),
            spruce.DeviceError,
            "CPU",
        ),
        (lambda b, f: merge_coefficients("slerp", b, f[:1]), spruce.ArgumentError, "slerp"),
    ],
)
def test_bad_inputs(call, exc, match):
    base, fts = models(seed=20)
    with pytest.raises(exc, match=match):
        call(base, fts)


def test_nan_is_refused_by_every_method():
    base, fts = models(seed=21)
    bad = fts[0].clone()
    bad[3, 5] = float("nan")
    for method in ["ties", "task_arithmetic", "dare_linear", "breadcrumbs", "della"]:
        with pytest.raises(spruce.NonFiniteError, match="NaN"):
            merge_tensors(method, base, [bad, fts[1]], density=0.5)
    with pytest.raises(spruce.NonFiniteError):
        merge_tensors("linear", None, [bad, fts[1]])


# ---------------------------------------------------------------------------------------------
# the torch contract


def _op_args(method: str, base, fts, **kw):
    from spruce.merge.tensors import _resolve

    args, _ = _resolve(method, base, fts, kw.pop("weights", None), kw.pop("density", 1.0),
                       kw.pop("scale", 1.0), kw.pop("seed", 0), kw.pop("preset", "spruce"), kw)  # fmt: skip
    return args


def _opcheck_samples():
    b64, f64 = models(n=2, shape=(5, 7), dtype=F64, seed=22)
    b32, f32 = models(n=3, shape=(4, 6), seed=23)
    bbf, fbf = models(n=2, shape=(3, 8), dtype=BF16, seed=24)
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    fis = [torch.rand(4, 6, generator=_gen(1)) for _ in f32]
    return [
        (
            "ties-f64-grad",
            _op_args("ties", grad(b64), [grad(f) for f in f64], density=0.5, weights=[0.3, 1.0]),
        ),
        (
            "dare-f64-grad",
            _op_args("dare_ties", grad(b64), [grad(f) for f in f64], density=0.5, seed=3),
        ),
        ("della-f64-grad", _op_args("della", grad(b64), [grad(f) for f in f64], density=0.5)),
        ("ta-f32", _op_args("task_arithmetic", b32, f32, scale=0.5)),
        ("linear-f32-grad", _op_args("linear", None, [grad(f) for f in f32], weights=W3)),
        ("fisher-f32", _op_args("fisher", None, f32, fisher=fis)),
        ("slerp-bf16", _op_args("slerp", bbf, fbf[:1], t=0.3)),
        ("pcb-f32", _op_args("pcb", b32, f32, density=0.3)),
        ("breadcrumbs-bf16", _op_args("breadcrumbs_ties", bbf, fbf, density=0.5, gamma=0.1)),
        ("transfer-f64-grad", _op_args("transfer", grad(b64), [grad(f) for f in f64], scale=0.5)),
        ("mergekit-dare-l1", _op_args("dare_linear", b32, f32, density=0.5, preset="mergekit")),
    ]


SAMPLES = _opcheck_samples()


@pytest.mark.parametrize(("sid", "args"), SAMPLES, ids=[s for s, _ in SAMPLES])
def test_opcheck_merge(sid, args):
    torch.library.opcheck(torch.ops.spruce.merge, args)


@pytest.mark.parametrize(
    ("sid", "args"), [s for s in SAMPLES if s[0].split("-")[0] not in ("slerp", "pcb", "mergekit")]
)
def test_opcheck_merge_coefficients(sid, args):
    detached = tuple(
        a.detach()
        if isinstance(a, torch.Tensor)
        else (
            [x.detach() for x in a]
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else a
        )
        for a in args
    )
    torch.library.opcheck(torch.ops.spruce.merge_coefficients, detached)


@pytest.mark.parametrize(
    "method",
    ["ties", "dare_ties", "della", "breadcrumbs", "task_arithmetic", "magnitude_prune", "transfer"],
)
def test_gradcheck(method):
    base, fts = models(
        n=2 if method == "transfer" else 3, shape=(4, 5), dtype=F64, seed=25, spread=1.0
    )
    base.requires_grad_()
    for f in fts:
        f.requires_grad_()
    kw = {} if method == "transfer" else dict(weights=[0.5, 1.2, 0.7], density=0.6, seed=2)
    assert torch.autograd.gradcheck(
        lambda b, *f: merge_tensors(method, b, list(f), **kw), (base, *fts)
    )


def test_gradcheck_linear_and_fisher():
    _, fts = models(shape=(3, 4), dtype=F64, seed=26)
    for f in fts:
        f.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *f: merge_tensors("linear", None, list(f), weights=W3), tuple(fts)
    )
    fis = [torch.rand(3, 4, generator=_gen(2), dtype=F64) for _ in fts]
    assert torch.autograd.gradcheck(
        lambda *f: merge_tensors("fisher", None, list(f), fisher=fis), tuple(fts)
    )


def test_backward_refuses_what_is_not_differentiable():
    base, fts = models(n=1, shape=(5,), seed=27)
    b = base.clone().requires_grad_()
    out = merge_tensors("slerp", b, fts)
    with pytest.raises(spruce.ArgumentError, match="not differentiable"):
        out.sum().backward()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    base, fts = models(seed=28)

    def f(b, a, c, d):
        return merge_tensors("ties", b, [a, c, d], weights=W3, density=0.4, scale=0.9)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    assert torch.equal(compiled(base, *fts), f(base, *fts))
    g = torch.compile(
        lambda b, a: merge_tensors("dare_linear", b, [a], density=0.3, seed=4),
        fullgraph=True,
        backend=backend,
    )
    assert torch.equal(
        g(base, fts[0]), merge_tensors("dare_linear", base, [fts[0]], density=0.3, seed=4)
    )


@pytest.mark.parametrize(
    ("sid", "args"), [s for s in SAMPLES if "grad" not in s[0]], ids=lambda v: str(v)[:20]
)
def test_merge_into_equals_merge_and_passes_opcheck(sid, args):
    """The streaming writer's op: the same values as merge, written into a caller's buffer."""
    want = torch.ops.spruce.merge(*args)
    out = torch.full_like(want, 7.0)
    assert torch.ops.spruce.merge_into(out, *args) is None
    assert torch.equal(out, want)
    torch.library.opcheck(torch.ops.spruce.merge_into, (torch.empty_like(want), *args))


def test_merge_into_refuses_a_bad_out():
    _, args = next(s for s in SAMPLES if s[0] == "ta-f32")
    model = args[1][0]
    with pytest.raises(spruce.SpruceError, match="out"):
        torch.ops.spruce.merge_into(model, *args)  # the output would overwrite an input
    with pytest.raises(spruce.DTypeError, match="out has dtype float64"):
        torch.ops.spruce.merge_into(torch.empty(model.shape, dtype=F64), *args)
    with pytest.raises(spruce.ArgumentError, match="contiguous"):
        torch.ops.spruce.merge_into(torch.empty(model.shape[::-1]).t(), *args)
