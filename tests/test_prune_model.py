"""spruce.prune.prune_model (methods x patterns x scopes, calibration rules, sequential
SparseGPT, OWL, report) and keeping masks through training (parametrization, optimizer hooks,
torch.compile)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import spruce
import spruce.prune as sp
from spruce.reference import prune as ref


class Conv1D(nn.Module):
    """Hugging Face's Conv1D layout: weight (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.up = Conv1D(2 * d, d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4, -1) @ self.v(h)
        x = x + self.o(a)
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, d: int = 16, layers: int = 2, vocab: int = 50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        x = self.emb(input_ids)
        for b in self.layers:
            x = b(x)
        logits = self.head(x)
        if labels is None:
            return logits
        return {
            "loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()),
            "logits": logits,
        }


def _model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _calib(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (2, 6), generator=g)
        out.append({"input_ids": ids, "labels": torch.roll(ids, -1, 1)})
    return out


def _zeros(model: nn.Module, name: str) -> float:
    w = model.get_submodule(name).weight
    return 1 - int(torch.count_nonzero(w)) / w.numel()


def _matrix(model: nn.Module, name: str) -> torch.Tensor:
    m = model.get_submodule(name)
    return m.weight.detach().t() if isinstance(m, Conv1D) else m.weight.detach()


# ---------------------------------------------------------------------------------------------


def test_magnitude_layer_global_row_and_report():
    m = _model()
    dense = copy.deepcopy(m)
    rep = sp.prune_model(m, "magnitude", 0.5, exclude="head")
    assert [r.name for r in rep.layers][:3] == ["layers.0.q", "layers.0.k", "layers.0.v"]
    for r in rep.layers:
        w = _matrix(dense, r.name)
        assert torch.equal(_matrix(m, r.name) != 0, ref.magnitude_mask(w, 0.5) & (w != 0))
        assert r.pruned == math.floor(0.5 * r.numel) and r.target == 0.5
    assert rep.layers[4].kind == "Conv1D" and rep.layers[4].shape == (32, 16)
    d = json.loads(rep.to_json())
    assert (
        d["method"] == "magnitude"
        and len(d["layers"]) == 12
        and d["total_pruned"] == rep.total_pruned
    )
    text = str(rep)
    assert "layers.0.up" in text and "Conv1D" in text and "total:" in text

    g = _model()
    rep = sp.prune_model(g, "magnitude", 0.6, scope="global", exclude="head", return_masks=True)
    names = [r.name for r in rep.layers]
    want = ref.global_magnitude_masks([_matrix(dense, n) for n in names], 0.6)
    for n, k in zip(names, want, strict=True):
        assert torch.equal(rep.masks[n], k)
    assert rep.total_pruned == math.floor(0.6 * rep.total_params)
    # the in-place path (no masks requested) prunes the same entries
    g2 = _model()
    sp.prune_model(g2, "magnitude", 0.6, scope="global", exclude="head")
    for n in names:
        assert torch.equal(_matrix(g2, n), _matrix(g, n))

    r = _model()
    sp.prune_model(r, "magnitude", 0.25, scope="row", include=r"layers\.0\.q$")
    assert torch.equal(
        _matrix(r, "layers.0.q") != 0,
        ref.topk_keep(_matrix(dense, "layers.0.q").abs(), 0.25, dim=-1),
    )


@pytest.mark.parametrize("pattern", ["2:4", "row", "column", "head"])
def test_magnitude_patterns(pattern):
    m = _model()
    dense = copy.deepcopy(m)
    sp.prune_model(
        m,
        "magnitude",
        None if ":" in pattern else 0.5,
        pattern=pattern,
        include="layers",
        head_dim=4,
    )
    w = _matrix(dense, "layers.1.o")
    got = _matrix(m, "layers.1.o") != 0
    if pattern == "2:4":
        want = spruce.nm_mask(w.abs(), 2, 4)
    else:
        dim = 1 if pattern == "column" else 0
        want = spruce.structured_mask(
            w, 0.5, dim=dim, group_size=4 if pattern == "head" else 1, norm=2
        )
    assert torch.equal(got, want)


def test_wanda_one_pass_equals_statistics_and_repo_path():
    m = _model()
    dense = copy.deepcopy(m)
    calib = _calib()
    stats = sp.ActivationStats(dense, exclude="head").collect(calib)
    rep = sp.prune_model(m, "wanda", 0.5, calibration=calib, exclude="head")
    for r in rep.layers:
        want = ref.wanda_mask_repo(_matrix(dense, r.name), stats[r.name].col_sq, 0.5)
        assert torch.equal(_matrix(m, r.name) != 0, want & (_matrix(dense, r.name) != 0))
        assert r.info["nsamples"] == 6
    assert rep.params["sequential"] is False and rep.params["calibration_batches"] == 3
    # 2:4 and global
    m2 = _model()
    sp.prune_model(m2, "wanda", None, pattern="2:4", calibration=calib, exclude="head")
    w = _matrix(dense, "layers.0.down")
    assert torch.equal(
        _matrix(m2, "layers.0.down") != 0,
        ref.wanda_mask_repo(w, stats["layers.0.down"].col_sq, 0.5, 2, 4),
    )
    m3 = _model()
    rep3 = sp.prune_model(m3, "wanda", 0.5, scope="global", calibration=calib, exclude="head")
    names = [r.name for r in rep3.layers]
    scores = [ref.wanda_scores(_matrix(dense, n), stats[n].col_sq) for n in names]
    for n, k in zip(names, ref.global_magnitude_masks(scores, 0.5), strict=True):
        assert torch.equal(_matrix(m3, n) != 0, k)
    assert rep3.total_pruned == math.floor(0.5 * rep3.total_params)


def test_wanda_sequential_uses_pruned_inputs():
    calib = _calib()
    m = _model()
    rep = sp.prune_model(m, "wanda", 0.5, calibration=calib, sequential=True, exclude="head")
    # Replay: each group's statistics come from the model with every earlier layer pruned.
    replay = _model()
    names = [r.name for r in rep.layers]
    for n in names:
        st = sp.ActivationStats(replay, layers=[n]).collect(calib)[n]
        w = _matrix(replay, n)
        spruce.apply_mask_(w, sp.wanda_mask(w, st.col_sq, 0.5))
        assert torch.equal(_matrix(m, n), w), n
    seq = sp.prune_model(_model(), "wanda", 0.5, calibration=calib, exclude="head")
    assert any(not torch.equal(_matrix(m, n), _matrix(_model(), n)) for n in names)
    assert seq.params["sequential"] is False


def test_sparsegpt_sequential_matches_layer_by_layer_reference():
    calib = _calib(2)
    m = _model()
    rep = sp.prune_model(
        m, "sparsegpt", 0.5, calibration=calib, include=r"layers\.0\.", block_size=8
    )
    replay = _model()
    for r in rep.layers:
        st = sp.ActivationStats(replay, layers=[r.name], wanda=False, hessian=True).collect(calib)[
            r.name
        ]
        w = _matrix(replay, r.name)
        want, keep = ref.sparsegpt(w, st.hessian, 0.5, block_size=8)
        mod = replay.get_submodule(r.name)
        with torch.no_grad():
            if isinstance(mod, Conv1D):
                mod.weight.copy_(want.t())
            else:
                mod.weight.copy_(want)
        torch.testing.assert_close(_matrix(m, r.name), want, rtol=1e-5, atol=1e-6)
        assert r.info["error"] >= 0 and r.info["damp"] > 0
    assert rep.params == {
        "calibration_batches": 2,
        "block_size": 8,
        "percdamp": 0.01,
        "sequential": True,
    }
    m24 = _model()
    sp.prune_model(
        m24,
        "sparsegpt",
        None,
        pattern="2:4",
        calibration=calib,
        include=r"layers\.1\.(q|up)$",
        block_size=8,
        sequential=False,
    )
    for n in ("layers.1.q", "layers.1.up"):
        k = _matrix(m24, n) != 0
        assert (k.reshape(k.shape[0], -1, 4).sum(-1) <= 2).all()


def test_gradient_methods_from_calibration_and_from_scores():
    calib = _calib()
    dense = _model()
    acc = sp.GradientScores(dense, "snip", exclude="head")
    for b in calib:
        dense.zero_grad()
        dense(**b)["loss"].backward()
        acc.accumulate()
    m = _model()
    rep = sp.prune_model(m, "snip", 0.5, calibration=calib, exclude="head")
    m2 = _model()
    sp.prune_model(m2, "snip", 0.5, scores=acc, exclude="head")
    for r in rep.layers:
        want = spruce.topk_mask(acc[r.name], 0.5)
        assert torch.equal(_matrix(m, r.name) != 0, want), r.name
        assert torch.equal(_matrix(m2, r.name) != 0, want)
    for method in ("movement", "fisher", "taylor", "snip_momentum"):
        mm = _model()
        rep = sp.prune_model(mm, method, 0.3, calibration=calib, exclude="head", pattern="row")
        assert all(r.sparsity == pytest.approx(0.3, abs=0.07) for r in rep.layers)
    mg = _model()
    rep = sp.prune_model(
        mg, "fisher", 0.5, calibration=calib, scope="global", loss_fn=lambda out, b: out["loss"] * 2
    )
    assert rep.total_pruned == math.floor(0.5 * rep.total_params)
    with pytest.raises(spruce.ConfigError, match="snip"):
        sp.prune_model(_model(), "movement", 0.5, scores=acc, exclude="head")


def test_random_and_owl_allocation():
    m = _model()
    rep = sp.prune_model(m, "random", 0.3, seed=7, exclude="head")
    assert all(r.pruned == math.floor(0.3 * r.numel) for r in rep.layers)
    m2 = _model()
    sp.prune_model(m2, "random", 0.3, seed=7, exclude="head")
    assert all(torch.equal(_matrix(m, r.name), _matrix(m2, r.name)) for r in rep.layers)
    g = sp.prune_model(_model(), "random", 0.3, seed=7, scope="global")
    assert g.total_pruned == math.floor(0.3 * g.total_params)

    calib = _calib()
    mo = _model()
    rep = sp.prune_model(
        mo, "wanda", 0.6, calibration=calib, allocation=sp.OWL(m=2.0, lam=0.1), exclude="head"
    )
    blocks = rep.params["owl_blocks"]
    assert set(blocks) == {"layers.0", "layers.1"}
    sps = [b["sparsity"] for b in blocks.values()]
    assert sum(sps) / 2 == pytest.approx(0.6) and max(sps) - min(sps) == pytest.approx(0.2)
    for r in rep.layers:
        assert r.target == pytest.approx(blocks[r.name.rsplit(".", 1)[0]]["sparsity"])
    mm = _model()
    rep = sp.prune_model(mm, "magnitude", 0.5, allocation={"layers.0.q": 0.9}, include="layers")
    assert rep.layers[0].target == 0.9 and rep.layers[0].pruned == math.floor(0.9 * 256)
    rep = sp.prune_model(
        _model(), "magnitude", 0.5, allocation=lambda n, mod: 0.1, include="layers"
    )
    assert all(r.target == 0.1 for r in rep.layers)


def test_calibration_feeding_rules():
    class Pos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x, y=None):
            return self.b(self.a(x) + (0 if y is None else y))

    for batch in (
        torch.randn(3, 8),
        (torch.randn(3, 8), torch.randn(3, 8)),
        [torch.randn(3, 8)],
        {"x": torch.randn(3, 8)},
    ):
        rep = sp.prune_model(Pos(), "wanda", 0.5, calibration=[batch])
        assert all(r.info["nsamples"] == 1 for r in rep.layers)


def test_config_errors():
    m = _model()
    with pytest.raises(spruce.ConfigError, match="method"):
        sp.prune_model(m, "obd", 0.5)
    with pytest.raises(spruce.ConfigError, match="calibration"):
        sp.prune_model(m, "wanda", 0.5)
    with pytest.raises(spruce.ConfigError, match="no nn.Linear"):
        sp.prune_model(m, "magnitude", 0.5, include="nothing-matches")
    with pytest.raises(spruce.ConfigError, match="1 - N/M"):
        sp.prune_model(m, "magnitude", 0.7, pattern="2:4")
    with pytest.raises(spruce.ConfigError, match="scope"):
        sp.prune_model(m, "magnitude", None, pattern="2:4", scope="global")
    with pytest.raises(spruce.ConfigError, match="head_dim"):
        sp.prune_model(m, "magnitude", 0.5, pattern="head")
    with pytest.raises(spruce.ConfigError, match="sparsegpt"):
        sp.prune_model(m, "sparsegpt", 0.5, scope="global", calibration=_calib())
    with pytest.raises(spruce.ConfigError, match="not divisible"):
        sp.prune_model(m, "magnitude", 0.5, pattern="head", head_dim=5, include="layers")
    with pytest.raises(spruce.ConfigError, match="sparsity"):
        sp.prune_model(m, "magnitude", 1.5)
    with pytest.raises(spruce.ConfigError, match="regular expression"):
        sp.prune_model(m, "magnitude", 0.5, include="[")
    with pytest.raises(spruce.ConfigError, match="loss"):
        sp.prune_model(
            _model(), "snip", 0.5, calibration=[{"input_ids": torch.zeros(1, 3, dtype=torch.long)}]
        )
    assert all(torch.count_nonzero(p) == p.numel() or p.dim() < 2 for p in _model().parameters())


# ---------------------------------------------------------------------------------------------
# Masks through training


def _train(
    model: nn.Module, steps: int = 3, opt: torch.optim.Optimizer | None = None
) -> torch.optim.Optimizer:
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for b in _calib(steps, seed=5):
        opt.zero_grad()
        model(**b)["loss"].backward()
        opt.step()
    return opt


def test_keep_masks_parametrization_keeps_zeros_and_is_removable():
    m = _model()
    rep = sp.prune_model(m, "magnitude", 0.5, include="layers", return_masks=True)
    h = sp.keep_masks(m, rep.masks)
    _train(m)
    for r in rep.layers:
        w = _matrix(m, r.name)
        assert torch.equal(w[~rep.masks[r.name]], torch.zeros_like(w[~rep.masks[r.name]]))
        assert (w[rep.masks[r.name]] != 0).float().mean() > 0.99
    mod = m.get_submodule("layers.0.q")
    assert mod.parametrizations.weight.original.grad is not None
    assert (mod.parametrizations.weight.original.grad[~rep.masks["layers.0.q"]] == 0).all()
    assert "layers.0.q.parametrizations.weight.0.mask" in m.state_dict()
    assert sp.make_permanent(m) == 12
    assert not hasattr(m.get_submodule("layers.0.q"), "parametrizations")
    assert _zeros(m, "layers.0.q") >= 0.5
    h.remove()  # already permanent: nothing left to remove

    m2 = _model()
    sp.prune_model(m2, "magnitude", 0.5, include=r"layers\.0\.q$")
    before = m2.layers[0].q.weight.detach().clone()
    h2 = sp.keep_masks(m2, include=r"layers\.0\.q$")  # masks from the zeros
    assert h2.names == ["layers.0.q"]
    h2.remove()
    assert torch.equal(m2.layers[0].q.weight, before)
    with pytest.raises(spruce.ShapeError, match="expected the"):
        sp.keep_masks(m2, {"layers.0.q": torch.ones(3, 3, dtype=torch.bool)})


def test_mask_optimizer_hooks_keep_zeros():
    m = _model()
    sp.prune_model(m, "magnitude", 0.5, include="layers")
    zeros = {n: _matrix(m, n) == 0 for n, _ in sp.find_layers(m, include="layers").items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    h = sp.mask_optimizer(opt, m, include="layers")
    _train(m, opt=opt)
    for n, z in zeros.items():
        assert (_matrix(m, n)[z] == 0).all()
    h.remove()
    _train(m, opt=opt)
    assert any((_matrix(m, n)[z] != 0).any() for n, z in zeros.items())


def test_masked_modules_compile_fullgraph():
    torch._dynamo.reset()
    lin = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    sp.prune_model(lin, "magnitude", 0.5)
    sp.keep_masks(lin)
    x = torch.randn(5, 16)
    eager = lin(x)
    compiled = torch.compile(lin, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)
    loss = compiled(x).sum()
    loss.backward()
    g = lin[0].parametrizations.weight.original.grad
    assert (g[lin[0].parametrizations.weight[0].mask.logical_not()] == 0).all()


def test_hugging_face_conv1d_layers_of_gpt2():
    """GPT-2 stores its projections as transformers' Conv1D (weight (in, out)): statistics,
    Wanda and sequential SparseGPT see each as its (out, in) matrix."""
    from transformers import GPT2Config, GPT2Model
    from transformers.pytorch_utils import Conv1D as HFConv1D

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    dense = GPT2Model(config).eval()
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 64, (2, 8), generator=g)} for _ in range(3)]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0]))
        for n, m in dense.named_modules()
        if isinstance(m, HFConv1D)
    ]
    stats = sp.ActivationStats(dense).collect(calib)
    for h in hooks:
        h.remove()
    names = [
        f"h.{i}.{p}"
        for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert list(stats) == names
    for n in names:
        torch.testing.assert_close(
            stats[n].col_sq, ref.wanda_statistic(seen[n]), rtol=1e-5, atol=1e-6
        )

    m = copy.deepcopy(dense)
    rep = sp.prune_model(m, "wanda", 0.5, calibration=calib)
    for r in rep.layers:
        w = dense.get_submodule(r.name).weight.detach().t()
        assert r.kind == "Conv1D" and r.shape == tuple(w.shape)
        want = ref.wanda_mask_repo(w, stats[r.name].col_sq, 0.5)
        assert torch.equal(m.get_submodule(r.name).weight.detach().t() != 0, want & (w != 0))

    m2 = copy.deepcopy(dense)
    rep2 = sp.prune_model(
        m2, "sparsegpt", None, pattern="2:4", calibration=calib, return_masks=True
    )
    assert rep2.params["sequential"] is True
    for r in rep2.layers:
        keep = rep2.masks[r.name]
        assert keep.shape == r.shape
        assert torch.all(keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2)
        w = m2.get_submodule(r.name).weight.detach().t()
        assert torch.all(w[~keep] == 0)
