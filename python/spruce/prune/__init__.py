"""Pruning: scores, calibration statistics, SparseGPT, whole-model pruners, masks that survive
training, and KS-Lottery.

>>> import spruce.prune as sp
>>> report = sp.prune_model(model, "wanda", 0.5, calibration=batches)
>>> print(report)

Every selection is spruce's exact selection (``floor(sparsity * n)`` pruned per comparison
group, ties pruning the lower index first); see :func:`prune_model` for the methods, patterns
and scopes, and ``spruce.reference.prune`` for the plain formulas each function is tested
against.
"""

from __future__ import annotations

from .ks import KSLottery, KSResult, ks_lottery, ks_test
from .masking import (
    MaskHandle,
    WeightMask,
    keep_masks,
    make_permanent,
    mask_optimizer,
    remove_masks,
)
from .model import (
    METHODS,
    OWL,
    PATTERNS,
    SCOPES,
    CubicSchedule,
    LayerReport,
    PruneReport,
    outlier_ratio,
    owl_sparsities,
    prune_model,
)
from .scores import (
    GRADIENT_METHODS,
    GradientScores,
    fisher_scores,
    group_scores,
    magnitude_scores,
    movement_scores,
    snip_scores,
    taylor_scores,
    wanda_mask,
    wanda_scores,
)
from .sparsegpt import SparseGPTResult, sparsegpt_
from .stats import ActivationStats, LayerStats, feed, find_layers

__all__ = [
    # scores
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
    # statistics
    "ActivationStats",
    "LayerStats",
    "find_layers",
    "feed",
    # SparseGPT
    "sparsegpt_",
    "SparseGPTResult",
    # whole model
    "prune_model",
    "PruneReport",
    "LayerReport",
    "METHODS",
    "PATTERNS",
    "SCOPES",
    "OWL",
    "owl_sparsities",
    "outlier_ratio",
    "CubicSchedule",
    # masks through training
    "keep_masks",
    "make_permanent",
    "remove_masks",
    "mask_optimizer",
    "WeightMask",
    "MaskHandle",
    # KS-Lottery
    "ks_test",
    "ks_lottery",
    "KSResult",
    "KSLottery",
]
