"""spruce: exact, fast sparse and structured compute for PyTorch.

Selection and masks live at the top level (``spruce.topk_mask`` ...); each op is also a torch
custom op (``torch.ops.spruce.<name>``) with fake kernels for ``torch.compile`` and autograd where
differentiable. Pure-PyTorch oracles of every op are in :mod:`spruce.reference`.
"""

from __future__ import annotations

# The capabilities are subpackages (``spruce.prune``, ``spruce.merge`` ...); the most used
# structured-matrix and tensor-network functions are also top-level names.
from . import _core, compress, distill, graph, merge, nn, prune, structured, tn
from .errors import (
    ArgumentError,
    CheckpointError,
    ConfigError,
    DeviceError,
    DTypeError,
    NonFiniteError,
    OutOfMemoryError,
    ShapeError,
    SpruceError,
)
from .masks import (
    KthValue,
    apply_mask_,
    global_topk_masks,
    kthvalue,
    mask_to_csr,
    nm_mask,
    pack_mask,
    quantile,
    random_mask,
    sparsity,
    structured_mask,
    topk_mask,
    unpack_mask,
)
from .structured import (
    boft_rotate,
    butterfly_multiply,
    fastfood,
    fwht,
    kron_matmul,
    kron_sum_matmul,
    monarch_multiply,
    monarch_project,
)
from .tn import (
    contract_expression,
    contract_path,
    einsum,
    mpo_decompose,
    tt_round,
    tt_svd,
    tt_to_tensor,
    tucker,
)

__version__: str = _core.__version__

__all__ = [
    "__version__",
    "info",
    "num_threads",
    "set_num_threads",
    # masks
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
    "apply_mask_",
    "sparsity",
    "KthValue",
    # errors
    "SpruceError",
    "ArgumentError",
    "ShapeError",
    "NonFiniteError",
    "DTypeError",
    "DeviceError",
    "CheckpointError",
    "ConfigError",
    "OutOfMemoryError",
    # structured matrices
    "butterfly_multiply",
    "monarch_multiply",
    "monarch_project",
    "kron_matmul",
    "kron_sum_matmul",
    "boft_rotate",
    "fwht",
    "fastfood",
    # tensor networks
    "contract_path",
    "einsum",
    "contract_expression",
    "tt_svd",
    "tt_to_tensor",
    "tt_round",
    "mpo_decompose",
    "tucker",
    # capabilities
    "compress",
    "prune",
    "merge",
    "structured",
    "nn",
    "tn",
    "graph",
    "distill",
]


def num_threads() -> int:
    """The number of threads spruce's kernels use (``SPRUCE_NUM_THREADS`` or all cores)."""
    return _core.num_threads()


def set_num_threads(n: int) -> None:
    """Sets the number of threads spruce's kernels use; 0 restores the default. Results never
    depend on it."""
    from ._native import check_int

    _core.set_num_threads(check_int("set_num_threads", "n", n, lo=0, hi=4096))


def info() -> dict[str, object]:
    """Version, build profile, threads and accelerator availability, as a dict."""
    import platform

    import torch

    build = dict(_core.build_info())
    cuda = torch.cuda.is_available()
    return {
        "spruce": __version__,
        "build profile": build["profile"],
        "target": build["target"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": num_threads(),
        "cuda": (
            "torch sees a CUDA device, but this build of spruce has no CUDA kernels yet: "
            "spruce ops raise DeviceError on CUDA tensors"
            if cuda
            else "unavailable: torch sees no CUDA device (spruce ops run on CPU tensors)"
        ),
    }
