"""The torch-integration contract of every spruce op.

- ``torch.library.opcheck`` (schema, autograd registration, fake tensors, AOT dispatch with
  dynamic shapes) on several sample inputs of every ``torch.ops.spruce`` op;
- ``gradcheck`` in float64 of the differentiable order statistics;
- ``torch.compile(fullgraph=True)`` of the public functions, equal to eager;
- fork safety of spruce's thread pool, and results that do not depend on the thread count.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

import spruce

OPS = torch.ops.spruce
CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Uniform scores in [0, 1) of ``dtype`` (drawn in float64, then cast)."""
    return torch.rand(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _distinct(*shape: int, seed: int = 0) -> torch.Tensor:
    """float64 values 0.01 apart, shuffled: every order statistic is locally constant."""
    n = int(np.prod(shape)) if shape else 1
    return (torch.randperm(n, generator=_gen(seed)).double() * 0.01 - 1.0).reshape(shape)


def _ties(*shape: int, levels: int = 16, seed: int = 0) -> torch.Tensor:
    """float32 scores with many exact ties (``levels`` distinct values)."""
    return torch.randint(0, levels, shape, generator=_gen(seed)).float()


# ---------------------------------------------------------------------------------------------
# opcheck: every op, several samples each


def _opcheck_samples() -> list:
    f64, bf16, f16 = torch.float64, torch.bfloat16, torch.float16
    x = _rand(6, 8)
    x3 = _rand(3, 4, 8, dtype=f64, seed=1)
    mask = _rand(6, 13, seed=2) > 0.4
    s = []

    def add(op: str, sid: str, *args: object) -> None:
        s.append(pytest.param(op, args, id=f"{op}-{sid}"))

    # topk_mask(scores, sparsity, dim)
    add("topk_mask", "f32-None", x, 0.5, None)
    add("topk_mask", "f32-dim-1", x, 0.5, -1)
    add("topk_mask", "f64-dim0", _rand(6, 8, dtype=f64), 0.25, 0)
    add("topk_mask", "bf16-dim1", _rand(6, 8, dtype=bf16), 0.75, 1)
    add("topk_mask", "f16-None", _rand(5, 3, dtype=f16), 0.4, None)
    add("topk_mask", "f64-3d-dim1", x3, 0.5, 1)
    add("topk_mask", "f32-ties-dim-1", _ties(4, 16), 0.5, -1)
    add("topk_mask", "f32-strided", _rand(8, 6).t(), 0.5, -1)
    add("topk_mask", "f32-1d-sparsity1", _rand(10), 1.0, None)
    add("topk_mask", "f32-empty", torch.empty(0, 5), 0.5, -1)
    # global_topk_masks(scores, sparsity)
    add("global_topk_masks", "f32-one", [x], 0.5)
    add("global_topk_masks", "mixed", [x, _rand(5, dtype=f64), _rand(2, 3, 4, dtype=bf16)], 0.3)
    add("global_topk_masks", "ties", [_ties(4, 8), _ties(7, seed=3)], 0.5)
    # nm_mask(scores, n, m, dim)
    add("nm_mask", "f32-2:4", x, 2, 4, -1)
    add("nm_mask", "f64-1:4-dim0", _rand(8, 3, dtype=f64), 1, 4, 0)
    add("nm_mask", "bf16-2:8", _rand(4, 16, dtype=bf16), 2, 8, -1)
    add("nm_mask", "f32-ties-2:4", _ties(4, 8, levels=2), 2, 4, 1)
    add("nm_mask", "f64-3d-4:8", _rand(2, 3, 16, dtype=f64), 4, 8, 2)
    # structured_mask(scores, sparsity, dim, group_size, norm)
    add("structured_mask", "f32-rows-l2", x, 0.5, 0, 1, 2.0)
    add("structured_mask", "f64-cols-l1", _rand(6, 8, dtype=f64), 0.25, 1, 2, 1.0)
    add("structured_mask", "bf16-linf", _rand(8, 4, dtype=bf16), 0.5, -2, 2, float("inf"))
    add("structured_mask", "f64-3d-heads", x3, 0.5, 1, 2, 2.0)
    # random_mask(shape, density, seed, device)
    add("random_mask", "2d", [6, 8], 0.5, 3, CPU)
    add("random_mask", "1d", [100], 0.1, 12345, CPU)
    add("random_mask", "3d-dense", [2, 3, 4], 1.0, 0, CPU)
    # kthvalue(x, k, dim): with and without requires_grad (autograd registration and backward)
    add("kthvalue", "f64-None-grad", _distinct(6, 8).requires_grad_(), 7, None)
    add("kthvalue", "f64-dim1-grad", _distinct(6, 8, seed=1).requires_grad_(), 3, 1)
    add("kthvalue", "f32-dim0-grad", _rand(6, 8).requires_grad_(), 6, 0)
    add("kthvalue", "f32-dim-1", x, 8, -1)
    add("kthvalue", "bf16-None", _rand(6, 8, dtype=bf16), 1, None)
    add("kthvalue", "f64-3d-dim1", x3, 2, 1)
    add("kthvalue", "f32-ties", _ties(5, 9), 4, -1)
    # quantile(x, q, dim)
    add("quantile", "f64-None-grad", _distinct(6, 8).requires_grad_(), [0.1, 0.5, 1.0], None)
    add("quantile", "f64-dim0-grad", _distinct(6, 8, seed=2).requires_grad_(), [0.3], 0)
    add("quantile", "f32-dim-1-grad", _rand(6, 8).requires_grad_(), [0.0, 0.25, 0.99], -1)
    add("quantile", "bf16-dim1", _rand(6, 8, dtype=bf16), [0.5], 1)
    add("quantile", "f64-3d-None", x3, [0.2, 0.8], None)
    # pack_mask(mask), unpack_mask(packed, shape)
    add("pack_mask", "2d-13cols", mask)
    add("pack_mask", "1d", mask.reshape(-1))
    add("pack_mask", "3d-8cols", (_rand(2, 3, 8) > 0.5))
    add("unpack_mask", "2d-13cols", spruce.pack_mask(mask), [6, 13])
    add("unpack_mask", "1d", spruce.pack_mask(mask.reshape(-1)), [78])
    add("unpack_mask", "3d", spruce.pack_mask(_rand(2, 3, 5) > 0.5), [2, 3, 5])
    # mask_to_csr(weight, mask)
    add("mask_to_csr", "f32", x, x > 0.5)
    add("mask_to_csr", "f64", _rand(6, 13, dtype=f64), mask)
    add("mask_to_csr", "bf16", _rand(6, 13, dtype=bf16), mask)
    add("mask_to_csr", "all-kept", x, torch.ones(6, 8, dtype=torch.bool))
    # apply_mask_(tensor, mask)
    add("apply_mask_", "f32", x.clone(), x > 0.5)
    add("apply_mask_", "f64", _rand(6, 13, dtype=f64), mask)
    add("apply_mask_", "bf16", _rand(6, 13, dtype=bf16), mask)
    return s


OPCHECK_SAMPLES = _opcheck_samples()
OP_NAMES = [
    "topk_mask",
    "global_topk_masks",
    "nm_mask",
    "structured_mask",
    "random_mask",
    "kthvalue",
    "quantile",
    "pack_mask",
    "unpack_mask",
    "mask_to_csr",
    "apply_mask_",
]


def test_every_op_has_opcheck_samples():
    covered = {p.values[0] for p in OPCHECK_SAMPLES}
    assert covered == set(OP_NAMES)
    for name in OP_NAMES:
        assert sum(p.values[0] == name for p in OPCHECK_SAMPLES) >= 3, name


def _clone_args(args: tuple) -> tuple:
    def one(a: object) -> object:
        if isinstance(a, torch.Tensor):
            return a.detach().clone().requires_grad_(a.requires_grad)
        if isinstance(a, list):
            return [one(v) for v in a]
        return a

    return tuple(one(a) for a in args)


@pytest.mark.parametrize(("op", "args"), OPCHECK_SAMPLES)
def test_opcheck(op, args):
    # every utility (schema, autograd registration, fake tensor, AOT dispatch dynamic) must pass
    torch.library.opcheck(getattr(OPS, op), _clone_args(args))


def test_mask_to_csr_opcheck_with_grad_weight():
    """``mask_to_csr`` has no autograd formula. opcheck's AOT-dispatch check cannot run it with a
    weight that requires grad: it sums the outputs into one scalar starting from the int64
    ``crow_indices``, and adding the float values into that long tensor raises in eager torch
    itself ("result type Float can't be cast to the desired output type Long"), before spruce is
    compared with anything. The other utilities must pass; the op must still run eagerly."""
    w = _rand(6, 8).requires_grad_()
    m = w.detach() > 0.5
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(OPS.mask_to_csr, (w, m), test_utils=utils)
    crow, col, val = spruce.mask_to_csr(w, m)
    assert int(crow[-1]) == int(m.sum()) == col.numel() == val.numel()


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, distinct values: the selection is locally constant)

DIMS = [None, 0, -1]


@pytest.mark.parametrize("dim", DIMS, ids=lambda d: f"dim={d}")
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_kthvalue(shape, dim):
    x = _distinct(*shape, seed=len(shape)).requires_grad_()
    n = x.numel() if dim is None else x.shape[dim]
    for k in (1, (n + 1) // 2, n):
        assert torch.autograd.gradcheck(
            lambda t, k=k: spruce.kthvalue(t, k, dim=dim).values, (x,), eps=1e-6, atol=1e-8
        )
    # the gradient lands on the selected element, as torch.kthvalue's
    k = (n + 1) // 2
    (g,) = torch.autograd.grad(spruce.kthvalue(x, k, dim=dim).values.sum(), x)
    xt = x.detach().clone().requires_grad_()
    ref = torch.kthvalue(xt.reshape(-1), k).values if dim is None else xt.kthvalue(k, dim).values
    (gt,) = torch.autograd.grad(ref.sum(), xt)
    assert torch.equal(g, gt)


@pytest.mark.parametrize("dim", DIMS, ids=lambda d: f"dim={d}")
@pytest.mark.parametrize("q", [0.37, [0.0, 0.25, 0.5, 0.61, 1.0]], ids=["scalar", "list"])
def test_gradcheck_quantile(q, dim):
    x = _distinct(5, 7, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: spruce.quantile(t, q, dim=dim), (x,), eps=1e-6, atol=1e-8
    )
    # and the same gradient as torch.quantile (linear interpolation)
    (g,) = torch.autograd.grad(spruce.quantile(x, q, dim=dim).sum(), x)
    xt = x.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(
        torch.quantile(xt, torch.tensor(q, dtype=torch.float64), dim=dim).sum(), xt
    )
    torch.testing.assert_close(g, gt, rtol=1e-12, atol=1e-12)


def test_gradcheck_quantile_3d_list():
    x = _distinct(3, 4, 5, seed=4).requires_grad_()
    for dim in DIMS + [1]:
        assert torch.autograd.gradcheck(
            lambda t, dim=dim: spruce.quantile(t, [0.1, 0.5, 0.93], dim=dim),
            (x,),
            eps=1e-6,
            atol=1e-8,
        )


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the public functions


def _masks_pipeline(x, y, a, b, w, *, with_torch_ops: bool):
    m1 = spruce.topk_mask(x, 0.5, dim=-1)
    m0 = spruce.topk_mask(x, 0.3)
    m2 = spruce.nm_mask(x, 2, 4)
    m3 = spruce.structured_mask(x, 0.25, dim=0, group_size=2, norm=1)
    ga, gb = spruce.global_topk_masks([a, b], 0.6)
    kv = spruce.kthvalue(x, 3, dim=1)
    k0 = spruce.kthvalue(y, 5)
    q = spruce.quantile(x, [0.1, 0.5, 0.9], dim=0)
    q0 = spruce.quantile(y, 0.3)
    r = spruce.random_mask((8, 16), 0.25, seed=7)
    p = spruce.pack_mask(m1)
    u = spruce.unpack_mask(p, m1.shape)
    out = [m1, m0, m2, m3, ga, gb, kv.values, kv.indices, k0.values, k0.indices, q, q0, r, p, u]
    if with_torch_ops:
        spruce.apply_mask_(w, m2)
        out += [(x * (m1 & m2)).sum(dim=1), w]
    return out


def _pipeline_inputs() -> tuple:
    return (
        _rand(8, 16, seed=10),
        _rand(40, dtype=torch.float64, seed=11),
        _rand(5, 7, seed=12),
        _rand(11, dtype=torch.bfloat16, seed=13),
        _rand(8, 16, seed=14),
    )


def _check_compiled(backend: str, *, with_torch_ops: bool, dynamic: bool | None = None) -> None:
    torch._dynamo.reset()
    eager_in, comp_in = _pipeline_inputs(), _pipeline_inputs()
    expected = _masks_pipeline(*eager_in, with_torch_ops=with_torch_ops)
    fn = torch.compile(_masks_pipeline, backend=backend, fullgraph=True, dynamic=dynamic)
    got = fn(*comp_in, with_torch_ops=with_torch_ops)
    assert len(got) == len(expected)
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert e.dtype == g.dtype and e.shape == g.shape, i
        assert torch.equal(e, g), i


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend, dynamic):
    _check_compiled(backend, with_torch_ops=True, dynamic=dynamic)


def test_compile_fullgraph_inductor():
    # Only spruce ops (extern kernels for inductor): no C++ kernel to compile, so it stays quick.
    _check_compiled("inductor", with_torch_ops=False)


def test_compile_mask_to_csr_dynamic_output():
    def f(w, m):
        crow, col, val = spruce.mask_to_csr(w, m)
        return crow, col, val * 2

    w = _rand(6, 8, seed=20)
    m = w > 0.5
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(w, m)
    for e, g in zip(f(w, m), got, strict=True):
        assert torch.equal(e, g)


def test_compile_kthvalue_backward():
    def f(x):
        return spruce.kthvalue(x, 4, dim=-1).values.sum() + spruce.quantile(x, 0.5).sum()

    x = _distinct(5, 7, seed=21).requires_grad_()
    (ge,) = torch.autograd.grad(f(x), x)
    torch._dynamo.reset()
    (gc,) = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x), x)
    assert torch.equal(ge, gc)


# ---------------------------------------------------------------------------------------------
# fork safety: a forked child builds a fresh pool instead of using the parent's dead threads

FORK_TIMEOUT_S = 60.0


def _run_in_forked_child(fn: Callable[[], str], timeout: float = FORK_TIMEOUT_S) -> str:
    """Runs ``fn`` in an ``os.fork()`` child; returns what it returned (raises if it failed)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(r)
            msg = fn()
            code = 0
        except BaseException as e:  # noqa: B036 - report anything to the parent
            msg = f"{type(e).__name__}: {e}"
        try:
            os.write(w, msg.encode()[:60000])
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    status = None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            pytest.fail(f"the forked child did not finish within {timeout:.0f} s (deadlock?)")
        else:
            time.sleep(0.02)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    msg = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, f"child failed: {msg}"
    return msg


def _fork_inputs() -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = _ties(512, 4096, levels=1000, seed=30)
    layers = [_rand(300, 700, seed=31), _rand(4096, seed=32).double(), _ties(64, 999, seed=33)]
    return x, layers


def test_fork_child_uses_spruce_after_parent_pool_started():
    x, layers = _fork_inputs()
    spruce.set_num_threads(2)
    try:
        # the parent's pool exists and has run parallel kernels
        expected_row = spruce.topk_mask(x, 0.5, dim=-1)
        expected_flat = spruce.topk_mask(x, 0.3)
        expected_global = spruce.global_topk_masks(layers, 0.6)

        def child() -> str:
            got_row = spruce.topk_mask(x, 0.5, dim=-1)
            got_flat = spruce.topk_mask(x, 0.3)
            got_global = spruce.global_topk_masks(layers, 0.6)
            assert np.array_equal(got_row.numpy(), expected_row.numpy())
            assert np.array_equal(got_flat.numpy(), expected_flat.numpy())
            for g, e in zip(got_global, expected_global, strict=True):
                assert np.array_equal(g.numpy(), e.numpy())
            return f"ok threads={spruce.num_threads()}"

        assert _run_in_forked_child(child) == "ok threads=2"
        # a second generation: a child of a child
        assert _run_in_forked_child(lambda: _run_in_forked_child(child)) == "ok threads=2"
        # and the parent's own pool still works
        assert torch.equal(spruce.topk_mask(x, 0.5, dim=-1), expected_row)
    finally:
        spruce.set_num_threads(0)


def test_fork_while_another_thread_runs_a_kernel():
    """Forking while a parent thread is inside a spruce kernel (the pool busy, its locks held)."""
    x, _ = _fork_inputs()
    expected = spruce.topk_mask(x, 0.5, dim=-1)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            spruce.topk_mask(x, 0.5, dim=-1)

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    try:
        time.sleep(0.05)
        for _ in range(3):

            def child() -> str:
                assert np.array_equal(spruce.topk_mask(x, 0.5, dim=-1).numpy(), expected.numpy())
                return "ok"

            assert _run_in_forked_child(child) == "ok"
    finally:
        stop.set()
        t.join()


def _mp_worker(seed: int) -> tuple[int, bytes]:
    m = spruce.random_mask((256, 1024), 0.5, seed=seed)
    s = spruce.topk_mask(_ties(256, 1024, seed=seed), 0.5, dim=-1)
    return int(m.sum()), spruce.pack_mask(s).numpy().tobytes()


def test_multiprocessing_fork_pool():
    """DataLoader-style workers. Like DataLoader's worker loop, each worker first limits torch's
    own intra-op threads to one: torch's OpenMP pool does not survive fork (a parallel torch op
    in the child waits forever on the parent's OpenMP team). spruce's pool needs no such care:
    it keeps its default size in the child."""
    spruce.topk_mask(_ties(512, 4096, seed=40), 0.5, dim=-1)  # the parent's pool is running
    expected = [_mp_worker(s) for s in range(4)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        res = pool.map_async(_mp_worker, range(4))
        got = res.get(timeout=FORK_TIMEOUT_S)
    assert got == expected


# ---------------------------------------------------------------------------------------------
# results do not depend on the thread count


def _thread_cases() -> dict[str, Callable[[], object]]:
    big = _ties(2048, 8192, levels=64, seed=50)  # 16.8 M entries, many ties
    wide = _rand(3, 1 << 21, seed=51)
    layers = [
        _ties(1024, 4096, levels=256, seed=52),
        _rand(3000, 1000, seed=53).double(),
        _ties(1 << 20, levels=256, seed=54).bfloat16(),
        _rand(4096, 1024, seed=55).half(),
    ]
    return {
        "topk_mask dim=-1": lambda: spruce.topk_mask(big, 0.5, dim=-1),
        "topk_mask dim=0": lambda: spruce.topk_mask(big, 0.3, dim=0),
        "topk_mask dim=None": lambda: spruce.topk_mask(big, 0.7),
        "topk_mask wide rows": lambda: spruce.topk_mask(wide, 0.5, dim=-1),
        "global_topk_masks": lambda: spruce.global_topk_masks(layers, 0.5),
        "nm_mask": lambda: spruce.nm_mask(big, 2, 4),
        "structured_mask": lambda: spruce.structured_mask(big, 0.5, dim=0, group_size=4),
        "random_mask": lambda: spruce.random_mask((4096, 4096), 0.3, seed=9),
        "kthvalue dim=None": lambda: spruce.kthvalue(big, big.numel() // 3),
        "kthvalue dim=-1": lambda: spruce.kthvalue(big, 1000, dim=-1),
        "quantile dim=None": lambda: spruce.quantile(wide, [0.01, 0.5, 0.999]),
        "pack_mask": lambda: spruce.pack_mask(big > 31),
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return a == b


def test_thread_count_does_not_change_results():
    cases = _thread_cases()
    results: dict[int, dict[str, object]] = {}
    try:
        for n in (1, 2):
            spruce.set_num_threads(n)
            assert spruce.num_threads() == n
            results[n] = {name: fn() for name, fn in cases.items()}
    finally:
        spruce.set_num_threads(0)
    env = os.environ.get("SPRUCE_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        assert spruce.num_threads() == int(env)
    assert spruce.num_threads() >= 1
    for name in cases:
        assert _same(results[1][name], results[2][name]), name
    # and the counts are the exact ones
    big_mask = results[2]["topk_mask dim=-1"]
    assert bool((big_mask.sum(dim=-1) == 8192 - 4096).all())
    layer_n = 1024 * 4096 + 3000 * 1000 + (1 << 20) + 4096 * 1024
    pruned = sum(int((~m).sum()) for m in results[2]["global_topk_masks"])
    assert pruned == int(0.5 * layer_n)
