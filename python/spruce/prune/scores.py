"""Pruning scores: magnitude, Wanda, gradient-based (movement, SNIP, snip-momentum, Fisher,
Taylor) and group scores for structured pruning.

Weights are seen as ``(out_features, in_features)`` matrices. Higher score = more important: the
lowest scores are pruned first (spruce's ranking: by ``(score, index)`` ascending).

- magnitude: ``|W|``;
- Wanda: ``|W_ij| * sqrt(s_j)`` with ``s`` the running mean of squared input-column norms
  (float32, see :class:`spruce.prune.ActivationStats`); computed in float32 (float64 for float64
  weights), exactly what torch's type promotion of ``W.abs() * s.sqrt()`` gives;
- movement (Sanh et al. 2020): accumulated ``-W * G``;
- SNIP (Lee et al. 2019): ``|W * G|``, accumulated;
- snip-momentum: ``S <- beta * S + |W * G|`` (beta = 0.9);
- Fisher (diagonal): accumulated ``G^2``;
- Taylor, first order (Molchanov et al. 2019): accumulated ``(W * G)^2``, the squared
  first-order estimate of the loss change when the weight is removed.

Gradient scores are accumulated in float32 (float64 for float64 weights) by
:class:`GradientScores`, which reads ``.grad`` after each backward pass or takes the gradients
explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import _ops
from .._native import as_tensor, back, check_int, check_number
from ..errors import ArgumentError, ConfigError, ShapeError
from .stats import find_layers, is_conv1d

__all__ = [
    "magnitude_scores",
    "wanda_scores",
    "wanda_mask",
    "movement_scores",
    "snip_scores",
    "fisher_scores",
    "taylor_scores",
    "GradientScores",
    "GRADIENT_METHODS",
    "group_scores",
]

#: The score kinds :class:`GradientScores` accumulates.
GRADIENT_METHODS = ("movement", "snip", "snip_momentum", "fisher", "taylor")


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def magnitude_scores(weight: Any) -> Any:
    """``|W|`` (same dtype as the weight)."""
    t, np_in = as_tensor("magnitude_scores", "weight", weight)
    return back(t.abs(), np_in)


def _stat(op: str, stat: Any) -> Tensor | None:
    if stat is None:
        return None
    t, _ = as_tensor(op, "stat", stat)
    return t


def wanda_scores(weight: Any, stat: Any) -> Any:
    """Wanda's scores ``|W_ij| * sqrt(stat_j)`` of an ``(out, in)`` weight.

    ``stat`` is the per-input-column statistic (``ActivationStats(...)[name].col_sq``). Half
    types are read in place; the result is float32 (float64 for a float64 weight).
    """
    t, np_in = as_tensor("wanda_scores", "weight", weight)
    return back(_ops.wanda_scores(t, _stat("wanda_scores", stat)), np_in)


def wanda_mask(
    weight: Any,
    stat: Any,
    sparsity: float | None = None,
    *,
    n: int = 0,
    m: int = 0,
) -> Any:
    """Wanda's keep-mask of an ``(out, in)`` weight, without materializing the scores.

    Unstructured (``n = m = 0``): inside every output row, exactly ``floor(sparsity * in)``
    lowest scores are pruned (Wanda's per-output comparison group; ties prune the lower column).
    N:M: the ``n`` largest scores of every ``m`` consecutive inputs are kept (``sparsity`` must
    then be None or ``1 - n/m``). ``stat=None`` ranks by ``|W|`` alone (per-row magnitude).
    """
    op = "wanda_mask"
    t, np_in = as_tensor(op, "weight", weight)
    n = check_int(op, "n", n, lo=0)
    m = check_int(op, "m", m, lo=0)
    if (n == 0) != (m == 0):
        raise ArgumentError(f"{op}: n ({n}) and m ({m}) must both be 0 (unstructured) or both > 0")
    if m:
        if sparsity is not None and abs(float(sparsity) - (1 - n / m)) > 1e-9:
            raise ArgumentError(
                f"{op}: sparsity ({sparsity}) must be None or 1 - n/m = {1 - n / m} for {n}:{m}"
            )
        s = 0.0
    else:
        if sparsity is None:
            raise ArgumentError(f"{op}: sparsity (None) must be a number in [0, 1] when n = m = 0")
        s = check_number(op, "sparsity", sparsity)
    return back(_ops.wanda_mask(t, _stat(op, stat), s, n, m), np_in)


def _wg(op: str, weight: Any, grad: Any) -> tuple[Tensor, Tensor, bool]:
    w, np_in = as_tensor(op, "weight", weight)
    g, _ = as_tensor(op, "grad", grad)
    if w.shape != g.shape:
        raise ShapeError(
            f"{op}: grad has shape {tuple(g.shape)}, expected the weight's shape {tuple(w.shape)}"
        )
    dt = _acc_dtype(w)
    return w.detach().to(dt), g.detach().to(dt), np_in


def movement_scores(weight: Any, grad: Any) -> Any:
    """One step of movement pruning's score: ``-W * G`` (float32; float64 for float64)."""
    w, g, np_in = _wg("movement_scores", weight, grad)
    return back(-(w * g), np_in)


def snip_scores(weight: Any, grad: Any) -> Any:
    """SNIP's connection sensitivity ``|W * G|``."""
    w, g, np_in = _wg("snip_scores", weight, grad)
    return back((w * g).abs_(), np_in)


def fisher_scores(grad: Any) -> Any:
    """One step of the diagonal Fisher: ``G^2``."""
    g, np_in = as_tensor("fisher_scores", "grad", grad)
    g = g.detach().to(_acc_dtype(g))
    return back(g * g, np_in)


def taylor_scores(weight: Any, grad: Any) -> Any:
    """First-order Taylor importance ``(W * G)^2``."""
    w, g, np_in = _wg("taylor_scores", weight, grad)
    return back((w * g).pow_(2), np_in)


class GradientScores(Mapping[str, Tensor]):
    """Accumulates a gradient-based score for the weights of the targeted layers.

    ``model`` is a module (its ``nn.Linear`` / ``Conv1D`` layers filtered by ``include`` /
    ``exclude``) or a mapping name -> weight tensor. Call :meth:`accumulate` after every
    ``loss.backward()`` (it reads ``.grad``), or pass the gradients. Scores are kept in the
    weights' stored layout; ``scores[name]`` gives the ``(out, in)`` view of a layer's score.

    >>> acc = GradientScores(model, "movement")
    >>> for batch in data:
    ...     loss = model(**batch).loss; loss.backward(); acc.accumulate(); opt.step(); opt.zero_grad()
    >>> spruce.prune.prune_model(model, "movement", 0.5, scores=acc)
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, Tensor],
        method: str = "snip",
        *,
        include: str | None = None,
        exclude: str | None = None,
        beta: float = 0.9,
    ) -> None:
        if method not in GRADIENT_METHODS:
            raise ConfigError(
                f"GradientScores: method ({method!r}) must be one of {', '.join(GRADIENT_METHODS)}"
            )
        self.method = method
        self.beta = check_number("GradientScores", "beta", beta)
        self._transposed: dict[str, bool] = {}
        if isinstance(model, nn.Module):
            layers = find_layers(model, include=include, exclude=exclude, op="GradientScores")
            self.params = {n: m.weight for n, m in layers.items()}
            self._transposed = {n: is_conv1d(m) for n, m in layers.items()}
        elif isinstance(model, Mapping):
            self.params = dict(model)
        else:
            raise ArgumentError(
                f"GradientScores: model ({type(model).__name__}) must be an nn.Module or a "
                "mapping of name -> weight"
            )
        if not self.params:
            raise ConfigError("GradientScores: no weight matched (check include / exclude)")
        self._scores: dict[str, Tensor] = {
            n: torch.zeros(p.shape, dtype=_acc_dtype(p), device=p.device)
            for n, p in self.params.items()
        }
        self.steps = 0

    def __getitem__(self, name: str) -> Tensor:
        s = self._scores[name]
        return s.t() if self._transposed.get(name, False) else s

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def reset(self) -> None:
        for s in self._scores.values():
            s.zero_()
        self.steps = 0

    @torch.no_grad()
    def accumulate(self, grads: Mapping[str, Tensor] | Iterable[Tensor] | None = None) -> None:
        """Adds one step. ``grads``: None (read each weight's ``.grad``), a mapping name ->
        gradient, or gradients in the order of the weights."""
        if grads is None:
            gmap = {n: p.grad for n, p in self.params.items()}
        elif isinstance(grads, Mapping):
            gmap = dict(grads)
        else:
            gmap = dict(zip(self.params, grads, strict=True))
        for n, p in self.params.items():
            g = gmap.get(n)
            if g is None:
                raise ArgumentError(
                    f"GradientScores.accumulate: weight {n!r} has no gradient (call "
                    "loss.backward() first, or pass grads)"
                )
            s = self._scores[n]
            w = p.detach().to(s.dtype)
            g = g.detach().to(s.dtype)
            if self.method == "movement":
                s.addcmul_(w, g, value=-1.0)
            elif self.method == "snip":
                s.add_((w * g).abs_())
            elif self.method == "snip_momentum":
                s.mul_(self.beta).add_((w * g).abs_())
            elif self.method == "fisher":
                s.addcmul_(g, g)
            else:  # taylor
                s.add_((w * g).pow_(2))
        self.steps += 1


_REDUCE = ("l1", "l2", "sum", "mean", "max")


def group_scores(scores: Any, *, dim: int = 0, group_size: int = 1, reduce: str = "l2") -> Any:
    """One score per group of ``group_size`` consecutive slices along ``dim``, reduced over all
    other entries: ``dim=0`` gives per-output-channel scores of an ``(out, in)`` matrix,
    ``dim=1`` per input column, ``dim=0, group_size=head_dim`` per attention head.

    ``reduce``: ``"l1"`` (sum of ``|x|``), ``"l2"`` (Euclidean norm), ``"sum"``, ``"mean"`` or
    ``"max"`` (of ``|x|``), accumulated in float64. Differentiable.
    """
    op = "group_scores"
    t, np_in = as_tensor(op, "scores", scores)
    if reduce not in _REDUCE:
        raise ArgumentError(f"{op}: reduce ({reduce!r}) must be one of {', '.join(_REDUCE)}")
    gs = check_int(op, "group_size", group_size, lo=1)
    d = check_int(op, "dim", dim, lo=-max(t.dim(), 1), hi=max(t.dim(), 1) - 1)
    if t.dim() == 0:
        raise ShapeError(f"{op}: scores has shape (), expected at least one dimension")
    size = t.shape[d]
    if size % gs:
        raise ShapeError(
            f"{op}: scores has shape {tuple(t.shape)}, expected a size divisible by group_size "
            f"({gs}) along dim {d % t.dim()}"
        )
    x = t.movedim(d, 0).reshape(size // gs, -1).to(torch.float64)
    if reduce == "l1":
        out = x.abs().sum(1)
    elif reduce == "l2":
        out = torch.linalg.vector_norm(x, 2, dim=1)
    elif reduce == "sum":
        out = x.sum(1)
    elif reduce == "mean":
        out = x.mean(1)
    else:
        out = x.abs().amax(1)
    return back(out, np_in)
