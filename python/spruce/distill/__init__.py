"""GNN-to-MLP distillation: fused losses (KD, GLNN, FF-G2M, KRD, NOSMOG similarity), teacher
GNNs on :mod:`spruce.graph`, and the :class:`Distiller` training helper.

The losses are native kernels with autograd (``torch.ops.spruce.<name>``) that never allocate an
``E x C`` tensor; see :mod:`spruce.distill.losses` for the conventions.
"""

from __future__ import annotations

from .distiller import LOSSES, TEACHERS, Distiller, DistillReport
from .losses import (
    entropy_shift,
    ffg2m_loss,
    glnn_loss,
    hfd_loss,
    kd_loss,
    krd_edge_sampling,
    lfd_loss,
    similarity_loss,
)
from .models import GCN, MLP, GraphSAGE

__all__ = [
    "kd_loss",
    "glnn_loss",
    "lfd_loss",
    "hfd_loss",
    "ffg2m_loss",
    "similarity_loss",
    "entropy_shift",
    "krd_edge_sampling",
    "Distiller",
    "DistillReport",
    "LOSSES",
    "TEACHERS",
    "MLP",
    "GCN",
    "GraphSAGE",
]
