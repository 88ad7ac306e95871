"""``spruce prune``: streaming checkpoint pruning, atomic output, bitmasks, errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spruce
from spruce.io import load_state_dict, open_checkpoint, save_state_dict
from spruce.prune import cli as prune_cli
from spruce.reference import prune as ref


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="spruce")
    sub = p.add_subparsers(dest="command", required=True)
    prune_cli.register(sub)
    args = p.parse_args(argv)
    return int(args.func(args))


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),
        "model.layers.0.q.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.q.bias": torch.randn(16, generator=g),
        "model.layers.0.up.weight": torch.randn(32, 16, generator=g).bfloat16(),
        "model.layers.0.conv.weight": torch.randn(8, 4, 2, 2, generator=g).half(),
        "model.layers.0.norm.weight": torch.ones(16),
        "model.step": torch.tensor([3], dtype=torch.int64),
        "lm_head.weight": torch.randn(50, 16, generator=g),
    }


PRUNED = ["model.layers.0.q.weight", "model.layers.0.up.weight", "model.layers.0.conv.weight"]


def test_layer_magnitude_single_file(tmp_path, capsys):
    sd = _state()
    src = tmp_path / "in.safetensors"
    save_state_dict(sd, src)
    out = tmp_path / "out.safetensors"
    assert _main(["prune", str(src), "-o", str(out), "--sparsity", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.q.weight" in text and "total:" in text and "embed" not in text
    got = load_state_dict(out)
    assert list(got) == list(sd)
    for n, t in sd.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape
        if n in PRUNED:
            m = t.reshape(t.shape[0], -1)
            keep = ref.magnitude_mask(m.double(), 0.5).reshape(t.shape)
            assert torch.equal(got[n], torch.where(keep, t, torch.zeros((), dtype=t.dtype)))
        else:
            assert torch.equal(got[n], t)
    with open_checkpoint(out) as ck:
        assert json.loads(ck.metadata["spruce.prune"])["sparsity"] == 0.5


def test_global_nm_masks_and_sharded_directory(tmp_path, capsys):
    sd = _state(1)
    src = tmp_path / "model"
    save_state_dict(sd, src, max_shard_bytes=2048)
    (src / "config.json").write_text('{"hidden_size": 16}')
    out = tmp_path / "pruned"
    assert (
        _main(
            [
                "prune",
                str(src),
                "-o",
                str(out),
                "--sparsity",
                "0.6",
                "--scope",
                "global",
                "--json",
                "--max-shard-size",
                "4KB",
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    total = sum(sd[n].numel() for n in PRUNED)
    assert rep["total_params"] == total and rep["total_pruned"] == math.floor(0.6 * total)
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    got = load_state_dict(out)
    want = ref.global_magnitude_masks([sd[n].double() for n in PRUNED], 0.6)
    for n, k in zip(PRUNED, want, strict=True):
        assert torch.equal(got[n] != 0, k & (sd[n] != 0))

    out24 = tmp_path / "p24.safetensors"
    masks = tmp_path / "masks.safetensors"
    assert (
        _main(
            [
                "prune",
                str(src),
                "-o",
                str(out24),
                "--pattern",
                "2:4",
                "--include",
                r"layers\.0\.(q|up)\.weight",
                "--save-masks",
                str(masks),
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == ""
    got = load_state_dict(out24)
    with open_checkpoint(masks) as mk:
        shapes = json.loads(mk.metadata["spruce.mask_shapes"])
        assert sorted(mk.names) == ["model.layers.0.q.weight", "model.layers.0.up.weight"]
        for n in mk.names:
            keep = spruce.unpack_mask(mk.get_tensor(n), shapes[n])
            assert torch.equal(keep, spruce.nm_mask(sd[n].abs(), 2, 4))
            assert torch.equal(got[n], torch.where(keep, sd[n], torch.zeros((), dtype=sd[n].dtype)))
            bits = np.packbits(keep.numpy(), axis=-1, bitorder="little")
            assert np.array_equal(mk.get_tensor(n).numpy(), bits)
    assert torch.equal(got["model.layers.0.conv.weight"], sd["model.layers.0.conv.weight"])


def test_random_row_and_column(tmp_path):
    sd = _state(2)
    src = tmp_path / "in.safetensors"
    save_state_dict(sd, src)
    for extra in (
        ["--method", "random", "--seed", "3"],
        ["--pattern", "row"],
        ["--pattern", "column"],
        ["--scope", "row"],
    ):
        out = tmp_path / f"o{extra[-1]}.safetensors"
        assert (
            _main(["prune", str(src), "-o", str(out), "--sparsity", "0.25", "--quiet", *extra]) == 0
        )
        q = load_state_dict(out)["model.layers.0.q.weight"]
        assert (q == 0).sum() == 64


def test_errors_leave_no_output(tmp_path):
    sd = _state()
    src = tmp_path / "in.safetensors"
    save_state_dict(sd, src)
    out = tmp_path / "out.safetensors"
    with pytest.raises(spruce.ConfigError, match="no tensor"):
        _main(["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--include", "nothing"])
    with pytest.raises(spruce.CheckpointError, match="dtype"):
        _main(["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--include", "step"])
    with pytest.raises(spruce.ConfigError, match="not divisible"):
        _main(["prune", str(src), "-o", str(out), "--pattern", "2:3"])
    with pytest.raises(spruce.ConfigError, match="differ"):
        _main(["prune", str(src), "-o", str(src), "--sparsity", "0.5"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(spruce.CheckpointError):
        _main(["prune", str(bad), "-o", str(out), "--sparsity", "0.5"])
    with pytest.raises(spruce.CheckpointError):
        _main(["prune", str(tmp_path / "missing"), "-o", str(out), "--sparsity", "0.5"])
    nan = dict(sd)
    nan["model.layers.0.q.weight"] = sd["model.layers.0.q.weight"].clone()
    nan["model.layers.0.q.weight"][0, 0] = float("nan")
    save_state_dict(nan, tmp_path / "nan.safetensors")
    with pytest.raises(spruce.NonFiniteError):
        _main(
            [
                "prune",
                str(tmp_path / "nan.safetensors"),
                "-o",
                str(out),
                "--sparsity",
                "0.5",
                "--save-masks",
                str(tmp_path / "m.safetensors"),
            ]
        )
    # a sharded index that lists a tensor no shard holds
    d = tmp_path / "sharded"
    save_state_dict(sd, d, max_shard_bytes=2048)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost.weight"] = next(iter(idx["weight_map"].values()))
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(spruce.CheckpointError, match="ghost"):
        _main(["prune", str(d), "-o", str(out), "--sparsity", "0.5"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.safetensors",
        "in.safetensors",
        "nan.safetensors",
        "sharded",
    ]


def test_the_spruce_command_exit_codes_and_outputs_beside_inputs(tmp_path, capsys):
    from spruce.cli import main

    sd = _state(3)
    src = tmp_path / "model"
    save_state_dict(sd, src, max_shard_bytes=2048)
    out = tmp_path / "pruned"
    assert main(["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--quiet"]) == 0
    assert load_state_dict(out)["model.layers.0.q.weight"].count_nonzero() == 128
    # errors: exit status 2, a message, no output
    bad = tmp_path / "bad"
    assert main(["prune", str(src), "-o", str(bad), "--pattern", "2:3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spruce: error:") and "not divisible" in err and not bad.exists()
    # outputs that would overwrite the input are refused before anything is read
    before = sorted(p.name for p in src.iterdir())
    for target in (src, src / "x.safetensors"):
        with pytest.raises(spruce.ConfigError, match="must differ from the input"):
            _main(["prune", str(src), "-o", str(target), "--sparsity", "0.5"])
    single = tmp_path / "single" / "model.safetensors"
    save_state_dict(sd, single)
    with pytest.raises(spruce.ConfigError, match="must differ from the input"):
        _main(["prune", str(single), "-o", str(single.parent), "--sparsity", "0.5"])
    with pytest.raises(spruce.ConfigError, match="must differ from the output"):
        _main(["prune", str(single), "-o", str(out), "--sparsity", "0.5", "--save-masks", str(out)])
    assert sorted(p.name for p in src.iterdir()) == before


def test_rewriting_an_output_directory_leaves_no_stale_shards(tmp_path):
    sd = _state(4)
    src = tmp_path / "in.safetensors"
    save_state_dict(sd, src)
    out = tmp_path / "out"
    _main(
        [
            "prune",
            str(src),
            "-o",
            str(out),
            "--sparsity",
            "0.2",
            "--quiet",
            "--max-shard-size",
            "2KB",
        ]
    )
    assert (out / "model.safetensors.index.json").exists()
    _main(["prune", str(src), "-o", str(out), "--sparsity", "0.7", "--quiet"])
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    q = load_state_dict(out)["model.layers.0.q.weight"]
    assert int((q == 0).sum()) == math.floor(0.7 * 256)


_MEMORY_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from spruce._measure import release_free_memory, reset_peak, status_bytes
from spruce.cli import main
from spruce.io import CheckpointWriter, TensorSpec

root = Path(sys.argv[1])
names = [f"layers.{i}.weight" for i in range(16)]
shape = (1024, 1024)  # 4 MiB float32 per tensor, 64 MiB in all
g = torch.Generator().manual_seed(0)
with CheckpointWriter(root / "in", [TensorSpec(n, torch.float32, shape) for n in names]) as w:
    for n in names:
        w.write(n, torch.randn(shape, generator=g))
argv = ["prune", str(root / "in"), "--sparsity", "0.5", "--quiet", *sys.argv[2:]]
assert main([*argv, "-o", str(root / "warm")]) == 0  # lazily loaded machinery, once
release_free_memory()
before = status_bytes("VmRSS")
reset_peak()
assert main([*argv, "-o", str(root / "out")]) == 0
print(json.dumps({"extra": status_bytes("VmHWM") - before}))
"""

# A fixed mmap threshold: every large buffer is returned to the system when freed, so the peak
# measures what spruce holds, not how glibc's dynamic threshold happened to recycle it.
_FIXED_MALLOC = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("extra", [[], ["--pattern", "2:4"], ["--save-masks", "MASKS"]])
def test_streaming_memory_is_bounded_by_the_largest_tensor(tmp_path, extra):
    """A 64 MiB checkpoint of 16 tensors of 4 MiB, pruned per tensor: a few tensors of resident
    memory at a time, not the checkpoint."""
    extra = [str(tmp_path / "masks.safetensors") if a == "MASKS" else a for a in extra]
    r = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=_FIXED_MALLOC,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])["extra"]
    assert got < 6 * 4 * 2**20, f"peak extra resident memory {got / 2**20:.1f} MiB"
