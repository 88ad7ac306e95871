"""Tensor networks: contraction paths (found in Rust, up to a hyper-optimizing search with
subtree reconfiguration), cached contraction with torch, TT / MPO / Tucker decompositions,
compressed layers and model compression."""

from __future__ import annotations

from .compress import LayerReport, compress_checkpoint, compress_model
from .contract import ContractExpression, clear_plan_cache, contract_expression, einsum
from .decomp import (
    balanced_modes,
    mpo_decompose,
    mpo_to_matrix,
    tt_ranks,
    tt_round,
    tt_svd,
    tt_to_tensor,
    tucker,
    tucker_to_tensor,
)
from .layers import MPOLinear, PerformanceWarning, TuckerConv2d, mpo_flops
from .paths import ContractionStep, PathInfo, contract_path

__all__ = [
    "contract_path",
    "PathInfo",
    "ContractionStep",
    "einsum",
    "contract_expression",
    "ContractExpression",
    "clear_plan_cache",
    "tt_svd",
    "tt_to_tensor",
    "tt_round",
    "tt_ranks",
    "mpo_decompose",
    "mpo_to_matrix",
    "tucker",
    "tucker_to_tensor",
    "balanced_modes",
    "MPOLinear",
    "TuckerConv2d",
    "PerformanceWarning",
    "mpo_flops",
    "compress_model",
    "compress_checkpoint",
    "LayerReport",
]
