"""spruce.nn structured layers and adapters: dense equivalents, PEFT as the oracle (through
from_peft), exact merge/unmerge, parameter counts, gradients and torch.compile(fullgraph=True)."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import spruce
import spruce.nn as snn
import spruce.structured as st
from spruce.reference import structured as ref

F64 = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed), dtype=F64).to(dtype)


def _linear(i: int, o: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).double()


def _randomize(m: nn.Module, seed: int, std: float = 0.1) -> None:
    g = _g(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * std)


# ---------------------------------------------------------------------------------------------
# layers


@pytest.mark.parametrize("i,o,nblocks", [(16, 16, 1), (12, 20, 2), (16, 40, 1), (10, 3, 3)])
def test_butterfly_linear_equals_its_dense_weight(i, o, nblocks):
    m = snn.ButterflyLinear(i, o, nblocks=nblocks, dtype=F64, generator=_g(1))
    assert m.nstacks == -(-o // m.n)
    x = _randn(4, 3, i, seed=2)
    torch.testing.assert_close(m(x), x @ m.to_dense().T + m.bias)
    # torch_butterfly's Butterfly: x broadcast to every stack, stacks concatenated, truncated
    y = ref.butterfly_multiply(m.twiddle.detach(), x.reshape(-1, 1, i), True, None)
    want = y.reshape(y.shape[0], -1)[:, :o] + m.bias.detach()
    torch.testing.assert_close(m(x).reshape(-1, o), want)
    assert m.parameter_count() == m.twiddle.numel() + o


def test_monarch_linear_and_from_linear():
    m = snn.MonarchLinear(30, 50, nblocks=3, dtype=F64, generator=_g(3))
    x = _randn(7, 30, seed=4)
    torch.testing.assert_close(m(x), x @ m.to_dense().T + m.bias)
    lin = _linear(30, 50, seed=5)
    with torch.no_grad():
        lin.weight.copy_(m.to_dense())
    back_ = snn.MonarchLinear.from_linear(lin, 3)
    torch.testing.assert_close(back_.to_dense(), lin.weight, rtol=1e-9, atol=1e-9)
    assert m.parameter_count() == m.w1.numel() + m.w2.numel() + 50


def test_kronecker_linear_equals_torch_kron():
    m = snn.KroneckerLinear((4, 3, 2), (2, 5, 3), dtype=F64, generator=_g(6))
    with torch.no_grad():
        m.bias.normal_(generator=_g(7))
    x = _randn(5, 24, seed=8)
    torch.testing.assert_close(m(x), x @ m.to_dense().T + m.bias)
    assert m.parameter_count() == 8 + 15 + 6 + 30


# ---------------------------------------------------------------------------------------------
# additive adapters


def _check_merge(adapter, x, want):
    base_w = adapter.base.weight.detach().clone()
    base_b = None if adapter.base.bias is None else adapter.base.bias.detach().clone()
    torch.testing.assert_close(adapter(x), want)
    adapter.merge()
    assert adapter.merged
    torch.testing.assert_close(adapter(x), want)
    torch.testing.assert_close(adapter.base(x), want)
    with pytest.raises(spruce.ArgumentError, match="already merged"):
        adapter.merge()
    adapter.unmerge()
    torch.testing.assert_close(adapter.base.weight, base_w, rtol=1e-12, atol=1e-12)
    if base_b is not None:
        torch.testing.assert_close(adapter.base.bias, base_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter(x), want)


@pytest.mark.parametrize(
    "make",
    [
        lambda b: snn.LoKr(b, r=2, alpha=3.0),
        lambda b: snn.LoKr(b, r=1, alpha=1.0, decompose_both=True),
        lambda b: snn.LoKr(b, r=16),
        lambda b: snn.KronA(b, scale=0.5),
        lambda b: snn.Compacter(b, n=4, rank=2),
    ],
    ids=["lokr", "lokr-both", "lokr-full", "krona", "compacter"],
)
def test_additive_adapters_forward_merge_unmerge(make):
    base = _linear(24, 16, seed=1)
    a = make(base)
    x = _randn(6, 24, seed=2)
    torch.testing.assert_close(a(x), base(x))  # starts as the base layer
    _randomize(a, 3)
    want = base(x) + x @ a.delta_weight().T
    _check_merge(a, x, want)
    assert not base.weight.requires_grad
    assert a.parameter_count() == sum(
        p.numel() for n, p in a.named_parameters() if not n.startswith("base")
    )


def test_adapters_refuse_non_linear_bases():
    with pytest.raises(spruce.ArgumentError, match="must be a torch.nn.Linear"):
        snn.LoKr(nn.Conv1d(2, 2, 1))
    with pytest.raises(spruce.ShapeError, match="n \\(5\\) must divide"):
        snn.Compacter(_linear(24, 16), n=5)


# ---------------------------------------------------------------------------------------------
# rotation adapters


@pytest.mark.parametrize("levels,block_size", [(1, 4), (2, 4), (3, 2)])
def test_boft_matches_dense_peft_formulation(levels, block_size):
    base = _linear(16, 12, seed=4)
    a = snn.BOFT(base, block_size=block_size, n_butterfly_factors=levels)
    x = _randn(5, 16, seed=5)
    torch.testing.assert_close(a(x), base(x))
    _randomize(a, 6, std=0.2)
    want = ref.peft_boft_forward(x, base.weight, base.bias, a.boft_R.detach(), a.boft_s.detach())
    _check_merge(a, x, want.detach())
    assert a.parameter_count() == levels * (16 // block_size) * block_size**2 + 12


@pytest.mark.parametrize("convention", ["peft_oft", "lycoris"])
@pytest.mark.parametrize("parameterization", ["cayley", "neumann"])
def test_oft_conventions_and_merge(convention, parameterization):
    base = _linear(12, 16, seed=7)
    a = snn.OFT(base, block_size=4, convention=convention, parameterization=parameterization)
    x = _randn(5, 12, seed=8)
    torch.testing.assert_close(a(x), base(x))
    _randomize(a, 9, std=0.05)
    blocks = a.blocks()[0].detach()
    r = torch.block_diag(*blocks)
    if convention == "peft_oft":
        want = base(x @ r)
    else:
        want = base(x) @ r  # LyCORIS: the output side, bias included
        torch.testing.assert_close(blocks, ref.cayley(a.oft_R.detach(), "lycoris")) if (
            parameterization == "cayley"
        ) else None
    _check_merge(a, x, want.detach())


def test_oft_block_share():
    base = _linear(12, 8, seed=10)
    a = snn.OFT(base, block_size=4, block_share=True)
    assert a.oft_R.shape == (1, 6)
    _randomize(a, 11)
    blocks = a.blocks()[0]
    assert torch.equal(blocks[0], blocks[2])


# ---------------------------------------------------------------------------------------------
# PEFT as the oracle


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))


def _peft_configs():
    peft = importlib.import_module("peft")
    return [
        (
            "boft",
            peft.BOFTConfig(target_modules=["lin"], boft_block_size=4, boft_n_butterfly_factor=1),
        ),
        ("oft-neumann", peft.OFTConfig(target_modules=["lin"], oft_block_size=4, r=0)),
        (
            "oft-exact",
            peft.OFTConfig(target_modules=["lin"], oft_block_size=4, r=0, use_cayley_neumann=False),
        ),
        ("lokr", peft.LoKrConfig(target_modules=["lin"], r=2, alpha=3)),
        ("lokr-full", peft.LoKrConfig(target_modules=["lin"], r=8, alpha=8)),
        (
            "oft-share",
            peft.OFTConfig(
                target_modules=["lin"],
                oft_block_size=4,
                r=0,
                block_share=True,
                num_cayley_neumann_terms=7,
            ),
        ),
        (
            "lokr-both",
            peft.LoKrConfig(target_modules=["lin"], r=1, alpha=3, decompose_both=True),
        ),
        (
            "boft-bias",
            peft.BOFTConfig(
                target_modules=["lin"],
                boft_block_size=0,
                boft_block_num=4,
                boft_n_butterfly_factor=1,
                bias="boft_only",
            ),
        ),
    ]


N_CONFIGS = 8


@pytest.mark.parametrize("idx", range(N_CONFIGS))
def test_from_peft_reproduces_peft_outputs_and_merges(idx):
    peft = importlib.import_module("peft")
    name, cfg = _peft_configs()[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Net().double(), cfg)
    _randomize(model, 12)
    x = _randn(7, 16, seed=13)
    want = model(x).detach()
    layer = model.base_model.model.lin
    peft_params = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "base_layer" not in n
    )
    converted = snn.from_peft(layer)
    assert converted.parameter_count() == peft_params
    lin_want = layer(x).detach()
    torch.testing.assert_close(converted(x), lin_want)
    # PEFT's merge and spruce's merge give the same weight (PEFT merges a copy: its OFT
    # unmerge inverts in float32 and would perturb the shared base weight)
    twin = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin.merge()
    peft_merged = twin.get_base_layer().weight.detach().clone()
    converted.merge()
    torch.testing.assert_close(converted.base.weight, peft_merged, rtol=1e-10, atol=1e-10)
    converted.unmerge()
    # whole-model conversion in place
    snn.from_peft(model)
    assert not any(
        type(m).__module__.startswith("peft.tuners.") and type(m).__name__ == "Linear"
        for m in model.modules()
    )
    torch.testing.assert_close(model(x), want)


def test_from_peft_refuses_models_without_adapters():
    with pytest.raises(spruce.ArgumentError, match="holds no PEFT"):
        snn.from_peft(_Net())


class _BlockDiagStandIn:
    """A CPU stand-in for PEFT BOFT's CUDA block-diagonal kernel (``fbd_cuda``), so that PEFT's
    own multi-factor BOFT forward runs as the oracle: without that kernel PEFT silently falls
    back to one butterfly factor."""

    @staticmethod
    def forward(blocks):
        return (torch.stack([torch.block_diag(*level) for level in blocks]),)


@pytest.mark.parametrize("factors,block_size", [(2, 4), (3, 2)])
def test_from_peft_multi_factor_boft_equals_peft(monkeypatch, factors, block_size):
    peft = importlib.import_module("peft")
    boft_layer = importlib.import_module("peft.tuners.boft.layer")
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _BlockDiagStandIn)
    cfg = peft.BOFTConfig(
        target_modules=["lin"], boft_block_size=block_size, boft_n_butterfly_factor=factors
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Net().double(), cfg)
    layer = model.base_model.model.lin
    assert layer.boft_R["default"].shape[0] == factors
    _randomize(model, 14, std=0.2)
    x = _randn(6, 16, seed=15)
    want = layer(x).detach()
    converted = snn.from_peft(layer)
    assert converted.boft_R.shape[0] == factors
    torch.testing.assert_close(converted(x), want)
    twin = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin.merge()
    converted.merge()
    torch.testing.assert_close(
        converted.base.weight, twin.get_base_layer().weight.detach(), rtol=1e-10, atol=1e-10
    )
    # the saved adapter converts without PEFT's modules too
    sd = peft.get_peft_model_state_dict(model)
    plain = _Net().double()
    snn.from_peft(plain, state_dict=sd, config=cfg)
    assert isinstance(plain.lin, snn.BOFT) and plain.lin.boft_R.shape[0] == factors
    torch.testing.assert_close(plain.lin(x), want)


@pytest.mark.parametrize("idx", range(N_CONFIGS))
def test_from_peft_state_dict_reproduces_peft(idx):
    peft = importlib.import_module("peft")
    name, cfg = _peft_configs()[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Net().double(), cfg)
    _randomize(model, 16)
    x = _randn(7, 16, seed=17)
    want = model(x).detach()
    sd = peft.get_peft_model_state_dict(model)
    plain = _Net().double()
    out = snn.from_peft(plain, state_dict=sd, config=cfg.to_dict())
    assert out is plain
    kind = {"boft": snn.BOFT, "oft": snn.OFT, "lokr": snn.LoKr}[name.split("-")[0]]
    assert isinstance(plain.lin, kind) and isinstance(plain.out, nn.Linear)
    assert not plain.lin.base.weight.requires_grad
    torch.testing.assert_close(plain(x), want)
    # adapter_config.json spells the type as a string
    plain2 = _Net().double()
    cfg_json = {**cfg.to_dict(), "peft_type": str(cfg.peft_type.value)}
    snn.from_peft(plain2, state_dict=dict(sd), config=cfg_json)
    torch.testing.assert_close(plain2(x), want)


def test_from_peft_state_dict_rank_and_alpha_patterns_and_errors():
    peft = importlib.import_module("peft")
    cfg = peft.LoKrConfig(
        target_modules=["lin", "out"],
        r=2,
        alpha=3,
        rank_pattern={"out": 1},
        alpha_pattern={"out": 5},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Net().double(), cfg)
    _randomize(model, 18)
    x = _randn(4, 16, seed=19)
    sd = peft.get_peft_model_state_dict(model)
    plain = snn.from_peft(_Net().double(), state_dict=sd, config=cfg)
    assert plain.lin.scaling == 1.5 and plain.out.scaling == 5.0
    torch.testing.assert_close(plain(x), model(x).detach())
    with pytest.raises(spruce.ArgumentError, match="needs config"):
        snn.from_peft(_Net().double(), state_dict=sd)
    with pytest.raises(spruce.ArgumentError, match="peft_type"):
        snn.from_peft(_Net().double(), state_dict=sd, config={"peft_type": "LORA"})
    with pytest.raises(spruce.ArgumentError, match="neither a LOKR adapter weight"):
        snn.from_peft(
            _Net().double(), state_dict={**sd, "base_model.model.nope.weight": x}, config=cfg
        )
    with pytest.raises(spruce.ArgumentError, match="no BOFT adapter weights"):
        snn.from_peft(_Net().double(), state_dict={}, config={"peft_type": "BOFT"})
    partial = {k: v for k, v in sd.items() if not k.endswith("lin.lokr_w2")}
    with pytest.raises(spruce.ArgumentError, match="lokr_w2"):
        snn.from_peft(_Net().double(), state_dict=partial, config=cfg)


def test_rotation_adapters_bad_inputs():
    base = _linear(16, 12)
    with pytest.raises(spruce.ArgumentError, match="exactly one of block_size and nblocks"):
        snn.BOFT(base)
    with pytest.raises(spruce.ArgumentError, match="exactly one of block_size and nblocks"):
        snn.BOFT(base, block_size=4, nblocks=4)
    with pytest.raises(spruce.ArgumentError, match=r"block_size \(5\) must divide"):
        snn.BOFT(base, block_size=5)
    with pytest.raises(spruce.ArgumentError, match="needs an even block size"):
        snn.BOFT(base, nblocks=2, n_butterfly_factors=3)
    with pytest.raises(spruce.ArgumentError, match="convention"):
        snn.OFT(base, block_size=4, convention="peft_boft")
    with pytest.raises(spruce.ArgumentError, match="not merged"):
        snn.OFT(base, block_size=4).unmerge()
    with pytest.raises(spruce.ArgumentError, match="not merged"):
        snn.LoKr(base).unmerge()
    with pytest.raises(spruce.ShapeError, match="must multiply"):
        snn.KronA(base, in_split=(3, 5))


# ---------------------------------------------------------------------------------------------
# gradients and compile


def _modules():
    f32 = torch.float32
    base = nn.Linear(16, 16)
    return [
        snn.ButterflyLinear(16, 24, nblocks=2, dtype=f32),
        snn.MonarchLinear(16, 16, nblocks=4, dtype=f32),
        snn.KroneckerLinear((4, 4), (4, 4), dtype=f32),
        snn.LoKr(nn.Linear(16, 16), r=2),
        snn.KronA(nn.Linear(16, 16)),
        snn.Compacter(nn.Linear(16, 16), n=4),
        snn.BOFT(base, block_size=4, n_butterfly_factors=2),
        snn.OFT(nn.Linear(16, 16), block_size=4, parameterization="neumann"),
        snn.OFT(nn.Linear(16, 16), block_size=4, convention="lycoris"),
    ]


@pytest.mark.parametrize("idx", range(9))
def test_modules_compile_fullgraph_forward_and_backward(idx):
    m = _modules()[idx]
    _randomize(m, idx, std=0.1)
    x = torch.randn(5, 16, generator=_g(idx))
    eager = m(x)
    grads = torch.autograd.grad(
        eager.square().sum(), [p for p in m.parameters() if p.requires_grad]
    )
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    cgrads = torch.autograd.grad(out.square().sum(), [p for p in m.parameters() if p.requires_grad])
    for a, b in zip(cgrads, grads, strict=True):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in grads)


def test_module_gradcheck_float64():
    base = _linear(8, 8, seed=20)
    a = snn.BOFT(base, block_size=2, n_butterfly_factors=3)
    _randomize(a, 21, std=0.3)
    x = _randn(3, 8, seed=22).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, r: torch.func.functional_call(a, {"boft_R": r}, (v,)),
        (x, a.boft_R.detach().clone().requires_grad_()),
    )
    m = snn.ButterflyLinear(6, 10, nblocks=2, dtype=F64)
    assert torch.autograd.gradcheck(
        lambda v, t: torch.func.functional_call(m, {"twiddle": t}, (v,)),
        (_randn(3, 6, seed=23).requires_grad_(), m.twiddle.detach().clone().requires_grad_()),
    )


def test_structured_helpers_reexported():
    assert st.boft_permutation is not None and snn.__all__
