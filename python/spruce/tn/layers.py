"""Compressed layers: an MPO (tensor-train matrix) linear layer and a Tucker-2 convolution."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError, ShapeError
from .decomp import balanced_modes, mpo_decompose, mpo_to_matrix, tucker

__all__ = ["MPOLinear", "TuckerConv2d", "PerformanceWarning", "mpo_flops"]


class PerformanceWarning(UserWarning):
    """A compressed layer would cost more than the dense layer it replaces."""


def mpo_flops(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds per input row of :class:`MPOLinear`'s forward (cores applied in order)."""
    d = len(in_modes)
    total = 0
    for k in range(d):
        done_out = math.prod(out_modes[:k])
        rest_in = math.prod(in_modes[k + 1 :])
        total += done_out * rest_in * ranks[k] * in_modes[k] * out_modes[k] * ranks[k + 1]
    return total


class MPOLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` (out, in) held as MPO cores ``(r_k, in_k, out_k, r_{k+1})``.

    The forward contracts the activation with one core at a time (a matrix product each) and
    never forms ``W``. It costs :func:`mpo_flops` multiply-adds per row instead of
    ``in * out``; a :class:`PerformanceWarning` is raised at construction when that is more.
    Build one from a trained layer with :meth:`from_linear`.
    """

    def __init__(
        self,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: Sequence[int] | int,
        *,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        im, om = [int(m) for m in in_modes], [int(m) for m in out_modes]
        if len(im) != len(om) or not im or any(m < 1 for m in im + om):
            raise ShapeError(
                f"MPOLinear: in_modes {im} and out_modes {om} must be non-empty, positive and "
                "of equal length"
            )
        d = len(im)
        if isinstance(ranks, int):
            rs = [1] + [ranks] * (d - 1) + [1]
        else:
            rs = [int(r) for r in ranks]
            if len(rs) == d - 1:
                rs = [1] + rs + [1]
        if len(rs) != d + 1 or rs[0] != 1 or rs[-1] != 1 or any(r < 1 for r in rs):
            raise ArgumentError(
                f"MPOLinear: ranks {ranks!r} must be an int or {d - 1} bond ranks "
                f"(or {d + 1} with boundary ranks 1)"
            )
        self.in_modes, self.out_modes, self.ranks = im, om, rs
        self.in_features, self.out_features = math.prod(im), math.prod(om)
        kw = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(rs[k], im[k], om[k], rs[k + 1], **kw)) for k in range(d)]
        )
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self.reset_parameters()
        dense = self.in_features * self.out_features
        if self.flops() > dense:
            warnings.warn(
                f"MPOLinear: ranks {rs} cost {self.flops()} multiply-adds per row, more than the "
                f"dense layer's {dense}; lower the ranks or use nn.Linear",
                PerformanceWarning,
                stacklevel=2,
            )

    def reset_parameters(self) -> None:
        # Each core scaled so that W's entries have variance about 1/(3 in), like nn.Linear.
        d = len(self.cores)
        target = 1.0 / (3.0 * self.in_features)
        per = target ** (1.0 / d)
        with torch.no_grad():
            for k, c in enumerate(self.cores):
                std = math.sqrt(per / self.ranks[k])
                c.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    def flops(self) -> int:
        """Multiply-adds per input row."""
        return mpo_flops(self.in_modes, self.out_modes, self.ranks)

    def num_parameters(self) -> int:
        return sum(c.numel() for c in self.cores) + (0 if self.bias is None else self.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(
                f"MPOLinear: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        lead = x.shape[:-1]
        b = math.prod(lead)
        # State (b, out_done, r_k, in_k, in_rest).
        t = x.reshape(b, 1, 1, self.in_modes[0], -1)
        for k, core in enumerate(self.cores):
            bb, od, r, i, ir = t.shape
            o, r2 = core.shape[2], core.shape[3]
            t = t.permute(0, 1, 4, 2, 3).reshape(bb * od * ir, r * i)
            t = t @ core.reshape(r * i, o * r2)
            t = t.reshape(bb, od, ir, o, r2).permute(0, 1, 3, 4, 2)
            nxt = self.in_modes[k + 1] if k + 1 < len(self.cores) else 1
            t = t.reshape(bb, od * o, r2, nxt, ir // nxt)
        y = t.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def to_matrix(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight (for checks; the forward never builds it)."""
        return mpo_to_matrix(list(self.cores))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        *,
        num_cores: int = 3,
        max_rank: Any = None,
        eps: float | None = None,
    ) -> MPOLinear:
        """Compresses a trained ``nn.Linear`` (bias kept dense). Modes default to the most
        balanced ``num_cores``-way factorizations of the features."""
        w = linear.weight.detach()
        im = list(in_modes) if in_modes is not None else balanced_modes(w.shape[1], num_cores)
        om = list(out_modes) if out_modes is not None else balanced_modes(w.shape[0], len(im))
        cores = mpo_decompose(w, im, om, max_rank=max_rank, eps=eps)
        ranks = [1] + [int(c.shape[-1]) for c in cores]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PerformanceWarning)
            m = cls(im, om, ranks, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        if m.flops() > m.in_features * m.out_features:
            warnings.warn(
                f"MPOLinear.from_linear: ranks {ranks} cost {m.flops()} multiply-adds per row, more "
                f"than the dense layer's {m.in_features * m.out_features}",
                PerformanceWarning,
                stacklevel=2,
            )
        with torch.no_grad():
            for p, c in zip(m.cores, cores, strict=True):
                p.copy_(c)
            if linear.bias is not None and m.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def extra_repr(self) -> str:
        return (
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
            f"bias={self.bias is not None}"
        )


class TuckerConv2d(nn.Module):
    """A ``Conv2d`` whose kernel ``(out, in, kh, kw)`` is Tucker-2 factored on its channel modes:
    a 1x1 conv to ``rank_in`` channels, the core conv (``rank_out x rank_in x kh x kw``, the
    original stride/padding/dilation), and a 1x1 conv to ``out`` channels (with the bias)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ranks: tuple[int, int],
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        r_out, r_in = int(ranks[0]), int(ranks[1])
        if not (1 <= r_out <= out_channels and 1 <= r_in <= in_channels):
            raise ArgumentError(
                f"TuckerConv2d: ranks {tuple(ranks)} must be in [1, out_channels] x [1, in_channels]"
            )
        kw = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, r_in, 1, bias=False, **kw)
        self.core = nn.Conv2d(
            r_in,
            r_out,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
            **kw,
        )
        self.last = nn.Conv2d(r_out, out_channels, 1, bias=bias, **kw)
        self.ranks = (r_out, r_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def to_weight(self) -> torch.Tensor:
        """The dense ``(out, in, kh, kw)`` kernel."""
        u_out = self.last.weight[:, :, 0, 0]  # (out, r_out)
        u_in = self.first.weight[:, :, 0, 0]  # (r_in, in)
        return torch.einsum("or,rskl,si->oikl", u_out, self.core.weight, u_in)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int], *, n_iter: int = 0) -> TuckerConv2d:
        """Tucker-2 (HOSVD, plus ``n_iter`` HOOI sweeps) of a trained ``Conv2d`` (groups=1)."""
        if conv.groups != 1:
            raise ArgumentError(f"TuckerConv2d.from_conv: groups ({conv.groups}) must be 1")
        w = conv.weight.detach()
        out_c, in_c, kh, kw_ = w.shape
        m = cls(
            in_c,
            out_c,
            (kh, kw_),
            ranks,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        core, (u_out, u_in, f_h, f_w) = tucker(w, [m.ranks[0], m.ranks[1], kh, kw_], n_iter=n_iter)
        # The spatial factors are square and orthogonal: fold them back into the core.
        core = torch.einsum("rskl,ak,bl->rsab", core, f_h, f_w)
        with torch.no_grad():
            m.first.weight.copy_(u_in.mT[:, :, None, None])
            m.core.weight.copy_(core)
            m.last.weight.copy_(u_out[:, :, None, None])
            if conv.bias is not None and m.last.bias is not None:
                m.last.bias.copy_(conv.bias.detach())
        return m
