"""Tensor networks: the hyper-optimizing path search (greedy trials + subtree reconfiguration)
against opt_einsum's evaluation of the same paths, greedy and random-greedy."""

from __future__ import annotations

import importlib
import random

import pytest

import spruce
import spruce.tn as tn
from spruce.reference import tn as ref

oe = importlib.import_module("opt_einsum")


def rand_network(seed: int, n: int, n_out: int = 0):
    """A random network of n tensors with about 1.5 n bonds of sizes 2..5 and n_out outputs."""
    rng = random.Random(seed)
    terms: list[list[str]] = [[] for _ in range(n)]
    sizes = {}
    k = 0
    for _ in range(3 * n // 2):
        a, b = rng.sample(range(n), 2)
        s = ref.symbol(k)
        k += 1
        sizes[s] = rng.randint(2, 5)
        terms[a].append(s)
        terms[b].append(s)
    out = []
    for _ in range(n_out):
        s = ref.symbol(k)
        k += 1
        sizes[s] = rng.randint(2, 4)
        terms[rng.randrange(n)].append(s)
        out.append(s)
    eq = ",".join("".join(t) for t in terms) + "->" + "".join(out)
    return eq, [tuple(sizes[c] for c in t) for t in terms]


def _hyper(eq, shapes, **kw):
    return tn.contract_path(eq, *shapes, shapes=True, optimize="hyper", **kw)


@pytest.mark.parametrize("n", [5, 9, 30, 80])
def test_paths_are_valid_and_costed_like_opt_einsum(n):
    for seed in range(4):
        eq, shapes = rand_network(100 * n + seed, n, n_out=seed % 3)
        path, info = _hyper(eq, shapes, seed=seed, trials=8, subtree_size=6)
        assert info.optimizer == "hyper" and 0 <= info.best_trial < 8
        assert sorted(len(p) for p in path) == [2] * (n - 1)
        _, theirs = oe.contract_path(eq, *shapes, shapes=True, optimize=path)
        assert info.opt_cost == theirs.opt_cost
        assert info.largest_intermediate == theirs.largest_intermediate
        assert ref.path_cost(eq, shapes, path) == (info.opt_cost, info.largest_intermediate)


def test_small_networks_reach_the_optimum():
    # Subtrees of up to 10 parts are searched exhaustively: the root's covers networks of at
    # most 10 tensors, which therefore get an optimal path.
    for seed in range(10):
        eq, shapes = rand_network(seed, 6 + seed % 5, n_out=seed % 2)
        best = tn.contract_path(eq, *shapes, shapes=True, optimize="optimal")[1].opt_cost
        assert _hyper(eq, shapes, trials=2, subtree_size=10)[1].opt_cost == best


@pytest.mark.parametrize("size", [60, 150])
def test_no_worse_than_greedy_and_random_greedy(size):
    eq, shapes = ref.random_regular_network(size, 3, 2, seed=size)
    g = tn.contract_path(eq, *shapes, shapes=True, optimize="greedy")[1].opt_cost
    oe_g = oe.contract_path(eq, *shapes, shapes=True, optimize="greedy")[1].opt_cost
    for seed in (0, 1):
        rg = tn.contract_path(
            eq, *shapes, shapes=True, optimize="random-greedy", seed=seed, trials=8
        )[1].opt_cost
        h = _hyper(eq, shapes, seed=seed, trials=8, subtree_size=6)[1].opt_cost
        assert h <= rg <= g <= oe_g
        assert h < rg  # reconfiguration finds something on networks this size


def test_seeded_and_thread_count_free():
    eq, shapes = ref.random_regular_network(80, 3, 4, seed=2)
    kw = dict(trials=12, subtree_size=6)
    a = _hyper(eq, shapes, seed=3, **kw)
    b = _hyper(eq, shapes, seed=3, **kw)
    spruce.set_num_threads(1)
    try:
        c = _hyper(eq, shapes, seed=3, **kw)
    finally:
        spruce.set_num_threads(0)
    assert a[0] == b[0] == c[0]
    assert a[1].best_trial == b[1].best_trial == c[1].best_trial
    d = _hyper(eq, shapes, seed=4, **kw)
    assert d[0] != a[0]


def test_time_limit_bounds_the_search():
    import time

    eq, shapes = ref.random_regular_network(200, 3, 2, seed=5)
    start = time.perf_counter()
    path, info = _hyper(eq, shapes, trials=10**6, time_limit=0.5)
    assert time.perf_counter() - start < 3.0
    assert ref.path_cost(eq, shapes, path)[0] == info.opt_cost
    g = tn.contract_path(eq, *shapes, shapes=True, optimize="greedy")[1].opt_cost
    assert info.opt_cost <= g
    # a budget of zero still returns the first trial's path
    path, info = _hyper(eq, shapes, trials=10**6, time_limit=0)
    assert info.best_trial == 0 and info.opt_cost <= g


def test_memory_limit_is_honoured():
    for seed in range(8):
        eq, shapes = rand_network(700 + seed, 14, n_out=1)
        free = _hyper(eq, shapes, seed=seed, trials=4)[1]
        limit = free.largest_intermediate // 4 + 1
        path, info = _hyper(eq, shapes, seed=seed, trials=4, memory_limit=limit)
        for s in info.steps[:-1]:
            assert s.size <= limit
        assert ref.path_cost(eq, shapes, path)[0] == info.opt_cost
        g = tn.contract_path(eq, *shapes, shapes=True, optimize="greedy", memory_limit=limit)
        assert info.opt_cost <= g[1].opt_cost
    eq, shapes = ref.random_regular_network(60, 3, 2, seed=1)
    _, info = _hyper(eq, shapes, trials=4, memory_limit="max_input")
    assert all(s.size <= 8 for s in info.steps[:-1])


@pytest.mark.parametrize(
    ("kwargs", "arg", "expected"),
    [
        (dict(subtree_size=2), "subtree_size", r"\(2\) must be an int in \[3, 12\]"),
        (dict(subtree_size=13), "subtree_size", r"\(13\) must be an int in \[3, 12\]"),
        (dict(subtree_size=8.0), "subtree_size", r"\(8\.0\) must be an int"),
        (dict(trials=0), "trials", r"\(0\) must be at least 1"),
        (dict(temperature=-1.0), "temperature", r"\(-1\) must be a finite number >= 0"),
        (dict(time_limit=-1.0), "time_limit", r"\(-1\) must be a finite number of seconds"),
        (dict(memory_limit=0), "memory_limit", r"\(0\) must be"),
    ],
)
def test_bad_arguments_raise_typed_errors(kwargs, arg, expected):
    eq, shapes = rand_network(1, 12)
    with pytest.raises(spruce.ArgumentError, match=f"contract_path: {arg} {expected}"):
        _hyper(eq, shapes, **kwargs)
    with pytest.raises(ValueError):  # what a user would catch
        _hyper(eq, shapes, **kwargs)


def test_unknown_optimizer_names_hyper():
    with pytest.raises(spruce.ArgumentError, match="'hyper'"):
        tn.contract_path("ij,jk", (2, 3), (3, 4), shapes=True, optimize="hyperr")


def test_hyper_progress_clock_changes_nothing():
    """The clock shown for hyper on large networks runs beside the search: same path, and an
    error of the search still reaches the caller."""
    from spruce.tn.paths import _with_clock

    eq, shapes = ref.random_regular_network(30, 3, 2, seed=4)
    kw = dict(shapes=True, optimize="hyper", seed=2, trials=3)
    a = tn.contract_path(eq, *shapes, progress=False, **kw)
    b = tn.contract_path(eq, *shapes, progress=True, **kw)
    assert a[0] == b[0] and a[1].opt_cost == b[1].opt_cost
    c = tn.contract_path(eq, *shapes, progress=True, time_limit=0.3, **kw)
    assert (
        c[1].opt_cost <= tn.contract_path(eq, *shapes, shapes=True, optimize="greedy")[1].opt_cost
    )

    def fail():
        raise spruce.ArgumentError("from the search")

    with pytest.raises(spruce.ArgumentError, match="from the search"):
        _with_clock(fail, 1.0)
