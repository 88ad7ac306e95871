"""Plain-PyTorch references for graphs and GNN-to-MLP distillation.

Written for clarity, not speed: dense adjacency matrices, gathers of one row per edge and
``F.kl_div``. The tests compare spruce's fused kernels with these in value and gradient, and the
benchmarks time them as the baseline (they materialize ``E x C`` tensors, as the reference code
of GLNN and FF-G2M does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dense_adjacency",
    "spmm",
    "segment_reduce",
    "scatter_reduce",
    "kd_loss",
    "ce_loss",
    "glnn_loss",
    "lfd_loss",
    "hfd_loss",
    "ffg2m_loss",
    "similarity_loss",
    "entropy_shift",
]


def dense_adjacency(
    edge_index: Tensor,
    num_nodes: int,
    *,
    self_loops: str = "add",
    normalization: str = "sym",
    edge_weight: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The dense ``(n, n)`` matrix ``A[target, source]`` with self-loops and normalization."""
    src, dst = edge_index[0], edge_index[1]
    w = torch.ones(src.shape[0], dtype=dtype) if edge_weight is None else edge_weight.to(dtype)
    a = torch.zeros(num_nodes, num_nodes, dtype=dtype)
    a = a.index_put((dst, src), w, accumulate=True)
    eye = torch.eye(num_nodes, dtype=dtype)
    if self_loops == "add":
        a = a + eye
    elif self_loops == "remaining":
        has_loop = torch.zeros(num_nodes, dtype=torch.bool)
        has_loop[src[src == dst]] = True
        a = a + torch.diag((~has_loop).to(dtype))
    deg = a.sum(dim=1)
    if normalization == "sym":
        d = deg.pow(-0.5)
        d = torch.where(torch.isinf(d), torch.zeros_like(d), d)
        a = d[:, None] * a * d[None, :]
    elif normalization == "rw":
        inv = torch.where(deg == 0, torch.zeros_like(deg), 1.0 / deg)
        a = inv[:, None] * a
    return a


def spmm(a: Tensor, x: Tensor) -> Tensor:
    """The dense product ``a @ x``."""
    return a @ x


def scatter_reduce(src: Tensor, index: Tensor, dim_size: int, reduce: str) -> Tensor:
    """``torch.Tensor.scatter_reduce`` along dim 0 into zeros, ``include_self=False``."""
    name = {"max": "amax", "min": "amin"}.get(reduce, reduce)
    idx = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.scatter_reduce(0, idx, src, name, include_self=False)


def segment_reduce(src: Tensor, indptr: Tensor, reduce: str) -> Tensor:
    """Segments as a scatter: row ``r`` goes to the segment that contains it."""
    counts = indptr.diff()
    seg = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
    return scatter_reduce(src, seg, counts.shape[0], reduce)


def kd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    temperature: float = 1.0,
    t2_scale: bool = False,
    reduction: str = "batchmean",
) -> Tensor:
    """Hinton's KD with ``F.kl_div`` on temperature-scaled log-softmaxes."""
    ls = F.log_softmax(student / temperature, dim=-1)
    lt = F.log_softmax(teacher / temperature, dim=-1)
    if reduction == "none":
        loss = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif reduction == "mean":  # sum over every element / (N x C), F.kl_div's "mean"
        loss = F.kl_div(ls, lt, reduction="sum", log_target=True) / ls.numel()
    else:
        loss = F.kl_div(ls, lt, reduction=reduction, log_target=True)
    return loss * temperature**2 if t2_scale else loss


def ce_loss(student: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy over the labelled rows."""
    return F.cross_entropy(student[mask], labels[mask])


def glnn_loss(student: Tensor, teacher: Tensor, labels: Tensor, mask: Tensor, lam: float) -> Tensor:
    """GLNN: ``lam * CE(labelled) + (1 - lam) * KL(teacher || student)`` (batchmean, T = 1)."""
    kl = F.kl_div(
        F.log_softmax(student, -1),
        F.log_softmax(teacher, -1),
        reduction="batchmean",
        log_target=True,
    )
    return lam * ce_loss(student, labels, mask) + (1 - lam) * kl


def lfd_loss(student: Tensor, teacher: Tensor, edge_index: Tensor) -> Tensor:
    """FF-G2M's low-frequency term: the given edges plus one loop per node, student at the
    source, teacher at the target, ``KL(softmax(t[j]) || softmax(s[i]))`` averaged over edges."""
    n = student.shape[0]
    loops = torch.arange(n)
    src = torch.cat([edge_index[0], loops])
    dst = torch.cat([edge_index[1], loops])
    ls = F.log_softmax(student, -1)[src]
    lt = F.log_softmax(teacher, -1)[dst]
    return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1).mean()


def hfd_loss(student: Tensor, teacher: Tensor, edge_index: Tensor, tau: float) -> Tensor:
    """FF-G2M's high-frequency term over the edges that are not loops: the KL between
    ``softmax(|t[i] - t[j]| / tau)`` and ``softmax(|s[i] - s[j]| / tau)``, averaged over edges."""
    keep = edge_index[0] != edge_index[1]
    src, dst = edge_index[0][keep], edge_index[1][keep]
    if src.numel() == 0:
        return student.sum() * 0
    ds = (student[src] - student[dst]).abs() / tau
    dt = (teacher[src] - teacher[dst]).abs() / tau
    lq = F.log_softmax(ds, -1)
    lp = F.log_softmax(dt, -1)
    return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1).mean()


def ffg2m_loss(
    student: Tensor,
    teacher: Tensor,
    edge_index: Tensor,
    labels: Tensor,
    mask: Tensor,
    lam: float,
    tau: float,
) -> Tensor:
    """FF-G2M: ``lam * CE + (1 - lam) * (LFD + HFD)``."""
    kd = lfd_loss(student, teacher, edge_index) + hfd_loss(student, teacher, edge_index, tau)
    return lam * ce_loss(student, labels, mask) + (1 - lam) * kd


def similarity_loss(teacher_repr: Tensor, student_repr: Tensor) -> Tensor:
    """NOSMOG's representation similarity: ``mean((T T^T - S S^T)^2)`` with the B x B Grams."""
    return ((teacher_repr @ teacher_repr.T - student_repr @ student_repr.T) ** 2).mean()


def entropy_shift(teacher_logits: Tensor, noisy_teacher_logits: Tensor) -> Tensor:
    """``|H(noisy) - H(clean)| / log C`` per node (KRD's reliability signal, in [0, 1])."""

    def entropy(z: Tensor) -> Tensor:
        lp = F.log_softmax(z, -1)
        return -(lp.exp() * lp).sum(-1)

    c = teacher_logits.shape[-1]
    scale = torch.log(torch.tensor(float(max(c, 2)), dtype=teacher_logits.dtype))
    return (entropy(noisy_teacher_logits) - entropy(teacher_logits)).abs() / scale
