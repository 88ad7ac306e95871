"""Typed stubs of the native module ``spruce._core`` (private: use the public ``spruce`` API).

Arrays cross zero-copy: float inputs are NumPy views of float32, float64, float16, or uint16 holding
bfloat16 bits; bfloat16 results come back the same way. Errors are raised as the classes of
``spruce.errors``.
"""

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

_Floats: TypeAlias = npt.NDArray[Any]
_Ints: TypeAlias = npt.NDArray[np.int64]
_Bools: TypeAlias = npt.NDArray[np.bool_]
_Stat: TypeAlias = npt.NDArray[np.float32] | None

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
    "wanda_scores",
    "wanda_mask",
    "score_threshold",
    "threshold_mask",
    "threshold_prune_",
    "outlier_count",
    "ks_2samp",
    "kstwo_sf",
    "merge",
    "merge_into",
    "merge_coefficients",
    "merge_model_cuts",
    "butterfly_multiply",
    "butterfly_multiply_backward",
    "fwht",
    "contract_path",
    "contract_path_steps",
    "graph_structure",
    "graph_norm",
    "spmm",
    "spmm_grad_values",
    "segment_reduce",
    "scatter_reduce",
    "kd_loss",
    "ce_loss",
    "lfd_loss",
    "hfd_loss",
    "krd_edge_sampling",
    "__version__",
]

def topk_mask(
    scores: npt.NDArray[Any], sparsity: float, dim: int | None = None
) -> npt.NDArray[np.bool_]:
    """Keep-mask pruning ``floor(sparsity * n)`` lowest entries per slice along ``dim`` (None: all)."""

def global_topk_masks(
    scores: list[npt.NDArray[Any]], sparsity: float
) -> list[npt.NDArray[np.bool_]]:
    """Keep-masks under one threshold across all arrays, without concatenating them."""

def nm_mask(scores: npt.NDArray[Any], n: int, m: int, dim: int = ...) -> npt.NDArray[np.bool_]:
    """Keeps the ``n`` largest of every ``m`` consecutive entries along ``dim``."""

def structured_mask(
    scores: npt.NDArray[Any],
    sparsity: float,
    dim: int = ...,
    group_size: int = ...,
    norm: float = ...,
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

# Pruning

def wanda_scores(weight: _Floats, stat: _Stat = None) -> _Floats:
    """``|W| * sqrt(stat)`` per input column (``stat`` None: ``|W|``), in place of a dense product."""

def wanda_mask(weight: _Floats, stat: _Stat, sparsity: float, n: int = ..., m: int = ...) -> _Bools:
    """The Wanda keep-mask per output row (``n:m`` > 0: per group of ``m`` inputs) without scores."""

def score_threshold(
    weights: list[_Floats], stats: list[_Stat], transposed: list[bool], sparsity: float
) -> tuple[float, int]:
    """The global score threshold over several layers and how many scores equal to it are pruned."""

def threshold_mask(
    weight: _Floats, stat: _Stat, transposed: bool, value: float, ties: int
) -> tuple[_Bools, int]:
    """The keep-mask of one layer under a global threshold; returns the ties it consumed."""

def threshold_prune_(
    weight: _Floats, stat: _Stat, transposed: bool, value: float, ties: int
) -> tuple[int, int]:
    """Zeroes the pruned entries of one layer in place; returns ``(pruned, ties consumed)``."""

def outlier_count(
    weights: list[_Floats], stats: list[_Stat], transposed: list[bool], m: float
) -> tuple[int, int]:
    """OWL: the number of scores above ``m`` times their layer mean, and the total."""

def ks_2samp(
    before: _Floats, after: _Floats, method: str = ...
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Two-sample Kolmogorov–Smirnov statistics and p-values per row."""

def kstwo_sf(n: int, x: float) -> float:
    """The survival function of the one-sample two-sided Kolmogorov–Smirnov statistic."""

# Merging

def merge(
    base: _Floats | None,
    models: list[_Floats],
    fisher: list[_Floats],
    masks: list[_Bools],
    cuts: list[tuple[int, int]],
    spec: dict[str, Any],
) -> _Floats:
    """Merges one tensor of several models in one fused pass (see ``spruce.merge.merge_tensors``)."""

def merge_into(
    out: _Floats,
    base: _Floats | None,
    models: list[_Floats],
    fisher: list[_Floats],
    masks: list[_Bools],
    cuts: list[tuple[int, int]],
    spec: dict[str, Any],
) -> None:
    """``merge`` written into ``out``: a writable contiguous array of the models' element type and
    element count that shares no memory with the inputs."""

def merge_coefficients(
    base: _Floats | None,
    models: list[_Floats],
    fisher: list[_Floats],
    masks: list[_Bools],
    cuts: list[tuple[int, int]],
    spec: dict[str, Any],
) -> _Floats:
    """The merge as per-model coefficients of shape ``(n_models, *shape)``."""

def merge_model_cuts(
    bases: list[_Floats], models: list[_Floats], density: float
) -> list[tuple[int, int]]:
    """Model-wide magnitude trimming: one ``(key, end)`` cut per tensor."""

# Structured matrices

def butterfly_multiply(
    twiddle: _Floats,
    x: _Floats,
    increasing_stride: bool = ...,
    output_size: int | None = ...,
    transpose: bool = ...,
) -> _Floats:
    """The product of the butterfly factors in ``twiddle`` with every row of ``x``."""

def butterfly_multiply_backward(
    twiddle: _Floats,
    x: _Floats,
    grad: _Floats,
    increasing_stride: bool = ...,
    output_size: int | None = ...,
    transpose: bool = ...,
) -> tuple[_Floats, _Floats]:
    """Gradients of ``butterfly_multiply`` with respect to ``twiddle`` and ``x``."""

def fwht(x: _Floats, normalized: bool = ...) -> _Floats:
    """The Walsh–Hadamard transform of every row (natural order)."""

# Tensor networks

def contract_path(
    eq: str,
    shapes: Sequence[Sequence[int]],
    optimize: str = ...,
    path: list[tuple[int, ...]] | None = ...,
    memory_limit: float | None = ...,
    max_input: bool = ...,
    time_limit: float | None = ...,
    trials: int = ...,
    first_trial: int = ...,
    seed: int = ...,
    temperature: float = ...,
    nbranch: int = ...,
    subtree_size: int = ...,
) -> dict[str, Any]:
    """A contraction order for an einsum equation and its cost (``opt_einsum`` conventions)."""

def contract_path_steps(
    eq: str, shapes: Sequence[Sequence[int]], path: Sequence[Sequence[int]]
) -> dict[str, list[Any]]:
    """A path step by step: positions, einsum, removed, cost, scale and size columns."""

# Graphs and distillation

def graph_structure(
    edge_index: _Ints, num_nodes: int, self_loops: str
) -> tuple[_Ints, _Ints, _Ints, _Bools, _Ints, _Ints, _Ints, _Ints]:
    """Coalesced CSR by target and its transpose from a ``(2, E)`` edge index."""

def graph_norm(values: _Floats, indptr: _Ints, indices: _Ints, normalization: str) -> _Floats:
    """Normalized edge weights (``sym``, ``rw``, ``col`` or ``none``)."""

def spmm(indptr: _Ints, indices: _Ints, values: _Floats, x: _Floats) -> _Floats:
    """``out[i] = sum_j values[ij] * x[j]`` over the CSR rows."""

def spmm_grad_values(indptr: _Ints, indices: _Ints, x: _Floats, grad_out: _Floats) -> _Floats:
    """The gradient of ``spmm`` with respect to the edge values."""

def segment_reduce(src: _Floats, indptr: _Ints, reduce: str) -> tuple[_Floats, _Ints]:
    """Reduction of consecutive row segments; returns the values and the arg index (max/min)."""

def scatter_reduce(src: _Floats, index: _Ints, dim_size: int, reduce: str) -> tuple[_Floats, _Ints]:
    """Reduction of rows by target index; returns the values and the arg index (max/min)."""

def kd_loss(
    student_logits: _Floats,
    teacher_logits: _Floats,
    temperature: float,
    t2_scale: bool,
    reduction: str,
    need_grad: bool,
) -> tuple[_Floats, _Floats]:
    """Soft-label KL distillation loss and its gradient with respect to the student logits."""

def ce_loss(
    student_logits: _Floats, labels: _Ints, labelled_mask: _Bools, need_grad: bool
) -> tuple[_Floats, _Floats]:
    """Cross-entropy over the labelled nodes and its gradient."""

def lfd_loss(
    student_logits: _Floats, teacher_logits: _Floats, edge_index: _Ints, need_grad: bool
) -> tuple[_Floats, _Floats]:
    """FF-G2M low-frequency distillation loss over the edges and its gradient."""

def hfd_loss(
    student_logits: _Floats, teacher_logits: _Floats, edge_index: _Ints, tau: float, need_grad: bool
) -> tuple[_Floats, _Floats]:
    """FF-G2M high-frequency distillation loss over the edges and its gradient."""

def krd_edge_sampling(edge_index: _Ints, entropy_shift: _Floats, power: float, seed: int) -> _Bools:
    """KRD: Bernoulli edge sampling by the reliability of each source node."""
