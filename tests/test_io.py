"""Checkpoint I/O: round trips against the safetensors library, sharding, atomicity, bad files."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch as st
import torch

import spruce
from spruce.io import (
    CheckpointWriter,
    TensorSpec,
    load_state_dict,
    open_checkpoint,
    save_state_dict,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(7, 5, generator=g),
        "h": torch.randn(33, generator=g).half(),
        "b": torch.randn(4, 3, generator=g).bfloat16(),
        "d": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i": torch.arange(6).reshape(2, 3),
        "m": torch.tensor([True, False, True]),
        "e": torch.empty(0, 4),
    }


def test_single_file_round_trip_matches_safetensors(tmp_path):
    sd = _state()
    path = tmp_path / "x.safetensors"
    save_state_dict(sd, path, metadata={"origin": "test"})
    loaded = st.load_file(path)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    ck = open_checkpoint(path)
    assert ck.metadata["origin"] == "test"
    assert ck.shape("w") == (7, 5) and ck.dtype("b") == torch.bfloat16
    assert ck.nbytes("w") == 7 * 5 * 4


def test_reads_files_written_by_safetensors(tmp_path):
    sd = _state(1)
    st.save_file(sd, tmp_path / "ref.safetensors")
    got = load_state_dict(tmp_path / "ref.safetensors")
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_sharded_directory_with_index(tmp_path):
    sd = _state(2)
    paths = save_state_dict(sd, tmp_path / "out", max_shard_bytes=100)
    names = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in names
    assert len(paths) == len(names) and len(paths) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    ck = open_checkpoint(tmp_path / "out")
    assert set(ck) == set(sd) and len(ck) == len(sd)
    for k in sd:
        assert torch.equal(ck[k], sd[k])


def test_one_shard_directory_is_model_safetensors(tmp_path):
    save_state_dict({"a": torch.ones(3)}, tmp_path / "d")
    assert os.listdir(tmp_path / "d") == ["model.safetensors"]
    assert torch.equal(open_checkpoint(tmp_path / "d")["a"], torch.ones(3))


def test_out_of_order_writes_and_abort_leaves_nothing(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (3,))]
    with CheckpointWriter(tmp_path / "o.safetensors", specs) as w:
        w.write("b", torch.ones(3))
        w.write("a", torch.zeros(2))
    got = st.load_file(tmp_path / "o.safetensors")
    assert torch.equal(got["a"], torch.zeros(2)) and torch.equal(got["b"], torch.ones(3))

    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "p.safetensors", specs) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]

    with pytest.raises(spruce.CheckpointError, match="never written"):
        with CheckpointWriter(tmp_path / "q", specs) as w:
            w.write("a", torch.zeros(2))
    assert not any(p.name.startswith(".") for p in (tmp_path / "q").iterdir())
    assert list((tmp_path / "q").iterdir()) == []


def test_writer_rejects_mismatches(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,))]
    with CheckpointWriter(tmp_path / "o.safetensors", specs) as w:
        with pytest.raises(spruce.CheckpointError, match=r"expected torch.float32 and \(2,\)"):
            w.write("a", torch.zeros(3))
        with pytest.raises(spruce.CheckpointError, match="not declared"):
            w.write("zzz", torch.zeros(2))
        w.write("a", torch.zeros(2))
        with pytest.raises(spruce.CheckpointError, match="written twice"):
            w.write("a", torch.zeros(2))
    with pytest.raises(spruce.CheckpointError, match="unique"):
        CheckpointWriter(tmp_path / "r.safetensors", specs * 2)


def test_malformed_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(spruce.CheckpointError, match="no such checkpoint"):
        open_checkpoint(tmp_path / "missing.safetensors")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(spruce.CheckpointError, match="too short"):
        open_checkpoint(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(spruce.CheckpointError, match="header length"):
        open_checkpoint(huge)
    notjson = tmp_path / "nj.safetensors"
    notjson.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(spruce.CheckpointError, match="not valid JSON"):
        open_checkpoint(notjson)
    # truncated data section
    good = tmp_path / "g.safetensors"
    save_state_dict({"w": torch.ones(100)}, good)
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(spruce.CheckpointError, match="truncated or corrupt"):
        open_checkpoint(trunc)
    # unsupported dtype
    header = json.dumps({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "dt.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(spruce.CheckpointError, match="dtype C64"):
        open_checkpoint(bad)
    # index naming a missing shard
    d = tmp_path / "idx"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "nope.safetensors"}})
    )
    with pytest.raises(spruce.CheckpointError, match="missing"):
        open_checkpoint(d)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(spruce.CheckpointError, match="no model.safetensors.index.json"):
        open_checkpoint(empty)
    ck = open_checkpoint(good)
    with pytest.raises(spruce.CheckpointError, match="no tensor named 'nope'"):
        ck["nope"]


def test_checkpoint_error_is_a_value_error():
    assert issubclass(spruce.CheckpointError, ValueError)
    assert issubclass(spruce.ConfigError, ValueError)
