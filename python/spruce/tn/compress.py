"""Compressing models and checkpoints with MPO (tensor-train matrix) factorizations.

:func:`compress_model` replaces matching ``nn.Linear`` modules by :class:`MPOLinear` in place;
:func:`compress_checkpoint` rewrites a safetensors checkpoint, storing each matching 2-D weight
``<name>.weight`` as cores ``<name>.cores.<k>`` (the state-dict keys of ``MPOLinear``) and
copying every other tensor. Both report, per layer, parameters before and after, the relative
Frobenius error of the weight and the multiply-adds per input row.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError
from .decomp import balanced_modes, mpo_decompose, mpo_to_matrix
from .layers import MPOLinear, PerformanceWarning, mpo_flops

__all__ = ["compress_model", "compress_checkpoint", "LayerReport"]


@dataclass(frozen=True)
class LayerReport:
    """What compressing one layer did."""

    name: str
    shape: tuple[int, int]
    in_modes: list[int]
    out_modes: list[int]
    ranks: list[int]
    params_before: int
    params_after: int
    rel_error: float
    flops_before: int
    flops_after: int

    @property
    def ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)


def _check(max_rank: Any, eps: Any, method: str) -> None:
    if method != "mpo":
        raise ArgumentError(f"compress: method ({method!r}) must be 'mpo'")
    if max_rank is None and eps is None:
        raise ArgumentError("compress: give max_rank or eps (or both)")


def _factor(
    name: str, w: torch.Tensor, num_cores: int, max_rank: Any, eps: Any
) -> tuple[list[torch.Tensor], LayerReport]:
    out_f, in_f = w.shape
    im, om = balanced_modes(in_f, num_cores), balanced_modes(out_f, num_cores)
    work = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
    cores = mpo_decompose(work, im, om, max_rank=max_rank, eps=eps)
    ranks = [1] + [int(c.shape[-1]) for c in cores]
    err = float(
        torch.linalg.norm(mpo_to_matrix(cores) - work) / torch.linalg.norm(work).clamp_min(1e-30)
    )
    rep = LayerReport(
        name=name,
        shape=(out_f, in_f),
        in_modes=im,
        out_modes=om,
        ranks=ranks,
        params_before=w.numel(),
        params_after=sum(c.numel() for c in cores),
        rel_error=err,
        flops_before=out_f * in_f,
        flops_after=mpo_flops(im, om, ranks),
    )
    return [c.to(w.dtype) for c in cores], rep


def compress_model(
    model: nn.Module,
    method: str = "mpo",
    *,
    max_rank: Any = None,
    eps: float | None = None,
    include: str = r".*",
    num_cores: int = 3,
    min_features: int = 64,
    progress: bool | None = None,
) -> list[LayerReport]:
    """Replaces every ``nn.Linear`` whose qualified name matches ``include`` (``re.search``) and
    whose features are both at least ``min_features`` by an :class:`MPOLinear` with
    ``num_cores`` cores (``max_rank`` / ``eps`` as in :func:`spruce.tn.mpo_decompose`). Layers
    whose factorization would cost more multiply-adds than the dense layer are left alone.
    Returns one :class:`LayerReport` per replaced layer; the layers left dense are named in a
    :class:`PerformanceWarning`."""
    _check(max_rank, eps, method)
    pattern = re.compile(include)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        and pattern.search(name)
        and min(mod.in_features, mod.out_features) >= min_features
    ]
    from tqdm.auto import tqdm

    reports = []
    kept: list[LayerReport] = []
    show = progress if progress is not None else len(targets) >= 8
    for name, mod in tqdm(targets, desc="compress", disable=not show or None):
        cores, rep = _factor(name, mod.weight.detach(), num_cores, max_rank, eps)
        if rep.flops_after > rep.flops_before:
            kept.append(rep)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PerformanceWarning)
            new = MPOLinear(
                rep.in_modes,
                rep.out_modes,
                rep.ranks,
                bias=mod.bias is not None,
                device=mod.weight.device,
                dtype=mod.weight.dtype,
            )
        with torch.no_grad():
            for p, c in zip(new.cores, cores, strict=True):
                p.copy_(c)
            if mod.bias is not None and new.bias is not None:
                new.bias.copy_(mod.bias.detach())
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        reports.append(rep)
    _warn_kept(kept)
    return reports


def _warn_kept(kept: list[LayerReport]) -> None:
    """Layers that matched but stay dense: their factorization would cost more than the layer."""
    if kept:
        names = ", ".join(
            f"{r.name} (ranks {r.ranks}: {r.flops_after} > {r.flops_before})" for r in kept
        )
        warnings.warn(
            f"compress: {len(kept)} matching layer(s) left dense because their MPO would cost more "
            f"multiply-adds per row than the dense layer: {names}; lower max_rank/eps or use "
            "more cores",
            PerformanceWarning,
            stacklevel=3,
        )


def compress_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_rank: Any = None,
    eps: float | None = None,
    include: str = r".*",
    num_cores: int = 3,
    min_features: int = 64,
    progress: bool | None = None,
) -> list[LayerReport]:
    """Rewrites a safetensors checkpoint with matching 2-D ``*.weight`` tensors as MPO cores.

    A tensor ``<name>.weight`` of shape ``(out, in)`` whose name matches ``include`` and whose
    dims are both at least ``min_features`` is stored as ``<name>.cores.<k>``; the modes and ranks
    go into the file's metadata (``spruce.mpo``, JSON). Other tensors are copied unchanged, as are
    matching weights whose MPO would cost more multiply-adds than the dense layer (named in a
    :class:`PerformanceWarning`).
    Reading is lazy and writing streams, so the whole model is never in memory at once.
    """
    from ..io import CheckpointWriter, TensorSpec, open_checkpoint

    _check(max_rank, eps, "mpo")
    pattern = re.compile(include)
    reports: list[LayerReport] = []
    with open_checkpoint(src) as ck:
        names = ck.names

        def plan() -> Iterator[tuple[str, Any]]:
            for n in names:
                shape = ck.shape(n)
                if (
                    n.endswith(".weight")
                    and len(shape) == 2
                    and min(shape) >= min_features
                    and pattern.search(n)
                ):
                    yield n, "mpo"
                else:
                    yield n, None

        # Factor first (one tensor at a time) to know the output layout, then stream it out.
        from tqdm.auto import tqdm

        chosen = [n for n, how in plan() if how == "mpo"]
        show = progress if progress is not None else len(chosen) >= 8
        factored: dict[str, list[torch.Tensor]] = {}
        kept: list[LayerReport] = []
        for n in tqdm(chosen, desc="compress", disable=not show or None):
            w = ck.get_tensor(n)
            cores, rep = _factor(n[: -len(".weight")], w, num_cores, max_rank, eps)
            if rep.flops_after > rep.flops_before:
                kept.append(rep)
                continue
            factored[n] = [c.contiguous() for c in cores]
            reports.append(rep)
        specs = []
        for n in names:
            if n in factored:
                base = n[: -len(".weight")]
                specs += [
                    TensorSpec(f"{base}.cores.{k}", c.dtype, tuple(c.shape))
                    for k, c in enumerate(factored[n])
                ]
            else:
                specs.append(ck.spec(n))
        meta = {"spruce.mpo": json.dumps([asdict(r) for r in reports])}
        with CheckpointWriter(dst, specs, metadata=meta) as wr:
            for n in names:
                if n in factored:
                    base = n[: -len(".weight")]
                    for k, c in enumerate(factored[n]):
                        wr.write(f"{base}.cores.{k}", c)
                else:
                    wr.write(n, ck.get_tensor(n))
    _warn_kept(kept)
    return reports
