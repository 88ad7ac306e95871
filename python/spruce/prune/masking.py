"""Keeping pruned weights at zero through training.

Two mechanisms, both removable:

- :func:`keep_masks` registers a parametrization (``torch.nn.utils.parametrize``) on each layer's
  ``weight``: the forward uses ``where(mask, W, 0)``, so the pruned entries are zero in every
  forward pass and their gradients are zero (the optimizer never sees them move the output).
  The mask is a buffer (moves with ``.to()``, saved in ``state_dict``), and the parametrized
  modules run under ``torch.compile(fullgraph=True)``. :func:`make_permanent` bakes the masks in
  (plain parameters again); :func:`remove_masks` drops them and restores the original values.
- :func:`mask_optimizer` keeps the plain parameters: gradient hooks zero the pruned gradients and
  an optimizer step hook re-zeroes the pruned weights after every step (undoing weight decay or
  momentum). No cost in the forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ArgumentError, ShapeError
from .stats import find_layers, is_conv1d

__all__ = [
    "WeightMask",
    "keep_masks",
    "make_permanent",
    "remove_masks",
    "mask_optimizer",
    "MaskHandle",
]


class WeightMask(nn.Module):
    """The parametrization ``W -> where(mask, W, 0)`` (mask in the weight's stored layout)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: Tensor) -> Tensor:
        return torch.where(
            self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)
        )


def _stored_mask(name: str, module: nn.Module, mask: Tensor | None) -> Tensor:
    w = module.weight
    if mask is None:
        return (w.detach() != 0).to(w.device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ArgumentError(f"keep_masks: masks[{name!r}] must be a bool tensor")
    stored = mask.t() if is_conv1d(module) else mask
    if tuple(stored.shape) != tuple(w.shape):
        want = tuple(w.t().shape) if is_conv1d(module) else tuple(w.shape)
        raise ShapeError(
            f"keep_masks: masks[{name!r}] has shape {tuple(mask.shape)}, expected the "
            f"(out, in) shape {want}"
        )
    return stored.to(w.device).contiguous()


def _masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight") and any(
            isinstance(p, WeightMask) for p in m.parametrizations.weight
        ):
            out.append((name, m))
    return out


class MaskHandle:
    """Returned by :func:`keep_masks` and :func:`mask_optimizer`; ``remove()`` undoes them."""

    def __init__(self, remove_fn: Any, names: list[str]) -> None:
        self._remove = remove_fn
        self.names = names

    def remove(self) -> None:
        self._remove()


def keep_masks(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    include: str | None = None,
    exclude: str | None = None,
) -> MaskHandle:
    """Masks the weights of the targeted layers in every forward pass (and so their gradients).

    ``masks`` maps layer names to ``(out, in)`` bool keep-masks (e.g. ``report.masks`` of
    :func:`spruce.prune.prune_model` with ``return_masks=True``); ``None`` derives each mask from
    the current zeros of the weight (``W != 0``). ``handle.remove()`` (or :func:`remove_masks`)
    restores plain weights with their original values; :func:`make_permanent` keeps the zeros.
    """
    layers = find_layers(model, include=include, exclude=exclude, op="keep_masks")
    if masks is not None:
        unknown = [n for n in masks if n not in dict(model.named_modules())]
        if unknown:
            raise ArgumentError(f"keep_masks: masks names an unknown module ({unknown[0]!r})")
        layers = {n: dict(model.named_modules())[n] for n in masks}
    done = []
    for name, m in layers.items():
        mask = _stored_mask(name, m, None if masks is None else masks[name])
        parametrize.register_parametrization(m, "weight", WeightMask(mask))
        done.append((name, m))

    def remove() -> None:
        for _, m in done:
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)

    return MaskHandle(remove, [n for n, _ in done])


def make_permanent(model: nn.Module) -> int:
    """Bakes every :class:`WeightMask` in: the weight becomes a plain parameter equal to the
    masked weight. Returns the number of layers changed."""
    mods = _masked_modules(model)
    for _, m in mods:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return len(mods)


def remove_masks(model: nn.Module) -> int:
    """Removes every :class:`WeightMask`, restoring the unmasked original weights."""
    mods = _masked_modules(model)
    for _, m in mods:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    return len(mods)


def mask_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    include: str | None = None,
    exclude: str | None = None,
) -> MaskHandle:
    """Keeps pruned weights at zero without a parametrization: zeroes their gradients (tensor
    hooks) and re-zeroes them after every ``optimizer.step()``. ``masks`` as in
    :func:`keep_masks` (None: the current zeros)."""
    layers = find_layers(model, include=include, exclude=exclude, op="mask_optimizer")
    if masks is not None:
        mods = dict(model.named_modules())
        layers = {n: mods[n] for n in masks if n in mods}
    pairs = [
        (m.weight, _stored_mask(n, m, None if masks is None else masks[n]))
        for n, m in layers.items()
    ]
    handles = [w.register_hook(lambda g, k=k: g * k) for w, k in pairs]

    def rezero(opt: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for w, k in pairs:
                w.masked_fill_(~k, 0)

    handles.append(optimizer.register_step_post_hook(rezero))
    rezero(optimizer, (), {})

    def remove() -> None:
        for h in handles:
            h.remove()

    return MaskHandle(remove, list(layers))
