"""Structured ops: butterfly, Walsh–Hadamard, Fastfood, Kronecker, Monarch, BOFT/OFT rotations.

Each op against its plain definition in ``spruce.reference.structured`` (and scipy's Hadamard,
torch.fft, torch.kron, PEFT's permutations where installed), ``opcheck`` on every op,
``gradcheck`` in float64, ``torch.compile(fullgraph=True)``, determinism and bad inputs.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import spruce
import spruce.structured as st
from spruce.reference import structured as ref

OPS = torch.ops.spruce
F64 = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed), dtype=F64).to(dtype)


# ---------------------------------------------------------------------------------------------
# butterfly

BFLY_CASES = [
    # (nstacks, nblocks, log_n, x_stacks, in_size, output_size, increasing, transpose)
    (1, 1, 3, 1, 8, None, True, False),
    (1, 1, 4, 1, 16, None, False, False),
    (3, 2, 4, 1, 11, 13, False, True),
    (2, 3, 3, 2, 6, 5, True, True),
    (2, 2, 5, 2, 40, 32, True, False),  # input truncated to n
    (1, 3, 2, 1, 3, 1, False, False),
    (4, 1, 6, 1, 64, 64, True, True),
]


@pytest.mark.parametrize("case", BFLY_CASES)
def test_butterfly_matches_factor_by_factor_reference(case):
    ns, nb, log_n, xs, ins, out, inc, tr = case
    n = 1 << log_n
    tw = _randn(ns, nb, log_n, n // 2, 2, 2, seed=1)
    x = _randn(21, xs, ins, seed=2)
    want = ref.butterfly_multiply(tw, x, inc, out, tr)
    got = st.butterfly_multiply(tw, x, increasing_stride=inc, output_size=out, transpose=tr)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got32 = st.butterfly_multiply(
        tw.float(), x.float(), increasing_stride=inc, output_size=out, transpose=tr
    )
    torch.testing.assert_close(got32, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_butterfly_half_types_accumulate_in_float32(dtype):
    tw = _randn(2, 2, 5, 16, 2, 2, seed=3, dtype=dtype) * 0.7
    x = _randn(19, 1, 32, seed=4, dtype=dtype)
    want = ref.butterfly_multiply(tw.double(), x.double(), True, 30, False)
    got = st.butterfly_multiply(tw, x, output_size=30)
    assert got.dtype == dtype
    # one rounding of the output, not one per factor
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    err = (got.double() - want).abs() / want.abs().clamp(min=1.0)
    assert err.max().item() <= tol


def test_butterfly_leading_dims_and_numpy():
    tw = _randn(1, 1, 3, 4, 2, 2, seed=5)
    x = _randn(2, 3, 1, 8, seed=6)
    y = st.butterfly_multiply(tw, x)
    assert y.shape == (2, 3, 1, 8)
    y_np = st.butterfly_multiply(tw.numpy(), x.numpy())
    assert isinstance(y_np, np.ndarray)
    np.testing.assert_allclose(y_np, y.numpy())
    xs = _randn(8, 5, seed=7).t().unsqueeze(1)  # non-contiguous
    torch.testing.assert_close(
        st.butterfly_multiply(tw, xs), st.butterfly_multiply(tw, xs.contiguous())
    )


@pytest.mark.parametrize("inc", [True, False])
def test_hadamard_twiddles_equal_scipy_hadamard(inc):
    scipy_linalg = importlib.import_module("scipy.linalg")
    n = 32
    tw = st.butterfly_twiddle(n, init="hadamard", dtype=F64)
    dense = st.butterfly_to_dense(tw, increasing_stride=inc)[0]
    np.testing.assert_array_equal(dense.numpy(), scipy_linalg.hadamard(n))
    x = _randn(5, n, seed=8)
    torch.testing.assert_close(st.fwht(x), x @ torch.from_numpy(scipy_linalg.hadamard(n)).double())


def test_dft_twiddle_reference_equals_torch_fft():
    # The complex DFT oracle of the butterfly definition (spruce's kernels are real-valued:
    # complex inputs are refused); checks the reference's indexing against torch.fft.
    n = 16
    tw = ref.dft_twiddle(n)
    bits = n.bit_length() - 1
    rev = [int(f"{i:0{bits}b}"[::-1], 2) for i in range(n)]
    x = torch.randn(3, 1, n, dtype=torch.complex128, generator=_g(9))
    y = ref.butterfly_multiply(tw, x[..., rev], True)
    torch.testing.assert_close(y[:, 0], torch.fft.fft(x[:, 0]))
    with pytest.raises(spruce.DTypeError):
        st.butterfly_multiply(tw.to(torch.complex64), x.to(torch.complex64))


def test_butterfly_dense_and_transpose_consistent():
    tw = _randn(2, 2, 4, 8, 2, 2, seed=10)
    m = st.butterfly_to_dense(tw, increasing_stride=False)
    mt = st.butterfly_to_dense(tw, increasing_stride=False, transpose=True)
    torch.testing.assert_close(mt, m.transpose(1, 2))


def test_butterfly_backward_is_deterministic_across_threads():
    tw = _randn(1, 2, 6, 32, 2, 2, dtype=torch.float32, seed=11).requires_grad_()
    x = _randn(1000, 1, 64, dtype=torch.float32, seed=12).requires_grad_()
    g = _randn(1000, 1, 64, dtype=torch.float32, seed=13)
    results = []
    old = spruce.num_threads()
    try:
        for threads in (1, 2, 3):
            spruce.set_num_threads(threads)
            gt, gx = torch.autograd.grad(st.butterfly_multiply(tw, x), (tw, x), g)
            results.append((gt, gx))
    finally:
        spruce.set_num_threads(old if old else 0)
    for gt, gx in results[1:]:
        assert torch.equal(gt, results[0][0]) and torch.equal(gx, results[0][1])


def test_butterfly_bad_inputs():
    tw = _randn(1, 1, 3, 4, 2, 2)
    with pytest.raises(spruce.ShapeError, match="twiddle has shape"):
        st.butterfly_multiply(_randn(1, 1, 3, 3, 2, 2), _randn(2, 1, 8))
    with pytest.raises(spruce.ShapeError, match="x has shape"):
        st.butterfly_multiply(_randn(2, 1, 3, 4, 2, 2), _randn(2, 3, 8))
    with pytest.raises(spruce.ArgumentError, match=r"output_size \(9\) must be in \[0, 8\]"):
        st.butterfly_multiply(tw, _randn(2, 1, 8), output_size=9)
    with pytest.raises(spruce.DTypeError, match="expected the dtype of x"):
        st.butterfly_multiply(tw.float(), _randn(2, 1, 8))
    with pytest.raises(spruce.DTypeError):
        st.butterfly_multiply(tw, torch.ones(2, 1, 8, dtype=torch.int32))
    with pytest.raises(spruce.ArgumentError, match="init"):
        st.butterfly_twiddle(8, init="nope")
    with pytest.raises(spruce.ArgumentError, match="power of two"):
        st.butterfly_twiddle(12)


def test_butterfly_twiddle_inits():
    n = 16
    eye = st.butterfly_to_dense(st.butterfly_twiddle(n, init="identity", dtype=F64))[0]
    torch.testing.assert_close(eye, torch.eye(n, dtype=F64))
    q = st.butterfly_to_dense(st.butterfly_twiddle(n, init="ortho", dtype=F64, generator=_g(1)))[0]
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Walsh–Hadamard and Fastfood


@pytest.mark.parametrize("n", [1, 2, 8, 64, 512])
def test_fwht_matches_dense_hadamard(n):
    x = _randn(3, 5, n, seed=n)
    torch.testing.assert_close(st.fwht(x), ref.fwht(x))
    y = st.fwht(x, normalized=True)
    torch.testing.assert_close(y, ref.fwht(x, normalized=True))
    torch.testing.assert_close(st.fwht(y, normalized=True), x)  # orthonormal involution
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        got = st.fwht(x.to(dt), normalized=True)
        assert got.dtype == dt
        want = ref.fwht(x.to(dt).double(), normalized=True)
        assert ((got.double() - want).abs() <= tol * (1 + want.abs())).all()


def test_fwht_refuses_non_powers_of_two():
    with pytest.raises(spruce.ShapeError, match="power-of-two size along the last dimension"):
        st.fwht(torch.ones(3, 6))


def test_fastfood_equals_its_dense_product():
    n = 16
    sign, perm, gauss, scale = st.fastfood_params(n, sigma=2.0, generator=_g(3), dtype=F64)
    x = _randn(4, n, seed=4)
    h = ref.sylvester_hadamard(n) / math.sqrt(n)
    p = torch.eye(n, dtype=F64)[perm]  # (P v)[i] = v[perm[i]]
    v = torch.diag(scale) @ h @ torch.diag(gauss) @ p @ h @ torch.diag(sign)
    torch.testing.assert_close(st.fastfood(x, sign, perm, gauss, scale), x @ v.T)
    assert set(sign.tolist()) <= {-1.0, 1.0}


# ---------------------------------------------------------------------------------------------
# Kronecker


@pytest.mark.parametrize(
    "dims",
    [
        [(3, 5)],
        [(3, 2), (4, 5)],
        [(2, 2), (3, 4), (5, 1)],
        [(2, 3), (1, 2), (4, 2), (3, 3)],
        [(6, 6), (6, 6)],
    ],
)
def test_kron_matmul_matches_torch_kron(dims):
    fs = [_randn(o, i, seed=k) for k, (o, i) in enumerate(dims)]
    n = math.prod(i for _, i in dims)
    x = _randn(2, 7, n, seed=99)
    torch.testing.assert_close(st.kron_matmul(fs, x), ref.kron_matmul(fs, x))
    xt = _randn(n, 9, seed=98).t()  # non-contiguous
    torch.testing.assert_close(st.kron_matmul(fs, xt), ref.kron_matmul(fs, xt))
    x32 = x.float()
    torch.testing.assert_close(
        st.kron_matmul([f.float() for f in fs], x32), ref.kron_matmul(fs, x).float()
    )


def test_kron_matmul_row_blocks(monkeypatch):
    """The forward runs in blocks of rows: a ragged last block and empty inputs agree too."""
    monkeypatch.setattr(spruce._ops, "_KRON_BLOCK", 64)  # 3 rows per block for width 20
    fs = [_randn(4, 5, seed=1), _randn(3, 4, seed=2)]
    for rows in (0, 1, 3, 7, 10):
        x = _randn(rows, 20, seed=rows)
        torch.testing.assert_close(st.kron_matmul(fs, x), ref.kron_matmul(fs, x))
        xg = x.clone().requires_grad_()
        fg = [f.clone().requires_grad_() for f in fs]
        st.kron_matmul(fg, xg).sum().backward()
        xr = x.clone().requires_grad_()
        fr = [f.clone().requires_grad_() for f in fs]
        ref.kron_matmul(fr, xr).sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad)
        for a, b in zip(fg, fr, strict=True):
            torch.testing.assert_close(a.grad, b.grad)


def test_kron_matmul_vec_trick_identity():
    a, b = _randn(3, 4, seed=1), _randn(5, 2, seed=2)
    xm = _randn(4, 2, seed=3)  # X of shape (n1, n2)
    y = st.kron_matmul([a, b], xm.reshape(1, -1))
    torch.testing.assert_close(y.reshape(3, 5), a @ xm @ b.T)


def test_kron_sum_matmul_matches_dense():
    a, b = _randn(3, 2, 4, seed=1), _randn(3, 5, 6, seed=2)
    x = _randn(2, 7, 24, seed=3)
    torch.testing.assert_close(st.kron_sum_matmul(a, b, x), ref.kron_sum_matmul(a, b, x))
    torch.testing.assert_close(
        st.kron_sum_matmul(list(a), list(b), x), ref.kron_sum_matmul(a, b, x)
    )


def test_kron_bad_inputs():
    with pytest.raises(spruce.ShapeError, match=r"expected \(\.\.\., 6\)"):
        st.kron_matmul([_randn(2, 2), _randn(2, 3)], _randn(4, 5))
    with pytest.raises(spruce.ShapeError, match="at least one matrix"):
        st.kron_matmul([], _randn(4, 5))
    with pytest.raises(spruce.ArgumentError, match="sequence"):
        st.kron_matmul(_randn(2, 2), _randn(4, 2))
    with pytest.raises(spruce.DTypeError, match="expected the dtype of x"):
        st.kron_matmul([_randn(2, 2).float()], _randn(4, 2))
    with pytest.raises(spruce.ShapeError):
        st.kron_sum_matmul(_randn(2, 2, 2), _randn(3, 2, 2), _randn(4, 4))


def test_kron_factorization_matches_peft():
    peft_lokr = importlib.import_module("peft.tuners.lokr.layer")
    for d in range(1, 200):
        for f in (-1, 0, 1, 2, 3, 4, 8, 16, 33):
            assert st.kron_factorization(d, f) == peft_lokr.factorization(d, f), (d, f)


# ---------------------------------------------------------------------------------------------
# Monarch


@pytest.mark.parametrize(
    "w1_shape,w2_shape", [((4, 4, 4), (4, 4, 4)), ((4, 3, 5), (6, 7, 2)), ((2, 6, 3), (4, 5, 3))]
)
def test_monarch_matches_fly_definition(w1_shape, w2_shape):
    w1, w2 = _randn(*w1_shape, seed=1), _randn(*w2_shape, seed=2)
    n = w1_shape[0] * w1_shape[2]
    x = _randn(9, n, seed=3)
    torch.testing.assert_close(st.monarch_multiply(x, w1, w2), ref.monarch_multiply(x, w1, w2))


@pytest.mark.parametrize("in_f,out_f,nb", [(16, 16, 4), (12, 20, 4), (20, 12, 4), (30, 50, 3)])
def test_monarch_project_round_trips_monarch_matrices(in_f, out_f, nb):
    s1, s2 = st.monarch_shapes(in_f, out_f, nb)
    w1, w2 = _randn(*s1, seed=4), _randn(*s2, seed=5)
    dense = st.monarch_to_dense(w1, w2)
    p1, p2 = st.monarch_project(dense, nb)
    torch.testing.assert_close(st.monarch_to_dense(p1, p2), dense, rtol=1e-10, atol=1e-10)


def test_monarch_project_is_nearest_for_dense_input():
    w = _randn(16, 16, seed=6)
    p1, p2 = st.monarch_project(w, 4)
    best = (st.monarch_to_dense(p1, p2) - w).norm()
    for seed in range(5):  # random Monarch matrices near the projection are no closer
        q1 = p1 + 1e-2 * _randn(*p1.shape, seed=seed)
        q2 = p2 + 1e-2 * _randn(*p2.shape, seed=seed + 10)
        assert (st.monarch_to_dense(q1, q2) - w).norm() >= best


def test_monarch_bad_shapes():
    with pytest.raises(spruce.ShapeError, match="l \\* r == k \\* q"):
        st.monarch_multiply(_randn(2, 8), _randn(2, 3, 4), _randn(2, 2, 2))
    with pytest.raises(spruce.ShapeError, match=r"expected \(batch, 8\)"):
        st.monarch_multiply(_randn(2, 9), _randn(2, 4, 4), _randn(2, 4, 4))


# ---------------------------------------------------------------------------------------------
# BOFT / OFT


def test_boft_permutations_match_peft_and_reference():
    boft = importlib.import_module("peft.tuners.boft.layer")
    assert st.boft_permutation(16, 4, 4, 1, 3) == [
        0,
        1,
        4,
        5,
        2,
        3,
        6,
        7,
        8,
        9,
        12,
        13,
        10,
        11,
        14,
        15,
    ]
    assert st.boft_permutation(16, 4, 4, 2, 3) == [
        0,
        1,
        4,
        5,
        8,
        9,
        12,
        13,
        2,
        3,
        6,
        7,
        10,
        11,
        14,
        15,
    ]
    for n, nb, b, levels in [(16, 4, 4, 3), (32, 8, 4, 2), (48, 8, 6, 4), (24, 6, 4, 1)]:
        for i in range(levels):
            want = boft.BOFTLayer.block_butterfly_perm(None, n, nb // 2**i, b // 2, levels - 1)
            assert st.boft_permutation(n, nb, b, i, levels) == want.tolist()
            assert st.boft_permutation(n, nb, b, i, levels) == ref.boft_permutation(
                n, nb, b, i, levels
            )


@pytest.mark.parametrize(
    "n,nb,b,levels", [(16, 4, 4, 3), (32, 8, 4, 2), (24, 6, 4, 1), (12, 3, 4, 1)]
)
def test_boft_rotate_matches_dense_peft_formulation(n, nb, b, levels):
    params = 0.3 * _randn(levels, nb, b, b, seed=n + levels)
    x = _randn(7, n, seed=1)
    r = ref.boft_rotation(ref.cayley(params, "peft_boft"))
    torch.testing.assert_close(st.boft_rotate(x, params), x @ r)
    torch.testing.assert_close(
        st.boft_rotate(x, params, n_butterfly_factors=levels, block_size=b), x @ r
    )
    blocks = st.orthogonal_blocks(params)
    torch.testing.assert_close(st.boft_apply(x, blocks, transpose=True), x @ r.T)
    # exact Cayley: orthogonal at float64 precision
    assert (r @ r.T - torch.eye(n, dtype=F64)).abs().max().item() < 1e-13
    assert (blocks @ blocks.transpose(-1, -2) - torch.eye(b, dtype=F64)).abs().max().item() < 1e-14


def test_peft_boft_cayley_equals_peft():
    boft = importlib.import_module("peft.tuners.boft.layer")
    a = _randn(6, 4, 4, seed=3)
    want = boft.BOFTLayer.cayley_batch(None, a)
    torch.testing.assert_close(st.orthogonal_blocks(a, convention="peft_boft"), want)


@pytest.mark.parametrize(
    "use_neumann,terms", [(False, 5), (True, 5), (True, 3), (True, 7), (True, 2)]
)
def test_peft_oft_parameterizations_equal_peft(use_neumann, terms):
    oft = importlib.import_module("peft.tuners.oft.layer")
    b = 6
    mod = oft.OFTRotationModule(
        3, b * (b - 1) // 2, b, 18, use_cayley_neumann=use_neumann, num_cayley_neumann_terms=terms
    ).double()
    with torch.no_grad():
        mod.weight.copy_(0.1 * _randn(3, b * (b - 1) // 2, seed=4))
    want = mod._cayley_batch(mod.weight, b, use_neumann, terms)
    got = st.orthogonal_blocks(
        mod.weight.detach(),
        convention="peft_oft",
        parameterization="neumann" if use_neumann else "cayley",
        neumann_terms=terms,
    )
    torch.testing.assert_close(got, want.detach())
    x = _randn(5, 18, seed=5)
    torch.testing.assert_close(
        st.boft_rotate(
            x,
            mod.weight.detach(),
            convention="peft_oft",
            parameterization="neumann" if use_neumann else "cayley",
            neumann_terms=terms,
        ),
        mod(x).detach(),
    )


def test_oft_neumann_approximates_the_transpose_of_peft_exact_cayley():
    w = 1e-3 * _randn(2, 6, seed=6)
    exact = st.orthogonal_blocks(w, convention="peft_oft")
    neumann = st.orthogonal_blocks(w, convention="peft_oft", parameterization="neumann")
    assert (neumann - exact.transpose(-1, -2)).abs().max() < 1e-10
    assert (neumann - exact).abs().max() > 1e-4


def test_lycoris_cayley_and_neumann():
    a = 0.05 * _randn(3, 4, 4, seed=7)
    got = st.orthogonal_blocks(a, convention="lycoris")
    torch.testing.assert_close(got, ref.cayley(a, "lycoris"))
    approx = st.orthogonal_blocks(
        a, convention="lycoris", parameterization="neumann", neumann_terms=12
    )
    torch.testing.assert_close(approx, got, rtol=1e-8, atol=1e-8)
    approx_boft = st.orthogonal_blocks(
        a, convention="peft_boft", parameterization="neumann", neumann_terms=12
    )
    torch.testing.assert_close(approx_boft, ref.cayley(a, "peft_boft"), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("side", ["input", "output"])
def test_boft_merge_and_unmerge(side):
    levels, nb, b = 2, 4, 4
    blocks = st.orthogonal_blocks(0.3 * _randn(levels, nb, b, b, seed=8))
    r = ref.boft_rotation(blocks)
    shape = (10, 16) if side == "input" else (16, 10)
    w, bias, scale = _randn(*shape, seed=9), _randn(shape[0], seed=10), _randn(shape[0], 1, seed=11)
    if side == "input":
        w2, b2 = st.boft_merge(w, blocks, side=side, bias=bias, scale=scale)
        torch.testing.assert_close(w2, scale * (w @ r.T))
        assert b2 is bias
    else:
        w2, b2 = st.boft_merge(w, blocks, side=side, bias=bias)
        torch.testing.assert_close(w2, r.T @ w)
        torch.testing.assert_close(b2, bias @ r)
        scale = None
    w3, b3 = st.boft_unmerge(w2, blocks, side=side, bias=b2, scale=scale)
    torch.testing.assert_close(w3, w)
    torch.testing.assert_close(b3, bias)
    # non-orthogonal blocks (Neumann) unmerge exactly too
    nblocks = st.orthogonal_blocks(
        _randn(levels, nb, b, b, seed=12), parameterization="neumann", neumann_terms=3
    )
    w4, _ = st.boft_merge(w, nblocks, side=side)
    torch.testing.assert_close(st.boft_unmerge(w4, nblocks, side=side)[0], w)


def test_boft_bad_inputs():
    with pytest.raises(spruce.ArgumentError, match="convention"):
        st.boft_rotate(_randn(2, 8), _randn(1, 2, 4, 4), convention="nope")
    with pytest.raises(spruce.ShapeError, match=r"expected \(batch, 8\)"):
        st.boft_apply(_randn(2, 9), _randn(1, 2, 4, 4))
    with pytest.raises(spruce.ShapeError, match="block size must be even"):
        st.boft_apply(_randn(2, 9), _randn(2, 3, 3, 3))
    with pytest.raises(spruce.ShapeError, match="2 butterfly factors"):
        st.boft_rotate(_randn(2, 8), _randn(1, 2, 4, 4), n_butterfly_factors=2)
    with pytest.raises(spruce.ArgumentError, match="n_butterfly_factors"):
        st.boft_rotate(_randn(2, 8), _randn(2, 6), convention="peft_oft", n_butterfly_factors=2)


# ---------------------------------------------------------------------------------------------
# torch integration: opcheck, gradcheck, compile


def _opcheck_samples():
    s = []

    def add(op, sid, *args):
        s.append(pytest.param(op, args, id=f"{op}-{sid}"))

    tw = _randn(2, 2, 3, 4, 2, 2, dtype=torch.float32)
    add("butterfly_multiply", "stacks", tw, _randn(5, 1, 7, dtype=torch.float32), True, 6, False)
    add(
        "butterfly_multiply", "f64-T", _randn(1, 1, 4, 8, 2, 2), _randn(3, 1, 16), False, None, True
    )
    add(
        "butterfly_multiply",
        "bf16",
        tw.bfloat16(),
        _randn(4, 2, 8, dtype=torch.bfloat16),
        True,
        None,
        False,
    )
    add("fwht", "f32", _randn(3, 16, dtype=torch.float32), False)
    add("fwht", "f64-norm", _randn(2, 3, 8), True)
    add("kron_matmul", "two", [_randn(3, 2), _randn(4, 5)], _randn(6, 10))
    add("kron_matmul", "three", [_randn(2, 2), _randn(3, 1), _randn(2, 3)], _randn(4, 6))
    add("kron_sum_matmul", "f64", _randn(3, 2, 4), _randn(3, 5, 6), _randn(7, 24))
    add("monarch_multiply", "f64", _randn(5, 20), _randn(4, 3, 5), _randn(6, 7, 2))
    add("boft_apply", "levels3", _randn(5, 16), _randn(3, 4, 4, 4), False)
    add("boft_apply", "T", _randn(5, 12), _randn(1, 3, 4, 4), True)
    return s


@pytest.mark.parametrize("op,args", _opcheck_samples())
def test_opcheck(op, args):
    def grad(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.clone().requires_grad_()
        if isinstance(a, list):
            return [grad(t) for t in a]
        return a

    torch.library.opcheck(getattr(OPS, op).default, args)
    torch.library.opcheck(getattr(OPS, op).default, tuple(grad(a) for a in args))


def test_opcheck_butterfly_backward_op():
    tw = _randn(2, 1, 3, 4, 2, 2)
    x = _randn(5, 1, 6)
    g = _randn(5, 2, 8)
    torch.library.opcheck(OPS.butterfly_multiply_backward.default, (g, tw, x, True, None, False))


def _req(*ts):
    return tuple(t.clone().requires_grad_() for t in ts)


def test_gradcheck_all_ops():
    gc = torch.autograd.gradcheck
    tw, x = _req(_randn(2, 2, 3, 4, 2, 2, seed=1), _randn(5, 1, 7, seed=2))
    assert gc(lambda t, v: st.butterfly_multiply(t, v, output_size=6, transpose=True), (tw, x))
    tw, x = _req(_randn(2, 1, 2, 2, 2, 2, seed=3), _randn(3, 2, 4, seed=4))
    assert gc(lambda t, v: st.butterfly_multiply(t, v, increasing_stride=False), (tw, x))
    (x,) = _req(_randn(3, 16, seed=5))
    assert gc(lambda v: st.fwht(v, normalized=True), (x,))
    assert torch.autograd.gradgradcheck(lambda v: st.fwht(v), (x,))
    a, b, c, x = _req(_randn(3, 2), _randn(1, 2), _randn(2, 3), _randn(4, 12, seed=6))
    assert gc(lambda a, b, c, v: st.kron_matmul([a, b, c], v), (a, b, c, x))
    a, b, x = _req(_randn(3, 2, 4), _randn(3, 5, 6), _randn(3, 24, seed=7))
    assert gc(st.kron_sum_matmul, (a, b, x))
    x, w1, w2 = _req(_randn(3, 20), _randn(4, 3, 5), _randn(6, 7, 2))
    assert gc(st.monarch_multiply, (x, w1, w2))
    x, bl = _req(_randn(3, 16), _randn(3, 4, 4, 4))
    assert gc(lambda v, q: st.boft_apply(v, q), (x, bl))
    assert gc(lambda v, q: st.boft_apply(v, q, transpose=True), (x, bl))
    x, p = _req(_randn(3, 16), 0.3 * _randn(2, 4, 4, 4))
    assert gc(lambda v, q: st.boft_rotate(v, q), (x, p))
    x, s, g, sc = _req(_randn(2, 8), _randn(8), _randn(8), _randn(8))
    perm = torch.randperm(8, generator=_g(0))
    assert gc(lambda v, a, b, c: st.fastfood(v, a, perm, b, c), (x, s, g, sc))


def test_compile_fullgraph_matches_eager():
    tw = _randn(1, 2, 4, 8, 2, 2, dtype=torch.float32)
    fs = [_randn(4, 4, dtype=torch.float32), _randn(2, 4, dtype=torch.float32)]
    w1, w2 = _randn(4, 4, 4, dtype=torch.float32), _randn(4, 4, 4, dtype=torch.float32)
    params = 0.2 * _randn(2, 4, 4, 4, dtype=torch.float32)

    def f(x):
        a = st.butterfly_multiply(tw, x.unsqueeze(1)).squeeze(1)
        b = st.fwht(a, normalized=True)
        c = st.kron_matmul(fs, b)[..., :16]
        d = st.monarch_multiply(b, w1, w2) + c.sum()
        return st.boft_rotate(d, params)

    x = _randn(6, 16, dtype=torch.float32)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, f(x))


def test_opcheck_boft_backward_op():
    torch.library.opcheck(
        OPS.boft_apply_backward.default, (_randn(5, 16), _randn(5, 16), _randn(3, 4, 4, 4), False)
    )
