"""Structured matrices applied to activations: butterfly, Walsh–Hadamard and Fastfood,
Kronecker products and sums, Monarch, orthogonal butterfly (BOFT/OFT) rotations.

Every op takes CPU torch tensors (NumPy arrays come back as NumPy), is a torch custom op
(``torch.ops.spruce.<name>``) with a fake kernel and autograd for every tensor input, and never
forms the dense matrix it applies. Butterfly products and the Walsh–Hadamard transform run in
native kernels (one fused pass over all factors per tile of rows); Kronecker, Monarch and BOFT
factors are reshaped GEMMs on torch's BLAS. Dense definitions live in
:mod:`spruce.reference.structured`.
"""

from __future__ import annotations

from ._boft import (
    CONVENTIONS,
    PARAMETERIZATIONS,
    boft_apply,
    boft_merge,
    boft_permutation,
    boft_rotate,
    boft_unmerge,
    orthogonal_blocks,
    skew_from_triu,
)
from ._butterfly import (
    butterfly_multiply,
    butterfly_to_dense,
    butterfly_twiddle,
    fastfood,
    fastfood_params,
    fwht,
)
from ._kron import kron_factorization, kron_matmul, kron_sum_matmul
from ._monarch import monarch_multiply, monarch_project, monarch_shapes, monarch_to_dense

__all__ = [
    "butterfly_multiply",
    "butterfly_twiddle",
    "butterfly_to_dense",
    "fwht",
    "fastfood",
    "fastfood_params",
    "kron_matmul",
    "kron_sum_matmul",
    "kron_factorization",
    "monarch_multiply",
    "monarch_project",
    "monarch_shapes",
    "monarch_to_dense",
    "boft_apply",
    "boft_rotate",
    "boft_merge",
    "boft_unmerge",
    "boft_permutation",
    "orthogonal_blocks",
    "skew_from_triu",
    "CONVENTIONS",
    "PARAMETERIZATIONS",
]
