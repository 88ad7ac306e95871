"""pure-PyTorch/NumPy oracles of every spruce op, written for clarity, not speed; also the
baselines of the benchmarks.

The selection-and-mask oracles are re-exported here (``spruce.reference.topk_mask`` ...); the
other capabilities live in their submodules (``spruce.reference.prune``, ``.merge``,
``.structured``, ``.tn``, ``.graph``).
"""

from __future__ import annotations

from .masks import (
    global_topk_masks,
    kthvalue,
    mask_to_csr,
    nm_mask,
    pack_mask,
    philox4x32_10,
    philox_words,
    quantile,
    random_mask,
    structured_mask,
    topk_mask,
    unpack_mask,
)

__all__ = [
    "topk_mask",
    "global_topk_masks",
    "nm_mask",
    "structured_mask",
    "random_mask",
    "kthvalue",
    "quantile",
    "pack_mask",
    "unpack_mask",
    "mask_to_csr",
    "philox4x32_10",
    "philox_words",
]
