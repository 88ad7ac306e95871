"""The distillation workflow: CSBM generator, file loaders, teacher GNNs, the Distiller,
``spruce distill`` and the demo rows."""

from __future__ import annotations

import argparse
import json
import pickle

import numpy as np
import pytest
import torch

import spruce
from spruce.distill import GCN, MLP, Distiller, GraphSAGE
from spruce.distill import cli as distill_cli
from spruce.graph import datasets
from spruce.reference import graph as R


def test_csbm_is_seeded_symmetric_and_has_the_asked_homophily():
    for h in (0.05, 0.5, 0.95):
        d = datasets.csbm(1200, 3, 16, h, seed=4)
        assert abs(d.homophily() - h) < 0.05
        ei = d.edge_index
        assert bool((ei[0] != ei[1]).all())
        key = ei[0] * d.num_nodes + ei[1]
        assert torch.equal(key.sort().values, (ei[1] * d.num_nodes + ei[0]).sort().values)
        assert torch.unique(key).numel() == key.numel()
        assert not bool((d.train_mask & d.val_mask).any() or (d.val_mask & d.test_mask).any())
        assert int(d.train_mask.sum()) == 3 * 20
    a, b = datasets.csbm(300, 3, 8, 0.7, seed=1), datasets.csbm(300, 3, 8, 0.7, seed=1)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.features, b.features)
    assert not torch.equal(a.edge_index, datasets.csbm(300, 3, 8, 0.7, seed=2).edge_index)
    with pytest.raises(spruce.ArgumentError, match="homophily"):
        datasets.csbm(100, 3, 8, 1.5)


def test_load_npz_edge_index_and_csr_layouts(tmp_path):
    d = datasets.csbm(200, 3, 5, 0.8, seed=0)
    p1 = tmp_path / "g.npz"
    np.savez(
        p1,
        edge_index=d.edge_index.numpy(),
        features=d.features.numpy(),
        labels=d.labels.numpy(),
        train_mask=d.train_mask.numpy(),
        val_mask=d.val_mask.numpy(),
        test_mask=d.test_mask.numpy(),
    )
    g = datasets.load_npz(p1)
    assert torch.equal(g.edge_index, d.edge_index) and torch.equal(g.labels, d.labels)
    assert torch.equal(g.train_mask, d.train_mask) and g.num_classes == 3
    # the CSR layout of the common .npz graph files, one direction only, split by seed
    import scipy.sparse as sp

    src, dst = d.edge_index
    keep = src < dst
    adj = sp.csr_matrix(
        (np.ones(int(keep.sum())), (src[keep].numpy(), dst[keep].numpy())), shape=(200, 200)
    )
    feats = sp.csr_matrix(d.features.numpy())
    p2 = tmp_path / "csr.npz"
    np.savez(
        p2,
        adj_data=adj.data,
        adj_indices=adj.indices,
        adj_indptr=adj.indptr,
        attr_data=feats.data,
        attr_indices=feats.indices,
        attr_indptr=feats.indptr,
        attr_shape=np.array(feats.shape),
        labels=d.labels.numpy(),
    )
    h = datasets.load_npz(p2, seed=3)
    assert torch.equal(h.edge_index, d.edge_index)
    torch.testing.assert_close(h.features, d.features)
    assert int(h.train_mask.sum()) == 60
    with pytest.raises(spruce.CheckpointError, match="no array named labels or y"):
        np.savez(tmp_path / "bad.npz", edge_index=d.edge_index.numpy(), x=d.features.numpy())
        datasets.load_npz(tmp_path / "bad.npz")
    with pytest.raises(spruce.CheckpointError, match="cannot read"):
        datasets.load_npz(tmp_path / "missing.npz")


def _write_planetoid(root, name: str) -> tuple[np.ndarray, list[int]]:
    """A tiny graph in the Planetoid raw layout (test nodes stored in a shuffled order, one
    test index missing from the graph, as CiteSeer's isolated nodes)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n_all, n_test, c, f = 12, 5, 3, 4
    x_all = rng.random((n_all, f)).astype(np.float32)
    y_all = np.eye(c)[rng.integers(0, c, n_all)]
    test_idx = [16, 13, 12, 15]  # node 14 missing
    x_test = rng.random((len(test_idx), f)).astype(np.float32)
    y_test = np.eye(c)[rng.integers(0, c, len(test_idx))]
    graph = {i: [(i + 1) % 17, (i + 3) % 17] for i in range(17)}
    objs = {
        "x": sp.csr_matrix(x_all[:3]),
        "y": y_all[:3],
        "allx": sp.csr_matrix(x_all),
        "ally": y_all,
        "tx": sp.csr_matrix(x_test),
        "ty": y_test,
        "graph": graph,
    }
    for k, v in objs.items():
        with open(root / f"ind.{name}.{k}", "wb") as fh:
            pickle.dump(v, fh)
    (root / f"ind.{name}.test.index").write_text("\n".join(map(str, test_idx)) + "\n")
    del n_test
    feats = np.zeros((17, f), dtype=np.float32)
    feats[:n_all] = x_all
    labels = np.full(17, -1)
    labels[:n_all] = y_all.argmax(1)
    for row, i in enumerate(test_idx):
        feats[i] = x_test[row]
        labels[i] = y_test[row].argmax()
    return feats, labels.tolist()


def test_load_planetoid_raw_files(tmp_path):
    feats, labels = _write_planetoid(tmp_path, "toy")
    d = datasets.load_planetoid(tmp_path, "toy")
    assert d.num_nodes == 17 and d.num_classes == 3
    torch.testing.assert_close(d.features, torch.from_numpy(feats))
    assert d.labels.tolist() == labels
    assert d.train_mask.nonzero().flatten().tolist() == [0, 1, 2]
    assert sorted(d.test_mask.nonzero().flatten().tolist()) == [12, 13, 15, 16]
    assert bool((d.edge_index[0] != d.edge_index[1]).all())
    with pytest.raises(spruce.CheckpointError, match="cannot read"):
        datasets.load_planetoid(tmp_path, "cora")


def test_teacher_models_run_on_spruce_graphs():
    d = datasets.csbm(300, 3, 8, 0.9, seed=0)
    for cls in (GCN, GraphSAGE):
        model = cls(8, 16, 3).double()
        graph = cls.make_graph(d.edge_index, d.num_nodes)
        graph = graph.with_values(graph.values.double())
        x = d.features.double().requires_grad_()
        out = model(x, graph)
        assert out.shape == (300, 3)
        out.square().sum().backward()
        assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    # GCN = dense A_hat products
    model = GCN(8, 16, 3, dropout=0.0).double().eval()
    graph = GCN.make_graph(d.edge_index, d.num_nodes)
    graph = graph.with_values(graph.values.double())
    a = R.dense_adjacency(d.edge_index, d.num_nodes, self_loops="remaining")
    x = d.features.double()
    h = a @ model.lins[0](x)
    torch.testing.assert_close(model(x, graph), a @ model.lins[1](torch.relu(h)))
    assert MLP(8, 16, 3)(d.features).shape == (300, 3)


def _outcome(seed: int, homophily: float) -> dict[str, float]:
    """Teacher GCN, then MLP students of one architecture: labels only, GLNN, FF-G2M."""
    d = datasets.csbm(400, 3, 16, homophily, seed=seed, feature_signal=1.5)
    # lam = 0.3, tau = 1.5: FF-G2M's published setting for a GCN teacher on Coauthor-CS
    common = dict(epochs=100, lam=0.3, tau=1.5, seed=seed, progress=False)
    base = Distiller(
        "gcn",
        None,
        d.edge_index,
        d.features,
        d.labels,
        d.masks,
        loss="mlp",
        teacher_epochs=100,
        **common,
    )
    r = base.run()
    assert 0 < r.student_test < 1 and r.teacher_latency_s > 0 and r.student_latency_s > 0
    accs = {"teacher": r.teacher_test, "mlp": r.student_test}
    for loss in ("glnn", "ffg2m"):
        dist = Distiller(
            base.soft_labels,
            None,
            d.edge_index,
            d.features,
            d.labels,
            d.masks,
            loss=loss,
            **common,
        )
        accs[loss] = dist.train_student()[1]
    return accs


@pytest.fixture
def one_torch_thread():
    """Tiny dense products: one thread is faster than several, and steadier on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("homophily", [0.7, 0.9])
def test_distilled_students_beat_the_label_only_mlp(homophily, one_torch_thread):
    """The issue's outcome claim on homophilous CSBM graphs, where the graph carries signal
    the features lack (features alone separate the classes only partly), over three seeds:
    the FF-G2M-distilled MLP beats the MLP trained on labels alone, and the GLNN-distilled MLP
    lands between that MLP and the GCN teacher. On heterophilous graphs (homophily <= 0.3) the
    GCN teacher itself is below the label-only MLP and no distilled student beats it: see the
    table of benches/distill_outcome.py."""
    runs = [_outcome(seed, homophily) for seed in range(3)]
    for a in runs:
        assert a["teacher"] > a["mlp"] + 0.1, a  # the graph helps: distillation has a point
        assert a["ffg2m"] > a["mlp"], a
        assert a["mlp"] < a["glnn"] <= a["teacher"], a

    def mean(k: str) -> float:
        return sum(a[k] for a in runs) / len(runs)

    assert mean("ffg2m") > mean("mlp") + 0.05, runs
    assert mean("glnn") > mean("mlp") + 0.05, runs


def test_distiller_model_selection_and_bad_arguments():
    d = datasets.csbm(300, 3, 8, 0.9, seed=0, feature_signal=1.5)
    base = Distiller(
        "gcn",
        None,
        d.edge_index,
        d.features,
        d.labels,
        d.masks,
        loss="mlp",
        epochs=60,
        teacher_epochs=60,
        progress=False,
    )
    val, test = base.train_teacher()
    hist = base.val_history["teacher"]
    assert len(hist) == 60 and val == max(hist)
    # ties in validation accuracy go to the later epoch: the teacher is not the first epoch
    # that reaches the best accuracy (an undertrained model), its soft labels are confident
    last_best = max(i for i, v in enumerate(hist) if v == max(hist))
    assert base.best_epoch["teacher"] == last_best > hist.index(max(hist))
    conf = base.soft_labels.softmax(-1).max(-1).values.mean()
    assert float(conf) > 0.8
    soft = base.soft_labels
    # a teacher trained elsewhere is used as it is with teacher_epochs=0
    again = Distiller(
        base.teacher, None, d.edge_index, d.features, d.labels, d.masks, teacher_epochs=0
    )
    assert again.train_teacher() == (val, test)
    torch.testing.assert_close(again.soft_labels, soft)
    # patience stops a run that no longer improves
    early = Distiller(
        soft, None, d.edge_index, d.features, d.labels, d.masks, epochs=500, patience=5
    )
    early.train_student()
    assert 5 < len(early.val_history["student"]) < 500
    with pytest.raises(spruce.ArgumentError, match="loss"):
        Distiller("gcn", None, d.edge_index, d.features, d.labels, d.masks, loss="kd")
    with pytest.raises(spruce.ArgumentError, match="teacher"):
        Distiller("gat", None, d.edge_index, d.features, d.labels, d.masks)
    with pytest.raises(spruce.ArgumentError, match="patience"):
        Distiller(soft, None, d.edge_index, d.features, d.labels, d.masks, patience=0)
    with pytest.raises(spruce.ShapeError):
        Distiller(soft[:5], None, d.edge_index, d.features, d.labels, d.masks)


def _run_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    distill_cli.register(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_distill_command(capsys, tmp_path):
    argv = ["distill", "--nodes", "300", "--classes", "3", "--features", "8", "--epochs", "20"]
    assert _run_cli(argv + ["--quiet"]) == 0
    out = capsys.readouterr().out
    assert "GCN teacher" in out and "MLP + FF-G2M" in out and "faster" in out
    assert _run_cli(argv + ["--json", "--loss", "glnn", "--teacher", "sage"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["loss"] for r in report["runs"]] == ["mlp", "glnn"]
    d = datasets.csbm(200, 3, 5, 0.8, seed=0)
    np.savez(
        tmp_path / "g.npz",
        edge_index=d.edge_index.numpy(),
        x=d.features.numpy(),
        y=d.labels.numpy(),
    )
    assert _run_cli(["distill", "--npz", str(tmp_path / "g.npz"), "--epochs", "5", "--json"]) == 0
    assert "runs" in json.loads(capsys.readouterr().out)
    _write_planetoid(tmp_path, "toy")
    argv = ["distill", "--planetoid", "toy", "--root", str(tmp_path), "--epochs", "3", "--json"]
    assert _run_cli(argv + ["--teacher", "sage"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "'toy'" in report["data"] and [r["loss"] for r in report["runs"]] == ["mlp", "ffg2m"]


def test_demo_rows_pass_their_checks():
    from spruce.distill._demo import demo_rows

    rows = demo_rows(quick=True)
    assert len(rows) == 3
    for r in rows:
        assert r.ok, (r.task, r.check)
        assert r.spruce_s > 0 and r.baseline_s > 0
