"""TT / MPO / Tucker decompositions (vs tensorly and exact recovery), compressed layers,
model and checkpoint compression, the `spruce compress` command."""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from torch import nn

import spruce
import spruce.tn as tn

tl = importlib.import_module("tensorly")
from tensorly.decomposition import tensor_train  # noqa: E402
from tensorly.decomposition import tucker as tl_tucker  # noqa: E402


def rand_tt(shape, ranks, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rs = [1, *ranks, 1]
    return [torch.randn(rs[k], n, rs[k + 1], generator=g, dtype=dtype) for k, n in enumerate(shape)]


def rel(a, b):
    return float(torch.linalg.norm(a - b).detach() / torch.linalg.norm(b).detach())


def test_tt_exact_recovery_at_true_rank():
    cores = rand_tt((4, 5, 6, 3), (3, 4, 2))
    full = tn.tt_to_tensor(cores)
    got = tn.tt_svd(full, max_rank=[3, 4, 2])
    assert tn.tt_ranks(got) == [1, 3, 4, 2, 1]
    assert rel(tn.tt_to_tensor(got), full) < 1e-12
    # eps = 0 finds the true ranks on its own (up to round-off in the tail)
    got = tn.tt_svd(full, eps=1e-10)
    assert tn.tt_ranks(got) == [1, 3, 4, 2, 1]


@pytest.mark.parametrize("eps", [0.5, 0.2, 0.05, 0.01])
def test_tt_eps_guarantee(eps):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 5, 4, 7, generator=g, dtype=torch.float64)
    cores = tn.tt_svd(t, eps=eps)
    assert rel(tn.tt_to_tensor(cores), t) <= eps
    # a low-rank tensor plus noise below eps compresses (the truncation is not needlessly exact)
    low = tn.tt_to_tensor(rand_tt((6, 5, 4, 7), (2, 3, 2), seed=9))
    noisy = low + 0.2 * eps * torch.linalg.norm(low) / math.sqrt(low.numel()) * torch.randn(
        low.shape, generator=g, dtype=torch.float64
    )
    cores = tn.tt_svd(noisy, eps=eps)
    assert rel(tn.tt_to_tensor(cores), noisy) <= eps
    assert all(r <= t for r, t in zip(tn.tt_ranks(cores), [1, 2, 3, 2, 1], strict=True))


def test_tt_equals_tensorly():
    tl.set_backend("pytorch")
    try:
        g = torch.Generator().manual_seed(2)
        t = torch.randn(5, 6, 4, 3, generator=g, dtype=torch.float64)
        for ranks in ([1, 2, 3, 2, 1], [1, 4, 5, 3, 1]):
            want = tl.tt_to_tensor(tensor_train(t, rank=ranks))
            got = tn.tt_to_tensor(tn.tt_svd(t, max_rank=ranks))
            torch.testing.assert_close(got, want)
    finally:
        tl.set_backend("numpy")


def test_tt_round():
    cores = rand_tt((4, 5, 6, 3), (3, 4, 2), seed=3)
    full = tn.tt_to_tensor(cores)
    # pad the ranks with redundant directions: rounding must find the true ranks again
    padded = [torch.cat([c, torch.zeros_like(c)], dim=-1) for c in cores[:-1]] + [cores[-1]]
    padded = [padded[0]] + [torch.cat([c, c], dim=0) for c in padded[1:]]
    rounded = tn.tt_round(padded, eps=1e-10)
    assert tn.tt_ranks(rounded) == [1, 3, 4, 2, 1]
    torch.testing.assert_close(tn.tt_to_tensor(rounded), tn.tt_to_tensor(padded))
    for eps in (0.3, 0.1):
        r = tn.tt_round(cores, eps=eps)
        assert rel(tn.tt_to_tensor(r), full) <= eps


def test_mpo_round_trip_and_errors():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64)
    cores = tn.mpo_decompose(w, [4, 5], [3, 4])
    assert [tuple(c.shape[1:3]) for c in cores] == [(4, 3), (5, 4)]
    torch.testing.assert_close(tn.mpo_to_matrix(cores), w)
    low = tn.mpo_decompose(w, [4, 5], [3, 4], eps=0.3)
    assert rel(tn.mpo_to_matrix(low), w) <= 0.3
    with pytest.raises(spruce.ShapeError, match="in_modes"):
        tn.mpo_decompose(w, [4, 4], [3, 4])
    with pytest.raises(spruce.ArgumentError, match="max_rank"):
        tn.tt_svd(w, max_rank=0)
    with pytest.raises(spruce.ArgumentError, match="eps"):
        tn.tt_svd(w, eps=-1)


def test_mpo_matches_tensorly_tt_matrix():
    tl.set_backend("pytorch")
    try:
        from tensorly.decomposition import tensor_train_matrix

        g = torch.Generator().manual_seed(5)
        w = torch.randn(12, 20, generator=g, dtype=torch.float64)
        # tensorly's TT-matrix takes a tensor (row modes..., column modes...) = (out..., in...)
        tt = tensor_train_matrix(w.reshape(3, 4, 4, 5), rank=[1, 3, 1])
        want = tl.tt_matrix_to_tensor(tt).reshape(12, 20)
        # spruce pairs (in_k, out_k); the same truncation happens on the same unfolding
        got = tn.mpo_to_matrix(tn.mpo_decompose(w, [4, 5], [3, 4], max_rank=3))
        torch.testing.assert_close(got, want)
    finally:
        tl.set_backend("numpy")


def test_tucker_exact_recovery_and_tensorly():
    g = torch.Generator().manual_seed(6)
    core = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    fs = [
        torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
        for n, r in [(5, 2), (6, 3), (4, 2)]
    ]
    t = tn.tucker_to_tensor(core, fs)
    c2, f2 = tn.tucker(t, [2, 3, 2])
    assert rel(tn.tucker_to_tensor(c2, f2), t) < 1e-12
    noisy = t + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    tl.set_backend("pytorch")
    try:
        want = tl.tucker_to_tensor(
            tl_tucker(noisy, rank=[2, 3, 2], init="svd", n_iter_max=50, tol=1e-12)
        )
    finally:
        tl.set_backend("numpy")
    got = tn.tucker_to_tensor(*tn.tucker(noisy, [2, 3, 2], n_iter=50, tol=1e-12))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    hosvd = tn.tucker_to_tensor(*tn.tucker(noisy, [2, 3, 2]))
    assert rel(got, noisy) <= rel(hosvd, noisy) + 1e-12
    with pytest.raises(spruce.ArgumentError, match="ranks"):
        tn.tucker(t, [2, 3])


def test_mpo_linear_forward_grad_and_from_linear():
    torch.manual_seed(0)
    m = tn.MPOLinear([4, 5, 3], [3, 2, 4], [2, 3], dtype=torch.float64)
    x = torch.randn(7, 2, 60, dtype=torch.float64, requires_grad=True)
    w = m.to_matrix()
    assert w.shape == (24, 60)
    y = m(x)
    torch.testing.assert_close(y, x @ w.T + m.bias)
    y.square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in m.cores)
    assert x.grad is not None
    # from_linear recovers a layer that is exactly an MPO of these ranks
    lin = nn.Linear(60, 24, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
    back = tn.MPOLinear.from_linear(lin, [4, 5, 3], [3, 2, 4], max_rank=[2, 3])
    torch.testing.assert_close(back(x), lin(x))
    assert back.num_parameters() < lin.weight.numel() + lin.bias.numel()
    with pytest.warns(tn.PerformanceWarning):
        tn.MPOLinear([4, 4], [4, 4], 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tn.MPOLinear([16, 16], [16, 16], 4)


def test_tucker_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2, dtype=torch.float64)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    full = tn.TuckerConv2d.from_conv(conv, (8, 6))
    torch.testing.assert_close(full(x), conv(x))
    torch.testing.assert_close(full.to_weight(), conv.weight)
    low = tn.TuckerConv2d.from_conv(conv, (4, 3), n_iter=5)
    err = rel(low.to_weight(), conv.weight.detach())
    assert 0 < err < 1
    assert low(x).shape == conv(x).shape


def test_compress_model_and_checkpoint(tmp_path, capsys):
    from spruce.io import load_state_dict, save_state_dict
    from spruce.tn.cli import register

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 8))
    x = torch.randn(5, 64)
    before = model(x)
    w0 = model[0].weight.detach().clone()
    reps = tn.compress_model(model, max_rank=4, include=r"^[01]$", num_cores=2)
    assert [r.name for r in reps] == ["0"]
    assert isinstance(model[0], tn.MPOLinear) and isinstance(model[2], nn.Linear)
    assert (
        reps[0].params_after < reps[0].params_before and reps[0].flops_after <= reps[0].flops_before
    )
    assert abs(reps[0].rel_error - rel(model[0].to_matrix(), w0)) < 1e-5
    h = x @ model[0].to_matrix().T + model[0].bias
    torch.testing.assert_close(model[0](x), h, rtol=1e-4, atol=1e-5)
    assert model(x).shape == before.shape
    with pytest.raises(spruce.ArgumentError, match="max_rank or eps"):
        tn.compress_model(model)

    g = torch.Generator().manual_seed(7)
    ranks = [1, 2, 2, 1]
    a_cores = [
        torch.randn(ranks[k], i, o, ranks[k + 1], generator=g)
        for k, (i, o) in enumerate(
            zip(tn.balanced_modes(256, 3), tn.balanced_modes(128, 3), strict=True)
        )
    ]
    sd = {
        "a.weight": tn.mpo_to_matrix(a_cores),
        "a.bias": torch.randn(128),
        "b.weight": torch.randn(8, 8),
    }
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_state_dict(sd, src)
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["compress", str(src), "-o", str(dst), "--eps", "0.5", "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "a " in out and "parameters" in out
    got = load_state_dict(dst)
    assert "a.weight" not in got and "a.cores.0" in got and "b.weight" in got
    torch.testing.assert_close(got["a.bias"], sd["a.bias"])
    cores = [got[f"a.cores.{k}"] for k in range(3)]
    assert rel(tn.mpo_to_matrix(cores), sd["a.weight"]) <= 0.5
    layer = tn.MPOLinear(
        [c.shape[1] for c in cores], [c.shape[2] for c in cores], tn.tt_ranks(cores)
    )
    layer.load_state_dict(
        {"cores.0": cores[0], "cores.1": cores[1], "cores.2": cores[2], "bias": got["a.bias"]}
    )
    args = parser.parse_args(["compress", str(src), "-o", str(dst), "--max-rank", "4", "--json"])
    assert args.func(args) == 0
    assert '"ranks"' in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["mpo", "tucker"])
def test_layers_compile_fullgraph_forward_and_backward(kind):
    torch.manual_seed(1)
    if kind == "mpo":
        m = tn.MPOLinear([4, 4, 4], [4, 4, 4], [2, 3])
        x = torch.randn(5, 2, 64)
    else:
        m = tn.TuckerConv2d.from_conv(nn.Conv2d(6, 8, 3, padding=1), (4, 3))
        x = torch.randn(2, 6, 7, 7)
    params = [p for p in m.parameters() if p.requires_grad]
    eager = m(x)
    grads = torch.autograd.grad(eager.square().sum(), params)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    cgrads = torch.autograd.grad(out.square().sum(), params)
    for a, b in zip(cgrads, grads, strict=True):
        torch.testing.assert_close(a, b)


def test_layer_and_decomposition_bad_inputs():
    m = tn.MPOLinear([4, 5], [3, 4], 2)
    with pytest.raises(spruce.ShapeError, match="input has 21 features, expected 20"):
        m(torch.randn(3, 21))
    with pytest.raises(spruce.ShapeError, match="in_modes"):
        tn.MPOLinear([4, 5], [3], 2)
    with pytest.raises(spruce.ArgumentError, match="ranks"):
        tn.MPOLinear([4, 5, 2], [3, 4, 2], [2, 2, 2])
    with pytest.raises(spruce.ArgumentError, match="ranks"):
        tn.TuckerConv2d(4, 6, 3, (7, 2))
    with pytest.raises(spruce.ArgumentError, match="groups"):
        tn.TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), (2, 2))
    with pytest.raises(spruce.ShapeError, match="leading rank 1"):
        tn.tt_to_tensor([torch.randn(2, 3, 1)])
    with pytest.raises(spruce.ShapeError, match="trailing rank"):
        tn.tt_to_tensor([torch.randn(1, 3, 2)])
    with pytest.raises(spruce.ArgumentError, match="non-empty"):
        tn.tt_round([])
    with pytest.raises(spruce.ArgumentError, match="floating"):
        tn.tt_svd(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(spruce.ArgumentError, match="max_rank"):
        tn.tt_svd(torch.randn(2, 3, 4), max_rank=[2])
    with pytest.raises(spruce.ShapeError, match="factors"):
        tn.tucker_to_tensor(torch.randn(2, 2), [torch.eye(2)])
    with pytest.raises(spruce.ArgumentError, match="method"):
        tn.compress_model(nn.Linear(64, 64), method="tucker", max_rank=2)


def test_spruce_compress_command(tmp_path, capsys):
    from spruce.cli import main
    from spruce.io import load_state_dict, save_state_dict

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    src, dst = tmp_path / "model.safetensors", tmp_path / "small.safetensors"
    save_state_dict(model.state_dict(), src)
    argv = [
        "compress",
        str(src),
        "-o",
        str(dst),
        "--max-rank",
        "4",
        "--include",
        r"^0\.",
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rel. error" in out and "MACs/row" in out and "1 layer(s)" in out
    got = load_state_dict(dst)
    assert sorted(got) == ["0.bias", "0.cores.0", "0.cores.1", "0.cores.2", "2.bias", "2.weight"]
    cores = [got[f"0.cores.{k}"] for k in range(3)]
    layer = tn.MPOLinear(
        [c.shape[1] for c in cores], [c.shape[2] for c in cores], tn.tt_ranks(cores)
    )
    layer.load_state_dict({**{f"cores.{k}": c for k, c in enumerate(cores)}, "bias": got["0.bias"]})
    assert max(tn.tt_ranks(cores)) <= 4
    x = torch.randn(3, 128)
    want = x @ tn.mpo_to_matrix(cores).T + got["0.bias"]
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
    assert main(["compress", str(src), "-o", str(dst)]) == 2
    assert "max_rank or eps" in capsys.readouterr().err


def test_compress_names_layers_left_dense(tmp_path, capsys):
    from spruce.cli import main
    from spruce.io import load_state_dict, save_state_dict

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(1024, 1024))
    with pytest.warns(tn.PerformanceWarning, match=r"left dense because .* 0 \(ranks"):
        assert tn.compress_model(model, max_rank=16) == []
    assert isinstance(model[0], nn.Linear)
    src, dst = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    save_state_dict(model.state_dict(), src)
    assert main(["compress", str(src), "-o", str(dst), "--max-rank", "16", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "no layer compressed" in captured.out and "left dense" in captured.err
    torch.testing.assert_close(load_state_dict(dst)["0.weight"], model[0].weight.detach())
