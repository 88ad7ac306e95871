"""Structured matrices: spruce against the plain definitions and the hand-written torch code
they replace (float32, 4096 rows, fixed seeds). Run with ``make bench``.

- butterfly, n = 4096 (one block, 12 factors): the factor-by-factor torch product
  (``spruce.reference.structured.butterfly_multiply``) and the dense ``x @ W.T`` it replaces;
- Walsh–Hadamard, n = 4096: the dense Hadamard matmul;
- ``kron_matmul`` with two 64 x 64 and three 16 x 16 factors: materialize-then-matmul and the
  best hand-written torch reshaping (the vec trick ``A X B^T``; mode products for three);
- a BOFT rotation (n = 4096, 2 butterfly factors of 32 x 32 blocks) forward + backward against
  PEFT's dense formulation (dense block-diagonal and permutation matrices, ``x @ R``).

``bytes`` is the input read once plus the output written once; the FLOPs of each case are in
its ``note`` (2 per multiply-add).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import spruce.structured as st
from spruce.reference import structured as ref

ROWS = 4096
F32 = 4


def _run(
    measure: Any, specs: dict[str, dict[str, Any]], impl: str, case: str, **common: Any
) -> None:
    spec = {**common, **specs[impl]}
    measure.benchmark.extra_info["case"] = case
    measure(spec.pop("fn"), **spec)


def _copy(fn: Callable[[], Any], nbytes: int) -> dict[str, Any]:
    return dict(
        fn=fn,
        impl="copy of the input (clone): the physical floor",
        role="copy",
        rounds=10,
        bytes_moved=2 * nbytes,
    )


@pytest.fixture(scope="module")
def x4096() -> torch.Tensor:
    return torch.randn(ROWS, 4096, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------

GROUP_A = "a) butterfly n = 4096 (1 block, 12 factors), 4096 rows float32"


@pytest.mark.parametrize("impl", ["spruce", "factor-by-factor", "dense", "copy"])
def test_a_butterfly(measure, x4096, impl):
    n = 4096
    tw = st.butterfly_twiddle(n, init="ortho", generator=torch.Generator().manual_seed(1))
    x = x4096.unsqueeze(1)
    flops = ROWS * 12 * (n // 2) * 6  # 12 factors, n/2 pairs, 6 FLOPs per pair
    specs = {
        "spruce": dict(
            fn=lambda: st.butterfly_multiply(tw, x),
            impl="spruce.butterfly_multiply",
            role="spruce",
            rounds=10,
            note=f"{flops / 1e9:.2f} GFLOP, twiddle {tw.numel() * F32 / 2**10:.0f} KiB",
        ),
        "factor-by-factor": dict(
            fn=lambda: ref.butterfly_multiply(tw, x),
            impl="torch, one factor at a time (reference)",
            role="baseline",
            rounds=1,
            warmup=0,
            target="spruce >= 20x faster",
            target_speedup=20.0,
        ),
        "dense": dict(
            fn=lambda: x4096 @ w.T,
            impl="dense x @ W.T (4096 x 4096)",
            role="baseline",
            rounds=2,
            target="spruce >= 8x faster",
            target_speedup=8.0,
            note=f"{2 * ROWS * n * n / 1e9:.0f} GFLOP",
        ),
        "copy": _copy(lambda: x4096.clone(), ROWS * n * F32),
    }
    w = torch.randn(n, n) if impl == "dense" else None
    _run(measure, specs, impl, "butterfly-4096", group=GROUP_A, bytes_moved=2 * ROWS * n * F32)


GROUP_B = "b) Walsh-Hadamard n = 4096, 4096 rows float32"


@pytest.mark.parametrize("impl", ["spruce", "dense", "copy"])
def test_b_fwht(measure, x4096, impl):
    n = 4096
    h = ref.sylvester_hadamard(n, torch.float32) if impl == "dense" else None
    specs = {
        "spruce": dict(
            fn=lambda: st.fwht(x4096),
            impl="spruce.fwht",
            role="spruce",
            rounds=10,
            note=f"{ROWS * n * 12 / 1e9:.2f} GFLOP (adds)",
        ),
        "dense": dict(
            fn=lambda: x4096 @ h,
            impl="dense x @ H (scipy.linalg.hadamard)",
            role="baseline",
            rounds=2,
            target="spruce >= 8x faster",
            target_speedup=8.0,
        ),
        "copy": _copy(lambda: x4096.clone(), ROWS * n * F32),
    }
    _run(measure, specs, impl, "fwht-4096", group=GROUP_B, bytes_moved=2 * ROWS * n * F32)


def _vec_trick(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    xm = x.reshape(x.shape[0], a.shape[1], b.shape[1])
    return torch.matmul(torch.matmul(a, xm), b.T).reshape(x.shape[0], -1)


def _modes3(fs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    a, b, c = fs
    t = x.reshape(-1, a.shape[1], b.shape[1], c.shape[1])
    t = torch.einsum("ia,rabc->ribc", a, t)
    t = torch.einsum("jb,ribc->rijc", b, t)
    return torch.einsum("kc,rijc->rijk", c, t).reshape(x.shape[0], -1)


GROUP_C = "c) kron_matmul, two 64 x 64 factors, 4096 rows float32"
GROUP_D = "d) kron_matmul, three 16 x 16 factors, 4096 rows float32"


def _kron_case(measure, x, fs, impl, group, case, handwritten, hand_name):
    n = x.shape[1]
    flops = 2 * ROWS * n * sum(f.shape[0] for f in fs)
    specs = {
        "spruce": dict(
            fn=lambda: st.kron_matmul(fs, x),
            impl="spruce.kron_matmul",
            role="spruce",
            rounds=10,
            note=f"{flops / 1e9:.2f} GFLOP; the product would be {n * n * F32 / 2**20:.0f} MiB",
            memory_limit=4 * ROWS * n * F32,
            memory_target="O(rows n) activations, never the n x n product",
        ),
        "materialize": dict(
            fn=lambda: ref.kron_matmul(fs, x),
            impl="torch.kron(...) then x @ K.T",
            role="baseline",
            rounds=2,
            target="spruce >= 10x faster",
            target_speedup=10.0,
        ),
        "handwritten": dict(
            fn=lambda: handwritten(fs, x),
            impl=hand_name,
            role="baseline",
            rounds=10,
            target="spruce no slower",
            target_speedup=1.0,
        ),
        "copy": _copy(lambda: x.clone(), ROWS * n * F32),
    }
    _run(measure, specs, impl, case, group=group, bytes_moved=2 * ROWS * n * F32)


@pytest.mark.parametrize("impl", ["spruce", "materialize", "handwritten", "copy"])
def test_c_kron_two(measure, x4096, impl):
    g = torch.Generator().manual_seed(2)
    fs = [torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)]
    _kron_case(
        measure,
        x4096,
        fs,
        impl,
        GROUP_C,
        "kron-2x64",
        lambda f, x: _vec_trick(f[0], f[1], x),
        "torch vec trick: A @ X @ B.T",
    )


@pytest.mark.parametrize("impl", ["spruce", "materialize", "handwritten", "copy"])
def test_d_kron_three(measure, x4096, impl):
    g = torch.Generator().manual_seed(3)
    fs = [torch.randn(16, 16, generator=g) for _ in range(3)]
    _kron_case(
        measure, x4096, fs, impl, GROUP_D, "kron-3x16", _modes3, "torch einsum mode products"
    )


GROUP_E = "e) BOFT rotation forward + backward, n = 4096, 2 factors of 32 x 32 blocks, 4096 rows"


def _peft_dense_boft(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """PEFT's formulation: dense block-diagonal and permutation matrices, R = F_1 F_0, x @ R."""
    levels, nb, b, _ = params.shape
    n = nb * b
    eye = torch.eye(b).expand(nb, b, b)
    r = torch.eye(n)
    for i in range(levels):
        s = 0.5 * (params[i] - params[i].transpose(1, 2))
        blocks = torch.linalg.solve(eye + s, eye - s, left=False)
        p = ref.permutation_matrix(st.boft_permutation(n, nb, b, i, levels), torch.float32)
        f = p @ torch.block_diag(*blocks) @ p.T
        r = f @ r
    return x @ r


@pytest.mark.parametrize("impl", ["spruce", "peft-dense", "copy"])
def test_e_boft_forward_backward(measure, x4096, impl):
    n, b, levels = 4096, 32, 2
    g = torch.Generator().manual_seed(4)
    params = (0.01 * torch.randn(levels, n // b, b, b, generator=g)).requires_grad_()
    x = x4096.clone().requires_grad_()
    grad = torch.randn(ROWS, n, generator=g)

    def spruce_step():
        y = st.boft_rotate(x, params)
        return torch.autograd.grad(y, (x, params), grad)

    def dense_step():
        y = _peft_dense_boft(x, params)
        return torch.autograd.grad(y, (x, params), grad)

    flops = 3 * 2 * ROWS * n * b * levels
    specs = {
        "spruce": dict(
            fn=spruce_step,
            impl="spruce.boft_rotate (+ backward)",
            role="spruce",
            rounds=3,
            note=f"{flops / 1e9:.1f} GFLOP forward + backward",
        ),
        "peft-dense": dict(
            fn=dense_step,
            impl="PEFT's dense formulation (+ backward)",
            role="baseline",
            rounds=1,
            warmup=0,
            target="spruce >= 20x faster",
            target_speedup=20.0,
            note="builds dense 4096 x 4096 block-diagonal and permutation matrices",
        ),
        "copy": _copy(lambda: x4096.clone(), ROWS * n * F32),
    }
    _run(measure, specs, impl, "boft-4096", group=GROUP_E, bytes_moved=4 * ROWS * n * F32)


GROUP_F = (
    "f) BOFT adapter on a 4096 x 4096 nn.Linear, forward + backward, 1 factor of 32 x 32 blocks, "
    "4096 rows"
)


@pytest.fixture(scope="module")
def boft_layers():
    """The same adapter in PEFT's BOFT layer and in spruce.nn.BOFT (PEFT without its CUDA
    extension runs one butterfly factor, so both use one)."""
    import warnings

    import peft

    import spruce.nn as snn

    torch.manual_seed(5)
    base = torch.nn.Sequential(torch.nn.Linear(4096, 4096))
    cfg = peft.BOFTConfig(target_modules=["0"], boft_block_size=32, boft_n_butterfly_factor=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, cfg)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.boft_R["default"].normal_(std=0.01)
    ours = snn.from_peft(layer)
    for p in ours.base.parameters():
        p.requires_grad_(False)
    return layer, ours


@pytest.mark.parametrize("impl", ["spruce", "peft"])
def test_f_boft_adapter_layer(measure, x4096, boft_layers, impl):
    peft_layer, ours = boft_layers
    x = x4096.clone().requires_grad_()
    g = torch.randn(ROWS, 4096, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(x4096), peft_layer(x4096), rtol=1e-3, atol=1e-3)

    def step(layer):
        params = [p for p in layer.parameters() if p.requires_grad]
        return torch.autograd.grad(layer(x), [x, *params], g)

    base_flops = 2 * 2 * ROWS * 4096 * 4096  # base layer forward + input gradient
    specs = {
        "spruce": dict(
            fn=lambda: step(ours),
            impl="spruce.nn.BOFT (from_peft of the same layer)",
            role="spruce",
            rounds=3,
            note=f"{base_flops / 1e9:.0f} GFLOP of it is the frozen base layer",
        ),
        "peft": dict(
            fn=lambda: step(peft_layer),
            impl="PEFT BOFT layer (dense block-diagonal and permutation matrices)",
            role="baseline",
            rounds=1,
            warmup=0,
            note="the base layer's GEMMs bound any speed-up on this layer",
        ),
    }
    _run(measure, specs, impl, "boft-layer-4096", group=GROUP_F, bytes_moved=4 * ROWS * 4096 * F32)
