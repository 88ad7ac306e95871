"""Merge configurations: YAML (or JSON, or a dict) in the spirit of mergekit's.

.. code-block:: yaml

    merge_method: ties          # any of spruce.merge.METHODS
    base_model: ./llama-base    # a safetensors file or directory (single or sharded)
    models:
      - model: ./llama-math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./llama-code
        parameters: {weight: 0.7}          # density from `parameters` below
    parameters:                 # defaults of the per-model ones, and the method's options
      density: 0.4
      lambda: 1.0               # or `scale`
    preset: spruce              # spruce | mergekit | peft | paper
    dtype: bfloat16             # output dtype of the merged tensors (default: the inputs')
    seed: 0
    max_shard_size: 5GB         # output shard size (bytes, or with kB/MB/GB/KiB/MiB/GiB)
    on_missing: base            # base | skip | error

Relative paths are relative to the configuration file. A model entry whose path is the base
model's is dropped (mergekit lists the base among the models). ``fisher`` merges give each model
a ``fisher:`` checkpoint with the same tensor names. ``linear`` and ``fisher`` take no base model.

``on_missing`` decides what happens to a tensor that some models lack: ``base`` (default) copies
it from the base model (the first model when there is no base), ``skip`` leaves it out of the
output, ``error`` refuses. A tensor the base lacks is left out under ``skip`` and refused
otherwise. Tensors whose dtype is not floating point are copied from the base.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError, ConfigError
from .tensors import _FAMILY, _HAS, METHODS, PRESETS, merge_plan

__all__ = ["MergeConfig", "ModelEntry", "load_config", "parse_size"]

Source = str | os.PathLike[str] | Mapping[str, torch.Tensor]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_TOP_KEYS = {
    "merge_method",
    "method",
    "base_model",
    "models",
    "parameters",
    "preset",
    "dtype",
    "seed",
    "max_shard_size",
    "out_shard_size",
    "on_missing",
}
_MODEL_KEYS = {"model", "parameters", "fisher"}
_PER_MODEL = {"weight", "density"}
#: global parameters and the merge option each maps to
_GLOBAL = {
    "weight": None,
    "density": None,
    "lambda": "scale",
    "scale": "scale",
    "seed": "seed",
    "normalize": "normalize",
    "rescale": "rescale",
    "election": "election",
    "votes": "votes",
    "zero_sign": "zero_sign",
    "divisor": "divisor",
    "dare_mask": "dare_mask",
    "rank_rule": "rank_rule",
    "gamma": "gamma",
    "epsilon": "epsilon",
    "t": "t",
    "fisher_floor": "fisher_floor",
    "trim_scope": "trim_scope",
}
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(v: Any) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500 MiB"``."""
    if isinstance(v, bool):
        raise ConfigError(f"max_shard_size ({v!r}) must be a size such as 5GB")
    if isinstance(v, int):
        n = v
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(v))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"max_shard_size ({v!r}) must be a size such as 5GB, 500MiB or 1000000"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"max_shard_size ({v!r}) must be > 0")
    return n


@dataclass
class ModelEntry:
    """One fine-tuned model: a checkpoint path (or an in-memory state dict) and its parameters."""

    model: Source
    weight: float | None = None
    density: float | None = None
    fisher: Source | None = None

    @property
    def label(self) -> str:
        return str(self.model) if not isinstance(self.model, Mapping) else "<state dict>"


@dataclass
class MergeConfig:
    """A checkpoint merge, validated (see the module docs for the YAML form)."""

    merge_method: str
    models: list[ModelEntry]
    base_model: Source | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    preset: str = "spruce"
    dtype: torch.dtype | None = None
    seed: int = 0
    max_shard_bytes: int = 5 * 2**30
    on_missing: str = "base"

    def weights(self) -> list[float]:
        default = self.parameters.get("weight", 1.0)
        return [float(default if m.weight is None else m.weight) for m in self.models]

    def densities(self) -> list[float]:
        default = self.parameters.get("density", 1.0)
        return [float(default if m.density is None else m.density) for m in self.models]

    def options(self) -> dict[str, Any]:
        """The merge options of :func:`spruce.merge.merge_tensors` (scale and seed apart)."""
        out = {}
        for k, v in self.parameters.items():
            opt = _GLOBAL.get(k)
            if opt is not None and opt not in ("scale", "seed"):
                out[opt] = v
        return out

    def scale(self) -> float:
        p = self.parameters
        return float(p.get("lambda", p.get("scale", 1.0)))


def _number(where: str, v: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where} ({v!r}) must be a number")
    v = float(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(f"{where} ({v}) must be in [{lo}, {hi}]")
    return v


def _source(where: str, v: Any, root: Path | None) -> Source:
    if isinstance(v, Mapping):
        return v
    if not isinstance(v, (str, os.PathLike)) or not str(v):
        raise ConfigError(f"{where} ({v!r}) must be a checkpoint path")
    p = Path(v).expanduser()
    if root is not None and not p.is_absolute():
        p = root / p
    return p


def _same_path(a: Source | None, b: Source) -> bool:
    if isinstance(a, Mapping) or isinstance(b, Mapping) or a is None:
        return a is b
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | MergeConfig) -> MergeConfig:
    """Reads and validates a configuration: a YAML or JSON file path, a dict, or a MergeConfig.

    Every problem raises :class:`spruce.ConfigError` naming the key, the value and what was
    expected; nothing is read from the checkpoints here.
    """
    if isinstance(source, MergeConfig):
        return source
    root: Path | None = None
    if isinstance(source, Mapping):
        raw: Any = dict(source)
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the merge configuration ({e.strerror})") from e
        root = path.resolve().parent
        if path.suffix.lower() == ".json":
            try:
                raw = json.loads(text)
            except ValueError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
        else:
            try:
                import yaml
            except ImportError as e:  # pragma: no cover - pyyaml is a dependency
                raise ConfigError(
                    "reading a YAML configuration needs PyYAML (pip install pyyaml)"
                ) from e
            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the merge configuration must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown configuration key(s) {', '.join(map(repr, unknown))}; keys are "
            f"{', '.join(sorted(_TOP_KEYS))}"
        )
    method = raw.get("merge_method", raw.get("method"))
    if method not in METHODS:
        raise ConfigError(f"merge_method ({method!r}) must be one of {', '.join(METHODS)}")
    preset = raw.get("preset", "spruce")
    if preset not in PRESETS:
        raise ConfigError(f"preset ({preset!r}) must be one of {', '.join(PRESETS)}")
    if method not in _HAS[preset]:
        raise ConfigError(
            f"merge_method ({method!r}) is not a {preset} method; {preset} has "
            f"{', '.join(m for m in METHODS if m in _HAS[preset])}"
        )
    params = raw.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"parameters must be a mapping, got {type(params).__name__}")
    bad = sorted(set(params) - set(_GLOBAL))
    if bad:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(map(repr, bad))}; parameters are "
            f"{', '.join(sorted(_GLOBAL))}"
        )
    params = dict(params)
    if "density" in params:
        _number("parameters.density", params["density"], 0.0, 1.0)
    if "weight" in params:
        _number("parameters.weight", params["weight"])
    combine = _FAMILY[method][0]
    base = raw.get("base_model")
    base_src = None if base is None else _source("base_model", base, root)
    if combine in ("linear", "fisher") and base_src is not None:
        raise ConfigError(f"base_model must be absent for {method} (it averages the models)")
    if combine not in ("linear", "fisher") and base_src is None:
        raise ConfigError(f"base_model is required for {method}")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models must be a non-empty list of {model: PATH, parameters: {...}}")
    models: list[ModelEntry] = []
    for i, m in enumerate(models_raw):
        where = f"models[{i}]"
        if isinstance(m, (str, os.PathLike)):
            m = {"model": m}
        if not isinstance(m, Mapping) or "model" not in m:
            raise ConfigError(f"{where} must be a mapping with a `model` path")
        extra = sorted(set(m) - _MODEL_KEYS)
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, extra))}")
        p = m.get("parameters") or {}
        if not isinstance(p, Mapping):
            raise ConfigError(f"{where}.parameters must be a mapping")
        extra = sorted(set(p) - _PER_MODEL)
        if extra:
            raise ConfigError(
                f"{where}.parameters: unknown key(s) {', '.join(map(repr, extra))}; "
                "per-model parameters are weight and density"
            )
        src = _source(f"{where}.model", m["model"], root)
        if _same_path(base_src, src):
            continue
        entry = ModelEntry(
            model=src,
            weight=None
            if "weight" not in p
            else _number(f"{where}.parameters.weight", p["weight"]),
            density=None
            if "density" not in p
            else _number(f"{where}.parameters.density", p["density"], 0.0, 1.0),
            fisher=None
            if m.get("fisher") is None
            else _source(f"{where}.fisher", m["fisher"], root),
        )
        if combine == "fisher" and entry.fisher is None:
            raise ConfigError(f"{where}: the fisher method needs a `fisher:` checkpoint per model")
        if combine != "fisher" and entry.fisher is not None:
            raise ConfigError(f"{where}: `fisher:` is only used by the fisher method")
        models.append(entry)
    if not models:
        raise ConfigError("models lists only the base model; give at least one other model")
    want = {"slerp": 1, "transfer": 2}.get(combine)
    if want is not None and len(models) != want:
        raise ConfigError(
            f"{method} takes exactly {want} model(s) besides the base, got {len(models)}"
            + (" (the fine-tune, then its own base)" if combine == "transfer" else "")
        )
    dtype = raw.get("dtype")
    if dtype is not None:
        if str(dtype).replace("torch.", "") not in _DTYPES:
            raise ConfigError(f"dtype ({dtype!r}) must be one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[str(dtype).replace("torch.", "")]
    seed = raw.get("seed", params.pop("seed", 0))
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < 2**63):
        raise ConfigError(f"seed ({seed!r}) must be an integer in [0, 2^63)")
    on_missing = raw.get("on_missing", "base")
    if on_missing not in ("base", "skip", "error"):
        raise ConfigError(f"on_missing ({on_missing!r}) must be 'base', 'skip' or 'error'")
    size = raw.get("max_shard_size", raw.get("out_shard_size", 5 * 2**30))
    cfg = MergeConfig(
        merge_method=method,
        models=models,
        base_model=base_src,
        parameters=params,
        preset=preset,
        dtype=dtype,
        seed=seed,
        max_shard_bytes=parse_size(size),
        on_missing=on_missing,
    )
    try:
        merge_plan(method, preset=preset, **cfg.options())
        lam = cfg.scale()
    except (ArgumentError, ValueError, TypeError) as e:
        raise ConfigError(f"parameters: {e}") from e
    if combine in ("linear", "fisher", "slerp") and lam != 1.0:
        raise ConfigError(f"parameters.lambda ({lam}) must be 1 for {method}")
    return cfg
