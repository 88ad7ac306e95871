"""Node-classification data: a contextual stochastic block model generator (embedded, no
download) and loaders for files a user already has (Planetoid raw files, ``.npz`` files).

Every loader returns a :class:`GraphData`: features, a symmetric ``(2, E)`` int64 edge_index
without duplicates, int64 labels and boolean train/validation/test masks.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._native import check_int, check_number
from ..errors import ArgumentError, CheckpointError

__all__ = ["GraphData", "csbm", "load_npz", "load_planetoid", "random_split", "edge_homophily"]


@dataclass
class GraphData:
    """A node-classification graph."""

    features: Tensor
    edge_index: Tensor
    labels: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int
    name: str = "graph"

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])

    @property
    def masks(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.train_mask, self.val_mask, self.test_mask

    def homophily(self) -> float:
        """The fraction of edges joining nodes of one class."""
        return edge_homophily(self.edge_index, self.labels)

    def __repr__(self) -> str:
        return (
            f"GraphData({self.name!r}, nodes={self.num_nodes}, edges={self.edge_index.shape[1]}, "
            f"features={self.features.shape[1]}, classes={self.num_classes}, "
            f"train/val/test={int(self.train_mask.sum())}/{int(self.val_mask.sum())}/"
            f"{int(self.test_mask.sum())})"
        )


def edge_homophily(edge_index: Tensor, labels: Tensor) -> float:
    """The fraction of edges whose endpoints share a label (NaN without edges)."""
    if edge_index.shape[1] == 0:
        return float("nan")
    return float((labels[edge_index[0]] == labels[edge_index[1]]).double().mean())


def _symmetric_unique(src: Tensor, dst: Tensor, n: int) -> Tensor:
    """Both directions of every edge, loops dropped, duplicates removed, sorted."""
    keep = src != dst
    src, dst = src[keep], dst[keep]
    a = torch.cat([src, dst])
    b = torch.cat([dst, src])
    key = torch.unique(a * n + b)
    return torch.stack([key // n, key % n])


def random_split(
    labels: Tensor,
    num_classes: int,
    *,
    train_per_class: int = 20,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Planetoid-style masks: ``train_per_class`` random nodes of each class for training,
    ``val_fraction`` of all nodes for validation, the rest for testing."""
    n = labels.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    train = torch.zeros(n, dtype=torch.bool)
    for c in range(num_classes):
        members = perm[labels[perm] == c]
        train[members[:train_per_class]] = True
    rest = perm[~train[perm]]
    n_val = int(round(val_fraction * n))
    val = torch.zeros(n, dtype=torch.bool)
    val[rest[:n_val]] = True
    test = ~(train | val)
    return train, val, test


def csbm(
    num_nodes: int = 2000,
    num_classes: int = 4,
    feature_dim: int = 32,
    homophily: float = 0.8,
    seed: int = 0,
    *,
    avg_degree: float = 8.0,
    feature_signal: float = 1.0,
    train_per_class: int = 20,
    val_fraction: float = 0.2,
) -> GraphData:
    """A contextual stochastic block model graph.

    Balanced classes; class ``c`` has a random mean ``mu_c`` (``N(0, I)`` scaled to norm
    ``feature_signal``) and node features ``mu_y + N(0, I)``, so features alone separate the
    classes only partly. Each of the ``num_nodes * avg_degree / 2`` undirected edges joins a
    uniform random node to a node of its own class with probability ``homophily``, else to a
    node of another class (uniform among the others): ``homophily`` runs from strongly
    heterophilous (0) through uninformative (``1 / num_classes``) to homophilous (1). Loops
    and duplicates are dropped. Deterministic in ``seed``.
    """
    op = "csbm"
    n = check_int(op, "num_nodes", num_nodes, lo=2)
    c = check_int(op, "num_classes", num_classes, lo=2, hi=n)
    d = check_int(op, "feature_dim", feature_dim, lo=1)
    h = check_number(op, "homophily", homophily)
    if not 0.0 <= h <= 1.0:
        raise ArgumentError(f"{op}: homophily ({h}) must be in [0, 1]")
    deg = check_number(op, "avg_degree", avg_degree)
    if not deg > 0:
        raise ArgumentError(f"{op}: avg_degree ({deg}) must be > 0")
    seed = check_int(op, "seed", seed, lo=0)
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % c)[torch.randperm(n, generator=g)]
    mu = torch.randn(c, d, generator=g)
    mu = mu / mu.norm(dim=1, keepdim=True) * float(feature_signal)
    features = mu[labels] + torch.randn(n, d, generator=g)
    # members of each class, contiguous: class k occupies order[start[k]:start[k] + size[k]]
    order = torch.argsort(labels, stable=True)
    size = torch.bincount(labels, minlength=c)
    start = torch.cumsum(size, 0) - size
    m = max(1, int(round(n * deg / 2)))
    src = torch.randint(0, n, (m,), generator=g)
    same = torch.rand(m, generator=g) < h
    shift = torch.randint(1, c, (m,), generator=g)
    target_class = torch.where(same, labels[src], (labels[src] + shift) % c)
    pick = (torch.rand(m, generator=g) * size[target_class]).long()
    dst = order[start[target_class] + pick.clamp(max=size[target_class] - 1)]
    edge_index = _symmetric_unique(src, dst, n)
    train, val, test = random_split(
        labels, c, train_per_class=train_per_class, val_fraction=val_fraction, seed=seed + 1
    )
    return GraphData(
        features, edge_index, labels, train, val, test, c, name=f"csbm(h={h:g}, seed={seed})"
    )


def _dense(a: Any) -> np.ndarray:
    return np.asarray(a.todense() if hasattr(a, "todense") else a)


def load_npz(
    path: str | os.PathLike,
    *,
    train_per_class: int = 20,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> GraphData:
    """Loads a node-classification graph from an ``.npz`` file.

    Recognised arrays: the edges as ``edge_index`` (``(2, E)``) or as a CSR adjacency
    ``adj_data``/``adj_indices``/``adj_indptr`` (the layout of the common citation/co-purchase
    ``.npz`` files); features as ``features``/``x`` (dense) or ``attr_data``/``attr_indices``/
    ``attr_indptr``/``attr_shape`` (CSR); labels as ``labels``/``y``; optional boolean
    ``train_mask``/``val_mask``/``test_mask`` (else a random Planetoid-style split by ``seed``).
    Edges are made symmetric, without loops or duplicates.
    """
    op = "load_npz"
    try:
        z = np.load(os.fspath(path), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{op}: cannot read {os.fspath(path)!r}: {e}") from e
    keys = set(z.files)

    def need(*names: str) -> str:
        for k in names:
            if k in keys:
                return k
        raise CheckpointError(
            f"{op}: {os.fspath(path)!r} has no array named {' or '.join(names)} "
            f"(it holds {sorted(keys)})"
        )

    if "edge_index" in keys:
        ei = torch.from_numpy(z["edge_index"].astype(np.int64))
        if ei.dim() != 2 or ei.shape[0] != 2:
            raise CheckpointError(f"{op}: edge_index has shape {tuple(ei.shape)}, expected (2, E)")
        src, dst = ei[0], ei[1]
    else:
        ptr = z[need("adj_indptr")].astype(np.int64)
        idx = z[need("adj_indices")].astype(np.int64)
        src = torch.from_numpy(np.repeat(np.arange(ptr.shape[0] - 1), np.diff(ptr)))
        dst = torch.from_numpy(idx)
    if "features" in keys or "x" in keys:
        x = z[need("features", "x")].astype(np.float32)
    else:
        ap = z[need("attr_indptr")].astype(np.int64)
        ai = z[need("attr_indices")].astype(np.int64)
        av = z[need("attr_data")].astype(np.float32)
        shape = tuple(int(v) for v in z[need("attr_shape")])
        x = np.zeros(shape, dtype=np.float32)
        rows = np.repeat(np.arange(shape[0]), np.diff(ap))
        np.add.at(x, (rows, ai), av)
    features = torch.from_numpy(np.ascontiguousarray(x))
    labels = torch.from_numpy(z[need("labels", "y")].astype(np.int64).reshape(-1))
    n = features.shape[0]
    if labels.shape[0] != n:
        raise CheckpointError(f"{op}: {labels.shape[0]} labels for {n} feature rows")
    if src.numel() and int(torch.maximum(src.max(), dst.max())) >= n:
        raise CheckpointError(f"{op}: an edge names a node >= the number of nodes ({n})")
    c = int(labels.max()) + 1 if n else 0
    edge_index = _symmetric_unique(src, dst, n)
    if {"train_mask", "val_mask", "test_mask"} <= keys:
        train, val, test = (
            torch.from_numpy(z[k].astype(bool)) for k in ("train_mask", "val_mask", "test_mask")
        )
    else:
        train, val, test = random_split(
            labels, c, train_per_class=train_per_class, val_fraction=val_fraction, seed=seed
        )
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return GraphData(features, edge_index, labels, train, val, test, c, name=name)


class _Unpickler(pickle.Unpickler):
    """Loads the Planetoid pickles: NumPy arrays, SciPy sparse matrices, dicts of lists."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in (
            "numpy",
            "scipy",
            "collections",
            "builtins",
            "copy_reg",
            "__builtin__",
        ):
            return super().find_class(module, name)
        raise CheckpointError(f"load_planetoid: refusing to unpickle {module}.{name}")


def load_planetoid(root: str | os.PathLike, name: str) -> GraphData:
    """Loads a Planetoid citation graph (Cora, CiteSeer, PubMed) from its raw files
    ``ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}`` in ``root``, with the public split:
    the ``len(y)`` first nodes train, the next 500 validate, the ``test.index`` nodes test.
    Test indices missing from the graph (CiteSeer's isolated nodes) get zero features and no
    label in any split. Reading the sparse feature matrices needs SciPy.
    """
    op = "load_planetoid"
    base = os.path.join(os.fspath(root), f"ind.{name.lower()}")
    parts: dict[str, Any] = {}
    for part in ("x", "tx", "allx", "y", "ty", "ally", "graph"):
        p = f"{base}.{part}"
        try:
            with open(p, "rb") as f:
                parts[part] = _Unpickler(f, encoding="latin1").load()
        except OSError as e:
            raise CheckpointError(f"{op}: cannot read {p!r}: {e}") from e
        except ModuleNotFoundError as e:
            raise CheckpointError(
                f"{op}: reading {p!r} needs {e.name} (pip install {e.name})"
            ) from e
    try:
        with open(f"{base}.test.index") as f:
            test_idx = [int(line) for line in f if line.strip()]
    except OSError as e:
        raise CheckpointError(f"{op}: cannot read {base + '.test.index'!r}: {e}") from e
    allx, tx = _dense(parts["allx"]), _dense(parts["tx"])
    ally, ty = np.asarray(parts["ally"]), np.asarray(parts["ty"])
    lo, hi = min(test_idx), max(test_idx)
    span = hi - lo + 1
    tx_full = np.zeros((span, tx.shape[1]), dtype=np.float32)
    ty_full = np.zeros((span, ty.shape[1]), dtype=ty.dtype)
    sorted_idx = np.sort(np.asarray(test_idx))
    tx_full[sorted_idx - lo] = tx
    ty_full[sorted_idx - lo] = ty
    x = np.concatenate([allx.astype(np.float32), tx_full])
    y = np.concatenate([ally, ty_full])
    order = np.asarray(test_idx)
    x[order] = x[sorted_idx]
    y[order] = y[sorted_idx]
    n = x.shape[0]
    labeled = y.sum(1) > 0
    labels = torch.from_numpy(np.where(labeled, y.argmax(1), -1).astype(np.int64))
    graph = parts["graph"]
    src, dst = [], []
    for u, nbrs in graph.items():
        for v in nbrs:
            if int(u) < n and int(v) < n:
                src.append(int(u))
                dst.append(int(v))
    edge_index = _symmetric_unique(
        torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64), n
    )
    n_train = len(parts["y"])
    train = torch.zeros(n, dtype=torch.bool)
    train[:n_train] = True
    val = torch.zeros(n, dtype=torch.bool)
    val[n_train : n_train + 500] = True
    test = torch.zeros(n, dtype=torch.bool)
    test[torch.tensor(test_idx)] = True
    has = torch.from_numpy(labeled)
    return GraphData(
        torch.from_numpy(x),
        edge_index,
        labels,
        train & has,
        val & has,
        test & has,
        int(y.shape[1]),
        name=name,
    )
