"""The GNN-to-MLP distillation loop: train (or take) a teacher GNN, cache its soft labels,
train an MLP student with a distillation loss, evaluate both."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._native import check_int
from ..errors import ArgumentError, ShapeError
from .losses import ffg2m_loss, glnn_loss
from .models import GCN, MLP, GraphSAGE

__all__ = ["Distiller", "DistillReport", "LOSSES", "TEACHERS"]

#: Student losses: labels only (a vanilla MLP), GLNN, FF-G2M.
LOSSES = ("mlp", "glnn", "ffg2m")
#: Teachers :class:`Distiller` builds by name.
TEACHERS = {"gcn": GCN, "sage": GraphSAGE}


@dataclass
class DistillReport:
    """Accuracies (at the best validation epoch) and full-graph inference latencies."""

    loss: str
    teacher: str
    teacher_val: float
    teacher_test: float
    student_val: float
    student_test: float
    teacher_latency_s: float
    student_latency_s: float

    @property
    def speedup(self) -> float:
        return self.teacher_latency_s / max(self.student_latency_s, 1e-12)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


def _accuracy(logits: Tensor, labels: Tensor, mask: Tensor) -> float:
    m = int(mask.sum())
    if m == 0:
        return float("nan")
    return float((logits[mask].argmax(-1) == labels[mask]).double().mean())


def _latency(fn, repeat: int = 20, budget_s: float = 1.0) -> float:
    """The best of ``repeat`` timed calls (fewer past ``budget_s``): the minimum is what the
    model costs, the rest is noise from other work on the machine."""
    with torch.no_grad():
        fn()
        best, start = float("inf"), time.perf_counter()
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
            if t0 - start > budget_s:
                break
    return best


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=enabled is False, leave=False)


class Distiller:
    """Trains a teacher GNN, caches its soft labels, and distills them into an MLP.

    - ``teacher``: ``"gcn"`` or ``"sage"`` (built on :mod:`spruce.graph`, trained here), an
      ``nn.Module`` called as ``teacher(features, graph)`` with a ``make_graph(edge_index,
      num_nodes)`` static method (trained here; with ``teacher_epochs=0`` a teacher trained
      elsewhere is used as it is), or a ``(N, C)`` tensor of precomputed teacher logits
      (nothing to train; latency then not measured).
    - ``student``: an ``nn.Module`` called as ``student(features)``, or None for a 2-layer MLP.
    - ``graph``: the ``(2, E)`` int64 edge_index (symmetric, as PyG's undirected graphs).
    - ``masks``: ``(train, val, test)`` boolean node masks.
    - ``loss``: ``"mlp"`` (cross-entropy on labels only), ``"glnn"`` or ``"ffg2m"``; ``lam``
      weighs the cross-entropy, ``tau`` is FF-G2M's temperature.

    Transductive: the student learns the teacher's soft labels on every node, and the labels
    of the training nodes. Model selection keeps the epoch with the best validation accuracy,
    the latest one among ties (as the GLNN and FF-G2M reference code: small validation sets
    saturate early, and the first epoch to reach the best accuracy is an undertrained model
    whose near-uniform soft labels carry little knowledge). ``patience``: stop after that
    many epochs without a new best (tie included); None trains every epoch. The validation
    accuracy of every epoch run is kept in ``val_history["teacher"]`` and
    ``val_history["student"]``, the index of the epoch kept in ``best_epoch`` (same keys).
    ``progress`` (None: a tqdm bar when interactive, False: silent).
    """

    def __init__(
        self,
        teacher: str | nn.Module | Tensor,
        student: nn.Module | None,
        graph: Tensor,
        features: Tensor,
        labels: Tensor,
        masks: Sequence[Tensor],
        *,
        loss: str = "ffg2m",
        lam: float = 0.5,
        tau: float = 1.0,
        hidden: int = 64,
        epochs: int = 200,
        teacher_epochs: int = 200,
        lr: float = 0.01,
        weight_decay: float = 5e-4,
        dropout: float = 0.5,
        patience: int | None = None,
        seed: int = 0,
        progress: bool | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise ArgumentError(f"Distiller: loss ({loss!r}) must be one of {', '.join(LOSSES)}")
        if len(masks) != 3:
            raise ArgumentError(f"Distiller: masks ({len(masks)} given) must be (train, val, test)")
        n = features.shape[0]
        if labels.shape != (n,) or any(m.shape != (n,) for m in masks):
            raise ShapeError(
                f"Distiller: labels {tuple(labels.shape)} and masks must have shape ({n},) "
                "(one per feature row)"
            )
        self.edge_index = graph
        self.features = features.float()
        self.labels = labels
        self.train_mask, self.val_mask, self.test_mask = (m.bool() for m in masks)
        self.num_classes = int(labels.max()) + 1
        self.loss, self.lam, self.tau = loss, float(lam), float(tau)
        self.hidden, self.dropout = hidden, dropout
        self.epochs, self.teacher_epochs = epochs, teacher_epochs
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed
        self.patience = (
            None if patience is None else check_int("Distiller", "patience", patience, lo=1)
        )
        self.progress = progress
        torch.manual_seed(seed)
        self._teacher_logits: Tensor | None = None
        self.teacher_name = teacher if isinstance(teacher, str) else type(teacher).__name__
        if isinstance(teacher, Tensor):
            if teacher.shape != (n, self.num_classes):
                raise ShapeError(
                    f"Distiller: teacher logits have shape {tuple(teacher.shape)}, expected "
                    f"({n}, {self.num_classes})"
                )
            self.teacher: nn.Module | None = None
            self._teacher_logits = teacher.detach().float()
            self.teacher_name = "given logits"
        elif isinstance(teacher, str):
            if teacher not in TEACHERS:
                raise ArgumentError(
                    f"Distiller: teacher ({teacher!r}) must be one of {', '.join(TEACHERS)}, a "
                    "module or a logits tensor"
                )
            self.teacher = TEACHERS[teacher](
                features.shape[1], hidden, self.num_classes, dropout=dropout
            )
        else:
            self.teacher = teacher
        self.student = student or MLP(features.shape[1], hidden, self.num_classes, dropout=dropout)
        self._graph = None
        if self.teacher is not None:
            make = getattr(self.teacher, "make_graph", None)
            if make is None:
                raise ArgumentError(
                    "Distiller: a teacher module needs a make_graph(edge_index, num_nodes) method"
                )
            self._graph = make(graph, n)
        self.teacher_val = self.teacher_test = float("nan")
        self.val_history: dict[str, list[float]] = {"teacher": [], "student": []}
        self.best_epoch: dict[str, int | None] = {"teacher": None, "student": None}

    def _fit(
        self, model: nn.Module, forward, loss_fn, epochs: int, desc: str
    ) -> tuple[float, float]:
        opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best_val, best_state, stale = -1.0, None, 0
        history = self.val_history[desc] = []
        self.best_epoch[desc] = None
        bar = _progress(epochs, desc, self.progress)
        for _ in range(epochs):
            model.train()
            opt.zero_grad()
            loss = loss_fn(forward())
            loss.backward()
            opt.step()
            model.eval()
            with torch.no_grad():
                val = _accuracy(forward(), self.labels, self.val_mask)
            history.append(val)
            # ties go to the later epoch: see the class docstring
            if val >= best_val:
                best_val, best_state, stale = val, copy.deepcopy(model.state_dict()), 0
                self.best_epoch[desc] = len(history) - 1
            else:
                stale += 1
            bar.update(1)
            if self.patience is not None and stale >= self.patience:
                break
        bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            out = forward()
        return _accuracy(out, self.labels, self.val_mask), _accuracy(
            out, self.labels, self.test_mask
        )

    def train_teacher(self) -> tuple[float, float]:
        """Trains the teacher on the labelled nodes; returns its (val, test) accuracy."""
        if self.teacher is None:
            return self.teacher_val, self.teacher_test
        torch.manual_seed(self.seed)
        teacher, graph = self.teacher, self._graph

        def ce(out: Tensor) -> Tensor:
            return nn.functional.cross_entropy(out[self.train_mask], self.labels[self.train_mask])

        self.teacher_val, self.teacher_test = self._fit(
            teacher, lambda: teacher(self.features, graph), ce, self.teacher_epochs, "teacher"
        )
        with torch.no_grad():
            self._teacher_logits = teacher(self.features, graph).detach()
        return self.teacher_val, self.teacher_test

    @property
    def teacher_graph(self):
        """The :class:`spruce.graph.Graph` the teacher runs on (None for given logits)."""
        return self._graph

    @property
    def soft_labels(self) -> Tensor:
        """The teacher's logits on every node (training the teacher first if needed)."""
        if self._teacher_logits is None:
            self.train_teacher()
        assert self._teacher_logits is not None
        return self._teacher_logits

    def train_student(self) -> tuple[float, float]:
        """Trains the student with the chosen loss; returns its (val, test) accuracy."""
        t = self.soft_labels if self.loss != "mlp" else None
        torch.manual_seed(self.seed)
        y, m = self.labels, self.train_mask
        if self.loss == "mlp":

            def loss_fn(out: Tensor) -> Tensor:
                return nn.functional.cross_entropy(out[m], y[m])
        elif self.loss == "glnn":

            def loss_fn(out: Tensor) -> Tensor:
                return glnn_loss(out, t, y, m, lam=self.lam)
        else:

            def loss_fn(out: Tensor) -> Tensor:
                return ffg2m_loss(out, t, self.edge_index, y, m, lam=self.lam, tau=self.tau)

        student = self.student
        return self._fit(student, lambda: student(self.features), loss_fn, self.epochs, "student")

    def run(self) -> DistillReport:
        """Teacher, then student; accuracies and full-graph inference latencies."""
        if self._teacher_logits is None:
            self.train_teacher()
        s_val, s_test = self.train_student()
        student, teacher, graph = self.student, self.teacher, self._graph
        t_lat = (
            _latency(lambda: teacher(self.features, graph)) if teacher is not None else float("nan")
        )
        s_lat = _latency(lambda: student(self.features))
        return DistillReport(
            self.loss,
            self.teacher_name,
            self.teacher_val,
            self.teacher_test,
            s_val,
            s_test,
            t_lat,
            s_lat,
        )
