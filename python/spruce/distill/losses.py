"""GNN-to-MLP distillation losses: fused native kernels with autograd.

Every loss takes ``(N, C)`` logits (float32, float64, float16 or bfloat16; halves accumulate in
float32) and returns a scalar tensor in the student's dtype. The gradient with respect to the
student logits is computed by the same native pass that computes the loss (when the student
requires grad). Teacher logits are targets: they are detached, no gradient flows into them.
Edge losses gather the rows of each edge inside the kernel; nothing of size ``E x C`` is ever
allocated. ``edge_index`` is PyG's ``(2, E)`` int64 (source, target) layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._native import as_tensor, back, check_int, check_number
from ..errors import ArgumentError, DTypeError, ShapeError

__all__ = [
    "kd_loss",
    "glnn_loss",
    "lfd_loss",
    "hfd_loss",
    "ffg2m_loss",
    "similarity_loss",
    "entropy_shift",
    "krd_edge_sampling",
]

_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _logits(op: str, student: Any, teacher: Any) -> tuple[Tensor, Tensor, bool]:
    s, np_in = as_tensor(op, "student_logits", student)
    t, _ = as_tensor(op, "teacher_logits", teacher)
    if s.dim() != 2:
        raise ShapeError(f"{op}: student_logits has shape {tuple(s.shape)}, expected (N, C)")
    if t.shape != s.shape:
        raise ShapeError(
            f"{op}: teacher_logits has shape {tuple(t.shape)}, expected the student's shape "
            f"{tuple(s.shape)}"
        )
    if t.dtype != s.dtype:
        t = t.to(s.dtype)
    return s, t.detach(), np_in


def _need_grad(s: Tensor) -> bool:
    return s.requires_grad and torch.is_grad_enabled()


def _edge_index(op: str, edge_index: Any) -> Tensor:
    ei, _ = as_tensor(op, "edge_index", edge_index)
    if ei.dtype != torch.int64:
        raise DTypeError(
            f"{op}: edge_index has dtype {str(ei.dtype).replace('torch.', '')}, expected int64"
        )
    if ei.dim() != 2 or ei.shape[0] != 2:
        raise ShapeError(f"{op}: edge_index has shape {tuple(ei.shape)}, expected (2, E)")
    return ei


def _lam(op: str, lam: Any) -> float:
    v = check_number(op, "lam", lam)
    if not 0.0 <= v <= 1.0:
        raise ArgumentError(f"{op}: lam ({v}) must be in [0, 1]")
    return v


def _positive(op: str, arg: str, v: Any) -> float:
    x = check_number(op, arg, v)
    if not (math.isfinite(x) and x > 0):
        raise ArgumentError(f"{op}: {arg} ({x}) must be a finite number > 0")
    return x


def _ce(op: str, s: Tensor, labels: Any, labelled_mask: Any) -> Tensor:
    y, _ = as_tensor(op, "labels", labels)
    m, _ = as_tensor(op, "labelled_mask", labelled_mask)
    if y.dtype != torch.int64:
        raise DTypeError(
            f"{op}: labels has dtype {str(y.dtype).replace('torch.', '')}, expected int64"
        )
    if m.dtype != torch.bool:
        raise DTypeError(
            f"{op}: labelled_mask has dtype {str(m.dtype).replace('torch.', '')}, expected bool"
        )
    n = s.shape[0]
    if y.shape != (n,) or m.shape != (n,):
        raise ShapeError(
            f"{op}: labels and labelled_mask have shapes {tuple(y.shape)} and {tuple(m.shape)}, "
            f"expected ({n},) each (one per node)"
        )
    loss, _ = _ops.ce_loss(s, y, m, _need_grad(s))
    return loss


def kd_loss(
    student_logits: Any,
    teacher_logits: Any,
    *,
    temperature: float = 1.0,
    t2_scale: bool = False,
    reduction: str = "batchmean",
) -> Any:
    """Hinton's knowledge distillation ``KL(softmax(t/T) || softmax(s/T))`` per row.

    ``t2_scale`` multiplies by ``T^2`` (Hinton's convention; GLNN uses ``T = 1`` and no factor).
    ``reduction``: ``"batchmean"`` (sum / N, as ``F.kl_div``'s), ``"sum"``, ``"mean"`` (sum /
    (N x C)) or ``"none"`` (one value per row). Equal to
    ``F.kl_div(log_softmax(s/T), log_softmax(t/T), reduction=..., log_target=True)``.
    """
    op = "kd_loss"
    s, t, np_in = _logits(op, student_logits, teacher_logits)
    temp = _positive(op, "temperature", temperature)
    if reduction not in _REDUCTIONS:
        raise ArgumentError(
            f"{op}: reduction ({reduction!r}) must be one of 'batchmean', 'sum', 'mean', 'none'"
        )
    loss, _ = _ops.kd_loss(s, t, temp, bool(t2_scale), reduction, _need_grad(s))
    return back(loss, np_in)


def glnn_loss(
    student_logits: Any,
    teacher_logits: Any,
    labels: Any,
    labelled_mask: Any,
    *,
    lam: float,
) -> Any:
    """GLNN: ``lam * CE(student[labelled], labels[labelled]) + (1 - lam) * KL(teacher || student)``.

    The KL term is averaged over all rows given (``reduction="batchmean"``, temperature 1, no
    ``T^2``), the cross-entropy over the labelled rows (``labelled_mask``; labels of other rows
    are ignored and may be anything, e.g. -1). With ``lam = 0`` the labels are not read.
    """
    op = "glnn_loss"
    s, t, np_in = _logits(op, student_logits, teacher_logits)
    lam = _lam(op, lam)
    total = None
    if lam < 1.0:
        kl, _ = _ops.kd_loss(s, t, 1.0, False, "batchmean", _need_grad(s))
        total = (1.0 - lam) * kl
    if lam > 0.0:
        ce = lam * _ce(op, s, labels, labelled_mask)
        total = ce if total is None else total + ce
    return back(total, np_in)


def lfd_loss(student_logits: Any, teacher_logits: Any, edge_index: Any) -> Any:
    """FF-G2M's low-frequency distillation: the mean over the given edges ``(i, j)`` plus one
    self-loop per node of ``KL(softmax(t[j]) || softmax(s[i]))`` (student at the source, teacher
    at the target). Each edge costs one dot product of length C (per-node softmaxes are shared)."""
    op = "lfd_loss"
    s, t, np_in = _logits(op, student_logits, teacher_logits)
    loss, _ = _ops.lfd_loss(s, t, _edge_index(op, edge_index), _need_grad(s))
    return back(loss, np_in)


def hfd_loss(student_logits: Any, teacher_logits: Any, edge_index: Any, *, tau: float = 1.0) -> Any:
    """FF-G2M's high-frequency distillation: the mean over the given edges ``(i, j)`` with
    ``i != j`` of ``KL(softmax(|t[i] - t[j]| / tau) || softmax(|s[i] - s[j]| / tau))`` (0 when
    every edge is a loop). The derivative of ``|x|`` at 0 is taken as 0, as torch's."""
    op = "hfd_loss"
    s, t, np_in = _logits(op, student_logits, teacher_logits)
    tau = _positive(op, "tau", tau)
    loss, _ = _ops.hfd_loss(s, t, _edge_index(op, edge_index), tau, _need_grad(s))
    return back(loss, np_in)


def ffg2m_loss(
    student_logits: Any,
    teacher_logits: Any,
    edge_index: Any,
    labels: Any,
    labelled_mask: Any,
    *,
    lam: float,
    tau: float = 1.0,
) -> Any:
    """FF-G2M: ``lam * CE(labelled) + (1 - lam) * (lfd_loss + hfd_loss(tau))`` (tau in [1, 1.5]
    in the paper)."""
    op = "ffg2m_loss"
    s, t, np_in = _logits(op, student_logits, teacher_logits)
    lam = _lam(op, lam)
    tau = _positive(op, "tau", tau)
    ei = _edge_index(op, edge_index)
    total = None
    if lam < 1.0:
        need = _need_grad(s)
        lo, _ = _ops.lfd_loss(s, t, ei, need)
        hi, _ = _ops.hfd_loss(s, t, ei, tau, need)
        total = (1.0 - lam) * (lo + hi)
    if lam > 0.0:
        ce = lam * _ce(op, s, labels, labelled_mask)
        total = ce if total is None else total + ce
    return back(total, np_in)


def similarity_loss(teacher_repr: Any, student_repr: Any) -> Any:
    """NOSMOG's representation similarity ``mean((T T^T - S S^T)^2)`` over the B x B Grams,
    computed as ``(|T^T T|^2 - 2 |T^T S|^2 + |S^T S|^2) / B^2``: O(B d^2) time and O(d^2)
    memory instead of O(B^2 d) and O(B^2). ``T`` is ``(B, d_t)``, ``S`` is ``(B, d_s)``; the
    widths may differ. A composite of matrix products, differentiable in both."""
    op = "similarity_loss"
    t, np_in = as_tensor(op, "teacher_repr", teacher_repr)
    s, _ = as_tensor(op, "student_repr", student_repr)
    if t.dim() != 2 or s.dim() != 2 or t.shape[0] != s.shape[0]:
        raise ShapeError(
            f"{op}: teacher_repr and student_repr have shapes {tuple(t.shape)} and "
            f"{tuple(s.shape)}, expected (B, d_t) and (B, d_s) with the same B"
        )
    b = t.shape[0]
    if s.dtype != t.dtype:
        s = s.to(t.dtype)
    tt = t.T @ t
    ss = s.T @ s
    ts = t.T @ s
    value = (tt.square().sum() - 2 * ts.square().sum() + ss.square().sum()) / max(b, 1) ** 2
    return back(value.clamp(min=0), np_in)


def entropy_shift(teacher_logits: Any, noisy_teacher_logits: Any) -> Any:
    """KRD's reliability signal: ``|H(softmax(noisy)) - H(softmax(clean))| / log C`` per node,
    the teacher's entropy shift under input noise scaled to [0, 1] (small = reliable)."""
    op = "entropy_shift"
    t, np_in = as_tensor(op, "teacher_logits", teacher_logits)
    n, _ = as_tensor(op, "noisy_teacher_logits", noisy_teacher_logits)
    if t.dim() != 2 or n.shape != t.shape:
        raise ShapeError(
            f"{op}: teacher_logits and noisy_teacher_logits have shapes {tuple(t.shape)} and "
            f"{tuple(n.shape)}, expected one (N, C) shape"
        )

    def entropy(z: Tensor) -> Tensor:
        lp = torch.log_softmax(z.detach(), -1)
        return -(lp.exp() * lp).sum(-1)

    scale = math.log(max(t.shape[1], 2))
    return back(((entropy(n) - entropy(t)).abs() / scale).clamp(max=1.0), np_in)


def krd_edge_sampling(edge_index: Any, entropy_shift: Any, *, power: float = 1.0, seed: int) -> Any:
    """KRD's reliability-guided sampling of distillation edges: a keep-mask over the ``E``
    edges, edge ``(i, j)`` kept with probability ``1 - entropy_shift[j]^power`` (shift clamped
    to [0, 1]). The draw is counter-based (Philox4x32-10 on ``(seed, edge position)``): the same
    seed gives the same mask on every machine and thread count. ``entropy_shift`` is ``(N,)``,
    e.g. from :func:`entropy_shift`; NaN raises :class:`spruce.NonFiniteError`."""
    op = "krd_edge_sampling"
    ei = _edge_index(op, edge_index)
    h, np_in = as_tensor(op, "entropy_shift", entropy_shift)
    if h.dim() != 1:
        raise ShapeError(f"{op}: entropy_shift has shape {tuple(h.shape)}, expected (N,)")
    p = _positive(op, "power", power)
    sd = check_int(op, "seed", seed, lo=0, hi=2**63 - 1)
    return back(_ops.krd_edge_sampling(ei, h.detach(), p, sd), np_in)
