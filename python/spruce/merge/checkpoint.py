"""Checkpoint-level merging: stream safetensors checkpoints one tensor at a time.

:func:`merge_checkpoints` reads the base and every model lazily (memory-mapped, through
:mod:`spruce.io`), merges one tensor name at a time with :func:`spruce.merge.merge_tensors` and
writes it straight into a sharded safetensors output that appears atomically when complete: each
tensor is merged into one of the writer's two reusable slots, which a background thread writes
(direct I/O) while the next tensor merges. The memory it needs is about (number of models + 3) x
the largest tensor (the inputs, the two slots), never the models' size: after each tensor every
input mapping is released, so the pages it touched leave the process.

Every name, shape and dtype is checked across the checkpoints before anything is written.
Random drops (DARE, DELLA) are keyed by a per-tensor seed derived from the configuration's seed
and the tensor's name, so the result does not depend on tensor order, sharding or on merging by
file versus by state dict (:func:`merge_state_dicts` gives identical tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _core, _ops
from .._measure import fmt_bytes, fmt_time, reset_peak
from .._native import to_numpy
from ..errors import ArgumentError, CheckpointError, ConfigError, SpruceError
from ..io import INDEX_NAME, Checkpoint, CheckpointWriter, TensorSpec, open_checkpoint
from .config import MergeConfig, Source, load_config
from .tensors import _FAMILY, _resolve, merge_plan

__all__ = ["MergeReport", "merge_checkpoints", "merge_state_dicts", "tensor_seed"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's random drops: ``seed`` mixed with a hash of ``name``."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return (seed ^ h) & (2**63 - 1)


@dataclass
class MergeReport:
    """What a merge did."""

    method: str
    preset: str
    out: Path | None
    files: list[Path] = field(default_factory=list)
    merged: int = 0
    copied: int = 0
    skipped: list[str] = field(default_factory=list)
    parameters: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int | None = None

    def summary(self) -> str:
        lines = [
            f"merged {self.merged} tensor(s) ({self.parameters:,} parameters) with "
            f"{self.method} (preset {self.preset}); copied {self.copied} from the base; "
            f"skipped {len(self.skipped)}",
            f"read {fmt_bytes(self.bytes_read)}, wrote {fmt_bytes(self.bytes_written)} in "
            f"{fmt_time(self.seconds)}; peak resident memory {fmt_bytes(self.peak_rss_bytes)}",
        ]
        if self.out is not None:
            lines.append(f"output: {self.out} ({len(self.files)} file(s))")
        if self.skipped:
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            lines.append(f"skipped: {', '.join(self.skipped[:5])}{more}")
        return "\n".join(lines)


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _Sources:
    """The inputs of a merge as mappings (open checkpoints or state dicts), with their labels."""

    def __init__(self, cfg: MergeConfig):
        self.opened: list[Checkpoint] = []
        self.base = None if cfg.base_model is None else self._open("base_model", cfg.base_model)
        self.models = [self._open(f"models[{i}]", m.model) for i, m in enumerate(cfg.models)]
        self.fisher = [
            self._open(f"models[{i}].fisher", m.fisher)
            for i, m in enumerate(cfg.models)
            if m.fisher is not None
        ]
        self.labels = (["base_model"] if self.base is not None else []) + [
            f"models[{i}] ({m.label})" for i, m in enumerate(cfg.models)
        ]

    def _open(self, where: str, src: Source) -> Mapping[str, torch.Tensor]:
        if isinstance(src, Mapping):
            return src
        try:
            ck = open_checkpoint(src)
            _check_index(ck)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from e
        self.opened.append(ck)
        return ck

    @property
    def all(self) -> list[Mapping[str, torch.Tensor]]:
        return ([self.base] if self.base is not None else []) + self.models

    def release(self) -> None:
        """Drops every memory mapping (they are reopened lazily on the next read)."""
        for ck in self.opened:
            ck.close()


def _check_index(ck: Checkpoint) -> None:
    """A sharded checkpoint's index must not list tensors that no shard holds (a truncated
    download or a hand-edited index): such a tensor would silently vanish from the merge."""
    index = ck.path / INDEX_NAME
    if not ck.path.is_dir() or not index.exists():
        return
    try:
        listed = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
    missing = [n for n in listed if n not in ck]
    if missing:
        raise CheckpointError(
            f"{index}: lists {len(missing)} tensor(s) that no shard holds (first: {missing[0]!r})"
        )


_CHECKPOINT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors|" + re.escape(INDEX_NAME))


def remove_stale_files(out: Path, written: Sequence[Path]) -> list[Path]:
    """After a checkpoint directory was (re)written: removes the files of an earlier checkpoint
    in it (``model.safetensors``, ``model-*-of-*.safetensors``, the index) that this write did
    not produce, so the directory never mixes a stale index or shards with the new weights."""
    if not out.is_dir():
        return []
    keep = {p.name for p in written}
    removed = []
    for f in sorted(out.iterdir()):
        if f.is_file() and f.name not in keep and _CHECKPOINT_FILE.fullmatch(f.name):
            f.unlink()
            removed.append(f)
    return removed


def _inputs(cfg: MergeConfig) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    if cfg.base_model is not None and not isinstance(cfg.base_model, Mapping):
        out.append(("base_model", Path(cfg.base_model)))
    for i, m in enumerate(cfg.models):
        if not isinstance(m.model, Mapping):
            out.append((f"models[{i}]", Path(m.model)))
        if m.fisher is not None and not isinstance(m.fisher, Mapping):
            out.append((f"models[{i}].fisher", Path(m.fisher)))
    return out


def output_overlaps(out: Path, inp: Path) -> bool:
    """Whether writing ``out`` could overwrite (or remove as stale) a file of ``inp``."""
    o, i = out.resolve(), inp.resolve()
    if o == i:
        return True
    out_is_file = out.suffix == ".safetensors"
    if i.is_dir():
        return out_is_file and o.parent == i
    return not out_is_file and o == i.parent and bool(_CHECKPOINT_FILE.fullmatch(i.name))


def _check_output(cfg: MergeConfig, out: Path) -> None:
    for where, p in _inputs(cfg):
        if output_overlaps(out, p):
            raise ConfigError(
                f"the output ({out}) must differ from the input {where} ({p}): the inputs are "
                "read while the output is written"
            )


def _meta(src: Mapping[str, torch.Tensor], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    if isinstance(src, Checkpoint):
        return src.shape(name), src.dtype(name)
    t = src[name]
    return tuple(t.shape), t.dtype


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


@dataclass
class _Item:
    name: str
    action: str  # "merge", "copy"
    spec: TensorSpec


def _plan_tensors(cfg: MergeConfig, src: _Sources) -> tuple[list[_Item], list[str]]:
    """Decides, for every tensor name, to merge, copy or skip it; checks shapes and dtypes."""
    ref = src.base if src.base is not None else src.models[0]
    ref_label = "base_model" if src.base is not None else src.labels[0]
    names: list[str] = list(ref)
    seen = set(names)
    for s in src.all:
        for n in s:
            if n not in seen:
                seen.add(n)
                names.append(n)
    items: list[_Item] = []
    skipped: list[str] = []
    for name in names:
        present = [(label, s) for label, s in zip(src.labels, src.all, strict=True) if name in s]
        missing = [label for label, s in zip(src.labels, src.all, strict=True) if name not in s]
        if name not in ref:
            if cfg.on_missing == "skip":
                skipped.append(name)
                continue
            raise CheckpointError(
                f"tensor {name!r} is missing from {ref_label} but present in "
                f"{', '.join(label for label, _ in present)}; set on_missing: skip to leave it out"
            )
        shape, dtype = _meta(ref, name)
        for label, s in present:
            sh, dt = _meta(s, name)
            if sh != shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {sh} in {label}, expected {shape} as in {ref_label}"
                )
            if dt != dtype:
                raise CheckpointError(
                    f"tensor {name!r} has dtype {_dtype_name(dt)} in {label}, expected "
                    f"{_dtype_name(dtype)} as in {ref_label} (convert the checkpoints to one dtype)"
                )
        for i, f in enumerate(src.fisher):
            if name in f and _meta(f, name)[0] != shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {_meta(f, name)[0]} in models[{i}].fisher, "
                    f"expected {shape}"
                )
        if missing:
            if cfg.on_missing == "error":
                raise CheckpointError(
                    f"tensor {name!r} is missing from {', '.join(missing)} (on_missing: error)"
                )
            if cfg.on_missing == "skip":
                skipped.append(name)
                continue
        floating = dtype in _FLOATS
        if floating and not missing and src.fisher:
            lacking = [i for i, f in enumerate(src.fisher) if name not in f]
            if lacking:
                raise CheckpointError(
                    f"tensor {name!r} is missing from the fisher checkpoint of models[{lacking[0]}]"
                )
        action = "merge" if floating and not missing else "copy"
        out_dtype = cfg.dtype if (cfg.dtype is not None and floating) else dtype
        items.append(_Item(name, action, TensorSpec(name, out_dtype, shape)))
    return items, skipped


def _model_cuts(cfg: MergeConfig, src: _Sources, items: list[_Item]) -> list[list[int]] | None:
    """Model-wide trimming: per merged tensor, the flattened (key, end) cut of every model."""
    plan = merge_plan(cfg.merge_method, preset=cfg.preset, **cfg.options())
    if plan["trim_scope"] != "model" or plan["sparsify"] != "magnitude":
        return None
    merged = [it.name for it in items if it.action == "merge"]
    per_tensor: list[list[int]] = [[] for _ in merged]
    if not merged or src.base is None:
        return per_tensor
    for k, d in enumerate(cfg.densities()):
        bases = [to_numpy("merge", "base", src.base[n]) for n in merged]
        models = [to_numpy("merge", "models", src.models[k][n]) for n in merged]
        cuts = _core.merge_model_cuts(bases, models, d)
        del bases, models
        src.release()
        for i, (key, end) in enumerate(cuts):
            per_tensor[i] += [key - 2**64 if key >= 2**63 else key, end]
    return per_tensor


def _run(
    cfg: MergeConfig,
    sink: Callable[[str, torch.Tensor], None] | CheckpointWriter,
    items: list[_Item],
    src: _Sources,
    report: MergeReport,
    progress: bool,
    clone_copies: bool = False,
) -> None:
    """Merges or copies every item into ``sink``: a function that keeps each result, or a
    checkpoint writer, whose slots take the results in place (merged straight into a reused
    buffer, written in the background while the next tensor merges)."""
    from tqdm.auto import tqdm

    writer = sink if isinstance(sink, CheckpointWriter) else None

    weights, densities = cfg.weights(), cfg.densities()
    options = cfg.options()
    options.pop("trim_scope", None)
    cuts = _model_cuts(cfg, src, items)
    base_like = src.base if src.base is not None else src.models[0]
    method = cfg.merge_method
    combine = _FAMILY[method][0]
    merged_index = 0
    bar = tqdm(
        total=sum(it.spec.nbytes for it in items),
        unit="B",
        unit_scale=True,
        desc=f"spruce merge ({method})",
        disable=not progress,
        file=sys.stderr,
    )
    try:
        for it in items:
            name = it.name
            if it.action == "copy":
                t = base_like[name]
                report.bytes_read += t.numel() * t.element_size()
                if writer is not None:
                    writer.slot(name).copy_(t)
                    writer.commit(name)
                    del t
                else:
                    if t.dtype != it.spec.dtype:
                        t = t.to(it.spec.dtype)
                    elif clone_copies:
                        t = t.clone()
                    sink(name, t)  # type: ignore[operator]
                report.copied += 1
            else:
                base = src.base[name] if src.base is not None else None
                models = [m[name] for m in src.models]
                opts = dict(options)
                if combine == "fisher":
                    opts["fisher"] = [f[name] for f in src.fisher]
                tensor_cuts = cuts[merged_index] if cuts is not None else ()
                args, _ = _resolve(
                    method,
                    base,
                    models,
                    weights,
                    densities,
                    cfg.scale(),
                    tensor_seed(cfg.seed, name),
                    cfg.preset,
                    opts,
                    tensor_cuts,
                )
                in_place = writer is not None and models[0].dtype == it.spec.dtype
                try:
                    if in_place:
                        assert writer is not None
                        _ops.merge_into(writer.slot(name), *args)
                    else:
                        merged = _ops.merge(*args)
                except SpruceError as e:
                    raise type(e)(f"tensor {name!r}: {e}") from e
                report.bytes_read += sum(t.numel() * t.element_size() for t in models) + (
                    0 if base is None else base.numel() * base.element_size()
                )
                report.parameters += models[0].numel()
                del base, models, args, opts
                if in_place:
                    assert writer is not None
                    writer.commit(name)
                elif writer is not None:
                    writer.slot(name).copy_(merged)
                    writer.commit(name)
                    del merged
                else:
                    if merged.dtype != it.spec.dtype:
                        merged = merged.to(it.spec.dtype)
                    sink(name, merged)  # type: ignore[operator]
                    del merged
                report.merged += 1
                merged_index += 1
            report.bytes_written += it.spec.nbytes
            src.release()
            bar.update(it.spec.nbytes)
    finally:
        bar.close()


def merge_checkpoints(
    config: str | os.PathLike[str] | Mapping[str, Any] | MergeConfig,
    out: str | os.PathLike[str],
    *,
    progress: bool | None = None,
    max_shard_bytes: int | None = None,
) -> MergeReport:
    """Merges safetensors checkpoints as a configuration describes; writes ``out`` atomically.

    ``config``: a YAML/JSON path, a dict or a :class:`MergeConfig` (see
    :mod:`spruce.merge.config`). ``out``: a directory (``model.safetensors``, or shards plus
    ``model.safetensors.index.json`` above ``max_shard_size``) or a ``.safetensors`` file path.
    ``progress``: a progress bar on stderr (default: when stderr is a terminal). Returns a
    :class:`MergeReport`; ``report.summary()`` is the text ``spruce merge`` prints.

    Raises :class:`spruce.ConfigError` or :class:`spruce.CheckpointError` before writing anything
    when the configuration or the checkpoints are inconsistent (names, shapes, dtypes, missing
    files); an error while merging leaves no partial output.
    """
    cfg = load_config(config)
    _check_output(cfg, Path(out))
    if progress is None:
        progress = sys.stderr.isatty()
    t0 = time.perf_counter()
    reset_peak()
    src = _Sources(cfg)
    items, skipped = _plan_tensors(cfg, src)
    report = MergeReport(cfg.merge_method, cfg.preset, Path(out), skipped=skipped)
    writer = CheckpointWriter(
        out,
        [it.spec for it in items],
        max_shard_bytes=max_shard_bytes or cfg.max_shard_bytes,
        metadata={"merged_by": "spruce", "merge_method": cfg.merge_method, "preset": cfg.preset},
    )
    try:
        with writer:
            _run(cfg, writer, items, src, report, progress)
    finally:
        src.release()
    report.files = writer.shard_paths
    remove_stale_files(Path(out), report.files)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = _vm_hwm()
    return report


def merge_state_dicts(
    method: str,
    base: Mapping[str, torch.Tensor] | None,
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    *,
    weights: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    seed: int = 0,
    preset: str = "spruce",
    dtype: torch.dtype | None = None,
    on_missing: str = "base",
    fisher: Sequence[Mapping[str, torch.Tensor]] | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Merges in-memory state dicts exactly as :func:`merge_checkpoints` merges files.

    Arguments as :func:`spruce.merge.merge_tensors` (one value or one per model for ``weights``
    and ``density``), plus ``dtype`` (of the merged tensors), ``on_missing`` (``"base"``,
    ``"skip"``, ``"error"``) and ``fisher`` (one state dict per model for the fisher method).
    Per-tensor seeds derive from ``seed`` and the tensor names, as for files.
    """
    n = len(finetuned)
    ws = (
        [1.0] * n
        if weights is None
        else ([weights] * n if isinstance(weights, (int, float)) else list(weights))
    )
    ds = [density] * n if isinstance(density, (int, float)) else list(density)
    if len(ws) != n or len(ds) != n:
        raise ArgumentError(
            f"merge_state_dicts: weights and density need one value per model ({n}), got "
            f"{len(ws)} and {len(ds)}"
        )
    fis = list(fisher or [])
    if fis and len(fis) != n:
        raise ArgumentError(f"merge_state_dicts: fisher needs one state dict per model ({n})")
    params = {"lambda": scale}
    for k, v in options.items():
        params[k] = v
    raw = {
        "merge_method": method,
        "base_model": base,
        "models": [
            {
                "model": m,
                "parameters": {"weight": w, "density": d},
                **({"fisher": fis[i]} if fis else {}),
            }
            for i, (m, w, d) in enumerate(zip(finetuned, ws, ds, strict=True))
        ],
        "parameters": params,
        "preset": preset,
        "seed": seed,
        "on_missing": on_missing,
    }
    if dtype is not None:
        raw["dtype"] = _dtype_name(dtype)
    try:
        cfg = load_config(raw)
    except ConfigError as e:
        raise ArgumentError(f"merge_state_dicts: {e}") from e
    src = _Sources(cfg)
    items, _ = _plan_tensors(cfg, src)
    out: dict[str, torch.Tensor] = {}
    report = MergeReport(cfg.merge_method, cfg.preset, None)

    def keep(name: str, t: torch.Tensor) -> None:
        out[name] = t

    _run(cfg, keep, items, src, report, progress=False, clone_copies=True)
    return out
