"""Typed stubs of the native module ``spruce._core`` (private: use the public ``spruce`` API).

Arrays cross zero-copy: float inputs are NumPy views of float32, float64, float16, or uint16 holding
bfloat16 bits; bfloat16 results come back the same way. Errors are raised as the classes of
``spruce.errors``.
"""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
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
    "num_threads",
    "set_num_threads",
    "build_info",
    "__version__",
]

def topk_mask(scores: npt.NDArray[Any], sparsity: float, dim: int | None = None) -> npt.NDArray[np.bool_]:
    """Keep-mask pruning ``floor(sparsity * n)`` lowest entries per slice along ``dim`` (None: all)."""

def global_topk_masks(scores: list[npt.NDArray[Any]], sparsity: float) -> list[npt.NDArray[np.bool_]]:
    """Keep-masks under one threshold across all arrays, without concatenating them."""

def nm_mask(scores: npt.NDArray[Any], n: int, m: int, dim: int = ...) -> npt.NDArray[np.bool_]:
    """Keeps the ``n`` largest of every ``m`` consecutive entries along ``dim``."""

def structured_mask(
    scores: npt.NDArray[Any], sparsity: float, dim: int = ..., group_size: int = ..., norm: float = ...
) -> npt.NDArray[np.bool_]:
    """Prunes whole groups of slices along ``dim`` ranked by their L1/L2/L-inf norm."""

def random_mask(shape: list[int], density: float, seed: int) -> npt.NDArray[np.bool_]:
    """Keeps exactly ``round(density * n)`` entries chosen by a counter-based generator."""

def kthvalue(
    x: npt.NDArray[Any], k: int, dim: int | None = None
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """The k-th smallest value (1-based) and its index per slice (flat for ``dim=None``)."""

def quantile(
    x: npt.NDArray[Any], q: list[float], dim: int | None = None
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Linear-interpolation quantiles ``(len(q), *reduced)`` with lower and upper indices."""

def pack_mask(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """Bits per row of the last dimension, little bit order (``numpy.packbits`` compatible)."""

def unpack_mask(packed: npt.NDArray[np.uint8], shape: list[int]) -> npt.NDArray[np.bool_]:
    """Inverts ``pack_mask`` for a mask of ``shape``."""

def mask_to_csr(
    weight: npt.NDArray[Any], mask: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[Any]]:
    """The kept entries of a 2-D weight as CSR ``(crow, col, values)``."""

def num_threads() -> int:
    """The number of threads spruce's kernels use."""

def set_num_threads(n: int) -> None:
    """Sets the number of threads (0 restores the default)."""

def build_info() -> dict[str, str]:
    """Version, profile and target of this build."""
