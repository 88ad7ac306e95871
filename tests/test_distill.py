"""spruce.distill: every loss against the plain gather + kl_div formulas of
spruce.reference.graph in value and gradient, gradcheck (float64), opcheck, torch.compile
(fullgraph), bad inputs, KRD sampling, the similarity identity and the memory footprint."""

from __future__ import annotations

import pytest
import torch

import spruce
import spruce.distill as D
from spruce._measure import peak_extra
from spruce.reference import graph as R

OPS = torch.ops.spruce


def _data(n=30, c=5, e=90, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2).to(dtype)
    ei = torch.randint(0, n, (2, e), generator=g)
    ei[:, :3] = torch.tensor([[4, 7, 7], [4, 7, 2]])  # loops and a duplicate-ish edge
    y = torch.randint(0, c, (n,), generator=g)
    m = torch.rand(n, generator=g) < 0.4
    y[~m] = -1  # labels of unlabelled nodes are ignored
    m[0] = True
    y[0] = 1
    return s, t, ei, y, m


def _value_and_grad(fn, s):
    s = s.detach().clone().requires_grad_()
    v = fn(s)
    (g,) = torch.autograd.grad(v.sum(), s)
    return v.detach(), g


def _close(spruce_fn, ref_fn, s, rtol=1e-10, atol=1e-12):
    v1, g1 = _value_and_grad(spruce_fn, s)
    v2, g2 = _value_and_grad(ref_fn, s)
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol)
    torch.testing.assert_close(g1, g2, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize(("temperature", "t2"), [(1.0, False), (3.0, True), (0.5, False)])
def test_kd_loss_equals_reference(reduction, temperature, t2):
    s, t, *_ = _data()
    kw = dict(temperature=temperature, t2_scale=t2, reduction=reduction)
    _close(lambda x: D.kd_loss(x, t, **kw), lambda x: R.kd_loss(x, t, **kw), s)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_glnn_loss_equals_reference(lam):
    s, t, _, y, m = _data(seed=1)
    _close(lambda x: D.glnn_loss(x, t, y, m, lam=lam), lambda x: R.glnn_loss(x, t, y, m, lam), s)


def test_lfd_and_hfd_equal_reference():
    s, t, ei, *_ = _data(seed=2)
    _close(lambda x: D.lfd_loss(x, t, ei), lambda x: R.lfd_loss(x, t, ei), s)
    for tau in (1.0, 1.5):
        _close(
            lambda x, tau=tau: D.hfd_loss(x, t, ei, tau=tau),
            lambda x, tau=tau: R.hfd_loss(x, t, ei, tau),
            s,
        )


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_ffg2m_loss_equals_reference(lam):
    s, t, ei, y, m = _data(seed=3)
    _close(
        lambda x: D.ffg2m_loss(x, t, ei, y, m, lam=lam, tau=1.2),
        lambda x: R.ffg2m_loss(x, t, ei, y, m, lam, 1.2),
        s,
    )


def test_hfd_with_ties_takes_zero_derivative_like_torch():
    s, t, ei, *_ = _data(seed=4)
    s[ei[1, 10]] = s[ei[0, 10]]  # |s_i - s_j| = 0 on one edge: abs' = 0 in both
    _close(lambda x: D.hfd_loss(x, t, ei), lambda x: R.hfd_loss(x, t, ei, 1.0), s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision(dtype):
    s, t, ei, y, m = _data(n=200, c=10, e=1000, seed=5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for fn, ref in [
        (
            lambda x: D.ffg2m_loss(x, t.to(dtype), ei, y, m, lam=0.4),
            lambda x: R.ffg2m_loss(x, t, ei, y, m, 0.4, 1.0),
        ),
        (
            lambda x: D.kd_loss(x, t.to(dtype), temperature=2.0),
            lambda x: R.kd_loss(x, t, temperature=2.0),
        ),
    ]:
        v, g = _value_and_grad(fn, s.to(dtype))
        vr, gr = _value_and_grad(ref, s)
        assert v.dtype == dtype and g.dtype == dtype
        torch.testing.assert_close(v.double(), vr, rtol=tol, atol=tol)
        torch.testing.assert_close(g.double(), gr, rtol=tol, atol=tol * 0.1)


def test_gradcheck_float64():
    s, t, ei, y, m = _data(n=8, c=4, e=20, seed=6)
    s = s.requires_grad_()
    checks = [
        lambda x: D.kd_loss(x, t, temperature=2.0, t2_scale=True),
        lambda x: D.kd_loss(x, t, reduction="none"),
        lambda x: D.glnn_loss(x, t, y, m, lam=0.3),
        lambda x: D.lfd_loss(x, t, ei),
        lambda x: D.hfd_loss(x, t, ei, tau=1.3),
        lambda x: D.ffg2m_loss(x, t, ei, y, m, lam=0.2, tau=1.1),
        lambda x: D.similarity_loss(t, x),
    ]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8)


def test_teacher_is_a_target_and_inputs_are_untouched():
    s, t, ei, y, m = _data(seed=7)
    t = t.requires_grad_()
    s0, t0, ei0 = s.clone(), t.detach().clone(), ei.clone()
    loss = D.ffg2m_loss(s.requires_grad_(), t, ei, y, m, lam=0.5)
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert torch.equal(s.detach(), s0) and torch.equal(t.detach(), t0) and torch.equal(ei, ei0)
    # without grad the native pass computes no gradient
    with torch.no_grad():
        v = D.ffg2m_loss(s, t, ei, y, m, lam=0.5)
    torch.testing.assert_close(v, loss.detach())


def test_similarity_loss_gram_identity():
    g = torch.Generator().manual_seed(8)
    tr = torch.randn(50, 12, generator=g, dtype=torch.float64, requires_grad=True)
    sr = torch.randn(50, 7, generator=g, dtype=torch.float64, requires_grad=True)
    _v = D.similarity_loss(tr, sr)
    torch.testing.assert_close(_v, R.similarity_loss(tr, sr), rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(_v, (tr, sr))
    gb = torch.autograd.grad(R.similarity_loss(tr, sr), (tr, sr))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert float(D.similarity_loss(tr, tr).detach()) == pytest.approx(0.0, abs=1e-9)


def test_krd_sampling_and_entropy_shift():
    g = torch.Generator().manual_seed(9)
    n, c, e = 50, 6, 20_000
    t = torch.randn(n, c, generator=g)
    noisy = t + 0.5 * torch.randn(n, c, generator=g)
    h = D.entropy_shift(t, noisy)
    torch.testing.assert_close(h, R.entropy_shift(t, noisy).clamp(max=1.0))
    assert bool(((h >= 0) & (h <= 1)).all())
    ei = torch.randint(0, n, (2, e), generator=g)
    keep = D.krd_edge_sampling(ei, h, power=0.5, seed=3)
    assert keep.dtype == torch.bool and keep.shape == (e,)
    assert torch.equal(keep, D.krd_edge_sampling(ei, h, power=0.5, seed=3))
    assert not torch.equal(keep, D.krd_edge_sampling(ei, h, power=0.5, seed=4))
    spruce.set_num_threads(1)
    try:
        assert torch.equal(keep, D.krd_edge_sampling(ei, h, power=0.5, seed=3))
    finally:
        spruce.set_num_threads(0)
    p = 1 - h[ei[1]].double() ** 0.5
    assert abs(float(keep.double().mean() - p.mean())) < 0.02
    sure = torch.zeros(n)
    sure[0] = 1.0
    k = D.krd_edge_sampling(ei, sure, seed=0)
    assert bool(k[ei[1] != 0].all()) and not bool(k[ei[1] == 0].any())


def test_bad_inputs():
    s, t, ei, y, m = _data(seed=10)
    with pytest.raises(spruce.ShapeError, match="teacher_logits has shape"):
        D.kd_loss(s, t[:, :3])
    with pytest.raises(spruce.ArgumentError, match="temperature"):
        D.kd_loss(s, t, temperature=0)
    with pytest.raises(spruce.ArgumentError, match="reduction"):
        D.kd_loss(s, t, reduction="avg")
    with pytest.raises(spruce.ArgumentError, match=r"lam \(1.5\) must be in \[0, 1\]"):
        D.glnn_loss(s, t, y, m, lam=1.5)
    bad = y.clone()
    bad[0] = 9
    with pytest.raises(
        spruce.ArgumentError, match=r"labels \(9 at node 0\) must be a class in \[0, 5\)"
    ):
        D.glnn_loss(s, t, bad, m, lam=0.5)
    with pytest.raises(spruce.ArgumentError, match="no labelled node"):
        D.glnn_loss(s, t, y, torch.zeros_like(m), lam=0.5)
    with pytest.raises(spruce.DTypeError, match="labelled_mask"):
        D.glnn_loss(s, t, y, m.long(), lam=0.5)
    with pytest.raises(spruce.ArgumentError, match=r"edge_index \(30 at \[1, 0\]\)"):
        D.lfd_loss(s, t, torch.tensor([[0], [30]]))
    with pytest.raises(spruce.DTypeError, match="int64"):
        D.hfd_loss(s, t, ei.int())
    with pytest.raises(spruce.ArgumentError, match="tau"):
        D.hfd_loss(s, t, ei, tau=-1.0)
    with pytest.raises(spruce.NonFiniteError):
        D.krd_edge_sampling(ei, torch.full((30,), float("nan")), seed=0)
    with pytest.raises(spruce.ShapeError):
        D.similarity_loss(s, t[:10])
    # hfd over loops only is 0 (mean over no edge), lfd still counts the added loops
    loops = torch.tensor([[1, 2], [1, 2]])
    assert float(D.hfd_loss(s, t, loops)) == 0.0
    torch.testing.assert_close(D.lfd_loss(s, t, loops), R.lfd_loss(s, t, loops))


def _loss_samples():
    s, t, ei, y, m = _data(n=10, c=4, e=30, seed=11)
    sg = s.clone().requires_grad_()
    return [
        (OPS.kd_loss, (sg, t, 2.0, True, "batchmean", True)),
        (OPS.kd_loss, (sg, t, 1.0, False, "none", True)),
        (OPS.kd_loss, (s, t, 1.0, False, "sum", False)),
        (OPS.ce_loss, (sg, y, m, True)),
        (OPS.lfd_loss, (sg, t, ei, True)),
        (OPS.hfd_loss, (sg, t, ei, 1.2, True)),
        (OPS.hfd_loss, (s, t, ei, 1.0, False)),
        (OPS.krd_edge_sampling, (ei, torch.rand(10, dtype=torch.float64), 1.0, 5)),
    ]


@pytest.mark.parametrize("i", range(len(_loss_samples())))
def test_opcheck(i):
    op, args = _loss_samples()[i]
    torch.library.opcheck(op, args)


def _objective(s, t, ei, y, m, tr):
    return (
        D.ffg2m_loss(s, t, ei, y, m, lam=0.3, tau=1.2)
        + D.glnn_loss(s, t, y, m, lam=0.5)
        + D.kd_loss(s, t, temperature=2.0, t2_scale=True)
        + D.similarity_loss(tr, s)
    )


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_with_backward(backend):
    s, t, ei, y, m = _data(seed=12)
    tr = torch.randn(30, 6, dtype=torch.float64)
    s = s.requires_grad_()
    want = _objective(s, t, ei, y, m, tr)
    (gw,) = torch.autograd.grad(want, s)
    torch._dynamo.reset()
    fn = torch.compile(_objective, backend=backend, fullgraph=True)
    got = fn(s, t, ei, y, m, tr)
    (gg,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gg, gw)


def test_edge_losses_allocate_no_edge_by_class_tensor():
    """200k edges x 40 classes in float32 is 32 MB per E x C tensor (the reference makes
    several); the fused forward + backward stays within a few N x C buffers."""
    g = torch.Generator().manual_seed(13)
    n, c, e = 5000, 40, 200_000
    s = torch.randn(n, c, generator=g, requires_grad=True)
    t = torch.randn(n, c, generator=g)
    ei = torch.randint(0, n, (2, e), generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    m = torch.rand(n, generator=g) < 0.2

    def step():
        s.grad = None
        D.ffg2m_loss(s, t, ei, y, m, lam=0.2).backward()

    step()
    _, peak = peak_extra(step)
    if peak is not None:
        assert peak < e * c * 4 // 2, peak
