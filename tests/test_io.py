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


def _slot_state() -> dict[str, torch.Tensor]:
    """Tensors of sizes that cross block boundaries in every way (tiny, empty, > 2 blocks)."""
    g = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(3, generator=g),
        "big": torch.randn(3001, 7, generator=g).bfloat16(),
        "empty": torch.zeros(0, 4),
        "h": torch.randn(1025, generator=g).half(),
        "tail": torch.randn(999, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("order", ["file", "reversed", "mixed"])
def test_slots_write_the_same_bytes_as_write(tmp_path, order):
    """Slots committed in file order (direct I/O), out of order (buffered fallback) or mixed
    with plain writes give the bytes `write` gives, in one file and in shards."""
    sd = _slot_state()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]
    names = list(sd)
    if order == "reversed":
        names = names[::-1]
    for out, shard in (("one.safetensors", 5 * 2**30), ("dir", 30_000)):
        want = tmp_path / f"want-{out}"
        save_state_dict(sd, want, max_shard_bytes=shard)
        got = tmp_path / f"got-{out}"
        with CheckpointWriter(got, specs, max_shard_bytes=shard) as w:
            for i, n in enumerate(names):
                if order == "mixed" and i % 2:
                    w.write(n, sd[n])
                else:
                    w.slot(n).copy_(sd[n])
                    w.commit(n)
        files = sorted(p.name for p in want.iterdir()) if want.is_dir() else [""]
        for f in files:
            a, b = (want / f, got / f) if f else (want, got)
            assert a.read_bytes() == b.read_bytes(), f
        assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))


def test_slot_misuse_and_background_errors_leave_nothing(tmp_path):
    sd = _slot_state()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]
    with pytest.raises(spruce.CheckpointError, match="written twice"):
        with CheckpointWriter(tmp_path / "o.safetensors", specs) as w:
            w.slot("a").copy_(sd["a"])
            w.commit("a")
            w.slot("a")
    with pytest.raises(spruce.CheckpointError, match="no slot was lent"):
        with CheckpointWriter(tmp_path / "o.safetensors", specs) as w:
            w.commit("a")
    with pytest.raises(spruce.CheckpointError, match="third"):
        with CheckpointWriter(tmp_path / "o.safetensors", specs) as w:
            w.slot("a")
            w.slot("big")
            w.slot("h")


def test_a_failed_background_write_raises_and_leaves_nothing(tmp_path, monkeypatch):
    sd = _slot_state()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]

    def full(fd, data, pos):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spruce.io, "_pwrite_all", full)
    with pytest.raises(OSError, match="No space"):
        with CheckpointWriter(tmp_path / "o.safetensors", specs) as w:
            for n, t in sd.items():
                w.slot(n).copy_(t)
                w.commit(n)
    assert list(tmp_path.iterdir()) == []


def test_a_file_system_refusing_direct_writes_falls_back_to_buffered(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse the write (EINVAL): the same bytes
    are then written buffered, and the output equals `write`'s."""
    import errno

    sd = _slot_state()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]
    direct = getattr(os, "O_DIRECT", 0)
    assert direct, "spruce targets Linux, which has O_DIRECT"
    opened: set[int] = set()
    real_open, real_pwrite = os.open, os.pwrite

    def open_(path, flags, *args):
        fd = real_open(path, flags & ~direct, *args)
        if flags & direct:
            opened.add(fd)
        return fd

    def pwrite(fd, data, pos):
        if fd in opened:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    want, got = tmp_path / "want.safetensors", tmp_path / "got.safetensors"
    save_state_dict(sd, want)
    with CheckpointWriter(got, specs) as w:
        for n, t in sd.items():
            w.slot(n).copy_(t)
            w.commit(n)
    assert opened, "the writer did not try direct I/O"
    assert want.read_bytes() == got.read_bytes()
