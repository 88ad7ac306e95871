"""Whole-model pruning, layerwise sparsity allocation (OWL) and gradual schedules."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import _ops
from .._native import check_int, check_number
from ..errors import ArgumentError, ConfigError
from ..masks import apply_mask_, global_topk_masks, nm_mask, random_mask, structured_mask, topk_mask
from .scores import GRADIENT_METHODS, GradientScores, group_scores
from .sparsegpt import sparsegpt_
from .stats import (
    ActivationStats,
    LayerStats,
    feed,
    find_layers,
    in_features,
    is_conv1d,
    weight_matrix,
)

__all__ = [
    "prune_model",
    "PruneReport",
    "LayerReport",
    "OWL",
    "owl_sparsities",
    "outlier_ratio",
    "CubicSchedule",
    "METHODS",
    "PATTERNS",
    "SCOPES",
]

METHODS = ("magnitude", "wanda", "sparsegpt", *GRADIENT_METHODS, "random")
PATTERNS = ("unstructured", "N:M", "row", "column", "head")
SCOPES = ("layer", "row", "global")
_NONNEG = ("snip", "snip_momentum", "fisher", "taylor")

# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class LayerReport:
    """One pruned layer: ``shape`` is ``(out_features, in_features)``; ``pruned`` counts the
    entries the mask removed; ``sparsity`` is the fraction of zeros after pruning."""

    name: str
    kind: str
    shape: tuple[int, int]
    numel: int
    pruned: int
    sparsity: float
    target: float | str
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneReport:
    """What :func:`prune_model` did. ``print(report)`` shows a table; ``report.to_json()`` (or
    ``json.dumps(report.to_dict())``) serializes everything but the masks."""

    method: str
    pattern: str
    scope: str
    sparsity: float | None
    layers: list[LayerReport]
    params: dict[str, Any]
    seconds: float
    masks: dict[str, Tensor] | None = field(default=None, repr=False)

    @property
    def total_params(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def total_pruned(self) -> int:
        return sum(r.pruned for r in self.layers)

    @property
    def overall_sparsity(self) -> float:
        n = self.total_params
        zeros = sum(round(r.sparsity * r.numel) for r in self.layers)
        return zeros / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "pattern": self.pattern,
            "scope": self.scope,
            "sparsity": self.sparsity,
            "params": self.params,
            "seconds": self.seconds,
            "total_params": self.total_params,
            "total_pruned": self.total_pruned,
            "overall_sparsity": self.overall_sparsity,
            "layers": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "shape": list(r.shape),
                    "numel": r.numel,
                    "pruned": r.pruned,
                    "sparsity": r.sparsity,
                    "target": r.target,
                    "seconds": r.seconds,
                    "info": r.info,
                }
                for r in self.layers
            ],
        }

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        head = ["layer", "kind", "shape", "target", "sparsity", "pruned", "time"]
        rows = [
            [
                r.name,
                r.kind,
                f"{r.shape[0]}x{r.shape[1]}",
                r.target if isinstance(r.target, str) else f"{r.target:.4f}",
                f"{r.sparsity:.4f}",
                f"{r.pruned:,}",
                f"{r.seconds * 1e3:.1f} ms",
            ]
            for r in self.layers
        ]
        widths = [
            max(len(h), *(len(c[i]) for c in rows)) if rows else len(h) for i, h in enumerate(head)
        ]
        lines = [
            f"spruce.prune: method={self.method} pattern={self.pattern} scope={self.scope} "
            f"sparsity={self.sparsity}",
            "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.append(
            f"total: {self.total_pruned:,} of {self.total_params:,} weights pruned, "
            f"{100 * self.overall_sparsity:.2f} % zeros, {self.seconds:.2f} s"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# OWL and schedules


@dataclass(frozen=True)
class OWL:
    """Outlier-weighted layerwise sparsity (Yin et al., 2024).

    Layers are grouped into blocks (by name, up to and including the first all-digit component:
    ``encoder.layer.3.attention.self.query`` belongs to ``encoder.layer.3``; a layer without one
    is its own block). A block's outlier ratio ``R`` is the fraction of its Wanda scores above
    ``m`` times their mean; the ratios are rescaled to ``[0, 2 lam]`` and each block gets
    sparsity ``s - (R_b - mean(R))`` (clipped to [0, 1]), so the mean stays ``s``. Defaults: the
    paper's ``m = 5``, ``lam = 0.08``.
    """

    m: float = 5.0
    lam: float = 0.08


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL's allocation from per-block outlier ratios: ``1 - (R' - mean(R') + 1 - s)`` with
    ``R'`` the ratios min-max rescaled to ``[0, 2 lam]``, clipped to [0, 1]. Equal ratios (or a
    single block) give every block ``s``."""
    r = [float(x) for x in ratios]
    if not r:
        return []
    lo, hi = min(r), max(r)
    if hi == lo:
        return [float(sparsity)] * len(r)
    scaled = [(x - lo) / (hi - lo) * 2 * lam for x in r]
    mean = sum(scaled) / len(scaled)
    return [min(1.0, max(0.0, 1 - (x - mean + 1 - sparsity))) for x in scaled]


def outlier_ratio(
    weights: Sequence[Tensor],
    stats: Sequence[Tensor | None] | None = None,
    *,
    m: float = 5.0,
    transposed: Sequence[bool] | None = None,
) -> float:
    """The fraction of the Wanda scores ``|W| sqrt(s)`` of all ``weights`` together (``stats``
    None: ``|W|``) that exceed ``m`` times their mean (one Rust pass for the mean, one for the
    count; the scores are never materialized)."""
    weights = list(weights)
    st = list(stats) if stats is not None else [None] * len(weights)
    tr = list(transposed) if transposed is not None else [False] * len(weights)
    count, total = (int(v) for v in _ops.outlier_count(weights, st, tr, float(m)))
    return count / total if total else 0.0


@dataclass(frozen=True)
class CubicSchedule:
    """Gradual pruning's cubic schedule (Zhu & Gupta, 2017):
    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` for ``t0 <= t <= t0 + n dt``.

    ``start`` = t0, ``end`` = t0 + n dt, ``every`` = dt: the sparsity changes only at
    ``start + k * every``. Before ``start`` the schedule gives ``initial``; from ``end`` on,
    ``final``. ``steps()`` lists the steps where pruning should run.
    """

    final: float
    end: int
    initial: float = 0.0
    start: int = 0
    every: int = 1

    def __post_init__(self) -> None:
        for name in ("final", "initial"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ArgumentError(f"CubicSchedule: {name} ({v!r}) must be a number in [0, 1]")
        check_int("CubicSchedule", "start", self.start, lo=0)
        check_int("CubicSchedule", "end", self.end, lo=self.start + 1)
        check_int("CubicSchedule", "every", self.every, lo=1)

    def __call__(self, step: int) -> float:
        t = check_int("CubicSchedule", "step", step)
        if t < self.start:
            return float(self.initial)
        if t >= self.end:
            return float(self.final)
        t = self.start + (t - self.start) // self.every * self.every
        frac = (t - self.start) / (self.end - self.start)
        return float(self.final + (self.initial - self.final) * (1.0 - frac) ** 3)

    def steps(self) -> list[int]:
        return list(range(self.start, self.end + 1, self.every))


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class _Cfg:
    method: str
    pattern: str
    scope: str
    sparsity: float | None
    label: str = ""
    n: int = 0
    m: int = 0
    dim: int = 0
    group: int = 1


def _parse(method: str, sparsity: Any, pattern: str, scope: str, head_dim: Any) -> _Cfg:
    op = "prune_model"
    if method not in METHODS:
        raise ConfigError(f"{op}: method ({method!r}) must be one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ConfigError(f"{op}: scope ({scope!r}) must be one of {', '.join(SCOPES)}")
    if not isinstance(pattern, str):
        raise ConfigError(f"{op}: pattern ({pattern!r}) must be a string")
    nm = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    cfg = _Cfg(method, "N:M" if nm else pattern, scope, None, label=pattern)
    if nm:
        cfg.n, cfg.m = int(nm.group(1)), int(nm.group(2))
        if not 0 <= cfg.n <= cfg.m or cfg.m == 0:
            raise ConfigError(f"{op}: pattern ({pattern!r}) must be N:M with 0 <= N <= M, M >= 1")
        cfg.label = f"{cfg.n}:{cfg.m}"
        want = 1 - cfg.n / cfg.m
        if sparsity is not None and abs(float(sparsity) - want) > 1e-9:
            raise ConfigError(
                f"{op}: sparsity ({sparsity}) must be None or 1 - N/M = {want} for pattern "
                f"{cfg.label!r}"
            )
        cfg.sparsity = want
        if scope != "layer":
            raise ConfigError(f"{op}: scope ({scope!r}) must be 'layer' for an N:M pattern")
    else:
        if pattern not in PATTERNS or pattern == "N:M":
            raise ConfigError(
                f"{op}: pattern ({pattern!r}) must be 'unstructured', 'row', 'column', 'head' or "
                "'N:M' such as '2:4'"
            )
        if sparsity is None:
            raise ConfigError(f"{op}: sparsity (None) must be a number in [0, 1]")
        s = check_number(op, "sparsity", sparsity)
        if not 0.0 <= s <= 1.0:
            raise ConfigError(f"{op}: sparsity ({sparsity}) must be a number in [0, 1]")
        cfg.sparsity = s
    if cfg.pattern in ("row", "column", "head"):
        if scope != "layer":
            raise ConfigError(f"{op}: scope ({scope!r}) must be 'layer' for pattern {pattern!r}")
        cfg.dim = 1 if cfg.pattern == "column" else 0
        if cfg.pattern == "head":
            if head_dim is None:
                raise ConfigError(f"{op}: head_dim (None) must be given for pattern 'head'")
            cfg.group = check_int(op, "head_dim", head_dim, lo=1)
    if method == "sparsegpt" and (cfg.pattern in ("row", "column", "head") or scope != "layer"):
        raise ConfigError(
            f"{op}: method 'sparsegpt' supports pattern 'unstructured' or N:M with scope 'layer' "
            f"(got pattern {pattern!r}, scope {scope!r})"
        )
    if method == "random" and (cfg.pattern != "unstructured" or scope == "row"):
        raise ConfigError(
            f"{op}: method 'random' supports pattern 'unstructured' with scope 'layer' or "
            f"'global' (got pattern {pattern!r}, scope {scope!r})"
        )
    return cfg


def _block_of(name: str) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _allocate(
    allocation: Any,
    cfg: _Cfg,
    targets: dict[str, nn.Module],
    stats: Callable[[], ActivationStats],
) -> tuple[dict[str, float], dict[str, Any]]:
    op = "prune_model"
    s = float(cfg.sparsity or 0.0)
    if allocation is None:
        return {n: s for n in targets}, {}
    if cfg.pattern != "unstructured" and cfg.pattern not in ("row", "column", "head"):
        raise ConfigError(f"{op}: allocation must be None for an N:M pattern")
    if cfg.scope == "global":
        raise ConfigError(f"{op}: allocation must be None with scope 'global'")
    if isinstance(allocation, str):
        if allocation.lower() != "owl":
            raise ConfigError(
                f"{op}: allocation ({allocation!r}) must be 'owl', an OWL(...), a mapping or a callable"
            )
        allocation = OWL()
    if isinstance(allocation, OWL):
        st = stats()
        blocks: dict[str, list[str]] = {}
        for n in targets:
            blocks.setdefault(_block_of(n), []).append(n)
        ratios = []
        for names in blocks.values():
            ws = [targets[n].weight.detach() for n in names]
            ss = [st[n].col_sq for n in names]
            tr = [is_conv1d(targets[n]) for n in names]
            ratios.append(outlier_ratio(ws, ss, m=allocation.m, transposed=tr))
        alloc = owl_sparsities(ratios, s, allocation.lam)
        per = {n: a for names, a in zip(blocks.values(), alloc, strict=True) for n in names}
        info = {
            "allocation": "owl",
            "owl_m": allocation.m,
            "owl_lambda": allocation.lam,
            "owl_blocks": {
                b: {"outlier_ratio": r, "sparsity": a}
                for b, r, a in zip(blocks, ratios, alloc, strict=True)
            },
        }
        return per, info
    if isinstance(allocation, Mapping):
        unknown = [k for k in allocation if k not in targets]
        if unknown:
            raise ConfigError(
                f"{op}: allocation names a layer that is not targeted ({unknown[0]!r})"
            )
        per = {n: float(allocation.get(n, s)) for n in targets}
        kind = "mapping"
    elif callable(allocation):
        per = {n: float(allocation(n, m)) for n, m in targets.items()}
        kind = "callable"
    else:
        raise ConfigError(
            f"{op}: allocation ({type(allocation).__name__}) must be 'owl', an OWL(...), a mapping or a callable"
        )
    for n, v in per.items():
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{op}: allocation gives layer {n!r} sparsity {v}, expected [0, 1]")
    return per, {"allocation": kind}


# ---------------------------------------------------------------------------------------------
# Calibration drivers


class _Stop(Exception):
    """Raised inside a hook to end a calibration forward pass early."""


def _same_input(x: Tensor, y: Tensor) -> bool:
    return x is y or (
        x.data_ptr() == y.data_ptr()
        and x.shape == y.shape
        and x.stride() == y.stride()
        and x._version == y._version
        and x.dtype == y.dtype
    )


def _run(model: nn.Module, batches: list[Any]) -> Iterable[int]:
    for i, b in enumerate(batches):
        try:
            feed(model, b)
        except _Stop:
            pass
        yield i


def _collect_group(
    model: nn.Module,
    remaining: dict[str, nn.Module],
    batches: list[Any],
    wanda: bool,
    hessian: bool,
) -> dict[str, LayerStats]:
    """Statistics of the next group of layers in forward order: the first remaining layer the
    model calls, and every remaining layer called with the very same input tensor (such layers
    cannot depend on each other). Each forward pass stops once the group has seen its input."""
    group: dict[str, LayerStats] = {}
    state: dict[str, Any] = {"anchor": None, "first": True, "seen": set()}

    def make(name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            from .stats import _first_tensor

            x = _first_tensor(args, kwargs)
            if x is None:
                return
            if state["first"]:
                if state["anchor"] is None:
                    state["anchor"] = x
                elif name not in group and not _same_input(x, state["anchor"]):
                    raise _Stop
                if name not in group:
                    group[name] = LayerStats(
                        name, in_features(module), want_col_sq=wanda, want_hessian=hessian
                    )
                group[name].add(x)
            elif name in group:
                group[name].add(x)
                state["seen"].add(name)
                if len(state["seen"]) == len(group):
                    raise _Stop

        return hook

    handles = [
        m.register_forward_pre_hook(make(n, m), with_kwargs=True) for n, m in remaining.items()
    ]
    try:
        for i in _run(model, batches):
            if i == 0:
                state["first"] = False
                state["anchor"] = None
            state["seen"] = set()
    finally:
        for h in handles:
            h.remove()
    return group


def _default_loss(out: Any) -> Tensor:
    if isinstance(out, Tensor) and out.numel() == 1:
        return out.reshape(())
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if isinstance(loss, Tensor):
        return loss
    raise ConfigError(
        "prune_model: the model's output has no scalar loss; pass loss_fn(output, batch) -> scalar"
    )


# ---------------------------------------------------------------------------------------------
# Masks per pattern


def _structured_from_scores(score: Tensor, cfg: _Cfg, s: float, signed: bool) -> Tensor:
    if not signed:
        return structured_mask(score, s, dim=cfg.dim, group_size=cfg.group, norm=1)
    g = group_scores(score, dim=cfg.dim, group_size=cfg.group, reduce="sum")
    keep_g = topk_mask(g, s)
    keep = keep_g.repeat_interleave(cfg.group)
    return (
        keep.reshape(-1, 1).expand(score.shape)
        if cfg.dim == 0
        else keep.reshape(1, -1).expand(score.shape)
    )


def _score_mask(score: Tensor, cfg: _Cfg, s: float, signed: bool) -> Tensor:
    if cfg.pattern == "N:M":
        return nm_mask(score, cfg.n, cfg.m)
    if cfg.pattern in ("row", "column", "head"):
        return _structured_from_scores(score, cfg, s, signed)
    return topk_mask(score, s, dim=-1 if cfg.scope == "row" else None)


def _check_shapes(cfg: _Cfg, targets: dict[str, nn.Module]) -> None:
    bad = []
    for name, mod in targets.items():
        out_f, in_f = weight_matrix(mod).shape
        if cfg.pattern == "N:M" and in_f % cfg.m:
            bad.append(f"{name} (in_features {in_f} not divisible by {cfg.m})")
        if cfg.pattern == "head" and out_f % cfg.group:
            bad.append(f"{name} (out_features {out_f} not divisible by head_dim {cfg.group})")
    if bad:
        raise ConfigError(
            f"prune_model: pattern {cfg.pattern!r} cannot apply to {len(bad)} layer(s): "
            + "; ".join(bad[:5])
            + " (exclude them)"
        )


# ---------------------------------------------------------------------------------------------
# prune_model


def prune_model(
    model: nn.Module,
    method: str,
    sparsity: float | None = None,
    *,
    pattern: str = "unstructured",
    scope: str = "layer",
    calibration: Iterable[Any] | None = None,
    include: str | None = None,
    exclude: str | None = None,
    allocation: Any = None,
    scores: GradientScores | Mapping[str, Tensor] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    sequential: bool | None = None,
    head_dim: int | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    seed: int = 0,
    return_masks: bool = False,
    progress: bool | None = None,
) -> PruneReport:
    """Prunes the ``nn.Linear`` (and ``Conv1D``-style) layers of ``model`` in place.

    ``method``: ``magnitude`` (``|W|``), ``wanda`` (``|W| sqrt(s)``, needs ``calibration``),
    ``sparsegpt`` (OBS updates, needs ``calibration``), ``movement``, ``snip``,
    ``snip_momentum``, ``fisher``, ``taylor`` (gradient scores: pass ``scores`` — a
    :class:`GradientScores` or a mapping name -> ``(out, in)`` score — or ``calibration`` with a
    loss, ``loss_fn(output, batch)`` or the output's ``.loss``), or ``random`` (seeded by
    ``seed``).

    ``pattern``: ``"unstructured"``; ``"N:M"`` such as ``"2:4"`` (keep N of every M consecutive
    inputs of each output; ``sparsity`` None or ``1 - N/M``); ``"row"`` (whole output channels),
    ``"column"`` (whole input features) or ``"head"`` (groups of ``head_dim`` consecutive output
    channels), ranked by the L2 norm of the weights for magnitude and by the sum of the scores
    otherwise.

    ``scope``: ``"layer"`` — each layer on its own, with the method's comparison group: the whole
    layer, except Wanda which compares within each output row as in the paper (and SparseGPT,
    which selects per block of columns); ``"row"`` — within each output row, for any method;
    ``"global"`` — one threshold over all targeted layers (magnitude and Wanda never materialize
    the scores: the extra memory is a few histograms).

    ``include`` / ``exclude``: regular expressions searched (``re.search``) in module names.
    ``allocation`` (scope ``"layer"``): ``"owl"`` / :class:`OWL` (outlier-weighted, needs
    ``calibration``), a mapping name -> sparsity, or ``callable(name, module) -> sparsity``.

    Calibration batches are fed as ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple
    or list, else ``model(batch)`` (tensors moved to the model's device), in eval mode without
    gradients. Wanda collects its statistics in one pass over the dense model unless
    ``sequential=True``; SparseGPT (``sequential`` default True) prunes layer by layer, the
    calibration inputs re-propagated through the layers already pruned: each pass stops right after
    the next group of layers (those fed the very same input tensor, such as q/k/v) has seen its
    input. ``return_masks=True`` keeps the ``(out, in)`` keep-masks in ``report.masks``.
    ``progress``: a tqdm bar (None: only on a terminal).

    Returns a :class:`PruneReport` (per-layer sparsity, time, parameters; printable, JSON).
    """
    t_start = time.perf_counter()
    op = "prune_model"
    cfg = _parse(method, sparsity, pattern, scope, head_dim)
    targets = find_layers(model, include=include, exclude=exclude, op=op)
    if not targets:
        raise ConfigError(
            f"{op}: no nn.Linear or Conv1D layer matched (include={include!r}, exclude={exclude!r})"
        )
    _check_shapes(cfg, targets)
    seed = check_int(op, "seed", seed, lo=0, hi=2**62)
    owl = allocation is not None and (
        isinstance(allocation, OWL) or (isinstance(allocation, str) and allocation.lower() == "owl")
    )
    grad = method in GRADIENT_METHODS
    needs_calib = method in ("wanda", "sparsegpt") or owl or (grad and scores is None)
    batches: list[Any] | None = None
    if calibration is not None:
        batches = list(calibration)
        if not batches:
            raise ConfigError(f"{op}: calibration is empty")
    if needs_calib and batches is None:
        what = (
            "the gradient scores (or pass scores=)"
            if grad
            else f"method {method!r}"
            if not owl
            else "OWL allocation"
        )
        raise ConfigError(f"{op}: calibration (None) must be given for {what}")
    if sequential is None:
        sequential = method == "sparsegpt"
    params: dict[str, Any] = {"seed": seed} if method == "random" else {}
    if batches is not None:
        params["calibration_batches"] = len(batches)
    if method == "sparsegpt":
        params.update(
            block_size=check_int(op, "block_size", block_size, lo=1), percdamp=float(percdamp)
        )
    if method in ("wanda", "sparsegpt"):
        params["sequential"] = bool(sequential)
    if cfg.pattern == "head":
        params["head_dim"] = cfg.group

    was_training = model.training
    model.eval()
    cache: dict[str, ActivationStats] = {}

    def dense_stats() -> ActivationStats:
        if "s" not in cache:
            assert batches is not None
            cache["s"] = ActivationStats(model, layers=targets, wanda=True).collect(batches)
        return cache["s"]

    try:
        per, alloc_info = _allocate(allocation, cfg, targets, dense_stats)
        params.update(alloc_info)
        reports: dict[str, LayerReport] = {}
        masks: dict[str, Tensor] | None = {} if return_masks else None
        bar = _bar(len(targets), progress, f"prune {method}")

        def record(
            name: str,
            mod: nn.Module,
            pruned: int,
            t0: float,
            info: dict | None = None,
            mask: Tensor | None = None,
        ) -> None:
            w = weight_matrix(mod)
            numel = w.numel()
            zeros = numel - int(torch.count_nonzero(w))
            target: float | str = cfg.label if cfg.pattern == "N:M" else per[name]
            reports[name] = LayerReport(
                name,
                "Conv1D" if is_conv1d(mod) else "Linear",
                (int(w.shape[0]), int(w.shape[1])),
                numel,
                int(pruned),
                zeros / numel if numel else 0.0,
                target,
                time.perf_counter() - t0,
                info or {},
            )
            if masks is not None:
                masks[name] = mask if mask is not None else (w != 0)
            bar.update(1)

        def apply(
            name: str, mod: nn.Module, keep: Tensor, t0: float, info: dict | None = None
        ) -> None:
            w = weight_matrix(mod)
            apply_mask_(w, keep.to(w.device))
            record(
                name,
                mod,
                keep.numel() - int(keep.sum()),
                t0,
                info,
                keep if masks is not None else None,
            )

        if method == "sparsegpt":
            _run_sparsegpt(
                model,
                targets,
                batches or [],
                cfg,
                per,
                bool(sequential),
                int(block_size),
                float(percdamp),
                record,
            )
        elif method == "wanda":
            if sequential:
                remaining = dict(targets)
                while remaining:
                    group = _collect_group(model, remaining, batches or [], True, False)
                    if not group:
                        raise ConfigError(
                            f"{op}: layers never called during calibration: {', '.join(list(remaining)[:5])}"
                        )
                    for name, st in group.items():
                        _prune_wanda_layer(
                            name, remaining.pop(name), st, cfg, per[name], apply, record
                        )
            else:
                st = dense_stats()
                missing = [n for n in targets if st[n].nsamples == 0]
                if missing:
                    raise ConfigError(
                        f"{op}: layers never called during calibration: {', '.join(missing[:5])}"
                    )
                if cfg.scope == "global":
                    _threshold_layers(
                        targets,
                        {n: st[n].col_sq for n in targets},
                        float(cfg.sparsity or 0.0),
                        masks is not None,
                        apply,
                        record,
                    )
                else:
                    for name, mod in targets.items():
                        _prune_wanda_layer(name, mod, st[name], cfg, per[name], apply, record)
        elif method == "magnitude":
            if cfg.scope == "global":
                _threshold_layers(
                    targets,
                    dict.fromkeys(targets),
                    float(cfg.sparsity or 0.0),
                    masks is not None,
                    apply,
                    record,
                )
            else:
                for name, mod in targets.items():
                    t0 = time.perf_counter()
                    s = per[name]
                    w = weight_matrix(mod)
                    if cfg.pattern == "unstructured" and cfg.scope == "layer":
                        _threshold_layers(
                            {name: mod}, dict.fromkeys([name]), s, masks is not None, apply, record
                        )
                        continue
                    if cfg.pattern == "N:M":
                        keep = _ops.wanda_mask(w.cpu(), None, 0.0, cfg.n, cfg.m)
                    elif cfg.pattern in ("row", "column", "head"):
                        keep = structured_mask(
                            w.cpu(), s, dim=cfg.dim, group_size=cfg.group, norm=2
                        )
                    else:  # per row
                        keep = _ops.wanda_mask(w.cpu(), None, s, 0, 0)
                    apply(name, mod, keep, t0)
        elif method == "random":
            _prune_random(targets, cfg, per, seed, apply)
        else:
            score_map = _gradient_scores(model, targets, method, scores, batches, loss_fn)
            signed = method == "movement"
            if cfg.scope == "global":
                t0 = time.perf_counter()
                names = list(targets)
                keeps = global_topk_masks(
                    [score_map[n].cpu() for n in names], float(cfg.sparsity or 0.0)
                )
                for n, k in zip(names, keeps, strict=True):
                    apply(n, targets[n], k, t0)
            else:
                for name, mod in targets.items():
                    t0 = time.perf_counter()
                    apply(name, mod, _score_mask(score_map[name].cpu(), cfg, per[name], signed), t0)
        bar.close()
    finally:
        model.train(was_training)
    layers = [reports[n] for n in targets]
    return PruneReport(
        method,
        cfg.label,
        cfg.scope,
        cfg.sparsity,
        layers,
        params,
        time.perf_counter() - t_start,
        masks,
    )


def _bar(total: int, progress: bool | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="layer",
        disable=None if progress is None else not progress,
        leave=False,
    )


def _prune_wanda_layer(
    name: str,
    mod: nn.Module,
    st: LayerStats,
    cfg: _Cfg,
    s: float,
    apply: Callable,
    record: Callable,
) -> None:
    t0 = time.perf_counter()
    w = weight_matrix(mod)
    stat = st.col_sq.cpu() if st.col_sq is not None else None
    if stat is None:
        raise ConfigError(f"prune_model: layer {name!r} was never called during calibration")
    wc = w.cpu()
    if cfg.pattern == "N:M":
        keep = _ops.wanda_mask(wc, stat, 0.0, cfg.n, cfg.m)
    elif cfg.pattern in ("row", "column", "head"):
        keep = _structured_from_scores(_ops.wanda_scores(wc, stat), cfg, s, False)
    elif cfg.scope == "layer" or cfg.scope == "row":
        keep = _ops.wanda_mask(wc, stat, s, 0, 0)
    else:  # pragma: no cover - global handled by the caller
        raise AssertionError(cfg.scope)
    apply(name, mod, keep, t0, {"nsamples": st.nsamples})


def _threshold_layers(
    targets: dict[str, nn.Module],
    stats: dict[str, Tensor | None],
    sparsity: float,
    want_masks: bool,
    apply: Callable,
    record: Callable,
) -> None:
    """One exact threshold over the scores of all ``targets`` (magnitude, or Wanda with stats),
    applied in place layer by layer; the scores are never materialized."""
    t0 = time.perf_counter()
    names = list(targets)
    stored = [targets[n].weight.detach() for n in names]
    tr = [is_conv1d(targets[n]) for n in names]
    st = [None if stats[n] is None else stats[n].cpu() for n in names]
    on_cpu = all(w.device.type == "cpu" for w in stored)
    cpu = stored if on_cpu else [w.cpu() for w in stored]
    value_t, ties_t = _ops.score_threshold(cpu, st, tr, sparsity)
    value, ties = float(value_t), int(ties_t)
    for n, w, wc, s, t in zip(names, stored, cpu, st, tr, strict=True):
        t1 = time.perf_counter() if len(names) > 1 else t0
        if want_masks or not on_cpu:
            keep_stored, used = _ops.threshold_mask(wc, s, t, value, ties)
            ties -= int(used)
            keep = keep_stored.t() if t else keep_stored
            apply(n, targets[n], keep, t1)
        else:
            pruned, used = (int(v) for v in _ops.threshold_prune_(w, s, t, value, ties))
            ties -= used
            record(n, targets[n], pruned, t1)


def _prune_random(
    targets: dict[str, nn.Module], cfg: _Cfg, per: dict[str, float], seed: int, apply: Callable
) -> None:
    if cfg.scope == "global":
        t0 = time.perf_counter()
        sizes = [weight_matrix(m).numel() for m in targets.values()]
        total = sum(sizes)
        k = math.floor(float(cfg.sparsity or 0.0) * total)
        keep_all = random_mask((total,), (total - k) / total if total else 1.0, seed=seed)
        off = 0
        for (name, mod), size in zip(targets.items(), sizes, strict=True):
            w = weight_matrix(mod)
            apply(name, mod, keep_all[off : off + size].reshape(w.shape), t0, {"seed": seed})
            off += size
        return
    for i, (name, mod) in enumerate(targets.items()):
        t0 = time.perf_counter()
        w = weight_matrix(mod)
        n = w.numel()
        k = math.floor(per[name] * n)
        layer_seed = (seed * 1_000_003 + i) % (2**63)
        keep = random_mask(tuple(w.shape), (n - k) / n if n else 1.0, seed=layer_seed)
        apply(name, mod, keep, t0, {"seed": layer_seed})


def _gradient_scores(
    model: nn.Module,
    targets: dict[str, nn.Module],
    method: str,
    scores: Any,
    batches: list[Any] | None,
    loss_fn: Callable | None,
) -> dict[str, Tensor]:
    op = "prune_model"
    if scores is not None:
        if isinstance(scores, GradientScores) and scores.method != method:
            raise ConfigError(f"{op}: scores hold {scores.method!r} scores, expected {method!r}")
        missing = [n for n in targets if n not in scores]
        if missing:
            raise ConfigError(f"{op}: scores has no entry for layer {missing[0]!r}")
        out = {}
        for n, mod in targets.items():
            sc = scores[n]
            want = tuple(weight_matrix(mod).shape)
            if tuple(sc.shape) != want:
                raise ConfigError(
                    f"{op}: scores[{n!r}] has shape {tuple(sc.shape)}, expected the (out, in) shape {want}"
                )
            out[n] = sc.detach()
        return out
    acc = GradientScores({n: m.weight for n, m in targets.items()}, method)
    acc._transposed = {n: is_conv1d(m) for n, m in targets.items()}
    weights = [m.weight for m in targets.values()]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches or []:
            with torch.enable_grad():
                out = feed(model, batch)
                loss = loss_fn(out, batch) if loss_fn is not None else _default_loss(out)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ConfigError(f"{op}: loss_fn must return a scalar tensor")
                grads = torch.autograd.grad(loss.reshape(()), weights, allow_unused=True)
            acc.accumulate(
                [
                    g if g is not None else torch.zeros_like(w)
                    for g, w in zip(grads, weights, strict=True)
                ]
            )
    finally:
        for w, f in zip(weights, flags, strict=True):
            w.requires_grad_(f)
    return {n: acc[n] for n in targets}


def _run_sparsegpt(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: list[Any],
    cfg: _Cfg,
    per: dict[str, float],
    sequential: bool,
    block_size: int,
    percdamp: float,
    record: Callable,
) -> None:
    def prune(name: str, mod: nn.Module, st: LayerStats) -> None:
        t0 = time.perf_counter()
        if st.hessian is None:
            raise ConfigError(f"prune_model: layer {name!r} was never called during calibration")
        w = weight_matrix(mod)
        if cfg.pattern == "N:M":
            res = sparsegpt_(
                w, st.hessian, None, n=cfg.n, m=cfg.m, block_size=block_size, percdamp=percdamp
            )
        else:
            res = sparsegpt_(w, st.hessian, per[name], block_size=block_size, percdamp=percdamp)
        st.hessian = None  # free it before the next layer
        record(
            name,
            mod,
            res.mask.numel() - int(res.mask.sum()),
            t0,
            {"error": res.error, "damp": res.damp, "nsamples": st.nsamples},
            res.mask,
        )

    if sequential:
        remaining = dict(targets)
        while remaining:
            group = _collect_group(model, remaining, batches, False, True)
            if not group:
                raise ConfigError(
                    f"prune_model: layers never called during calibration: {', '.join(list(remaining)[:5])}"
                )
            for name, st in group.items():
                prune(name, remaining.pop(name), st)
    else:
        stats = ActivationStats(model, layers=targets, wanda=False, hessian=True).collect(batches)
        for name, mod in targets.items():
            prune(name, mod, stats[name])
