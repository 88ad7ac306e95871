"""Structured replacements of ``nn.Linear``: butterfly, Monarch, Kronecker."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._native import check_int
from ..errors import ArgumentError
from ..structured import (
    butterfly_multiply,
    butterfly_twiddle,
    kron_matmul,
    monarch_multiply,
    monarch_project,
    monarch_shapes,
)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class ButterflyLinear(nn.Module):
    """A linear map by a product of butterfly factors (torch_butterfly's ``Butterfly``).

    ``n`` = the next power of two of ``in_features``; ``nstacks = ceil(out_features / n)``
    stacks of ``nblocks`` butterfly blocks each (``nstacks * nblocks * log2(n) * 2n``
    parameters instead of ``in * out``). The input is zero-padded to ``n`` and broadcast to
    every stack (no copy), the stacks' outputs are concatenated and truncated to
    ``out_features``, then the bias is added. ``init``: see :func:`spruce.structured.butterfly_twiddle`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        increasing_stride: bool = True,
        nblocks: int = 1,
        init: str = "randn",
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("ButterflyLinear", "in_features", in_features, lo=1)
        self.out_features = check_int("ButterflyLinear", "out_features", out_features, lo=1)
        self.n = 1 << (self.in_features - 1).bit_length()
        self.nstacks = math.ceil(self.out_features / self.n)
        self.increasing_stride = bool(increasing_stride)
        dtype = dtype or torch.get_default_dtype()
        tw = butterfly_twiddle(
            self.n,
            nstacks=self.nstacks,
            nblocks=nblocks,
            init=init,
            dtype=dtype,
            generator=generator,
        )
        self.twiddle = nn.Parameter(tw)
        if bias:
            bound = 1 / math.sqrt(self.in_features)
            b = torch.empty(self.out_features, dtype=dtype).uniform_(
                -bound, bound, generator=generator
            )
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, transpose: bool = False) -> Tensor:
        lead = x.shape[:-1]
        out_size = self.out_features if self.nstacks == 1 else None
        y = butterfly_multiply(
            self.twiddle,
            x.reshape(-1, 1, self.in_features),
            increasing_stride=self.increasing_stride,
            output_size=out_size,
            transpose=transpose,
        )
        y = y.reshape(y.shape[0], -1)[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def to_dense(self) -> Tensor:
        """The ``(out_features, in_features)`` weight this layer applies."""
        eye = torch.eye(self.in_features, dtype=self.twiddle.dtype)
        y = butterfly_multiply(
            self.twiddle,
            eye.unsqueeze(1),
            increasing_stride=self.increasing_stride,
            output_size=self.out_features if self.nstacks == 1 else None,
        )
        return y.reshape(self.in_features, -1)[:, : self.out_features].t().contiguous()

    def parameter_count(self) -> int:
        return _count(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}, "
            f"nstacks={self.nstacks}, nblocks={self.twiddle.shape[1]}, "
            f"params={self.parameter_count()} (dense: {self.in_features * self.out_features})"
        )


class MonarchLinear(nn.Module):
    """A linear map by a Monarch matrix (fly's ``MonarchLinear``): input zero-padded to
    ``nblocks * ceil(in / nblocks)``, two block-diagonal factors, output truncated, bias added.
    :meth:`from_linear` projects a trained dense layer onto it (:func:`monarch_project`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("MonarchLinear", "in_features", in_features, lo=1)
        self.out_features = check_int("MonarchLinear", "out_features", out_features, lo=1)
        self.nblocks = check_int("MonarchLinear", "nblocks", nblocks, lo=1)
        s1, s2 = monarch_shapes(self.in_features, self.out_features, self.nblocks)
        dtype = dtype or torch.get_default_dtype()
        b1, b2 = 1 / math.sqrt(s1[2]), 1 / math.sqrt(s2[2])
        self.w1 = nn.Parameter(torch.empty(s1, dtype=dtype).uniform_(-b1, b1, generator=generator))
        self.w2 = nn.Parameter(torch.empty(s2, dtype=dtype).uniform_(-b2, b2, generator=generator))
        if bias:
            bound = 1 / math.sqrt(self.in_features)
            b = torch.empty(self.out_features, dtype=dtype).uniform_(
                -bound, bound, generator=generator
            )
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, nblocks: int) -> MonarchLinear:
        """The Monarch layer nearest (Frobenius) to ``linear``'s weight, with its bias."""
        m = cls(
            linear.in_features,
            linear.out_features,
            nblocks,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            w1, w2 = monarch_project(linear.weight.detach(), nblocks)
            m.w1.copy_(w1)
            m.w2.copy_(w2)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        n = self.w1.shape[0] * self.w1.shape[2]
        if n != self.in_features:
            x = F.pad(x, (0, n - self.in_features))
        y = monarch_multiply(x, self.w1, self.w2)[..., : self.out_features]
        return y if self.bias is None else y + self.bias

    def to_dense(self) -> Tensor:
        eye = torch.eye(self.in_features, dtype=self.w1.dtype)
        bias, self.bias = self.bias, None
        try:
            return self.forward(eye).t().contiguous()
        finally:
            self.bias = bias

    def parameter_count(self) -> int:
        return _count(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nblocks={self.nblocks}, params={self.parameter_count()} "
            f"(dense: {self.in_features * self.out_features})"
        )


class KroneckerLinear(nn.Module):
    """``y = x @ kron(F_1, ..., F_k).T + bias`` with factors ``(out_dims[i], in_dims[i])``;
    the product is never formed (:func:`spruce.structured.kron_matmul`)."""

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dims: Sequence[int],
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if len(in_dims) != len(out_dims) or len(in_dims) == 0:
            raise ArgumentError(
                f"KroneckerLinear: in_dims ({list(in_dims)}) and out_dims ({list(out_dims)}) "
                f"must be non-empty and of the same length"
            )
        dtype = dtype or torch.get_default_dtype()
        self.in_features = math.prod(in_dims)
        self.out_features = math.prod(out_dims)
        self.factors = nn.ParameterList()
        for i, o in zip(in_dims, out_dims, strict=True):
            bound = 1 / math.sqrt(check_int("KroneckerLinear", "in_dims", i, lo=1))
            f = torch.empty(check_int("KroneckerLinear", "out_dims", o, lo=1), i, dtype=dtype)
            self.factors.append(nn.Parameter(f.uniform_(-bound, bound, generator=generator)))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        y = kron_matmul(list(self.factors), x)
        return y if self.bias is None else y + self.bias

    def to_dense(self) -> Tensor:
        w = self.factors[0]
        for f in list(self.factors)[1:]:
            w = torch.kron(w, f)
        return w

    def parameter_count(self) -> int:
        return _count(self)

    def extra_repr(self) -> str:
        dims = [tuple(f.shape) for f in self.factors]
        return (
            f"factors={dims}, params={self.parameter_count()} "
            f"(dense: {self.in_features * self.out_features})"
        )
