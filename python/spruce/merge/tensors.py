"""Tensor-level merging: ``merge_tensors`` and the conventions of each preset.

Notation: base ``θ0``, fine-tunes ``θk``, task vectors ``τk = θk - θ0``, weights ``wk``,
densities ``dk``, scale ``λ``. Every method is one fused native pass over all the task vectors
(computed on the fly, never stacked): sparsify each ``τk``, rescale, elect signs, combine.

Methods
-------
``linear``            ``Σ wk θk / Σ wk`` (model soup, WiSE-FT); no base.
``task_arithmetic``   ``θ0 + λ Σ wk τk``.
``ties``              trim each ``τk`` to its ``floor(dk n)`` largest ``|τk|``, elect a sign per
                      entry, average the agreeing entries (TIES-merging).
``magnitude_prune``   the TIES trim, then ``θ0 + λ Σ wk τ̂k`` (no election; PEFT's).
``dare_linear``       drop entries at random, rescale the kept ones, ``θ0 + λ Σ wk τ̂k`` (DARE).
``dare_ties``         DARE's drop, then TIES' election and disjoint mean.
``della``             DELLA (drop by magnitude rank, elect, fuse): keep probability
                      ``(d - ε) + 2ε q(rank)`` within each row, then TIES' election.
``della_ties``        the same method as ``della`` (its election is TIES').
``della_linear``      DELLA's drop without the election.
``breadcrumbs``       drop the ``floor(γ n)`` largest ``|τk|`` (outliers) and the smallest so that
                      ``floor(dk n)`` remain, then sum.
``breadcrumbs_ties``  the same drop, then TIES' election.
``pcb``               PCB-merging: intra/inter balancing scores, keep the top ``dk`` of each.
``fisher``            ``Σ wk Fk θk / Σ wk Fk`` with one diagonal Fisher per model; no base.
``slerp``             spherical interpolation from the base (``t = 0``) to one model (``t = 1``).
``transfer``          ``θ0 + λ (θ1 - θ2)``: move the fine-tuning ``θ1 - θ2`` onto the base ``θ0``.

Presets
-------
The tools disagree on what these methods compute. ``preset`` picks whose conventions to follow;
every option below can also be set one by one (``merge_plan`` shows the resolved choices).

========================  ==============  ============  ===============  ==============
convention                spruce          mergekit      peft             paper
========================  ==============  ============  ===============  ==============
sign election (TIES)      weighted Σ      weighted Σ    unweighted Σ     unweighted Σ
vote exactly 0            no sign (0)     +1            +1               no sign (0)
TIES divisor              Σ agreeing w    Σ agreeing w  agreeing count   agreeing count
                                          (if normalize)
DARE drop                 exact count     Bernoulli     Bernoulli        Bernoulli
DARE / DELLA rescale      1 / keep prob.  L1 norm       1 / density      1 / keep prob.
DELLA rank scale          rank / n        rank/(n - 1)  -                rank / n
DELLA ε (default)         0.1             0.15          -                0.1
trim scope                per tensor      per tensor    per tensor       whole model*
========================  ==============  ============  ===============  ==============

(*) at checkpoint level (``merge_checkpoints``, ``merge_state_dicts``); a single tensor is its
own scope. mergekit's ``normalize`` defaults are kept per method (``ties``, ``della`` and
``linear`` normalize; ``dare_ties`` and ``breadcrumbs_ties`` do not, so they sum the agreeing
entries). PEFT has only ``task_arithmetic``, ``ties``, ``magnitude_prune``, ``dare_linear`` and
``dare_ties``; mergekit has no ``magnitude_prune``, ``pcb``, ``fisher`` or ``transfer``.

Why the ``spruce`` preset: the weighted election and the divisor ``Σ agreeing weights`` make the
result invariant to rescaling all weights and reduce to TIES' disjoint mean for equal weights (a
model with weight 0 neither votes nor dilutes the mean, unlike PEFT's count); an exactly tied
vote elects no sign, so merging ``-τ`` gives exactly ``-merge(τ)`` (the tools' ``+1`` breaks that
symmetry); DARE keeps exactly ``K = floor(d n)`` entries and rescales by ``n / K``, so the
density is exact and ``E[τ̂] = τ`` holds exactly; density 0 gives the base (no NaN, no
assertion); DELLA divides each kept entry by its own keep probability, as its paper does, which
keeps it unbiased.

Counts and ties: exact-count sparsifiers keep ``floor(d n)`` entries (``int(d * n)`` as the tools);
magnitudes are ranked by ``(|τ|, index)``, so among equal magnitudes the lower flat index is
dropped first; breadcrumbs never drops the whole task vector when no outlier is to be removed
(mergekit's slice ``[n_bot:-0]`` empties it; spruce does not copy that). Random draws come from
the counter-based generator: model ``k`` uses stream ``k + 1`` under ``seed``, so masks are
identical on every machine, thread count and chunking.

Inputs are CPU torch tensors or NumPy arrays (then NumPy is returned) of one dtype among float32,
float64, float16 and bfloat16, read in place; f32/f16/bf16 accumulate in float32, float64 in
float64; the result has the inputs' dtype and is rounded once. Inputs are never modified. NaN in
any input raises :class:`spruce.NonFiniteError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._native import FLOAT_DTYPES, as_tensor, back, check_int, check_number
from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError

__all__ = [
    "METHODS",
    "PRESETS",
    "merge_tensors",
    "merge_coefficients",
    "merge_plan",
]

#: Every merge method.
METHODS: tuple[str, ...] = (
    "linear",
    "task_arithmetic",
    "ties",
    "magnitude_prune",
    "dare_linear",
    "dare_ties",
    "della",
    "della_ties",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "pcb",
    "fisher",
    "slerp",
    "transfer",
)

#: Every preset.
PRESETS: tuple[str, ...] = ("spruce", "mergekit", "peft", "paper")

# method -> (how task vectors combine, how each is sparsified)
_FAMILY: dict[str, tuple[str, str]] = {
    "linear": ("linear", "none"),
    "task_arithmetic": ("sum", "none"),
    "ties": ("consensus", "magnitude"),
    "magnitude_prune": ("sum", "magnitude"),
    "dare_linear": ("sum", "random"),
    "dare_ties": ("consensus", "random"),
    "della": ("consensus", "rank"),
    "della_ties": ("consensus", "rank"),
    "della_linear": ("sum", "rank"),
    "breadcrumbs": ("sum", "outliers"),
    "breadcrumbs_ties": ("consensus", "outliers"),
    "pcb": ("pcb", "none"),
    "fisher": ("fisher", "none"),
    "slerp": ("slerp", "none"),
    "transfer": ("transfer", "none"),
}

_HAS = {
    "spruce": set(METHODS),
    "mergekit": set(METHODS) - {"magnitude_prune", "pcb", "fisher", "transfer"},
    "peft": {"task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties"},
    "paper": set(METHODS) - {"magnitude_prune"},
}

# mergekit's per-method `normalize` defaults (its registry); every other preset: linear only.
_MERGEKIT_NORMALIZE = {"linear", "ties", "della", "della_ties"}

_OPTIONS = (
    "normalize",
    "rescale",
    "election",
    "votes",
    "zero_sign",
    "divisor",
    "dare_mask",
    "rank_rule",
    "gamma",
    "epsilon",
    "t",
    "fisher",
    "fisher_floor",
    "masks",
    "trim_scope",
)


def _choice(method: str, name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ArgumentError(
            f"merge_tensors: {name} ({value!r}) must be one of {', '.join(map(repr, allowed))} "
            f"(method {method!r})"
        )
    return value


def merge_plan(method: str, *, preset: str = "spruce", **options: Any) -> dict[str, Any]:
    """The conventions a merge follows, resolved from the preset and the options.

    Returns a dict with ``combine``, ``votes``, ``election``, ``zero_sign``, ``divisor``,
    ``normalize``, ``sparsify`` (``none``, ``magnitude``, ``random_exact``, ``bernoulli``,
    ``outliers``, ``rank``), ``rescale`` (``none``, ``inverse``, ``l1``), ``rank_rule``, ``gamma``,
    ``epsilon`` (None: 0.1 or 0.15 capped at min(d, 1 - d)), ``t``, ``fisher_floor`` and
    ``trim_scope``. Tensor options (``fisher``, ``masks``) are accepted and ignored here.
    """
    if not isinstance(method, str) or method not in _FAMILY:
        raise ArgumentError(
            f"merge_tensors: method ({method!r}) must be one of {', '.join(METHODS)}"
        )
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ArgumentError(
            f"merge_tensors: preset ({preset!r}) must be one of {', '.join(PRESETS)}"
        )
    if method not in _HAS[preset]:
        raise ArgumentError(
            f"merge_tensors: method ({method!r}) is not a {preset} method; "
            f"{preset} has {', '.join(m for m in METHODS if m in _HAS[preset])}"
        )
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ArgumentError(
            f"merge_tensors: unknown option(s) {', '.join(unknown)}; options are "
            f"{', '.join(_OPTIONS)}"
        )
    combine, kind = _FAMILY[method]
    weighted = preset in ("spruce", "mergekit")
    if preset == "mergekit":
        normalize = method in _MERGEKIT_NORMALIZE
    else:
        normalize = combine == "linear"
    if "normalize" in options and options["normalize"] is not None:
        if not isinstance(options["normalize"], bool):
            raise ArgumentError(
                f"merge_tensors: normalize ({options['normalize']!r}) must be a bool"
            )
        normalize = options["normalize"]
    if preset == "mergekit":
        divisor = "weight" if normalize else "none"
    elif preset == "spruce":
        divisor = "weight"
    else:
        divisor = "count"
    if "normalize" in options and options["normalize"] is False and preset != "mergekit":
        divisor = "none"
    # sparsifier and rescale rule
    sparsify = {
        "none": "none",
        "magnitude": "magnitude",
        "outliers": "outliers",
        "rank": "rank",
        "random": "random_exact" if preset == "spruce" else "bernoulli",
    }[kind]
    if kind in ("random", "rank"):
        rescale = "l1" if preset == "mergekit" else "inverse"
    else:
        rescale = "none"
    plan: dict[str, Any] = {
        "method": method,
        "preset": preset,
        "combine": combine,
        "votes": "sum",
        "election": "weighted" if weighted else "unweighted",
        "zero_sign": "positive" if preset in ("mergekit", "peft") else "zero",
        "divisor": divisor,
        "normalize": normalize,
        "sparsify": sparsify,
        "rescale": rescale,
        "rank_rule": "minmax" if preset == "mergekit" else "paper",
        "gamma": 0.01,
        "epsilon": None,
        "t": 0.5,
        "fisher_floor": 1e-6,
        "trim_scope": "model" if preset == "paper" and kind == "magnitude" else "tensor",
    }
    if "rescale" in options and options["rescale"] is not None:
        r = options["rescale"]
        if isinstance(r, bool):
            r = ("l1" if preset == "mergekit" else "inverse") if r else "none"
        plan["rescale"] = _choice(method, "rescale", r, ("none", "inverse", "l1"))
    for name, allowed in (
        ("election", ("weighted", "unweighted")),
        ("votes", ("sum", "count")),
        ("zero_sign", ("positive", "zero")),
        ("divisor", ("none", "count", "weight")),
        ("rank_rule", ("paper", "minmax")),
        ("trim_scope", ("tensor", "model")),
    ):
        if options.get(name) is not None:
            plan[name] = _choice(method, name, options[name], allowed)
    if options.get("dare_mask") is not None:
        dm = _choice(method, "dare_mask", options["dare_mask"], ("exact", "bernoulli"))
        if kind == "random":
            plan["sparsify"] = "random_exact" if dm == "exact" else "bernoulli"
    for name in ("gamma", "epsilon", "t", "fisher_floor"):
        if options.get(name) is not None:
            plan[name] = check_number("merge_tensors", name, options[name])
    return plan


def _densities(density: Any, n: int) -> list[float]:
    if isinstance(density, (Sequence, Tensor)) and not isinstance(density, str):
        ds = [check_number("merge_tensors", "density", d) for d in density]
        if len(ds) != n:
            raise ArgumentError(
                f"merge_tensors: density has {len(ds)} entries, expected one per model ({n})"
            )
    else:
        ds = [check_number("merge_tensors", "density", density)] * n
    for d in ds:
        if not (0.0 <= d <= 1.0):
            raise ArgumentError(f"merge_tensors: density ({d}) must be a number in [0, 1]")
    return ds


def _weights(weights: Any, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        return [float(weights)] * n
    ws = [check_number("merge_tensors", "weights", w) for w in weights]
    if len(ws) != n:
        raise ArgumentError(
            f"merge_tensors: weights has {len(ws)} entries, expected one per model ({n})"
        )
    for w in ws:
        if not math.isfinite(w):
            raise ArgumentError(f"merge_tensors: weights ({w}) must be finite")
    return ws


def _tensors(base: Any, finetuned: Any, method: str) -> tuple[Tensor | None, list[Tensor], bool]:
    if isinstance(finetuned, (Tensor,)) or not isinstance(finetuned, Sequence):
        raise ArgumentError(
            f"merge_tensors: finetuned ({type(finetuned).__name__}) must be a sequence of tensors"
        )
    pairs = [as_tensor("merge_tensors", "finetuned", f) for f in finetuned]
    models = [t for t, _ in pairs]
    if not models:
        raise ArgumentError("merge_tensors: finetuned is empty; give at least one model")
    np_in = pairs[0][1]
    combine = _FAMILY[method][0]
    b = None
    if base is not None:
        b, np_b = as_tensor("merge_tensors", "base", base)
        np_in = np_b
    if combine in ("linear", "fisher") and b is not None:
        raise ArgumentError(
            f"merge_tensors: base must be None for {method} (it averages `finetuned`; put the "
            "base model among them to include it)"
        )
    if combine not in ("linear", "fisher") and b is None:
        raise ArgumentError(f"merge_tensors: {method} needs a base tensor")
    want = {"slerp": 1, "transfer": 2}.get(combine)
    if want is not None and len(models) != want:
        raise ArgumentError(
            f"merge_tensors: {method} takes exactly {want} finetuned tensor(s), got {len(models)}"
            + (" (the fine-tune and its own base)" if combine == "transfer" else "")
        )
    ref = b if b is not None else models[0]
    ref_name = "the base" if b is not None else "finetuned[0]"
    for i, t in enumerate(([b] if b is not None else []) + models):
        name = "base" if (b is not None and i == 0) else f"finetuned[{i - (b is not None)}]"
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(
                f"merge_tensors: {name} has dtype {str(t.dtype).replace('torch.', '')}, expected "
                "float32, float64, float16 or bfloat16"
            )
        if t.dtype != ref.dtype:
            raise DTypeError(
                f"merge_tensors: {name} has dtype {str(t.dtype).replace('torch.', '')}, expected "
                f"{str(ref.dtype).replace('torch.', '')} like {ref_name} (cast the inputs to one dtype)"
            )
        if t.shape != ref.shape:
            raise ShapeError(
                f"merge_tensors: {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} "
                f"like {ref_name}"
            )
        if t.device.type != "cpu":
            raise DeviceError(
                f"merge_tensors: {name} is on {t.device}, expected a CPU tensor: this build of "
                "spruce has no CUDA merge kernels; move the tensors with .cpu()"
            )
    return b, models, np_in


def _resolve(
    method: str,
    base: Any,
    finetuned: Any,
    weights: Any,
    density: Any,
    scale: Any,
    seed: Any,
    preset: str,
    options: dict[str, Any],
    cuts: Sequence[int] = (),
) -> tuple[tuple, bool]:
    """The ``spruce::merge`` arguments of a call, and whether the caller gave NumPy. ``cuts``:
    precomputed model-wide trims (flattened ``(key, end)`` pairs, one per model)."""
    plan = merge_plan(method, preset=preset, **options)
    b, models, np_in = _tensors(base, finetuned, method)
    n = len(models)
    ws = _weights(weights, n)
    ds = _densities(density, n)
    lam = check_number("merge_tensors", "scale", scale)
    if not math.isfinite(lam):
        raise ArgumentError(f"merge_tensors: scale ({lam}) must be finite")
    if plan["combine"] in ("linear", "fisher", "slerp") and lam != 1.0:
        raise ArgumentError(
            f"merge_tensors: scale ({lam}) must be 1 for {method} (it forms no task vector)"
        )
    sd = check_int("merge_tensors", "seed", seed, lo=0, hi=2**63 - 1)
    eps = plan["epsilon"]
    if plan["sparsify"] == "rank" and eps is None:
        default = 0.15 if preset == "mergekit" else 0.1
        inner = [min(d, 1.0 - d) for d in ds if 0.0 < d < 1.0]
        eps = min([default, *inner])
    fisher = list(options.get("fisher") or [])
    if plan["combine"] == "fisher":
        if len(fisher) != n:
            raise ArgumentError(
                f"merge_tensors: fisher has {len(fisher)} tensors, expected one per model ({n})"
            )
    elif fisher:
        raise ArgumentError("merge_tensors: fisher is only used by the fisher method")
    fisher = [as_tensor("merge_tensors", "fisher", f)[0] for f in fisher]
    for f in fisher:
        if f.shape != models[0].shape:
            raise ShapeError(
                f"merge_tensors: fisher has shape {tuple(f.shape)}, expected {tuple(models[0].shape)}"
            )
    masks = list(options.get("masks") or [])
    if masks:
        if plan["sparsify"] == "none":
            raise ArgumentError(f"merge_tensors: masks are not used by {method} (it drops nothing)")
        if len(masks) != n:
            raise ArgumentError(
                f"merge_tensors: masks has {len(masks)} tensors, expected one per model ({n})"
            )
        masks = [as_tensor("merge_tensors", "masks", m)[0] for m in masks]
        for m in masks:
            if m.dtype != torch.bool or m.shape != models[0].shape:
                raise ShapeError(
                    f"merge_tensors: masks must be bool tensors of shape {tuple(models[0].shape)}, "
                    f"got {m.dtype} {tuple(m.shape)}"
                )
    cuts = list(cuts)
    args = (
        b,
        models,
        fisher,
        masks,
        cuts,
        plan["combine"],
        plan["votes"],
        plan["election"] == "weighted",
        plan["zero_sign"] == "positive",
        plan["divisor"],
        plan["normalize"],
        plan["sparsify"],
        plan["gamma"],
        0.0 if eps is None else eps,
        plan["rank_rule"],
        plan["rescale"],
        ws,
        ds,
        lam,
        plan["t"],
        plan["fisher_floor"],
        sd,
    )
    return args, np_in


def merge_tensors(
    method: str,
    base: Any,
    finetuned: Sequence[Any],
    *,
    weights: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    seed: int = 0,
    preset: str = "spruce",
    **method_options: Any,
) -> Any:
    """Merges one tensor of several fine-tuned models into one.

    ``base`` is the pre-trained tensor (``None`` for ``linear`` and ``fisher``, which average
    ``finetuned`` themselves); ``finetuned`` the fine-tuned tensors (``slerp``: one, ``transfer``:
    the fine-tune and its own base). ``weights`` (default 1 each) and ``density`` (fraction kept,
    default 1) take one value or one per model; ``scale`` is λ; ``seed`` keys the random drops
    of DARE and DELLA. ``preset`` selects whose conventions to follow (see the module docs).

    Method options: ``normalize`` (divide by the weights' sum), ``rescale`` (``"none"``,
    ``"inverse"``, ``"l1"``, or a bool for the preset's rule), ``election`` (``"weighted"`` /
    ``"unweighted"``), ``votes`` (``"sum"`` / ``"count"``), ``zero_sign`` (``"positive"`` /
    ``"zero"``), ``divisor`` (``"weight"``, ``"count"``, ``"none"``), ``dare_mask`` (``"exact"`` /
    ``"bernoulli"``), ``rank_rule`` (``"paper"`` / ``"minmax"``), ``gamma`` (breadcrumbs'
    outlier fraction, 0.01), ``epsilon`` (DELLA's spread), ``t`` (slerp, 0.5), ``fisher`` (one
    Fisher tensor per model), ``fisher_floor`` (1e-6), ``masks`` (one bool keep-mask per model,
    replacing the sparsifier's own choice: for reproducing another tool's draw).

    Differentiable in ``base`` and ``finetuned`` for fixed masks and signs (the gradient is
    :func:`merge_coefficients`), except ``slerp``, ``pcb`` and L1 rescaling.

    >>> spruce.merge.merge_tensors("ties", torch.zeros(4), [torch.tensor([1., -.5, .3, 0.]),
    ...     torch.tensor([-.6, .4, -.2, .9])], weights=[0.2, 1.0], preset="mergekit")
    tensor([-0.6000,  0.4000, -0.2000,  0.9000])
    """
    args, np_in = _resolve(
        method, base, finetuned, weights, density, scale, seed, preset, dict(method_options)
    )
    return back(_ops.merge(*args), np_in)


def merge_coefficients(
    method: str,
    base: Any,
    finetuned: Sequence[Any],
    *,
    weights: float | Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    seed: int = 0,
    preset: str = "spruce",
    **method_options: Any,
) -> Any:
    """The merge as per-model coefficients ``c`` of shape ``(len(finetuned), *shape)``.

    ``merge_tensors(...) == base + Σ_k c[k] * (finetuned[k] - base)`` (``Σ_k c[k] * finetuned[k]``
    for ``linear`` and ``fisher``), up to rounding. ``c[k]`` is zero exactly where model ``k``'s
    entry was dropped or disagreed with the elected sign: it shows what each model contributed.
    float32 (float64 for float64 inputs). Not defined for ``slerp``, ``pcb`` and L1 rescaling.
    """
    args, np_in = _resolve(
        method, base, finetuned, weights, density, scale, seed, preset, dict(method_options)
    )
    return back(_ops.merge_coefficients(*args), np_in)
