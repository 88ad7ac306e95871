"""Calibration statistics streamed from forward hooks, without storing activations.

``ActivationStats`` hooks the inputs of the targeted layers (``nn.Linear`` and Hugging Face
``Conv1D``-style layers, whose weight is stored ``(in, out)``) and keeps, per layer, only what the
pruners need:

- Wanda's per-input-column statistic, the running mean over calibration *samples* of the squared
  column norms, in float32: ``s_j <- s_j * n/(n+b) + ||X_j||^2 / (n+b)``;
- SparseGPT's Hessian ``H <- H * n/(n+b) + (2/(n+b)) X^T X`` in float32.

Here ``X`` is the layer input flattened to ``(tokens, in_features)`` and ``b`` the number of samples
in the batch: ``x.shape[0]`` for an input with 3 or more dimensions (batch, sequence, features),
1 for a 2-D input (the convention of the Wanda and SparseGPT repositories). Padding tokens count
like any other token, as there. Memory is ``in_features`` floats per layer for Wanda and
``in_features^2`` for SparseGPT, independent of the calibration set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, ConfigError

__all__ = ["ActivationStats", "LayerStats", "find_layers", "feed", "weight_matrix"]


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 style): ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(w, Tensor)
        and w.dim() == 2
    )


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as an ``(out_features, in_features)`` view sharing the parameter's storage
    (detached: writing to it changes the parameter without autograd)."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def in_features(module: nn.Module) -> int:
    w = module.weight
    return int(w.shape[0] if is_conv1d(module) else w.shape[1])


def _compile(op: str, arg: str, pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ConfigError(f"{op}: {arg} ({pattern!r}) must be a regular expression string or None")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"{op}: {arg} ({pattern!r}) is not a valid regular expression: {e}"
        ) from e


def find_layers(
    model: nn.Module,
    *,
    include: str | None = None,
    exclude: str | None = None,
    op: str = "find_layers",
) -> dict[str, nn.Module]:
    """The prunable layers of ``model`` (``nn.Linear`` and ``Conv1D``-style), by qualified name
    in module order, whose name matches ``include`` (``re.search``; None: every layer) and does
    not match ``exclude``."""
    inc = _compile(op, "include", include)
    exc = _compile(op, "exclude", exclude)
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"{op}: model ({type(model).__name__}) must be a torch.nn.Module")
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not is_prunable(m):
            continue
        if inc is not None and not inc.search(name):
            continue
        if exc is not None and exc.search(name):
            continue
        out[name] = m
    return out


def _device_of(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _to(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, Tensor):
        return x.to(device) if x.device != device else x
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    return x


def feed(model: nn.Module, batch: Any) -> Any:
    """Runs one calibration batch: ``model(**batch)`` for a mapping, ``model(*batch)`` for a
    tuple or list, else ``model(batch)``. Tensors are moved to the model's device first."""
    batch = _to(batch, _device_of(model))
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@dataclass
class LayerStats:
    """The calibration statistics of one layer."""

    name: str
    in_features: int
    nsamples: int = 0
    #: Wanda's per-input-column running mean of squared norms (float32, ``(in_features,)``).
    col_sq: Tensor | None = None
    #: SparseGPT's Hessian ``2/n X^T X`` (float32, ``(in_features, in_features)``).
    hessian: Tensor | None = None
    want_col_sq: bool = True
    want_hessian: bool = False
    calls: int = field(default=0, repr=False)

    def add(self, x: Tensor) -> None:
        """Adds one batch of layer inputs (``(..., in_features)``)."""
        if x.shape[-1] != self.in_features:
            raise ArgumentError(
                f"ActivationStats: layer {self.name!r} got an input of shape {tuple(x.shape)}, "
                f"expected a last dimension of {self.in_features}"
            )
        x = x.detach()
        b = int(x.shape[0]) if x.dim() >= 3 else 1
        x2 = x.reshape(-1, self.in_features)
        n0, n1 = self.nsamples, self.nsamples + b
        if self.want_col_sq:
            if self.col_sq is None:
                self.col_sq = torch.zeros(self.in_features, dtype=torch.float32, device=x.device)
            sq = torch.linalg.vector_norm(x2, 2, dim=0, dtype=torch.float32).pow_(2)
            self.col_sq.mul_(n0 / n1).add_(sq.div_(n1))
        if self.want_hessian:
            if self.hessian is None:
                self.hessian = torch.zeros(
                    self.in_features, self.in_features, dtype=torch.float32, device=x.device
                )
            xf = x2.to(torch.float32)
            self.hessian.mul_(n0 / n1).addmm_(xf.t(), xf, alpha=2.0 / n1)
        self.nsamples = n1
        self.calls += 1


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("input", "x", "hidden_states"):
        v = kwargs.get(key)
        if isinstance(v, Tensor):
            return v
    for v in kwargs.values():
        if isinstance(v, Tensor):
            return v
    return None


class ActivationStats(Mapping[str, LayerStats]):
    """Streams the calibration statistics of the targeted layers through forward pre-hooks.

    >>> stats = ActivationStats(model, wanda=True, hessian=False)
    >>> with stats:                       # hooks live inside the block
    ...     for batch in calibration:
    ...         spruce.prune.stats.feed(model, batch)
    >>> stats["layers.0.mlp.up_proj"].col_sq

    ``stats.collect(calibration)`` does the loop under ``torch.no_grad()`` in eval mode.
    ``layers`` selects the layers (a mapping name -> module, or names); otherwise ``include`` /
    ``exclude`` regular expressions filter the prunable layers of ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Mapping[str, nn.Module] | Iterable[str] | None = None,
        include: str | None = None,
        exclude: str | None = None,
        wanda: bool = True,
        hessian: bool = False,
    ) -> None:
        self.model = model
        if layers is None:
            targets = find_layers(model, include=include, exclude=exclude, op="ActivationStats")
        elif isinstance(layers, Mapping):
            targets = dict(layers)
        else:
            all_layers = find_layers(model, op="ActivationStats")
            names = list(layers)
            missing = [n for n in names if n not in all_layers]
            if missing:
                raise ConfigError(
                    f"ActivationStats: layers ({missing[0]!r}) must name Linear or Conv1D modules "
                    "of the model"
                )
            targets = {n: all_layers[n] for n in names}
        for n, m in targets.items():
            if not is_prunable(m):
                raise ConfigError(
                    f"ActivationStats: layer {n!r} ({type(m).__name__}) must be an nn.Linear or a "
                    "Conv1D-style layer"
                )
        self.modules = targets
        self._stats = {
            n: LayerStats(n, in_features(m), want_col_sq=wanda, want_hessian=hessian)
            for n, m in targets.items()
        }
        self._handles: list[Any] = []

    # Mapping interface
    def __getitem__(self, name: str) -> LayerStats:
        return self._stats[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def _hook(self, name: str):
        st = self._stats[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_tensor(args, kwargs)
            if x is not None:
                st.add(x)

        return hook

    def attach(self) -> ActivationStats:
        if not self._handles:
            for n, m in self.modules.items():
                self._handles.append(m.register_forward_pre_hook(self._hook(n), with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationStats:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def collect(self, calibration: Iterable[Any]) -> ActivationStats:
        """Feeds every batch of ``calibration`` through the model (eval mode, no gradients)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self, torch.no_grad():
                for batch in calibration:
                    feed(self.model, batch)
        finally:
            self.model.train(was_training)
        return self
