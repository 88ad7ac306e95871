"""Every spruce torch custom op, in one place: schema, kernel, fake kernel and autograd.

The kernels call the native module on CPU tensors; public functions (``spruce.masks`` ...) call
these ops, so ``torch.ops.spruce.<name>`` is the same computation, usable under
``torch.compile(fullgraph=True)`` and with fake tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _core
from ._native import check_bool, check_cpu, check_float, from_numpy, to_numpy
from .errors import DeviceError, DTypeError

# ---------------------------------------------------------------------------------------------
# Selection and masks


@torch.library.custom_op("spruce::topk_mask", mutates_args=())
def topk_mask(scores: Tensor, sparsity: float, dim: int | None) -> Tensor:
    check_float("topk_mask", "scores", scores)
    return from_numpy(_core.topk_mask(to_numpy("topk_mask", "scores", scores), sparsity, dim))


@topk_mask.register_fake
def _(scores: Tensor, sparsity: float, dim: int | None) -> Tensor:
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.custom_op("spruce::global_topk_masks", mutates_args=())
def global_topk_masks(scores: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    arrays = []
    for s in scores:
        check_float("global_topk_masks", "scores", s)
        arrays.append(to_numpy("global_topk_masks", "scores", s))
    return [from_numpy(m) for m in _core.global_topk_masks(arrays, sparsity)]


@global_topk_masks.register_fake
def _(scores: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    return [s.new_empty(s.shape, dtype=torch.bool) for s in scores]


@torch.library.custom_op("spruce::nm_mask", mutates_args=())
def nm_mask(scores: Tensor, n: int, m: int, dim: int) -> Tensor:
    check_float("nm_mask", "scores", scores)
    return from_numpy(_core.nm_mask(to_numpy("nm_mask", "scores", scores), n, m, dim))


@nm_mask.register_fake
def _(scores: Tensor, n: int, m: int, dim: int) -> Tensor:
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.custom_op("spruce::structured_mask", mutates_args=())
def structured_mask(scores: Tensor, sparsity: float, dim: int, group_size: int, norm: float) -> Tensor:
    check_float("structured_mask", "scores", scores)
    arr = to_numpy("structured_mask", "scores", scores)
    return from_numpy(_core.structured_mask(arr, sparsity, dim, group_size, norm))


@structured_mask.register_fake
def _(scores: Tensor, sparsity: float, dim: int, group_size: int, norm: float) -> Tensor:
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.custom_op("spruce::random_mask", mutates_args=())
def random_mask(shape: Sequence[int], density: float, seed: int, device: torch.device) -> Tensor:
    if torch.device(device).type != "cpu":
        raise DeviceError(
            f"random_mask: device ({device}) must be cpu: this build of spruce has no "
            f"{torch.device(device).type} kernel for random_mask"
        )
    return from_numpy(_core.random_mask(list(shape), density, seed))


@random_mask.register_fake
def _(shape: Sequence[int], density: float, seed: int, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=torch.bool, device=device)


@torch.library.custom_op("spruce::pack_mask", mutates_args=())
def pack_mask(mask: Tensor) -> Tensor:
    check_bool("pack_mask", "mask", mask)
    return from_numpy(_core.pack_mask(to_numpy("pack_mask", "mask", mask)))


@pack_mask.register_fake
def _(mask: Tensor) -> Tensor:
    shape = list(mask.shape) or [1]
    shape[-1] = (shape[-1] + 7) // 8
    return mask.new_empty(shape, dtype=torch.uint8)


@torch.library.custom_op("spruce::unpack_mask", mutates_args=())
def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    check_cpu("unpack_mask", "packed", packed)
    if packed.dtype != torch.uint8:
        raise DTypeError(f"unpack_mask: packed has dtype {str(packed.dtype).replace('torch.', '')}, expected uint8")
    return from_numpy(_core.unpack_mask(packed.detach().contiguous().numpy(), list(shape)))


@unpack_mask.register_fake
def _(packed: Tensor, shape: Sequence[int]) -> Tensor:
    return packed.new_empty(list(shape), dtype=torch.bool)


@torch.library.custom_op("spruce::mask_to_csr", mutates_args=())
def mask_to_csr(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    check_float("mask_to_csr", "weight", weight)
    check_bool("mask_to_csr", "mask", mask)
    crow, col, val = _core.mask_to_csr(
        to_numpy("mask_to_csr", "weight", weight), to_numpy("mask_to_csr", "mask", mask)
    )
    return from_numpy(crow), from_numpy(col), from_numpy(val, weight.dtype)


@mask_to_csr.register_fake
def _(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    nnz = torch.library.get_ctx().new_dynamic_size()
    crow = weight.new_empty((weight.shape[0] + 1,), dtype=torch.int64)
    return crow, weight.new_empty((nnz,), dtype=torch.int64), weight.new_empty((nnz,))


@torch.library.custom_op("spruce::apply_mask_", mutates_args=("tensor",))
def apply_mask_(tensor: Tensor, mask: Tensor) -> None:
    tensor.masked_fill_(mask.logical_not(), 0)


@apply_mask_.register_fake
def _(tensor: Tensor, mask: Tensor) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Order statistics (differentiable: the gradient flows to the selected elements)


@torch.library.custom_op("spruce::kthvalue", mutates_args=())
def kthvalue(x: Tensor, k: int, dim: int | None) -> tuple[Tensor, Tensor]:
    check_float("kthvalue", "input", x)
    values, indices = _core.kthvalue(to_numpy("kthvalue", "input", x), k, dim)
    return from_numpy(values, x.dtype), from_numpy(indices)


def _reduced(x: Tensor, dim: int | None) -> list[int]:
    if dim is None:
        return []
    d = dim % max(x.dim(), 1)
    return [s for i, s in enumerate(x.shape) if i != d]


@kthvalue.register_fake
def _(x: Tensor, k: int, dim: int | None) -> tuple[Tensor, Tensor]:
    shape = _reduced(x, dim)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def _scatter_grad(shape: torch.Size, dim: int | None, index: Tensor, grad: Tensor, out: Tensor) -> None:
    """Adds ``grad`` into ``out`` (of ``shape``) at the positions ``index`` along ``dim``."""
    if dim is None:
        out.view(-1).index_put_((index.reshape(1),), grad.reshape(1).to(out.dtype), accumulate=True)
    else:
        d = dim % len(shape)
        out.scatter_add_(d, index.unsqueeze(d), grad.unsqueeze(d).to(out.dtype))


def _kth_setup(ctx, inputs, output) -> None:
    x, _k, dim = inputs
    ctx.shape, ctx.dim, ctx.dtype = x.shape, dim, x.dtype
    ctx.save_for_backward(output[1])


def _kth_backward(ctx, grad_values: Tensor, grad_indices: Tensor):
    (index,) = ctx.saved_tensors
    gx = grad_values.new_zeros(ctx.shape, dtype=ctx.dtype)
    _scatter_grad(ctx.shape, ctx.dim, index, grad_values, gx)
    return gx, None, None


kthvalue.register_autograd(_kth_backward, setup_context=_kth_setup)


@torch.library.custom_op("spruce::quantile", mutates_args=())
def quantile(x: Tensor, q: Sequence[float], dim: int | None) -> tuple[Tensor, Tensor, Tensor]:
    check_float("quantile", "input", x)
    values, lo, hi = _core.quantile(to_numpy("quantile", "input", x), list(q), dim)
    return from_numpy(values, x.dtype), from_numpy(lo), from_numpy(hi)


@quantile.register_fake
def _(x: Tensor, q: Sequence[float], dim: int | None) -> tuple[Tensor, Tensor, Tensor]:
    shape = [len(q), *_reduced(x, dim)]
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.int64)


def quantile_weight(q: float, n: int) -> float:
    """The interpolation weight of the upper order statistic (the native rule, in float64)."""
    pos = q * (n - 1)
    return pos - math.floor(pos)


def _q_setup(ctx, inputs, output) -> None:
    x, q, dim = inputs
    ctx.shape, ctx.q, ctx.dim, ctx.dtype = x.shape, list(q), dim, x.dtype
    ctx.n = x.numel() if dim is None else x.shape[dim]
    ctx.save_for_backward(output[1], output[2])


def _q_backward(ctx, grad: Tensor, _glo: Tensor, _ghi: Tensor):
    lo, hi = ctx.saved_tensors
    gx = grad.new_zeros(ctx.shape, dtype=ctx.dtype)
    for i, q in enumerate(ctx.q):
        w = quantile_weight(q, ctx.n)
        _scatter_grad(ctx.shape, ctx.dim, lo[i], grad[i] * (1.0 - w), gx)
        _scatter_grad(ctx.shape, ctx.dim, hi[i], grad[i] * w, gx)
    return gx, None, None


quantile.register_autograd(_q_backward, setup_context=_q_setup)


# ---------------------------------------------------------------------------------------------
# Pruning (spruce.prune)


# ---------------------------------------------------------------------------------------------
# Merging (spruce.merge)


# ---------------------------------------------------------------------------------------------
# Tensor networks (spruce.tn)


# ---------------------------------------------------------------------------------------------
# Structured matrices (spruce.structured, spruce.nn)


# ---------------------------------------------------------------------------------------------
# Graphs and distillation (spruce.graph, spruce.distill)
