"""Adapters around an existing ``nn.Linear``: forward = base + adapter, exact merge/unmerge.

Every adapter keeps the base layer as ``self.base`` (frozen unless ``freeze_base=False``),
reports its trainable parameter count (:meth:`parameter_count`), and never forms a dense
Kronecker product or rotation in forward or backward. ``merge()`` folds the adapter into the
base weight (forming the delta once, or applying the rotation to the weight's rows in
O(out n b (m + 1))) and ``unmerge()`` applies the exact inverse (subtraction, or the inverse
rotation): the weights come back up to float rounding.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._native import check_int, check_number
from ..errors import ArgumentError, ShapeError
from ..structured import (
    boft_apply,
    boft_merge,
    boft_unmerge,
    kron_factorization,
    kron_matmul,
    kron_sum_matmul,
    orthogonal_blocks,
)


class _Adapter(nn.Module, ABC):
    side = "input"

    def __init__(self, base: nn.Linear, freeze_base: bool) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ArgumentError(
                f"{type(self).__name__}: base ({type(base).__name__}) must be a torch.nn.Linear"
            )
        self.base = base
        self.merged = False
        if freeze_base:
            for p in base.parameters():
                p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        return self.adapted(x)

    @abstractmethod
    def adapted(self, x: Tensor) -> Tensor:
        """The unmerged forward: base layer plus adapter."""

    def parameter_count(self) -> int:
        """Trainable parameters of the adapter (the base layer excluded)."""
        base = {id(p) for p in self.base.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in base and p.requires_grad)

    def _check_unmerged(self, what: str) -> None:
        if self.merged:
            raise ArgumentError(f"{type(self).__name__}.{what}: the adapter is already merged")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapter params={self.parameter_count()}, merged={self.merged}"
        )


class _Additive(_Adapter):
    """Adapters with ``y = base(x) + x @ delta.T``."""

    @abstractmethod
    def delta_weight(self) -> Tensor:
        """The dense ``(out, in)`` delta (formed only on request, e.g. for merging)."""

    @torch.no_grad()
    def merge(self) -> None:
        self._check_unmerged("merge")
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ArgumentError(f"{type(self).__name__}.unmerge: the adapter is not merged")
        self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = False


class LoKr(_Additive):
    """LoKr (PEFT/LyCORIS): ``delta = kron(w1, w2) * alpha / r`` with ``w1`` ``(out_l, in_m)``
    and ``w2`` ``(out_k, in_n)`` from :func:`kron_factorization` of the layer's sizes; either
    factor is a rank-``r`` product ``w_a @ w_b`` when PEFT would make it one (``w2`` when
    ``r < max(out_k, in_n) / 2``; ``w1`` likewise with ``decompose_both``). Applied as
    ``kron_matmul([w1, w2], x)``: PEFT forms the ``out x in`` product every forward.
    ``w1`` starts at zero (the adapter starts as the identity)."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float | None = None,
        *,
        factor: int = -1,
        decompose_both: bool = False,
        freeze_base: bool = True,
    ) -> None:
        super().__init__(base, freeze_base)
        self.r = check_int("LoKr", "r", r, lo=1)
        self.scaling = check_number("LoKr", "alpha", self.r if alpha is None else alpha) / self.r
        out_l, out_k = kron_factorization(base.out_features, factor)
        in_m, in_n = kron_factorization(base.in_features, factor)
        dt = base.weight.dtype
        self.w1 = self.w1_a = self.w1_b = self.w2 = self.w2_a = self.w2_b = None
        if decompose_both and self.r < max(out_l, in_m) / 2:
            self.w1_a = nn.Parameter(torch.zeros(out_l, self.r, dtype=dt))
            self.w1_b = nn.Parameter(_kaiming((self.r, in_m), dt))
        else:
            self.w1 = nn.Parameter(torch.zeros(out_l, in_m, dtype=dt))
        if self.r < max(out_k, in_n) / 2:
            self.w2_a = nn.Parameter(_kaiming((out_k, self.r), dt))
            self.w2_b = nn.Parameter(_kaiming((self.r, in_n), dt))
        else:
            self.w2 = nn.Parameter(_kaiming((out_k, in_n), dt))

    def factors(self) -> tuple[Tensor, Tensor]:
        w1 = self.w1 if self.w1 is not None else self.w1_a @ self.w1_b
        w2 = self.w2 if self.w2 is not None else self.w2_a @ self.w2_b
        return w1, w2

    def adapted(self, x: Tensor) -> Tensor:
        w1, w2 = self.factors()
        return self.base(x) + kron_matmul([w1 * self.scaling, w2], x)

    def delta_weight(self) -> Tensor:
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scaling


class KronA(_Additive):
    """KronA: ``delta = scale * kron(A, B)``, ``A`` ``(out_a, in_a)``, ``B`` ``(out_b, in_b)``
    (default split: :func:`kron_factorization` of each size). ``B`` starts at zero."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        in_split: tuple[int, int] | None = None,
        out_split: tuple[int, int] | None = None,
        scale: float = 1.0,
        freeze_base: bool = True,
    ) -> None:
        super().__init__(base, freeze_base)
        out_a, out_b = out_split or kron_factorization(base.out_features)
        in_a, in_b = in_split or kron_factorization(base.in_features)
        if out_a * out_b != base.out_features or in_a * in_b != base.in_features:
            raise ShapeError(
                f"KronA: splits out {(out_a, out_b)} and in {(in_a, in_b)} must multiply to the "
                f"layer's ({base.out_features}, {base.in_features})"
            )
        dt = base.weight.dtype
        self.scale = check_number("KronA", "scale", scale)
        self.A = nn.Parameter(_kaiming((out_a, in_a), dt))
        self.B = nn.Parameter(torch.zeros(out_b, in_b, dtype=dt))

    def adapted(self, x: Tensor) -> Tensor:
        return self.base(x) + kron_matmul([self.A * self.scale, self.B], x)

    def delta_weight(self) -> Tensor:
        return torch.kron(self.A, self.B) * self.scale


class Compacter(_Additive):
    """Compacter's parameterized hypercomplex multiplication as a parallel delta:
    ``delta = sum_i kron(A_i, B_i)``, ``A_i`` ``(n, n)``, ``B_i = s_i t_i^T`` of rank ``rank``
    (``(out / n) x (in / n)``), applied by :func:`kron_sum_matmul`. (Compacter itself puts two
    such layers in a bottleneck with a nonlinearity, which cannot be merged; this is its
    mergeable, LoRA-like placement.) ``t`` starts at zero."""

    def __init__(
        self, base: nn.Linear, n: int = 4, rank: int = 1, *, freeze_base: bool = True
    ) -> None:
        super().__init__(base, freeze_base)
        n = check_int("Compacter", "n", n, lo=1)
        rank = check_int("Compacter", "rank", rank, lo=1)
        if base.out_features % n or base.in_features % n:
            raise ShapeError(
                f"Compacter: n ({n}) must divide the layer's sizes ({base.out_features}, "
                f"{base.in_features})"
            )
        dt = base.weight.dtype
        self.A = nn.Parameter(_kaiming((n, n, n), dt))
        self.s = nn.Parameter(_kaiming((n, base.out_features // n, rank), dt))
        self.t = nn.Parameter(torch.zeros(n, base.in_features // n, rank, dtype=dt))

    def _bs(self) -> Tensor:
        return self.s @ self.t.transpose(1, 2)

    def adapted(self, x: Tensor) -> Tensor:
        return self.base(x) + kron_sum_matmul(self.A, self._bs(), x)

    def delta_weight(self) -> Tensor:
        bs = self._bs()
        return sum(torch.kron(self.A[i], bs[i]) for i in range(self.A.shape[0]))


class _Rotation(_Adapter):
    """Adapters whose delta is an orthogonal (butterfly) rotation of the weight."""

    @abstractmethod
    def blocks(self) -> Tensor:
        """The orthogonal blocks of every butterfly factor."""

    def _scale(self) -> Tensor | None:
        return None

    @torch.no_grad()
    def merge(self) -> None:
        self._check_unmerged("merge")
        blocks = self.blocks()
        w, b = boft_merge(
            self.base.weight, blocks, side=self.side, bias=self.base.bias, scale=self._scale()
        )
        self.base.weight.copy_(w)
        if b is not None and self.base.bias is not None:
            self.base.bias.copy_(b)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ArgumentError(f"{type(self).__name__}.unmerge: the adapter is not merged")
        w, b = boft_unmerge(
            self.base.weight,
            self.blocks(),
            side=self.side,
            bias=self.base.bias,
            scale=self._scale(),
        )
        self.base.weight.copy_(w)
        if b is not None and self.base.bias is not None:
            self.base.bias.copy_(b)
        self.merged = False


class BOFT(_Rotation):
    """BOFT (PEFT): ``y = ((x R) W^T) * s + bias`` with ``R`` the orthogonal butterfly of
    ``n_butterfly_factors`` (PEFT's ``boft_n_butterfly_factor``) permuted block-diagonal
    factors of ``block_size`` blocks (or ``nblocks`` blocks), each block the Cayley map of
    ``boft_R`` (``"peft_boft"`` convention), and ``s`` (``boft_s``) a per-output scale. ``R`` is
    applied to activations (:func:`spruce.structured.boft_apply`): PEFT builds dense ``n x n``
    permutation and block-diagonal matrices every forward. Starts as the identity."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        block_size: int | None = None,
        nblocks: int | None = None,
        n_butterfly_factors: int = 1,
        parameterization: str = "cayley",
        neumann_terms: int = 5,
        freeze_base: bool = True,
    ) -> None:
        super().__init__(base, freeze_base)
        n = base.in_features
        b, nb = _blocks("BOFT", n, block_size, nblocks)
        levels = check_int("BOFT", "n_butterfly_factors", n_butterfly_factors, lo=1)
        if levels > 1 and (b % 2 or nb % (1 << (levels - 1))):
            raise ArgumentError(
                f"BOFT: n_butterfly_factors ({levels}) needs an even block size (got {b}) and "
                f"nblocks (got {nb}) divisible by 2**{levels - 1}"
            )
        self.parameterization = parameterization
        self.neumann_terms = neumann_terms
        dt = base.weight.dtype
        self.boft_R = nn.Parameter(torch.zeros(levels, nb, b, b, dtype=dt))
        self.boft_s = nn.Parameter(torch.ones(base.out_features, 1, dtype=dt))

    def blocks(self) -> Tensor:
        return orthogonal_blocks(
            self.boft_R,
            convention="peft_boft",
            parameterization=self.parameterization,
            neumann_terms=self.neumann_terms,
        )

    def _scale(self) -> Tensor:
        return self.boft_s

    def adapted(self, x: Tensor) -> Tensor:
        xr = boft_apply(x, self.blocks())
        y = F.linear(xr, self.base.weight) * self.boft_s.reshape(-1)
        return y if self.base.bias is None else y + self.base.bias


class OFT(_Rotation):
    """OFT: a block-diagonal orthogonal rotation of ``block_size`` blocks (or ``r`` blocks).

    ``convention="peft_oft"`` (PEFT v2): parameters ``oft_R`` ``(r, b (b - 1) / 2)`` (one shared
    block with ``block_share``), rotation of the input, ``y = base(x @ R)``;
    ``parameterization="neumann"`` with ``neumann_terms=5`` is PEFT's default
    (``use_cayley_neumann``). ``convention="lycoris"``: parameters ``(nblocks, b, b)`` over the
    output features, ``y = base(x) @ R`` (the bias is rotated too, as LyCORIS's bypass forward
    does). Starts as the identity."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        block_size: int | None = None,
        r: int | None = None,
        convention: str = "peft_oft",
        parameterization: str = "cayley",
        neumann_terms: int = 5,
        block_share: bool = False,
        freeze_base: bool = True,
    ) -> None:
        super().__init__(base, freeze_base)
        if convention not in ("peft_oft", "lycoris"):
            raise ArgumentError(f"OFT: convention ({convention!r}) must be 'peft_oft' or 'lycoris'")
        self.convention = convention
        self.side = "input" if convention == "peft_oft" else "output"
        n = base.in_features if self.side == "input" else base.out_features
        b, nb = _blocks("OFT", n, block_size, r)
        self.nblocks, self.block_size, self.block_share = nb, b, bool(block_share)
        self.parameterization = parameterization
        self.neumann_terms = neumann_terms
        dt = base.weight.dtype
        count = 1 if block_share else nb
        if convention == "peft_oft":
            self.oft_R = nn.Parameter(torch.zeros(count, b * (b - 1) // 2, dtype=dt))
        else:
            self.oft_R = nn.Parameter(torch.zeros(count, b, b, dtype=dt))

    def blocks(self) -> Tensor:
        blocks = orthogonal_blocks(
            self.oft_R,
            convention=self.convention,
            parameterization=self.parameterization,
            neumann_terms=self.neumann_terms,
            block_size=self.block_size,
        )
        if self.block_share:
            blocks = blocks.expand(self.nblocks, -1, -1)
        return blocks.unsqueeze(0)

    def adapted(self, x: Tensor) -> Tensor:
        if self.side == "input":
            return self.base(boft_apply(x, self.blocks()))
        return boft_apply(self.base(x), self.blocks())


def _blocks(op: str, n: int, block_size: int | None, nblocks: int | None) -> tuple[int, int]:
    if (block_size is None) == (nblocks is None):
        raise ArgumentError(f"{op}: give exactly one of block_size and nblocks (r)")
    if block_size is not None:
        b = check_int(op, "block_size", block_size, lo=1)
        if n % b:
            raise ArgumentError(f"{op}: block_size ({b}) must divide the rotated size ({n})")
        return b, n // b
    nb = check_int(op, "nblocks", nblocks, lo=1)
    if n % nb:
        raise ArgumentError(f"{op}: nblocks ({nb}) must divide the rotated size ({n})")
    return n // nb, nb


def _kaiming(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    t = torch.empty(shape, dtype=dtype)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t
