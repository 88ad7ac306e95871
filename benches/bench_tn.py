"""Tensor networks: path finding against opt_einsum, hyper-optimized paths against cotengra,
cached contraction against torch.einsum, MPO compression of a 4096 x 4096 layer against the
dense layer.

Networks are random 3-regular graphs of bond 4 (fixed seeds; bond 2 for the hyper-optimizer
cases). Path-finding cases assert first that spruce's path costs no more than opt_einsum's
(equal for dp and optimal); the hyper-optimizer cases give both tools the same time budget and
assert that spruce's path costs no more than cotengra's. Run with ``make bench``.
"""

from __future__ import annotations

import warnings
from typing import Any

import opt_einsum as oe
import pytest
import torch

import spruce.tn as tn
from spruce.reference import tn as ref


def _run(measure: Any, specs: dict[str, dict[str, Any]], impl: str, **common: Any) -> None:
    spec = {**common, **specs[impl]}
    measure(spec.pop("fn"), **spec)


def _path_case(measure, impl, *, n, optimize, group, target_speedup, rounds_oe, equal):
    eq, shapes = ref.random_regular_network(n, 3, 4, seed=n)
    ours = tn.contract_path(eq, *shapes, shapes=True, optimize=optimize)[1].opt_cost
    theirs = oe.contract_path(eq, *shapes, shapes=True, optimize=optimize)[1].opt_cost
    assert ours == theirs if equal else ours <= theirs
    specs = {
        "spruce": dict(
            fn=lambda: tn.contract_path(eq, *shapes, shapes=True, optimize=optimize),
            impl=f"spruce.contract_path(optimize={optimize!r})",
            role="spruce",
            rounds=20,
        ),
        "opt_einsum": dict(
            fn=lambda: oe.contract_path(eq, *shapes, shapes=True, optimize=optimize),
            impl=f"opt_einsum.contract_path(optimize={optimize!r})",
            role="baseline",
            rounds=rounds_oe,
            warmup=0 if rounds_oe == 1 else 1,
            target=f"spruce >= {target_speedup:g}x faster at {'equal' if equal else 'no worse'} cost",
            target_speedup=target_speedup,
        ),
    }
    _run(measure, specs, impl, group=group, bytes_moved=0)


GROUP_A = "a) greedy path: 300-tensor random 3-regular network, bond 4"


@pytest.mark.parametrize("impl", ["spruce", "opt_einsum"])
def test_a_greedy_300(measure, impl):
    _path_case(
        measure,
        impl,
        n=300,
        optimize="greedy",
        group=GROUP_A,
        target_speedup=20.0,
        rounds_oe=5,
        equal=False,
    )


@pytest.mark.parametrize("n", [12, 14, 16])
@pytest.mark.parametrize("impl", ["spruce", "opt_einsum"])
def test_b_dp(measure, impl, n):
    _path_case(
        measure,
        impl,
        n=n,
        optimize="dp",
        group=f"b) dp path: {n}-tensor random 3-regular network, bond 4",
        target_speedup=10.0,
        rounds_oe=3,
        equal=True,
    )


GROUP_C = "c) optimal path: 10-tensor random 3-regular network, bond 4"


@pytest.mark.parametrize("impl", ["spruce", "opt_einsum"])
def test_c_optimal_10(measure, impl):
    _path_case(
        measure,
        impl,
        n=10,
        optimize="optimal",
        group=GROUP_C,
        target_speedup=100.0,
        rounds_oe=1,
        equal=True,
    )


# The time both hyper-optimizers get per network: cotengra's default configuration runs 128
# repeats, which takes many minutes on 300 tensors on 2 cores; a fixed budget for both keeps the
# comparison fair and the benchmark short.
HYPER_BUDGET = 30.0
# cotengra's result per network size: (seconds, opt_einsum cost of its path), filled by the
# cotengra row (timed) or, when that row is deselected, by the spruce row (untimed).
_COTENGRA: dict[int, tuple[float, int]] = {}


def _cotengra_optimizer() -> Any:
    import cotengra as ctg

    with warnings.catch_warnings():  # "kahypar not installed: using 'labels'"
        warnings.simplefilter("ignore", UserWarning)
        return ctg.HyperOptimizer(max_time=HYPER_BUDGET)


def _cotengra_run(n: int, eq: str, shapes: list[tuple[int, ...]]) -> Any:
    import time

    start = time.perf_counter()
    result = oe.contract_path(eq, *shapes, shapes=True, optimize=_cotengra_optimizer())
    _COTENGRA[n] = (time.perf_counter() - start, int(result[1].opt_cost))
    return result


def _cotengra_config() -> str:
    import cotengra as ctg

    opt = _cotengra_optimizer()
    optlib = type(getattr(opt, "_optimizer", None)).__name__
    return (
        f"cotengra {ctg.__version__} HyperOptimizer(max_time={HYPER_BUDGET:.0f}), otherwise "
        f"default: methods {'/'.join(getattr(opt, '_methods', ()))}, up to {opt.max_repeats} "
        f"repeats, optlib {optlib}, subtree reconfiguration {opt.reconf_opts!r}"
    )


@pytest.mark.parametrize("n", [100, 300])
@pytest.mark.parametrize("impl", ["cotengra", "spruce"])
def test_f_hyper_vs_cotengra(measure, impl, n):
    eq, shapes = ref.random_regular_network(n, 3, 2, seed=n)
    group = (
        f"f) hyper-optimized path: {n}-tensor random 3-regular network, bond 2, "
        f"{HYPER_BUDGET:.0f} s budget each"
    )
    info = measure.benchmark.extra_info
    if impl == "cotengra":
        measure(
            lambda: _cotengra_run(n, eq, shapes),
            group=group,
            impl=f"cotengra.HyperOptimizer(max_time={HYPER_BUDGET:.0f})",
            role="baseline",
            bytes_moved=0,
            rounds=1,
            warmup=0,
            note=_cotengra_config(),
        )
        seconds, cost = _COTENGRA[n]
        info.update(opt_cost=cost, seconds=seconds)
        return
    if n not in _COTENGRA:
        _cotengra_run(n, eq, shapes)
    _, theirs = _COTENGRA[n]
    found: dict[str, Any] = {}

    def run():
        found["result"] = tn.contract_path(
            eq, *shapes, shapes=True, optimize="hyper", trials=10**6, time_limit=HYPER_BUDGET
        )
        return found["result"]

    measure(
        run,
        group=group,
        impl=f"spruce.contract_path(optimize='hyper', time_limit={HYPER_BUDGET:.0f})",
        role="spruce",
        bytes_moved=0,
        rounds=1,
        warmup=0,
    )
    path, ours = found["result"]
    assert ref.path_cost(eq, shapes, path)[0] == ours.opt_cost
    info.update(
        opt_cost=int(ours.opt_cost),
        cotengra_opt_cost=theirs,
        cost_ratio=ours.opt_cost / theirs,
        note=(
            f"opt_einsum cost of the path: spruce {ours.opt_cost:.4e}, cotengra {theirs:.4e} "
            f"(spruce / cotengra = {ours.opt_cost / theirs:.3f}; target <= 1)"
        ),
    )
    assert ours.opt_cost <= theirs


GROUP_D = "d) repeated contraction: 8-site MPS norm (bond 16, phys 2), float32"


@pytest.mark.parametrize("impl", ["spruce", "torch"])
def test_d_cached_contraction(measure, impl):
    eq_ket, shapes = ref.chain_network(8, 16, 2)
    lhs, out = eq_ket.split("->")
    # bra: the same chain with fresh bond symbols, sharing the physical indices
    terms = lhs.split(",")
    bond = {c for t in terms for c in t} - set(out)
    shift = {c: ref.symbol(30 + i) for i, c in enumerate(sorted(bond))}
    bra = ["".join(shift.get(c, c) for c in t) for t in terms]
    eq = ",".join(terms + bra) + "->"
    g = torch.Generator().manual_seed(0)
    ops = [torch.randn(*s, generator=g) for s in shapes] * 2
    torch.testing.assert_close(tn.einsum(eq, *ops), torch.einsum(eq, *ops), rtol=1e-3, atol=1e-3)
    specs = {
        "spruce": dict(
            fn=lambda: tn.einsum(eq, *ops),
            impl="spruce.einsum (cached plan)",
            role="spruce",
            rounds=50,
        ),
        "torch": dict(
            fn=lambda: torch.einsum(eq, *ops),
            impl="torch.einsum (plans every call)",
            role="baseline",
            rounds=20,
            target="spruce faster",
            target_speedup=1.0,
        ),
    }
    _run(measure, specs, impl, group=GROUP_D, bytes_moved=sum(4 * o.numel() for o in ops))


GROUP_E = "e) 4096 x 4096 linear layer as an MPO (3 cores of 16 x 16), forward of 64 rows, float32"


@pytest.fixture(scope="module")
def dense_layer():
    g = torch.Generator().manual_seed(0)
    # a weight with a decaying MPO spectrum (a sum of products of small random matrices)
    cores = [
        torch.randn(1, 16, 16, 64, generator=g),
        torch.randn(64, 16, 16, 64, generator=g) / 8,
        torch.randn(64, 16, 16, 1, generator=g) / 8,
    ]
    w = tn.mpo_to_matrix(cores)
    w += 0.05 * w.std() * torch.randn(w.shape, generator=g)
    lin = torch.nn.Linear(4096, 4096)
    with torch.no_grad():
        lin.weight.copy_(w / w.std() / 64)
    return lin


@pytest.mark.parametrize("impl", ["dense", "mpo-4", "mpo-8", "mpo-16", "mpo-64"])
def test_e_mpo_forward(measure, dense_layer, impl):
    x = torch.randn(64, 4096)
    if impl == "dense":
        layer = dense_layer
        note = "16.8M parameters, 16.78M multiply-adds per row"
        role, target, speedup = "baseline", None, None
    else:
        rank = int(impl.split("-")[1])
        with warnings.catch_warnings():  # ranks 16 and 64 cost more than dense: measured anyway
            warnings.simplefilter("ignore", tn.PerformanceWarning)
            layer = tn.MPOLinear.from_linear(dense_layer, [16, 16, 16], [16, 16, 16], max_rank=rank)
        err = float(
            torch.linalg.norm(layer.to_matrix() - dense_layer.weight)
            / torch.linalg.norm(dense_layer.weight)
        )
        note = (
            f"{layer.num_parameters() - 4096} parameters in cores, relative weight error "
            f"{err:.3f}, {layer.flops() / 1e6:.2f}M multiply-adds per row (dense 16.78M)"
        )
        role, target, speedup = "spruce", None, None
    with torch.no_grad():
        specs = {
            impl: dict(
                fn=lambda: layer(x),
                impl=f"MPOLinear rank {impl.split('-')[1]}" if impl != "dense" else "nn.Linear",
                role=role,
                rounds=5 if impl == "mpo-64" else 20,
                note=note,
            )
        }
        if target:
            specs[impl].update(target=target, target_speedup=speedup)
        _run(measure, specs, impl, group=GROUP_E, bytes_moved=4 * x.numel() * 2)
