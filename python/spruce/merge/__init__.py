"""Model merging: task arithmetic, TIES, DARE, DELLA, breadcrumbs, PCB, Fisher, SLERP, transfer.

- :func:`merge_tensors` merges one tensor of several models in one fused native pass (no stacked
  task vectors), following the conventions of a ``preset`` (``"spruce"``, ``"mergekit"``,
  ``"peft"``, ``"paper"``); :func:`merge_coefficients` shows what each model contributed.
- :func:`merge_state_dicts` merges in-memory state dicts; :func:`merge_checkpoints` streams
  safetensors checkpoints one tensor at a time from a YAML/dict configuration
  (``spruce merge CONFIG.yaml -o OUT_DIR``), writing sharded safetensors atomically.

See :mod:`spruce.merge.tensors` for every method and the table of preset conventions.
"""

from __future__ import annotations

from .checkpoint import MergeReport, merge_checkpoints, merge_state_dicts
from .config import MergeConfig, ModelEntry, load_config
from .tensors import METHODS, PRESETS, merge_coefficients, merge_plan, merge_tensors

__all__ = [
    "METHODS",
    "PRESETS",
    "merge_tensors",
    "merge_coefficients",
    "merge_plan",
    "merge_state_dicts",
    "merge_checkpoints",
    "MergeConfig",
    "ModelEntry",
    "MergeReport",
    "load_config",
]
