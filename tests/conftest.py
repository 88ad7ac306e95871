"""Shared helpers of the tests: score generators with planted ties, bit-exact comparison, and a
fixture that restores spruce's thread count."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

import spruce

#: Every float dtype spruce's selection ops accept.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: Kinds of generated scores: continuous, a coarse grid (many ties, -0.0 beside +0.0), all
#: equal, and only signed zeros.
KINDS = ("randn", "ties", "equal", "zeros")

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def make_scores(
    shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0, kind: str = "randn"
) -> torch.Tensor:
    """A fresh CPU tensor of ``shape`` and ``dtype`` (drawn in float64, then cast).

    ``"ties"`` rounds to a grid of step 0.5 in [-1.5, 1.5] and turns about half of the zeros
    into ``-0.0``; ``"equal"`` is one repeated value; ``"zeros"`` mixes ``-0.0`` and ``+0.0``.
    """
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if kind == "randn":
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "ties":
        x = torch.randint(-3, 4, shape, generator=g).to(torch.float64) / 2
    elif kind == "equal":
        x = torch.full(shape, 0.75, dtype=torch.float64)
    elif kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    negative_zero = torch.rand(shape, generator=g) < 0.5
    x = torch.where((x == 0) & negative_zero, torch.full_like(x, -0.0), x)
    return x.to(dtype)


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous tensor equal to ``x``: ``"transposed"`` (a permuted copy viewed back) or
    ``"step"`` (every other element of a twice-as-long last dimension); ``"contiguous"``: x."""
    if layout == "contiguous" or x.dim() == 0:
        return x
    if layout == "transposed":
        rev = list(range(x.dim() - 1, -1, -1))
        return x.permute(rev).contiguous().permute(rev)
    if layout == "step":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(f"unknown layout {layout!r}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor as integers (so ``-0.0`` differs from ``+0.0``, NaN equals NaN)."""
    if t.dtype == torch.bool or not t.is_floating_point():
        return t
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bit pattern."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


class Snapshot:
    """Remembers tensors' bits to assert later that nothing modified them."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors
        self.copies = [t.clone() for t in tensors]

    def assert_unchanged(self) -> None:
        for t, c in zip(self.tensors, self.copies, strict=True):
            assert same_bits(t, c), "an input was modified"


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Restores spruce's default thread count after the test."""
    yield
    spruce.set_num_threads(0)
