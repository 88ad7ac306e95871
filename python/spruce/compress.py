"""Model compression by tensor networks (``spruce compress``): MPO-factored linear layers.

The implementation lives in :mod:`spruce.tn.compress`; this module is the short public name.
"""

from __future__ import annotations

from .tn.compress import LayerReport, compress_checkpoint, compress_model

__all__ = ["compress_model", "compress_checkpoint", "LayerReport"]
