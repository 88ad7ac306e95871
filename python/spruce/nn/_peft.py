"""Conversion of trained PEFT adapters (BOFT, OFT, LoKr on ``nn.Linear``) to spruce modules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..errors import ArgumentError, ShapeError
from ._adapters import BOFT, OFT, LoKr


def _kind(module: nn.Module) -> str | None:
    mod = type(module).__module__
    if type(module).__name__ != "Linear" or not mod.startswith("peft.tuners."):
        return None
    for kind in ("boft", "oft", "lokr"):
        if mod == f"peft.tuners.{kind}.layer":
            return kind
    return None


def _adapter_name(layer: nn.Module, adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    active = list(getattr(layer, "active_adapters", []) or [])
    if len(active) != 1:
        raise ArgumentError(
            f"from_peft: the layer has active adapters {active}; pass adapter_name= to pick one"
        )
    return active[0]


def _convert(layer: nn.Module, kind: str, adapter_name: str | None) -> nn.Module:
    name = _adapter_name(layer, adapter_name)
    if getattr(layer, "merged", False):
        raise ArgumentError("from_peft: the PEFT layer is merged; call unmerge() on it first")
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear):
        raise ArgumentError(f"from_peft: base layer {type(base).__name__} is not an nn.Linear")
    if getattr(layer, "fan_in_fan_out", False):
        raise ArgumentError("from_peft: fan_in_fan_out (Conv1D) layers are not supported")
    if kind == "boft":
        r, s = layer.boft_R[name], layer.boft_s[name]
        out = BOFT(base, block_size=r.shape[-1], n_butterfly_factors=r.shape[0], freeze_base=False)
        out.boft_R.data.copy_(r.detach())
        out.boft_s.data.copy_(s.detach())
        return out
    if kind == "oft":
        rot = layer.oft_R[name]
        if getattr(rot, "coft", False):
            raise ArgumentError("from_peft: constrained OFT (coft=True) is not supported")
        b = rot.block_size
        out = OFT(
            base,
            block_size=b,
            convention="peft_oft",
            parameterization="neumann" if rot.use_cayley_neumann else "cayley",
            neumann_terms=rot.num_cayley_neumann_terms,
            block_share=rot.block_share,
            freeze_base=False,
        )
        out.oft_R.data.copy_(rot.weight.detach())
        return out
    # LoKr
    if name in getattr(layer, "lokr_t2", {}):
        raise ArgumentError("from_peft: LoKr with a CP-decomposed w2 (lokr_t2) is not supported")
    tensors = {}
    for attr in _LOKR_PARAMS:
        store = getattr(layer, f"lokr_{attr}", {})
        if name in store:
            tensors[attr] = store[name].detach()
    r = layer.r[name] if hasattr(layer, "r") else 1
    return _lokr(base, tensors, int(r), float(layer.scaling[name]), freeze_base=False)


_LOKR_PARAMS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")


def _lokr(
    base: nn.Linear, tensors: dict[str, Tensor], r: int, scaling: float, *, freeze_base: bool
) -> LoKr:
    """A :class:`LoKr` holding exactly the given factors (full ``w1``/``w2`` or their
    ``_a``/``_b`` pairs) with the given scaling."""
    for side in ("w1", "w2"):
        whole = side in tensors
        pair = f"{side}_a" in tensors and f"{side}_b" in tensors
        if whole == pair:
            raise ArgumentError(
                f"from_peft: LoKr needs either lokr_{side} or both lokr_{side}_a and "
                f"lokr_{side}_b, got {sorted(k for k in tensors if k.startswith(side))}"
            )
    out = LoKr(base, r=max(int(r), 1), alpha=1.0, freeze_base=freeze_base)
    out.scaling = float(scaling)
    for attr in _LOKR_PARAMS:
        setattr(out, attr, None)
        if attr in tensors:
            setattr(out, attr, nn.Parameter(tensors[attr].detach().clone()))
    w1, w2 = out.factors()
    if (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) != tuple(base.weight.shape):
        raise ShapeError(
            f"from_peft: LoKr factors {tuple(w1.shape)} and {tuple(w2.shape)} do not make the "
            f"layer's weight {tuple(base.weight.shape)}"
        )
    return out


_SUFFIXES = {
    "boft": ("boft_R", "boft_s"),
    "oft": ("oft_R.weight",),
    "lokr": tuple(f"lokr_{a}" for a in _LOKR_PARAMS),
}


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        raise ArgumentError(
            "from_peft: state_dict= needs config= (the adapter's PEFT config, or the dict of "
            "its adapter_config.json)"
        )
    cfg = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(cfg, Mapping):
        raise ArgumentError(
            f"from_peft: config ({type(config).__name__}) must be a PEFT config or a mapping"
        )
    return dict(cfg)


def _pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    r"""PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the
    module name (``(.*\.)?key$``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _from_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], config: Any, freeze_base: bool
) -> nn.Module:
    cfg = _config_dict(config)
    peft_type = cfg.get("peft_type")
    kind = str(getattr(peft_type, "value", peft_type)).lower()
    if kind not in _SUFFIXES:
        raise ArgumentError(
            f"from_peft: config peft_type ({peft_type!r}) must be BOFT, OFT or LOKR"
        )
    if cfg.get("fan_in_fan_out", False):
        raise ArgumentError("from_peft: fan_in_fan_out (Conv1D) layers are not supported")
    if kind == "oft" and cfg.get("coft", False):
        raise ArgumentError("from_peft: constrained OFT (coft=True) is not supported")
    own = model.state_dict()
    adapters: dict[str, dict[str, Tensor]] = {}
    plain: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        k = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
        for suffix in _SUFFIXES[kind]:
            if k.endswith("." + suffix):
                adapters.setdefault(k[: -len(suffix) - 1], {})[suffix] = value
                break
        else:
            k = k.replace(".base_layer.", ".")
            if k not in own:
                raise ArgumentError(
                    f"from_peft: state_dict key {key!r} is neither a {kind.upper()} adapter "
                    f"weight nor a tensor of the model"
                )
            plain[k] = value
    if not adapters:
        raise ArgumentError(f"from_peft: state_dict holds no {kind.upper()} adapter weights")
    for k, value in plain.items():  # biases or modules_to_save trained alongside
        own[k].copy_(value)
    for name, tensors in adapters.items():
        try:
            base = model.get_submodule(name)
        except AttributeError as e:
            raise ArgumentError(f"from_peft: the model has no module {name!r}") from e
        if not isinstance(base, nn.Linear):
            raise ArgumentError(
                f"from_peft: module {name!r} ({type(base).__name__}) is not an nn.Linear"
            )
        dt = base.weight.dtype
        if kind == "boft":
            if set(tensors) != {"boft_R", "boft_s"}:
                raise ArgumentError(f"from_peft: {name}: BOFT needs boft_R and boft_s")
            r = tensors["boft_R"]
            if r.dim() != 4:
                raise ShapeError(
                    f"from_peft: {name}.boft_R has shape {tuple(r.shape)}, expected "
                    f"(factors, nblocks, b, b)"
                )
            out: nn.Module = BOFT(
                base,
                block_size=r.shape[-1],
                n_butterfly_factors=r.shape[0],
                freeze_base=freeze_base,
            )
            out.boft_R.data.copy_(r)
            out.boft_s.data.copy_(tensors["boft_s"].reshape(out.boft_s.shape))
        elif kind == "oft":
            w = tensors["oft_R.weight"]
            e = w.shape[-1]
            b = int(round((1 + (1 + 8 * e) ** 0.5) / 2))
            out = OFT(
                base,
                block_size=b,
                convention="peft_oft",
                parameterization="neumann" if cfg.get("use_cayley_neumann", True) else "cayley",
                neumann_terms=int(cfg.get("num_cayley_neumann_terms", 5)),
                block_share=bool(cfg.get("block_share", False)),
                freeze_base=freeze_base,
            )
            if tuple(w.shape) != tuple(out.oft_R.shape):
                raise ShapeError(
                    f"from_peft: {name}.oft_R.weight has shape {tuple(w.shape)}, expected "
                    f"{tuple(out.oft_R.shape)}"
                )
            out.oft_R.data.copy_(w)
        else:
            r = _pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", 8))
            alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg.get("alpha", 8))
            if int(r) < 1:
                raise ArgumentError(f"from_peft: {name}: LoKr rank r ({r}) must be >= 1")
            factors = {a[len("lokr_") :]: t.to(dt) for a, t in tensors.items()}
            out = _lokr(base, factors, int(r), float(alpha) / int(r), freeze_base=freeze_base)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, out)
    return model


def from_peft(
    module: nn.Module,
    adapter_name: str | None = None,
    *,
    state_dict: Mapping[str, Tensor] | None = None,
    config: Any = None,
    freeze_base: bool = True,
) -> nn.Module:
    """Converts PEFT BOFT, OFT (v2) and LoKr adapters on ``nn.Linear`` layers to
    :class:`BOFT`, :class:`OFT` (``"peft_oft"`` convention, PEFT's Cayley–Neumann setting kept)
    and :class:`LoKr`, sharing the same base layer and copying the adapter's weights.

    Given one PEFT tuner layer, returns the spruce module; given any other module (a
    ``PeftModel`` or a plain model holding tuner layers), replaces every supported layer in
    place and returns the module. The outputs are the same as PEFT's (up to rounding) — without
    PEFT's dense rotations or Kronecker products. Dropouts are not carried over (convert for
    inference or continue training without them); COFT, Conv layers and CP-decomposed LoKr are
    refused with :class:`spruce.ArgumentError`. PEFT layers must be unmerged.

    With ``state_dict`` (a saved adapter: ``get_peft_model_state_dict(...)`` or the tensors of
    ``adapter_model.safetensors``) and ``config`` (its PEFT config, or the dict of
    ``adapter_config.json``), ``module`` is the plain base model: every ``nn.Linear`` named in
    the state dict is wrapped in place by the adapter holding those weights (frozen base unless
    ``freeze_base=False``), and any other tensor of the model it names (biases trained with
    PEFT's ``bias=``) is copied into the model. PEFT itself is not needed for this. LoKr's ``rank_pattern`` / ``alpha_pattern``
    are honoured; an unknown key is refused.
    """
    if state_dict is not None:
        return _from_state_dict(module, state_dict, config, freeze_base)
    kind = _kind(module)
    if kind is not None:
        return _convert(module, kind, adapter_name)
    found = False
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            k = _kind(child)
            if k is not None:
                setattr(parent, child_name, _convert(child, k, adapter_name))
                found = True
    if not found:
        raise ArgumentError(
            f"from_peft: {type(module).__name__} holds no PEFT BOFT, OFT or LoKr Linear layer"
        )
    return module
