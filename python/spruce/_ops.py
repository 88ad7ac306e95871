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
def structured_mask(
    scores: Tensor, sparsity: float, dim: int, group_size: int, norm: float
) -> Tensor:
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
        raise DTypeError(
            f"unpack_mask: packed has dtype {str(packed.dtype).replace('torch.', '')}, expected uint8"
        )
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


def _scatter_grad(
    shape: torch.Size, dim: int | None, index: Tensor, grad: Tensor, out: Tensor
) -> None:
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
    return (
        x.new_empty(shape),
        x.new_empty(shape, dtype=torch.int64),
        x.new_empty(shape, dtype=torch.int64),
    )


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


def _stat_array(op: str, stat: Tensor | None):
    """A per-column statistic as the contiguous float32 vector the native kernels read."""
    if stat is None:
        return None
    from .errors import ShapeError

    check_cpu(op, "stat", stat)
    if stat.dim() != 1:
        raise ShapeError(f"{op}: stat has shape {tuple(stat.shape)}, expected a 1-D vector")
    return stat.detach().to(torch.float32).contiguous().numpy()


def _score_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


@torch.library.custom_op("spruce::wanda_scores", mutates_args=())
def wanda_scores(weight: Tensor, stat: Tensor | None) -> Tensor:
    check_float("wanda_scores", "weight", weight)
    w = to_numpy("wanda_scores", "weight", weight)
    return from_numpy(_core.wanda_scores(w, _stat_array("wanda_scores", stat)))


@wanda_scores.register_fake
def _(weight: Tensor, stat: Tensor | None) -> Tensor:
    return weight.new_empty(weight.shape, dtype=_score_dtype(weight))


@torch.library.custom_op("spruce::wanda_mask", mutates_args=())
def wanda_mask(weight: Tensor, stat: Tensor | None, sparsity: float, n: int, m: int) -> Tensor:
    check_float("wanda_mask", "weight", weight)
    w = to_numpy("wanda_mask", "weight", weight)
    return from_numpy(_core.wanda_mask(w, _stat_array("wanda_mask", stat), sparsity, n, m))


@wanda_mask.register_fake
def _(weight: Tensor, stat: Tensor | None, sparsity: float, n: int, m: int) -> Tensor:
    return weight.new_empty(weight.shape, dtype=torch.bool)


def _seg_arrays(op: str, weights: Sequence[Tensor], stats: Sequence[Tensor | None]):
    from .errors import ArgumentError

    if len(stats) != len(weights):
        raise ArgumentError(
            f"{op}: stats (a list of {len(stats)}) must have one entry per weight ({len(weights)})"
        )
    arrays, stat_arrays = [], []
    for w, s in zip(weights, stats, strict=True):
        check_float(op, "weights", w)
        arrays.append(to_numpy(op, "weights", w))
        stat_arrays.append(_stat_array(op, s))
    return arrays, stat_arrays


@torch.library.custom_op("spruce::score_threshold", mutates_args=())
def score_threshold(
    weights: Sequence[Tensor],
    stats: Sequence[Tensor | None],
    transposed: Sequence[bool],
    sparsity: float,
) -> tuple[Tensor, Tensor]:
    arrays, stat_arrays = _seg_arrays("score_threshold", weights, stats)
    value, ties = _core.score_threshold(arrays, stat_arrays, list(transposed), sparsity)
    return torch.tensor(value, dtype=torch.float64), torch.tensor(ties, dtype=torch.int64)


@score_threshold.register_fake
def _(weights, stats, transposed, sparsity) -> tuple[Tensor, Tensor]:
    dev = weights[0].device if len(weights) else torch.device("cpu")
    return torch.empty((), dtype=torch.float64, device=dev), torch.empty(
        (), dtype=torch.int64, device=dev
    )


@torch.library.custom_op("spruce::threshold_mask", mutates_args=())
def threshold_mask(
    weight: Tensor, stat: Tensor | None, transposed: bool, value: float, ties: int
) -> tuple[Tensor, Tensor]:
    check_float("threshold_mask", "weight", weight)
    w = to_numpy("threshold_mask", "weight", weight)
    mask, used = _core.threshold_mask(
        w, _stat_array("threshold_mask", stat), transposed, value, ties
    )
    return from_numpy(mask), torch.tensor(used, dtype=torch.int64)


@threshold_mask.register_fake
def _(weight, stat, transposed, value, ties) -> tuple[Tensor, Tensor]:
    return weight.new_empty(weight.shape, dtype=torch.bool), weight.new_empty((), dtype=torch.int64)


@torch.library.custom_op("spruce::threshold_prune_", mutates_args=("weight",))
def threshold_prune_(
    weight: Tensor, stat: Tensor | None, transposed: bool, value: float, ties: int
) -> Tensor:
    check_float("threshold_prune_", "weight", weight)
    check_cpu("threshold_prune_", "weight", weight)
    t = weight.detach()
    work = t if t.is_contiguous() else t.contiguous()
    view = work.view(torch.uint16) if work.dtype == torch.bfloat16 else work
    pruned, used = _core.threshold_prune_(
        view.numpy(), _stat_array("threshold_prune_", stat), transposed, value, ties
    )
    if work is not t:
        t.copy_(work)
    return torch.tensor([pruned, used], dtype=torch.int64)


@threshold_prune_.register_fake
def _(weight, stat, transposed, value, ties) -> Tensor:
    return weight.new_empty((2,), dtype=torch.int64)


@torch.library.custom_op("spruce::outlier_count", mutates_args=())
def outlier_count(
    weights: Sequence[Tensor], stats: Sequence[Tensor | None], transposed: Sequence[bool], m: float
) -> Tensor:
    arrays, stat_arrays = _seg_arrays("outlier_count", weights, stats)
    count, total = _core.outlier_count(arrays, stat_arrays, list(transposed), m)
    return torch.tensor([count, total], dtype=torch.int64)


@outlier_count.register_fake
def _(weights, stats, transposed, m) -> Tensor:
    dev = weights[0].device if len(weights) else torch.device("cpu")
    return torch.empty((2,), dtype=torch.int64, device=dev)


@torch.library.custom_op("spruce::ks_2samp", mutates_args=())
def ks_2samp(before: Tensor, after: Tensor, method: str) -> tuple[Tensor, Tensor]:
    check_float("ks_2samp", "before", before)
    check_float("ks_2samp", "after", after)
    a = to_numpy("ks_2samp", "before", before)
    b = to_numpy("ks_2samp", "after", after)
    stat, p = _core.ks_2samp(a, b, method)
    return from_numpy(stat), from_numpy(p)


@ks_2samp.register_fake
def _(before: Tensor, after: Tensor, method: str) -> tuple[Tensor, Tensor]:
    rows = before.shape[0]
    return before.new_empty((rows,), dtype=torch.float64), before.new_empty(
        (rows,), dtype=torch.float64
    )


# ---------------------------------------------------------------------------------------------
# Merging (spruce.merge)


def _merge_spec(
    combine: str,
    votes: str,
    weighted: bool,
    zero_positive: bool,
    divisor: str,
    normalize: bool,
    sparsify: str,
    gamma: float,
    epsilon: float,
    rank_rule: str,
    rescale: str,
    weights: Sequence[float],
    densities: Sequence[float],
    scale: float,
    t: float,
    fisher_floor: float,
    seed: int,
) -> dict:
    """The native module's merge specification (plain values, checked natively)."""
    return {
        "combine": combine,
        "votes": votes,
        "weighted": bool(weighted),
        "zero_positive": bool(zero_positive),
        "divisor": divisor,
        "normalize": bool(normalize),
        "sparsify": sparsify,
        "gamma": float(gamma),
        "epsilon": float(epsilon),
        "rank_rule": rank_rule,
        "rescale": rescale,
        "weights": [float(w) for w in weights],
        "densities": [float(d) for d in densities],
        "scale": float(scale),
        "t": float(t),
        "fisher_floor": float(fisher_floor),
        "seed": int(seed),
    }


def _merge_native(
    fn,
    base: Tensor | None,
    models: Sequence[Tensor],
    fisher: Sequence[Tensor],
    masks: Sequence[Tensor],
    cuts: Sequence[int],
    spec: dict,
):
    """Zero-copy views of the inputs, then the native call. Fisher tensors cross in the
    accumulator type (float64 for float64 models, else float32); cuts as (key, end) pairs whose
    key is an int64 reinterpreted as unsigned."""
    if not models:
        from .errors import ArgumentError

        raise ArgumentError("merge: models (0 tensors) must hold at least one model")
    arrays = []
    for m in models:
        check_float("merge", "models", m)
        arrays.append(to_numpy("merge", "models", m))
    b = None
    if base is not None:
        check_float("merge", "base", base)
        b = to_numpy("merge", "base", base)
    acc = torch.float64 if models[0].dtype == torch.float64 else torch.float32
    fis = []
    for f in fisher:
        check_float("merge", "fisher", f)
        check_cpu("merge", "fisher", f)
        fis.append(f.detach().to(acc).contiguous().numpy())
    ms = []
    for m in masks:
        check_bool("merge", "masks", m)
        ms.append(to_numpy("merge", "masks", m))
    pairs = [(int(cuts[i]) & (2**64 - 1), int(cuts[i + 1])) for i in range(0, len(cuts), 2)]
    return fn(b, arrays, fis, ms, pairs, spec)


@torch.library.custom_op("spruce::merge", mutates_args=())
def merge(
    base: Tensor | None,
    models: Sequence[Tensor],
    fisher: Sequence[Tensor],
    masks: Sequence[Tensor],
    cuts: Sequence[int],
    combine: str,
    votes: str,
    weighted: bool,
    zero_positive: bool,
    divisor: str,
    normalize: bool,
    sparsify: str,
    gamma: float,
    epsilon: float,
    rank_rule: str,
    rescale: str,
    weights: Sequence[float],
    densities: Sequence[float],
    scale: float,
    t: float,
    fisher_floor: float,
    seed: int,
) -> Tensor:
    """One fused merge of a tensor (the conventions are resolved by ``spruce.merge``)."""
    spec = _merge_spec(
        combine, votes, weighted, zero_positive, divisor, normalize, sparsify, gamma, epsilon,
        rank_rule, rescale, weights, densities, scale, t, fisher_floor, seed,
    )  # fmt: skip
    out = _merge_native(_core.merge, base, models, fisher, masks, cuts, spec)
    return from_numpy(out, models[0].dtype)


def _span(t: Tensor) -> tuple[int, int]:
    """The byte range a strided tensor's elements occupy (torch strides are never negative)."""
    if t.numel() == 0:
        return (0, 0)
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return (t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size())


def _overlap(a: Tensor, b: Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


@torch.library.custom_op("spruce::merge_into", mutates_args=("out",))
def merge_into(
    out: Tensor,
    base: Tensor | None,
    models: Sequence[Tensor],
    fisher: Sequence[Tensor],
    masks: Sequence[Tensor],
    cuts: Sequence[int],
    combine: str,
    votes: str,
    weighted: bool,
    zero_positive: bool,
    divisor: str,
    normalize: bool,
    sparsify: str,
    gamma: float,
    epsilon: float,
    rank_rule: str,
    rescale: str,
    weights: Sequence[float],
    densities: Sequence[float],
    scale: float,
    t: float,
    fisher_floor: float,
    seed: int,
) -> None:
    """:func:`merge` written into ``out`` (the models' dtype and element count, contiguous, sharing no
    memory with the inputs): streaming merges reuse one output buffer from tensor to tensor."""
    from .errors import ArgumentError

    if models and out.dtype != models[0].dtype:
        raise DTypeError(
            f"merge: out has dtype {str(out.dtype).replace('torch.', '')}, expected the models' "
            f"dtype {str(models[0].dtype).replace('torch.', '')}"
        )
    if not out.is_contiguous():
        raise ArgumentError("merge: out must be a contiguous tensor")
    inputs = [t for t in (base, *models, *fisher, *masks) if t is not None]
    if any(_overlap(out, t) for t in inputs):
        raise ArgumentError(
            "merge: out shares memory with an input; expected a separate buffer (inputs are "
            "never modified)"
        )
    spec = _merge_spec(
        combine, votes, weighted, zero_positive, divisor, normalize, sparsify, gamma, epsilon,
        rank_rule, rescale, weights, densities, scale, t, fisher_floor, seed,
    )  # fmt: skip
    dst = to_numpy("merge", "out", out)
    _merge_native(lambda *a: _core.merge_into(dst, *a), base, models, fisher, masks, cuts, spec)


@merge_into.register_fake
def _(
    out: Tensor,
    base: Tensor | None,
    models: Sequence[Tensor],
    fisher: Sequence[Tensor],
    masks: Sequence[Tensor],
    cuts: Sequence[int],
    combine: str,
    votes: str,
    weighted: bool,
    zero_positive: bool,
    divisor: str,
    normalize: bool,
    sparsify: str,
    gamma: float,
    epsilon: float,
    rank_rule: str,
    rescale: str,
    weights: Sequence[float],
    densities: Sequence[float],
    scale: float,
    t: float,
    fisher_floor: float,
    seed: int,
) -> None:
    return None


@merge.register_fake
def _(
    base: Tensor | None,
    models: Sequence[Tensor],
    fisher: Sequence[Tensor],
    masks: Sequence[Tensor],
    cuts: Sequence[int],
    combine: str,
    votes: str,
    weighted: bool,
    zero_positive: bool,
    divisor: str,
    normalize: bool,
    sparsify: str,
    gamma: float,
    epsilon: float,
    rank_rule: str,
    rescale: str,
    weights: Sequence[float],
    densities: Sequence[float],
    scale: float,
    t: float,
    fisher_floor: float,
    seed: int,
) -> Tensor:
    return models[0].new_empty(models[0].shape)


@torch.library.custom_op("spruce::merge_coefficients", mutates_args=())
def merge_coefficients(
    base: Tensor | None,
    models: Sequence[Tensor],
    fisher: Sequence[Tensor],
    masks: Sequence[Tensor],
    cuts: Sequence[int],
    combine: str,
    votes: str,
    weighted: bool,
    zero_positive: bool,
    divisor: str,
    normalize: bool,
    sparsify: str,
    gamma: float,
    epsilon: float,
    rank_rule: str,
    rescale: str,
    weights: Sequence[float],
    densities: Sequence[float],
    scale: float,
    t: float,
    fisher_floor: float,
    seed: int,
) -> Tensor:
    """The per-model coefficients ``c`` of a merge: ``base + Σ c[k] (models[k] - base)``."""
    spec = _merge_spec(
        combine, votes, weighted, zero_positive, divisor, normalize, sparsify, gamma, epsilon,
        rank_rule, rescale, weights, densities, scale, t, fisher_floor, seed,
    )  # fmt: skip
    return from_numpy(
        _merge_native(_core.merge_coefficients, base, models, fisher, masks, cuts, spec)
    )


@merge_coefficients.register_fake
def _(
    base: Tensor | None,
    models: Sequence[Tensor],
    fisher: Sequence[Tensor],
    masks: Sequence[Tensor],
    cuts: Sequence[int],
    combine: str,
    votes: str,
    weighted: bool,
    zero_positive: bool,
    divisor: str,
    normalize: bool,
    sparsify: str,
    gamma: float,
    epsilon: float,
    rank_rule: str,
    rescale: str,
    weights: Sequence[float],
    densities: Sequence[float],
    scale: float,
    t: float,
    fisher_floor: float,
    seed: int,
) -> Tensor:
    acc = torch.float64 if models[0].dtype == torch.float64 else torch.float32
    return models[0].new_empty((len(models), *models[0].shape), dtype=acc)


def _merge_setup(ctx, inputs, output) -> None:
    base, models, fisher, masks, cuts, *rest = inputs
    ctx.rest = rest
    ctx.cuts = list(cuts)
    ctx.has_base = base is not None
    ctx.n = len(models)
    ctx.n_fisher = len(fisher)
    ctx.n_masks = len(masks)
    ctx.fisher_grad = any(f.requires_grad for f in fisher)
    ctx.dtypes = [m.dtype for m in models]
    ctx.base_dtype = base.dtype if base is not None else None
    saved = ([base] if base is not None else []) + list(models) + list(fisher) + list(masks)
    ctx.save_for_backward(*saved)


def _merge_backward(ctx, grad: Tensor):
    from .errors import ArgumentError as _ArgumentError

    saved = list(ctx.saved_tensors)
    base = saved.pop(0) if ctx.has_base else None
    models, saved = saved[: ctx.n], saved[ctx.n :]
    fisher, masks = saved[: ctx.n_fisher], saved[ctx.n_fisher :]
    combine, rescale, sparsify = ctx.rest[0], ctx.rest[10], ctx.rest[6]
    if ctx.fisher_grad:
        raise _ArgumentError(
            "merge: no gradient flows to the Fisher tensors (they weight the models); "
            "detach them before merging"
        )
    if combine in ("slerp", "pcb") or (rescale == "l1" and sparsify != "none"):
        what = combine if combine in ("slerp", "pcb") else "L1 rescaling"
        raise _ArgumentError(
            f"merge: {what} is not differentiable through spruce (its coefficients depend on the "
            "inputs through norms and order statistics); detach the inputs"
        )
    coef = merge_coefficients(base, models, fisher, masks, ctx.cuts, *ctx.rest)
    g = grad.to(coef.dtype)
    grads = [(g * coef[k]).to(ctx.dtypes[k]) for k in range(ctx.n)]
    gbase = None
    if base is not None:
        gbase = (g - g * coef.sum(0)).to(ctx.base_dtype)
    # lists of tensors (empty lists included) take one entry per element; other arguments None
    return (
        gbase,
        grads,
        [None] * ctx.n_fisher,
        [None] * ctx.n_masks,
        [] if not ctx.cuts else None,
        *(None for _ in ctx.rest),
    )


merge.register_autograd(_merge_backward, setup_context=_merge_setup)


# ---------------------------------------------------------------------------------------------
# Tensor networks (spruce.tn)


# ---------------------------------------------------------------------------------------------
# Structured matrices (spruce.structured, spruce.nn)


# Butterfly products and the Walsh–Hadamard transform run in the native kernels (one fused pass
# over all factors per row tile). Kronecker, Monarch and the block-diagonal BOFT factors are
# reshaped GEMMs: they run on torch's BLAS, and their backward is written out here so that
# autograd keeps only the inputs (never a Kronecker product, a dense rotation, or a per-factor
# intermediate).


def _same_float(op: str, pairs: Sequence[tuple[str, Tensor]]) -> None:
    first_name, first = pairs[0]
    check_float(op, first_name, first)
    check_cpu(op, first_name, first)
    for name, t in pairs[1:]:
        check_float(op, name, t)
        check_cpu(op, name, t)
        if t.dtype != first.dtype:
            raise DTypeError(
                f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}, expected the dtype "
                f"of {first_name} ({str(first.dtype).replace('torch.', '')})"
            )


def _butterfly_out_size(twiddle: Tensor, output_size: int | None) -> int:
    return (1 << twiddle.shape[2]) if output_size is None else output_size


@torch.library.custom_op("spruce::butterfly_multiply", mutates_args=())
def butterfly_multiply(
    twiddle: Tensor, x: Tensor, increasing_stride: bool, output_size: int | None, transpose: bool
) -> Tensor:
    _same_float("butterfly_multiply", [("x", x), ("twiddle", twiddle)])
    y = _core.butterfly_multiply(
        to_numpy("butterfly_multiply", "twiddle", twiddle),
        to_numpy("butterfly_multiply", "x", x),
        increasing_stride,
        output_size,
        transpose,
    )
    return from_numpy(y, x.dtype)


@butterfly_multiply.register_fake
def _(
    twiddle: Tensor, x: Tensor, increasing_stride: bool, output_size: int | None, transpose: bool
) -> Tensor:
    return x.new_empty((x.shape[0], twiddle.shape[0], _butterfly_out_size(twiddle, output_size)))


@torch.library.custom_op("spruce::butterfly_multiply_backward", mutates_args=())
def butterfly_multiply_backward(
    grad: Tensor,
    twiddle: Tensor,
    x: Tensor,
    increasing_stride: bool,
    output_size: int | None,
    transpose: bool,
) -> tuple[Tensor, Tensor]:
    op = "butterfly_multiply_backward"
    _same_float(op, [("x", x), ("twiddle", twiddle), ("grad", grad)])
    gt, gx = _core.butterfly_multiply_backward(
        to_numpy(op, "twiddle", twiddle),
        to_numpy(op, "x", x),
        to_numpy(op, "grad", grad),
        increasing_stride,
        output_size,
        transpose,
    )
    return from_numpy(gt, twiddle.dtype), from_numpy(gx, x.dtype)


@butterfly_multiply_backward.register_fake
def _(
    grad: Tensor,
    twiddle: Tensor,
    x: Tensor,
    increasing_stride: bool,
    output_size: int | None,
    transpose: bool,
) -> tuple[Tensor, Tensor]:
    return twiddle.new_empty(twiddle.shape), x.new_empty(x.shape)


def _bfly_setup(ctx, inputs, output) -> None:
    twiddle, x, inc, out, tr = inputs
    ctx.args = (inc, out, tr)
    ctx.save_for_backward(twiddle, x)


def _bfly_backward(ctx, grad: Tensor):
    twiddle, x = ctx.saved_tensors
    gt, gx = butterfly_multiply_backward(grad.contiguous(), twiddle, x, *ctx.args)
    return gt, gx, None, None, None


butterfly_multiply.register_autograd(_bfly_backward, setup_context=_bfly_setup)


@torch.library.custom_op("spruce::fwht", mutates_args=())
def fwht(x: Tensor, normalized: bool) -> Tensor:
    check_float("fwht", "x", x)
    return from_numpy(_core.fwht(to_numpy("fwht", "x", x), normalized), x.dtype)


@fwht.register_fake
def _(x: Tensor, normalized: bool) -> Tensor:
    return x.new_empty(x.shape)


def _fwht_setup(ctx, inputs, output) -> None:
    ctx.normalized = inputs[1]


def _fwht_backward(ctx, grad: Tensor):
    # The Hadamard matrix is symmetric: the adjoint is the transform itself.
    return fwht(grad.contiguous(), ctx.normalized), None


fwht.register_autograd(_fwht_backward, setup_context=_fwht_setup)


# Kronecker products, as mode products on x viewed as (batch, n_1, ..., n_k). Mode i applies
# F_i (out_i, in_i) along axis i: one GEMM for the last axis, a broadcast batched GEMM elsewhere.


def _mode_product(t: Tensor, f: Tensor, pre: int, post: int, out: Tensor | None = None) -> Tensor:
    """``t`` viewed as (pre, n, post) -> (pre, out, post) with ``f`` (out, n) applied to n.

    ``out``, when given, is a contiguous destination of ``pre * out * post`` elements."""
    o, n = f.shape
    if post == 1:
        if out is None:
            return torch.mm(t.reshape(pre, n), f.t())
        return torch.mm(t.reshape(pre, n), f.t(), out=out.view(pre, o))
    if out is None:
        return torch.matmul(f, t.reshape(pre, n, post))
    return torch.matmul(f, t.reshape(pre, n, post), out=out.view(pre, o, post))


# Elements of the widest partial product per row block of the forward: 2^19 (2 MiB in float32)
# keeps each block's intermediates in the cache between the mode products, instead of writing a
# whole (rows, ...) intermediate to memory and reading it back (1.35x faster than torch's vec
# trick A @ X @ B.T for two 64 x 64 factors on 4096 rows).
_KRON_BLOCK = 1 << 19


def _kron_apply(factors: Sequence[Tensor], x2: Tensor) -> Tensor:
    """The forward alone: every mode product per block of rows, the last one into the output."""
    ins = [f.shape[1] for f in factors]
    outs = [f.shape[0] for f in factors]
    rows, k = x2.shape[0], len(factors)
    width = max(math.prod(outs[:i]) * math.prod(ins[i:]) for i in range(k + 1))
    block = max(1, _KRON_BLOCK // max(1, width))
    y = x2.new_empty((rows, math.prod(outs)))
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        t = x2[start:stop]
        for i, f in enumerate(factors):
            pre = (stop - start) * math.prod(outs[:i])
            post = math.prod(ins[i + 1 :])
            t = _mode_product(t, f, pre, post, y[start:stop] if i == k - 1 else None)
    return y


def _mode_gram(q: Tensor, p: Tensor, pre: int, post: int, o: int, n: int) -> Tensor:
    """``sum_{a,c} q[a, o, c] p[a, n, c]`` for q viewed (pre, o, post) and p (pre, n, post)."""
    if post == 1:
        return torch.mm(q.reshape(pre, o).t(), p.reshape(pre, n))
    return torch.tensordot(q.reshape(pre, o, post), p.reshape(pre, n, post), dims=([0, 2], [0, 2]))


def _kron_forward(factors: Sequence[Tensor], x2: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Applies every factor, mode by mode; returns the result and the input of every mode."""
    ins = [f.shape[1] for f in factors]
    outs = [f.shape[0] for f in factors]
    rows = x2.shape[0]
    t = x2
    inputs = []
    for i, f in enumerate(factors):
        inputs.append(t)
        pre = rows * math.prod(outs[:i])
        post = math.prod(ins[i + 1 :])
        t = _mode_product(t, f, pre, post)
    return t.reshape(rows, math.prod(outs)), inputs


def _kron_check(op: str, factors: Sequence[Tensor], x: Tensor) -> None:
    from .errors import ShapeError

    if len(factors) == 0:
        raise ShapeError(f"{op}: factors (an empty list) must hold at least one matrix")
    _same_float(op, [("x", x), *[("factors", f) for f in factors]])
    for i, f in enumerate(factors):
        if f.dim() != 2:
            raise ShapeError(
                f"{op}: factors[{i}] has shape {tuple(f.shape)}, expected a matrix (out_i, in_i)"
            )
    n = math.prod([f.shape[1] for f in factors])
    if x.dim() != 2 or x.shape[1] != n:
        raise ShapeError(
            f"{op}: x has shape {tuple(x.shape)}, expected (batch, {n}) (the product of the factors' "
            f"input sizes)"
        )


@torch.library.custom_op("spruce::kron_matmul", mutates_args=())
def kron_matmul(factors: Sequence[Tensor], x: Tensor) -> Tensor:
    _kron_check("kron_matmul", factors, x)
    return _kron_apply(list(factors), x)


@kron_matmul.register_fake
def _(factors: Sequence[Tensor], x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], math.prod([f.shape[0] for f in factors])))


def _kron_setup(ctx, inputs, output) -> None:
    factors, x = inputs
    ctx.k = len(factors)
    ctx.save_for_backward(x, *factors)


def _kron_backward(ctx, grad: Tensor):
    x, *factors = ctx.saved_tensors
    ins = [f.shape[1] for f in factors]
    outs = [f.shape[0] for f in factors]
    rows = x.shape[0]
    _, inputs = _kron_forward(factors, x)
    grads: list[Tensor | None] = [None] * len(factors)
    q = grad.contiguous()
    for i in range(len(factors) - 1, -1, -1):
        pre = rows * math.prod(outs[:i])
        post = math.prod(ins[i + 1 :])
        if ctx.needs_input_grad[0]:
            grads[i] = _mode_gram(q, inputs[i], pre, post, outs[i], ins[i])
        q = _mode_product(q, factors[i].t(), pre, post)
    gx = q.reshape(rows, math.prod(ins)) if ctx.needs_input_grad[1] else None
    return grads, gx


kron_matmul.register_autograd(_kron_backward, setup_context=_kron_setup)


def _kron_sum_parts(As: Tensor, Bs: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x as (rows * n1, n2), B stacked as (s * o2, n2), A as (o1, n1 * s) with column (i, s)."""
    s, o1, n1 = As.shape
    _, o2, n2 = Bs.shape
    x2 = x.reshape(-1, n2)
    b2 = Bs.reshape(s * o2, n2)
    a2 = As.permute(1, 2, 0).reshape(o1, n1 * s)
    return x2, b2, a2


@torch.library.custom_op("spruce::kron_sum_matmul", mutates_args=())
def kron_sum_matmul(As: Tensor, Bs: Tensor, x: Tensor) -> Tensor:
    from .errors import ShapeError

    _same_float("kron_sum_matmul", [("x", x), ("As", As), ("Bs", Bs)])
    if As.dim() != 3 or Bs.dim() != 3 or As.shape[0] != Bs.shape[0]:
        raise ShapeError(
            f"kron_sum_matmul: As {tuple(As.shape)} and Bs {tuple(Bs.shape)} must be stacks "
            f"(s, out_a, in_a) and (s, out_b, in_b) of the same length s"
        )
    s, o1, n1 = As.shape
    _, o2, n2 = Bs.shape
    if x.dim() != 2 or x.shape[1] != n1 * n2:
        raise ShapeError(
            f"kron_sum_matmul: x has shape {tuple(x.shape)}, expected (batch, {n1 * n2})"
        )
    rows = x.shape[0]
    x2, b2, a2 = _kron_sum_parts(As, Bs, x)
    t = torch.mm(x2, b2.t()).reshape(rows, n1 * s, o2)  # T[b, (i, s), q]
    return torch.matmul(a2, t).reshape(rows, o1 * o2)


@kron_sum_matmul.register_fake
def _(As: Tensor, Bs: Tensor, x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], As.shape[1] * Bs.shape[1]))


def _kron_sum_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _kron_sum_backward(ctx, grad: Tensor):
    As, Bs, x = ctx.saved_tensors
    s, o1, n1 = As.shape
    _, o2, n2 = Bs.shape
    rows = x.shape[0]
    x2, b2, a2 = _kron_sum_parts(As, Bs, x)
    g = grad.reshape(rows, o1, o2)
    ga = gb = gx = None
    if ctx.needs_input_grad[0]:
        t = torch.mm(x2, b2.t()).reshape(rows, n1 * s, o2)
        ga2 = torch.tensordot(g, t, dims=([0, 2], [0, 2]))  # (o1, n1 * s)
        ga = ga2.reshape(o1, n1, s).permute(2, 0, 1)
    u = torch.matmul(a2.t(), g).reshape(rows * n1, s * o2)  # U[b, i, s, q]
    if ctx.needs_input_grad[1]:
        gb = torch.mm(u.t(), x2).reshape(s, o2, n2)
    if ctx.needs_input_grad[2]:
        gx = torch.mm(u, b2).reshape(rows, n1 * n2)
    return ga, gb, gx


kron_sum_matmul.register_autograd(_kron_sum_backward, setup_context=_kron_sum_setup)


# Monarch (block-diagonal, permute, block-diagonal), in the layout of fly's reference:
# w1 (k, q, p), w2 (l, s, r) with k p = n and l r = k q.


def _monarch_mid(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """The input of the second block-diagonal factor, as (l, rows, r)."""
    k, q, p = w1.shape
    nl, s, r = w2.shape
    rows = x.shape[0]
    u = torch.bmm(x.reshape(rows, k, p).transpose(0, 1), w1.transpose(1, 2))  # (k, rows, q)
    return u.transpose(0, 1).reshape(rows, r, nl).permute(2, 0, 1).contiguous()


@torch.library.custom_op("spruce::monarch_multiply", mutates_args=())
def monarch_multiply(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    from .errors import ShapeError

    _same_float("monarch_multiply", [("x", x), ("w1", w1), ("w2", w2)])
    if w1.dim() != 3 or w2.dim() != 3:
        raise ShapeError(
            f"monarch_multiply: w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} must be (k, q, p) "
            f"and (l, s, r)"
        )
    k, q, p = w1.shape
    nl, s, r = w2.shape
    if nl * r != k * q:
        raise ShapeError(
            f"monarch_multiply: w2 has shape {tuple(w2.shape)}, expected l * r == k * q "
            f"({k * q}) for w1 of shape {tuple(w1.shape)}"
        )
    if x.dim() != 2 or x.shape[1] != k * p:
        raise ShapeError(
            f"monarch_multiply: x has shape {tuple(x.shape)}, expected (batch, {k * p})"
        )
    v = _monarch_mid(x, w1, w2)
    out = torch.bmm(v, w2.transpose(1, 2))  # (l, rows, s)
    return out.permute(1, 2, 0).reshape(x.shape[0], s * nl)


@monarch_multiply.register_fake
def _(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w2.shape[0] * w2.shape[1]))


def _monarch_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _monarch_backward(ctx, grad: Tensor):
    x, w1, w2 = ctx.saved_tensors
    k, q, p = w1.shape
    nl, s, r = w2.shape
    rows = x.shape[0]
    v = _monarch_mid(x, w1, w2)
    g2 = grad.reshape(rows, s, nl).permute(2, 0, 1)  # (l, rows, s)
    gw2 = torch.bmm(g2.transpose(1, 2), v) if ctx.needs_input_grad[2] else None
    gv = torch.bmm(g2, w2)  # (l, rows, r)
    gu = gv.permute(1, 2, 0).reshape(rows, k, q).transpose(0, 1)  # (k, rows, q)
    x3 = x.reshape(rows, k, p).transpose(0, 1)  # (k, rows, p)
    gw1 = torch.bmm(gu.transpose(1, 2), x3) if ctx.needs_input_grad[1] else None
    gx = torch.bmm(gu, w1).transpose(0, 1).reshape(rows, k * p) if ctx.needs_input_grad[0] else None
    return gx, gw1, gw2


monarch_multiply.register_autograd(_monarch_backward, setup_context=_monarch_setup)


# BOFT: R = F_m ... F_0 with F_i = P_i blockdiag(B_i) P_i^T (PEFT's order and permutations).
# Rows of x are processed as columns of x^T (n, rows): every permutation is then a gather of
# whole rows and every block-diagonal factor one batched GEMM of (b x b) @ (b x rows).


def boft_permutation(n: int, nblocks: int, block_size: int, level: int, levels: int) -> list[int]:
    """PEFT's butterfly permutation of level ``level`` (of ``levels`` = m + 1): inside groups of
    ``block_size * 2**level`` features, chunks of ``block_size / 2`` are reordered even chunks
    first, then odd ones. Level 0, and every level when ``levels == 1``, is the identity."""
    if levels <= 1 or level == 0:
        return list(range(n))
    group = block_size << level
    half = block_size // 2
    chunks = group // half
    order = [c for c in range(0, chunks, 2)] + [c for c in range(1, chunks, 2)]
    inner = [c * half + j for c in order for j in range(half)]
    return [g + i for g in range(0, n, group) for i in inner]


_BOFT_INDEX: dict[tuple[int, int, int, int], list[tuple[Tensor, Tensor]]] = {}


def _boft_index(n: int, nblocks: int, b: int, levels: int) -> list[tuple[Tensor, Tensor]]:
    """``(perm, inverse)`` index tensors per level (cached)."""
    key = (n, nblocks, b, levels)
    if key not in _BOFT_INDEX:
        out = []
        for i in range(levels):
            perm = torch.tensor(boft_permutation(n, nblocks, b, i, levels), dtype=torch.int64)
            out.append((perm, torch.argsort(perm)))
        _BOFT_INDEX[key] = out
    return _BOFT_INDEX[key]


def _boft_chain(
    zt: Tensor, blocks: Tensor, transpose: bool, keep: bool
) -> tuple[Tensor, list[Tensor]]:
    """``(x @ R)^T`` (or ``(x @ R^T)^T``) for ``zt = x^T`` of shape (n, rows).

    Row-space view: ``x @ F_i`` gathers with the inverse permutation, multiplies each block
    ``z_k @ B_k`` and gathers with the permutation. On ``zt`` the block product is
    ``B_k^T @ zt_k``. With ``keep``, returns the input of every block product (by level).
    """
    levels, nb, b, _ = blocks.shape
    n, rows = zt.shape
    index = _boft_index(n, nb, b, levels)
    order = range(levels) if transpose else range(levels - 1, -1, -1)
    kept: list[Tensor] = [zt] * levels
    last = order[-1]
    for i in order:
        perm, inv = index[i]
        if i > 0:
            zt = zt.index_select(0, inv.to(zt.device))
        if keep:
            kept[i] = zt
            if i == last:  # the backward needs the inputs of the block products only
                break
        mats = blocks[i] if transpose else blocks[i].transpose(1, 2)
        zt = torch.bmm(mats, zt.reshape(nb, b, rows)).reshape(n, rows)
        if i > 0:
            zt = zt.index_select(0, perm.to(zt.device))
    return zt, kept


def _boft_check(x: Tensor, blocks: Tensor) -> None:
    from .errors import ShapeError

    _same_float("boft_apply", [("x", x), ("blocks", blocks)])
    if blocks.dim() != 4 or blocks.shape[2] != blocks.shape[3]:
        raise ShapeError(
            f"boft_apply: blocks has shape {tuple(blocks.shape)}, expected (levels, nblocks, b, b)"
        )
    levels, nb, b, _ = blocks.shape
    if x.dim() != 2 or x.shape[1] != nb * b:
        raise ShapeError(f"boft_apply: x has shape {tuple(x.shape)}, expected (batch, {nb * b})")
    if levels > 1 and (b % 2 or nb % (1 << (levels - 1))):
        raise ShapeError(
            f"boft_apply: blocks has shape {tuple(blocks.shape)}: with {levels} butterfly factors "
            f"the block size must be even and nblocks a multiple of 2**{levels - 1}"
        )


@torch.library.custom_op("spruce::boft_apply", mutates_args=())
def boft_apply(x: Tensor, blocks: Tensor, transpose: bool) -> Tensor:
    _boft_check(x, blocks)
    zt, _ = _boft_chain(x.t().contiguous(), blocks, transpose, False)
    return zt.t().contiguous()


@boft_apply.register_fake
def _(x: Tensor, blocks: Tensor, transpose: bool) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("spruce::boft_apply_backward", mutates_args=())
def boft_apply_backward(
    grad: Tensor, x: Tensor, blocks: Tensor, transpose: bool
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`boft_apply` in ``x`` and ``blocks``: the forward is recomputed to
    get the input of every block product, then the factors are swept in reverse."""
    _boft_check(x, blocks)
    levels, nb, b, _ = blocks.shape
    n = nb * b
    index = _boft_index(n, nb, b, levels)
    _, kept = _boft_chain(x.t().contiguous(), blocks, transpose, True)
    gt = grad.t().contiguous()
    gblocks: list[Tensor] = [blocks[0]] * levels
    order = range(levels - 1, -1, -1) if transpose else range(levels)
    rows = x.shape[0]
    for i in order:
        perm, inv = index[i]
        if i > 0:
            gt = gt.index_select(0, inv.to(gt.device))
        g3 = gt.reshape(nb, b, rows)
        # the forward product on columns is out = M^T u (M = B, or B^T when transposed):
        # d/dM of sum(g * M^T u) = u g^T
        gm = torch.bmm(kept[i].reshape(nb, b, rows), g3.transpose(1, 2))
        gblocks[i] = gm.transpose(1, 2) if transpose else gm
        mats = blocks[i].transpose(1, 2) if transpose else blocks[i]
        gt = torch.bmm(mats, g3).reshape(n, rows)
        if i > 0:
            gt = gt.index_select(0, perm.to(gt.device))
    return gt.t().contiguous(), torch.stack(gblocks)


@boft_apply_backward.register_fake
def _(grad: Tensor, x: Tensor, blocks: Tensor, transpose: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), blocks.new_empty(blocks.shape)


def _boft_setup(ctx, inputs, output) -> None:
    x, blocks, transpose = inputs
    ctx.transpose = transpose
    ctx.save_for_backward(x, blocks)


def _boft_backward(ctx, grad: Tensor):
    x, blocks = ctx.saved_tensors
    gx, gb = boft_apply_backward(grad.contiguous(), x, blocks, ctx.transpose)
    return gx, gb, None


boft_apply.register_autograd(_boft_backward, setup_context=_boft_setup)


# ---------------------------------------------------------------------------------------------
# Graphs and distillation (spruce.graph, spruce.distill)


def _ints(op: str, arg: str, t: Tensor):
    """A zero-copy int64 NumPy view of a CPU index tensor."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{op}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise DTypeError(
            f"{op}: {arg} has dtype {str(t.dtype).replace('torch.', '')}, expected int64"
        )
    check_cpu(op, arg, t)
    return t.detach().contiguous().numpy()


def _bools(op: str, arg: str, t: Tensor):
    check_bool(op, arg, t)
    return to_numpy(op, arg, t)


def _rows_of(indptr: Tensor, nnz: int) -> Tensor:
    """The row of each CSR slot (explicit output size: no host sync)."""
    n = indptr.shape[0] - 1
    return torch.repeat_interleave(
        torch.arange(n, device=indptr.device), indptr.diff(), output_size=nnz
    )


@torch.library.custom_op("spruce::graph_structure", mutates_args=())
def graph_structure(
    edge_index: Tensor, num_nodes: int, self_loops: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _core.graph_structure(
        _ints("from_edge_index", "edge_index", edge_index), num_nodes, self_loops
    )
    return tuple(from_numpy(a) for a in out)  # type: ignore[return-value]


@graph_structure.register_fake
def _(edge_index: Tensor, num_nodes: int, self_loops: str):
    nnz = torch.library.get_ctx().new_dynamic_size()
    i64 = torch.int64
    ptr = edge_index.new_empty((num_nodes + 1,), dtype=i64)
    slots = [edge_index.new_empty((nnz,), dtype=i64) for _ in range(5)]
    e = edge_index.new_empty((edge_index.shape[1],), dtype=i64)
    fill = edge_index.new_empty((nnz,), dtype=torch.bool)
    return ptr, slots[0], e, fill, ptr.clone(), slots[1], slots[2], slots[3]


@torch.library.custom_op("spruce::graph_norm", mutates_args=())
def graph_norm(values: Tensor, indptr: Tensor, indices: Tensor, normalization: str) -> Tensor:
    check_float("graph_norm", "values", values)
    out = _core.graph_norm(
        to_numpy("graph_norm", "values", values),
        _ints("graph_norm", "indptr", indptr),
        _ints("graph_norm", "indices", indices),
        normalization,
    )
    return from_numpy(out, values.dtype)


@graph_norm.register_fake
def _(values: Tensor, indptr: Tensor, indices: Tensor, normalization: str) -> Tensor:
    return torch.empty_like(values)


def _norm_setup(ctx, inputs, output) -> None:
    values, indptr, indices, normalization = inputs
    ctx.normalization = normalization
    ctx.save_for_backward(values, output, indptr, indices)


def _norm_backward(ctx, g: Tensor):
    values, out, indptr, indices = ctx.saved_tensors
    if ctx.normalization == "none":
        return g, None, None, None
    n = indptr.shape[0] - 1
    row = _rows_of(indptr, values.shape[0])
    deg = values.new_zeros(n).index_add(0, row, values)
    zero = deg == 0
    go = g * out
    if ctx.normalization == "rw":
        inv = torch.where(zero, torch.zeros_like(deg), 1.0 / torch.where(zero, 1.0, deg))
        s = values.new_zeros(n).index_add(0, row, go)
        return (g - s[row]) * inv[row], None, None, None
    a = torch.where(zero, torch.zeros_like(deg), torch.where(zero, 1.0, deg).pow(-0.5))
    s = values.new_zeros(n).index_add(0, row, go).index_add(0, indices, go)
    dd = torch.where(zero, torch.zeros_like(deg), -0.5 * s / torch.where(zero, 1.0, deg))
    return g * a[row] * a[indices] + dd[row], None, None, None


graph_norm.register_autograd(_norm_backward, setup_context=_norm_setup)


@torch.library.custom_op("spruce::spmm", mutates_args=())
def spmm(
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    t_indptr: Tensor,
    t_indices: Tensor,
    t_perm: Tensor,
    t_inv: Tensor,
    x: Tensor,
) -> Tensor:
    check_float("spmm", "x", x)
    check_float("spmm", "values", values)
    out = _core.spmm(
        _ints("spmm", "indptr", indptr),
        _ints("spmm", "indices", indices),
        to_numpy("spmm", "values", values),
        to_numpy("spmm", "x", x),
    )
    return from_numpy(out, x.dtype)


@spmm.register_fake
def _(indptr, indices, values, t_indptr, t_indices, t_perm, t_inv, x) -> Tensor:
    return x.new_empty((indptr.shape[0] - 1, x.shape[1]))


def _spmm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _spmm_backward(ctx, g: Tensor):
    indptr, indices, values, t_indptr, t_indices, t_perm, t_inv, x = ctx.saved_tensors
    g = g.contiguous()
    gx = gv = None
    if ctx.needs_input_grad[7]:
        # A^T g through the transpose: its transpose is A (slots t_inv), its values values[t_perm]
        gx = spmm(t_indptr, t_indices, values[t_perm], indptr, indices, t_inv, t_perm, g)
    if ctx.needs_input_grad[2]:
        gv = spmm_grad_values(indptr, indices, x, g)
    return None, None, gv, None, None, None, None, gx


spmm.register_autograd(_spmm_backward, setup_context=_spmm_setup)


@torch.library.custom_op("spruce::spmm_grad_values", mutates_args=())
def spmm_grad_values(indptr: Tensor, indices: Tensor, x: Tensor, grad_out: Tensor) -> Tensor:
    check_float("spmm_grad_values", "x", x)
    check_float("spmm_grad_values", "grad_out", grad_out)
    out = _core.spmm_grad_values(
        _ints("spmm_grad_values", "indptr", indptr),
        _ints("spmm_grad_values", "indices", indices),
        to_numpy("spmm_grad_values", "x", x),
        to_numpy("spmm_grad_values", "grad_out", grad_out),
    )
    return from_numpy(out, x.dtype)


@spmm_grad_values.register_fake
def _(indptr: Tensor, indices: Tensor, x: Tensor, grad_out: Tensor) -> Tensor:
    return x.new_empty((indices.shape[0],))


def _reduce_fake(src: Tensor, rows: int, reduce: str) -> tuple[Tensor, Tensor]:
    f = src.shape[1]
    arg = (rows, f) if reduce in ("max", "min", "amax", "amin") else (0,)
    return src.new_empty((rows, f)), src.new_empty(arg, dtype=torch.int64)


def _selected_grad(src_shape, arg: Tensor, g: Tensor) -> Tensor:
    """Routes ``g`` to the selected source rows ``arg`` (``-1``: an empty segment, no gradient)."""
    keep = arg >= 0
    return g.new_zeros(src_shape).scatter_add(
        0, arg.clamp(min=0), torch.where(keep, g, torch.zeros_like(g))
    )


@torch.library.custom_op("spruce::segment_reduce", mutates_args=())
def segment_reduce(src: Tensor, indptr: Tensor, reduce: str) -> tuple[Tensor, Tensor]:
    check_float("segment_reduce", "src", src)
    out, arg = _core.segment_reduce(
        to_numpy("segment_reduce", "src", src),
        _ints("segment_reduce", "indptr", indptr),
        reduce,
    )
    return from_numpy(out, src.dtype), from_numpy(arg)


@segment_reduce.register_fake
def _(src: Tensor, indptr: Tensor, reduce: str) -> tuple[Tensor, Tensor]:
    return _reduce_fake(src, indptr.shape[0] - 1, reduce)


def _segment_setup(ctx, inputs, output) -> None:
    src, indptr, reduce = inputs
    ctx.reduce, ctx.shape = reduce, src.shape
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(indptr, output[1])


def _segment_backward(ctx, g: Tensor, _garg):
    indptr, arg = ctx.saved_tensors
    if ctx.reduce in ("max", "min", "amax", "amin"):
        return _selected_grad(ctx.shape, arg, g), None, None
    counts = indptr.diff()
    row = _rows_of(indptr, ctx.shape[0])
    gs = g[row]
    if ctx.reduce == "mean":
        gs = gs / counts[row].to(g.dtype).unsqueeze(1)
    return gs, None, None


segment_reduce.register_autograd(_segment_backward, setup_context=_segment_setup)


@torch.library.custom_op("spruce::scatter_reduce", mutates_args=())
def scatter_reduce(src: Tensor, index: Tensor, dim_size: int, reduce: str) -> tuple[Tensor, Tensor]:
    check_float("scatter_reduce", "src", src)
    out, arg = _core.scatter_reduce(
        to_numpy("scatter_reduce", "src", src),
        _ints("scatter_reduce", "index", index),
        dim_size,
        reduce,
    )
    return from_numpy(out, src.dtype), from_numpy(arg)


@scatter_reduce.register_fake
def _(src: Tensor, index: Tensor, dim_size: int, reduce: str) -> tuple[Tensor, Tensor]:
    return _reduce_fake(src, dim_size, reduce)


def _scatter_setup(ctx, inputs, output) -> None:
    src, index, dim_size, reduce = inputs
    ctx.reduce, ctx.shape, ctx.dim_size = reduce, src.shape, dim_size
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(index, output[1])


def _scatter_backward(ctx, g: Tensor, _garg):
    index, arg = ctx.saved_tensors
    if ctx.reduce in ("max", "min", "amax", "amin"):
        return _selected_grad(ctx.shape, arg, g), None, None, None
    gs = g[index]
    if ctx.reduce == "mean":
        ones = torch.ones(index.shape[0], dtype=g.dtype, device=g.device)
        counts = g.new_zeros(ctx.dim_size).index_add(0, index, ones)
        gs = gs / counts[index].unsqueeze(1)
    return gs, None, None, None


scatter_reduce.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# Losses: each op returns (loss, gradient of the loss in the student logits); the gradient is
# computed by the same native pass when need_grad is true (else it is empty) and scaled by the
# upstream gradient in backward. Teacher logits are targets: no gradient flows into them.


def _loss_fake(s: Tensor, need_grad: bool, per_row: bool = False) -> tuple[Tensor, Tensor]:
    loss = s.new_empty((s.shape[0],) if per_row else ())
    return loss, s.new_empty(s.shape if need_grad else (0,))


def _loss_setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.n_inputs = len(inputs)


def _loss_backward(ctx, g: Tensor, _gg):
    (grad,) = ctx.saved_tensors
    if grad.dim() != 2:
        raise RuntimeError(
            "spruce distillation loss: backward needs the gradient computed in the forward "
            "pass; call the op with need_grad=True (the public functions do this when the "
            "student logits require grad)"
        )
    scale = g.unsqueeze(1) if g.dim() == 1 else g
    return (grad * scale,) + (None,) * (ctx.n_inputs - 1)


def _loss_result(out, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    loss, grad = out
    return from_numpy(loss, dtype), from_numpy(grad, dtype)


@torch.library.custom_op("spruce::kd_loss", mutates_args=())
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    t2_scale: bool,
    reduction: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    check_float("kd_loss", "student_logits", student_logits)
    check_float("kd_loss", "teacher_logits", teacher_logits)
    out = _core.kd_loss(
        to_numpy("kd_loss", "student_logits", student_logits),
        to_numpy("kd_loss", "teacher_logits", teacher_logits),
        temperature,
        t2_scale,
        reduction,
        need_grad,
    )
    return _loss_result(out, student_logits.dtype)


@kd_loss.register_fake
def _(student_logits, teacher_logits, temperature, t2_scale, reduction, need_grad):
    return _loss_fake(student_logits, need_grad, per_row=reduction == "none")


kd_loss.register_autograd(_loss_backward, setup_context=_loss_setup)


@torch.library.custom_op("spruce::ce_loss", mutates_args=())
def ce_loss(
    student_logits: Tensor, labels: Tensor, labelled_mask: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor]:
    check_float("ce_loss", "student_logits", student_logits)
    out = _core.ce_loss(
        to_numpy("ce_loss", "student_logits", student_logits),
        _ints("ce_loss", "labels", labels),
        _bools("ce_loss", "labelled_mask", labelled_mask),
        need_grad,
    )
    return _loss_result(out, student_logits.dtype)


@ce_loss.register_fake
def _(student_logits, labels, labelled_mask, need_grad):
    return _loss_fake(student_logits, need_grad)


ce_loss.register_autograd(_loss_backward, setup_context=_loss_setup)


@torch.library.custom_op("spruce::lfd_loss", mutates_args=())
def lfd_loss(
    student_logits: Tensor, teacher_logits: Tensor, edge_index: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor]:
    check_float("lfd_loss", "student_logits", student_logits)
    check_float("lfd_loss", "teacher_logits", teacher_logits)
    out = _core.lfd_loss(
        to_numpy("lfd_loss", "student_logits", student_logits),
        to_numpy("lfd_loss", "teacher_logits", teacher_logits),
        _ints("lfd_loss", "edge_index", edge_index),
        need_grad,
    )
    return _loss_result(out, student_logits.dtype)


@lfd_loss.register_fake
def _(student_logits, teacher_logits, edge_index, need_grad):
    return _loss_fake(student_logits, need_grad)


lfd_loss.register_autograd(_loss_backward, setup_context=_loss_setup)


@torch.library.custom_op("spruce::hfd_loss", mutates_args=())
def hfd_loss(
    student_logits: Tensor, teacher_logits: Tensor, edge_index: Tensor, tau: float, need_grad: bool
) -> tuple[Tensor, Tensor]:
    check_float("hfd_loss", "student_logits", student_logits)
    check_float("hfd_loss", "teacher_logits", teacher_logits)
    out = _core.hfd_loss(
        to_numpy("hfd_loss", "student_logits", student_logits),
        to_numpy("hfd_loss", "teacher_logits", teacher_logits),
        _ints("hfd_loss", "edge_index", edge_index),
        tau,
        need_grad,
    )
    return _loss_result(out, student_logits.dtype)


@hfd_loss.register_fake
def _(student_logits, teacher_logits, edge_index, tau, need_grad):
    return _loss_fake(student_logits, need_grad)


hfd_loss.register_autograd(_loss_backward, setup_context=_loss_setup)


@torch.library.custom_op("spruce::krd_edge_sampling", mutates_args=())
def krd_edge_sampling(edge_index: Tensor, entropy_shift: Tensor, power: float, seed: int) -> Tensor:
    check_float("krd_edge_sampling", "entropy_shift", entropy_shift)
    keep = _core.krd_edge_sampling(
        _ints("krd_edge_sampling", "edge_index", edge_index),
        to_numpy("krd_edge_sampling", "entropy_shift", entropy_shift),
        power,
        seed,
    )
    return from_numpy(keep)


@krd_edge_sampling.register_fake
def _(edge_index: Tensor, entropy_shift: Tensor, power: float, seed: int) -> Tensor:
    return edge_index.new_empty((edge_index.shape[1],), dtype=torch.bool)
