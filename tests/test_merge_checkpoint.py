"""spruce.merge at checkpoint level: three synthetic fine-tunes of a small transformer merged by
file (single, sharded, directory) and by state dict, the YAML configuration and the `spruce merge`
command, the rules for missing tensors, and every error raised before any output is written."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import spruce
from spruce.io import INDEX_NAME, save_state_dict
from spruce.merge import load_config, merge_checkpoints, merge_state_dicts, merge_tensors
from spruce.merge.checkpoint import tensor_seed
from spruce.merge.cli import register
from spruce.reference import merge as ref

yaml = importlib.import_module("yaml")

VOCAB, DIM, FF, LAYERS = 64, 32, 48, 2


def transformer(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A tiny decoder: embeddings, attention and MLP weights, norms, a non-float buffer."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(VOCAB, DIM, generator=g)
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            sd[p + f"self_attn.{proj}_proj.weight"] = torch.randn(DIM, DIM, generator=g) / 6
        sd[p + "mlp.up_proj.weight"] = torch.randn(FF, DIM, generator=g) / 6
        sd[p + "mlp.down_proj.weight"] = torch.randn(DIM, FF, generator=g) / 6
        sd[p + "input_layernorm.weight"] = torch.ones(DIM)
    sd["model.norm.weight"] = torch.ones(DIM)
    sd["lm_head.weight"] = torch.randn(VOCAB, DIM, generator=g)
    out = {k: v.to(dtype) for k, v in sd.items()}
    out["model.rotary.inv_freq_steps"] = torch.arange(DIM // 2, dtype=torch.int64)
    return out


def finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return {
        k: (v + 0.02 * torch.randn(v.shape, generator=g).to(v.dtype))
        if v.is_floating_point()
        else v.clone()
        for k, v in base.items()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base and three fine-tunes on disk: a single file, a sharded directory with an index, a
    directory with model.safetensors, and a bare .safetensors path."""
    root = tmp_path_factory.mktemp("models")
    base = transformer()
    fts = [finetune(base, k) for k in range(3)]
    save_state_dict(base, root / "base")
    save_state_dict(fts[0], root / "ft0", max_shard_bytes=20_000)  # several shards + index
    save_state_dict(fts[1], root / "ft1")
    save_file(fts[2], str(root / "ft2.safetensors"))
    assert (root / "ft0" / "model.safetensors.index.json").exists()
    paths = [root / "ft0", root / "ft1", root / "ft2.safetensors"]
    return root, base, fts, paths


def config(world, method="ties", **extra):
    root, _, _, paths = world
    cfg = {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [
            {"model": str(p), "parameters": {"weight": w, "density": d}}
            for p, w, d in zip(paths, [1.0, 0.7, 0.4], [0.5, 0.3, 0.6], strict=True)
        ],
        "seed": 3,
    }
    cfg.update(extra)
    return cfg


CASES = [
    ("ties", {}),
    ("dare_ties", {}),
    ("della", {}),
    ("breadcrumbs_ties", {"parameters": {"gamma": 0.05}}),
    ("task_arithmetic", {"parameters": {"lambda": 0.8}}),
    ("ties", {"preset": "paper"}),
    ("dare_linear", {"preset": "mergekit"}),
    ("pcb", {}),
]


@pytest.mark.parametrize(
    ("method", "extra"), CASES, ids=[f"{m}-{e.get('preset', 'spruce')}" for m, e in CASES]
)
def test_by_file_equals_by_state_dict_and_loads_everywhere(world, tmp_path, method, extra):
    _, base, fts, _ = world
    cfg = config(world, method, **extra)
    report = merge_checkpoints(cfg, tmp_path / "out", progress=False, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(report.files) == len(set(index["weight_map"].values())) + 1 > 2
    merged = spruce.io.load_state_dict(tmp_path / "out")
    params = cfg.get("parameters", {})
    by_dict = merge_state_dicts(
        method,
        base,
        fts,
        weights=[1.0, 0.7, 0.4],
        density=[0.5, 0.3, 0.6],
        scale=params.get("lambda", 1.0),
        seed=3,
        preset=cfg.get("preset", "spruce"),
        **{k: v for k, v in params.items() if k != "lambda"},
    )
    assert list(merged) == list(base) == list(by_dict)
    for name in base:
        assert torch.equal(merged[name], by_dict[name]), name
    assert torch.equal(merged["model.rotary.inv_freq_steps"], base["model.rotary.inv_freq_steps"])
    assert report.merged == len(base) - 1 and report.copied == 1
    # the same files read back by safetensors' own loaders and by torch
    with safe_open(str(report.files[0]), framework="pt") as f:
        assert f.metadata()["merge_method"] == method
    for shard in report.files[:-1]:
        for name, t in load_file(str(shard)).items():
            assert torch.equal(t, merged[name])
    # every float tensor differs from the base (something was merged)
    assert not torch.equal(merged["lm_head.weight"], base["lm_head.weight"])


def test_each_tensor_is_merge_tensors_with_its_own_seed(world, tmp_path):
    _, base, fts, _ = world
    merge_checkpoints(config(world, "dare_ties"), tmp_path / "o.safetensors", progress=False)
    merged = load_file(str(tmp_path / "o.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    want = merge_tensors(
        "dare_ties", base[name], [f[name] for f in fts], weights=[1.0, 0.7, 0.4],
        density=[0.5, 0.3, 0.6], seed=tensor_seed(3, name),
    )  # fmt: skip
    assert torch.equal(merged[name], want)
    assert tensor_seed(3, name) != tensor_seed(3, "lm_head.weight")


def test_paper_preset_trims_over_the_whole_model(world, tmp_path):
    _, base, fts, _ = world
    merge_checkpoints(config(world, "ties", preset="paper"), tmp_path / "o", progress=False)
    merged = spruce.io.load_state_dict(tmp_path / "o")
    names = [n for n in base if base[n].is_floating_point()]
    masks = {n: [] for n in names}
    for f, d in zip(fts, [0.5, 0.3, 0.6], strict=True):
        flat = torch.cat([(f[n] - base[n]).reshape(-1) for n in names])
        keep = ref.trim_mask(flat, d)
        assert int(keep.sum()) == int(d * flat.numel())
        offset = 0
        for n in names:
            masks[n].append(keep[offset : offset + base[n].numel()].reshape(base[n].shape))
            offset += base[n].numel()
    for n in names:
        want = ref.merge(
            "ties", base[n], [f[n] for f in fts], weights=[1.0, 0.7, 0.4],
            density=[0.5, 0.3, 0.6], preset="paper", masks=masks[n],
        )  # fmt: skip
        assert torch.equal(merged[n], want), n
    # per-tensor trimming gives a different model
    per_tensor = merge_state_dicts(
        "ties", base, fts, weights=[1.0, 0.7, 0.4], density=[0.5, 0.3, 0.6], preset="paper",
        trim_scope="tensor",
    )  # fmt: skip
    assert any(not torch.equal(per_tensor[n], merged[n]) for n in names)


def test_linear_fisher_slerp_transfer_checkpoints(world, tmp_path):
    root, base, fts, paths = world
    lin = {"merge_method": "linear", "models": [str(p) for p in paths]}
    merge_checkpoints(lin, tmp_path / "lin", progress=False)
    got = spruce.io.load_state_dict(tmp_path / "lin")
    n = "model.embed_tokens.weight"
    assert torch.equal(got[n], merge_tensors("linear", None, [f[n] for f in fts]))
    # fisher: one fisher checkpoint per model
    fis = []
    for k, f in enumerate(fts):
        g = torch.Generator().manual_seed(k)
        fd = {
            name: torch.rand(t.shape, generator=g) for name, t in f.items() if t.is_floating_point()
        }
        save_file(fd, str(root / f"fisher{k}.safetensors"))
        fis.append(fd)
    fcfg = {
        "merge_method": "fisher",
        "models": [
            {"model": str(p), "fisher": str(root / f"fisher{k}.safetensors")}
            for k, p in enumerate(paths)
        ],
    }
    merge_checkpoints(fcfg, tmp_path / "fis", progress=False)
    got = spruce.io.load_state_dict(tmp_path / "fis")
    assert torch.equal(
        got[n], merge_tensors("fisher", None, [f[n] for f in fts], fisher=[f[n] for f in fis])
    )
    # slerp lists the base among the models, as mergekit configurations do: it is dropped
    scfg = {
        "merge_method": "slerp",
        "base_model": str(root / "base"),
        "models": [str(root / "base"), str(paths[1])],
        "parameters": {"t": 0.3},
    }
    merge_checkpoints(scfg, tmp_path / "slerp", progress=False)
    got = spruce.io.load_state_dict(tmp_path / "slerp")
    assert torch.equal(got[n], merge_tensors("slerp", base[n], [fts[1][n]], t=0.3))
    tcfg = {
        "merge_method": "transfer",
        "base_model": str(paths[2]),
        "models": [str(paths[0]), str(root / "base")],
    }
    merge_checkpoints(tcfg, tmp_path / "tr", progress=False)
    got = spruce.io.load_state_dict(tmp_path / "tr")
    assert torch.equal(got[n], fts[2][n] + (fts[0][n] - base[n]))


def test_yaml_and_the_merge_command(world, tmp_path, capsys):
    root, base, fts, paths = world
    text = f"""
merge_method: ties
base_model: {root / "base"}
models:
  - model: {paths[0]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {paths[1]}
    parameters: {{weight: 0.7}}
parameters: {{density: 0.3, lambda: 0.9}}
preset: mergekit
dtype: bfloat16
max_shard_size: 10kB
"""
    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(text)
    cfg = load_config(cfg_path)
    assert (
        cfg.densities() == [0.5, 0.3]
        and cfg.weights() == [1.0, 0.7]
        and cfg.max_shard_bytes == 10_000
    )
    parser = argparse.ArgumentParser(prog="spruce")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["merge", str(cfg_path), "-o", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "merged 17 tensor(s)" in out and "copied 1" in out and "peak resident memory" in out
    merged = spruce.io.load_state_dict(tmp_path / "out")
    n = "model.layers.0.self_attn.v_proj.weight"
    assert merged[n].dtype == torch.bfloat16
    want = merge_tensors(
        "ties", base[n], [fts[0][n], fts[1][n]], weights=[1.0, 0.7], density=[0.5, 0.3], scale=0.9,
        preset="mergekit",
    )  # fmt: skip
    assert torch.equal(merged[n], want.to(torch.bfloat16))
    assert len(list((tmp_path / "out").glob("*.safetensors"))) >= 3
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    # dry run: checks, writes nothing
    args = parser.parse_args(["merge", str(cfg_path), "-o", str(tmp_path / "dry"), "--dry-run"])
    assert args.func(args) == 0
    assert "would merge 17" in capsys.readouterr().out and not (tmp_path / "dry").exists()


def test_relative_paths_are_relative_to_the_config(world, tmp_path):
    root, _, _, _ = world
    (root / "rel.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft1]\n"
    )
    merge_checkpoints(root / "rel.yaml", tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_missing_tensors_follow_on_missing(world, tmp_path):
    root, base, fts, paths = world
    partial = {k: v for k, v in fts[1].items() if k != "lm_head.weight"}
    extra = dict(fts[2], **{"extra.bias": torch.zeros(3)})
    save_file(partial, str(root / "partial.safetensors"))
    save_file(extra, str(root / "extra.safetensors"))
    cfg = {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "models": [str(paths[0]), str(root / "partial.safetensors")],
    }
    r = merge_checkpoints(cfg, tmp_path / "a", progress=False)
    got = spruce.io.load_state_dict(tmp_path / "a")
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"]) and r.copied == 2
    r = merge_checkpoints({**cfg, "on_missing": "skip"}, tmp_path / "b", progress=False)
    assert "lm_head.weight" not in spruce.io.load_state_dict(tmp_path / "b")
    assert r.skipped == ["lm_head.weight"]
    with pytest.raises(spruce.CheckpointError, match="missing from models\\[1\\]"):
        merge_checkpoints({**cfg, "on_missing": "error"}, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    cfg2 = {**cfg, "models": [str(paths[0]), str(root / "extra.safetensors")]}
    with pytest.raises(spruce.CheckpointError, match="extra.bias.*missing from base_model"):
        merge_checkpoints(cfg2, tmp_path / "d", progress=False)
    r = merge_checkpoints({**cfg2, "on_missing": "skip"}, tmp_path / "d", progress=False)
    assert r.skipped == ["extra.bias"]


def _assert_no_output(path: Path) -> None:
    assert not path.exists() or not any(path.iterdir())


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda c, r: c.update(merge_method="nope"), spruce.ConfigError, "merge_method"),
        (
            lambda c, r: c.update(preset="peft", merge_method="della"),
            spruce.ConfigError,
            "not a peft method",
        ),
        (
            lambda c, r: c["models"][0]["parameters"].update(density=1.5),
            spruce.ConfigError,
            "density",
        ),
        (lambda c, r: c["models"][0]["parameters"].update(colour=1), spruce.ConfigError, "colour"),
        (lambda c, r: c.update(colour=1), spruce.ConfigError, "unknown configuration key"),
        (lambda c, r: c.update(parameters={"epsilon": "x"}), spruce.ConfigError, "epsilon"),
        (lambda c, r: c.update(dtype="int8"), spruce.ConfigError, "dtype"),
        (lambda c, r: c.update(max_shard_size="lots"), spruce.ConfigError, "max_shard_size"),
        (lambda c, r: c.pop("base_model"), spruce.ConfigError, "base_model is required"),
        (lambda c, r: c.update(models=[]), spruce.ConfigError, "models"),
        (
            lambda c, r: c["models"][0].update(model=str(r / "nowhere")),
            spruce.CheckpointError,
            "nowhere",
        ),
        (
            lambda c, r: c["models"][1].update(model=str(r / "shapes.safetensors")),
            spruce.CheckpointError,
            "shape",
        ),
        (
            lambda c, r: c["models"][1].update(model=str(r / "dtypes.safetensors")),
            spruce.CheckpointError,
            "dtype",
        ),
        (
            lambda c, r: c["models"][1].update(model=str(r / "nan.safetensors")),
            spruce.NonFiniteError,
            "lm_head",
        ),
    ],
)
def test_errors_come_before_any_output(world, tmp_path, mutate, exc, match):
    root, base, fts, _ = world
    if not (root / "shapes.safetensors").exists():
        save_file(
            dict(fts[1], **{"lm_head.weight": torch.zeros(VOCAB + 1, DIM)}),
            str(root / "shapes.safetensors"),
        )
        save_file(
            {k: v.double() if v.is_floating_point() else v for k, v in fts[1].items()},
            str(root / "dtypes.safetensors"),
        )
        bad = dict(fts[1])
        bad["lm_head.weight"] = bad["lm_head.weight"].clone()
        bad["lm_head.weight"][0, 0] = float("nan")
        save_file(bad, str(root / "nan.safetensors"))
    cfg = json.loads(json.dumps(config(world)))
    mutate(cfg, root)
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        merge_checkpoints(cfg, out, progress=False)
    _assert_no_output(out)


def test_json_config_and_state_dict_errors(world, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(config(world)))
    assert load_config(path).merge_method == "ties"
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(spruce.ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(spruce.ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    _, base, fts, _ = world
    with pytest.raises(spruce.ArgumentError, match="one value per model"):
        merge_state_dicts("ties", base, fts, weights=[1.0])


def test_malformed_configs_and_checkpoints_raise_before_output(world, tmp_path):
    root, _, _, paths = world
    (tmp_path / "bad.yaml").write_text("merge_method: ties\nmodels: [a, b\n")
    with pytest.raises(spruce.ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- ties\n- linear\n")
    with pytest.raises(spruce.ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    out = tmp_path / "out"
    # a file cut short: its header promises more data than it holds
    data = paths[2].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cfg = config(world)
    cfg["models"][2]["model"] = str(tmp_path / "cut.safetensors")
    with pytest.raises(spruce.CheckpointError, match="truncated"):
        merge_checkpoints(cfg, out, progress=False)
    _assert_no_output(out)
    # a sharded index that lists a tensor no shard holds
    ghost = tmp_path / "ghost"
    shutil.copytree(paths[0], ghost)
    index = json.loads((ghost / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(
        iter(index["weight_map"].values())
    )
    (ghost / INDEX_NAME).write_text(json.dumps(index))
    cfg = config(world)
    cfg["models"][0]["model"] = str(ghost)
    with pytest.raises(spruce.CheckpointError, match=r"models\[0\].*layers\.9"):
        merge_checkpoints(cfg, out, progress=False)
    _assert_no_output(out)


def test_output_must_not_overwrite_an_input(world, tmp_path):
    root, base, _, paths = world
    before = sorted(p.name for p in (root / "base").iterdir())
    for out in (root / "base", root / "base" / "merged.safetensors", paths[2], paths[0]):
        with pytest.raises(spruce.ConfigError, match="must differ from the input"):
            merge_checkpoints(config(world), out, progress=False)
    assert sorted(p.name for p in (root / "base").iterdir()) == before
    assert torch.equal(
        spruce.io.load_state_dict(root / "base")["lm_head.weight"], base["lm_head.weight"]
    )


def test_rewriting_an_output_directory_leaves_no_stale_shards(world, tmp_path):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    merge_checkpoints(config(world, "task_arithmetic"), out, progress=False, max_shard_bytes=20_000)
    assert (out / INDEX_NAME).exists()
    (out / "config.json").write_text("{}")
    merge_checkpoints(config(world, "ties"), out, progress=False)
    merge_checkpoints(config(world, "ties"), fresh, progress=False)
    # the earlier shards and index are gone: the directory loads the new merge, not the old one
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    got, want = spruce.io.load_state_dict(out), spruce.io.load_state_dict(fresh)
    assert list(got) == list(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_the_spruce_command_exit_codes(world, tmp_path, capsys):
    from spruce.cli import main

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config(world, "dare_ties")))
    assert main(["merge", str(good), "-o", str(tmp_path / "out")]) == 0
    assert "merged 17 tensor(s)" in capsys.readouterr().out
    merged = spruce.io.load_state_dict(tmp_path / "out")
    _, base, fts, _ = world
    by_dict = merge_state_dicts(
        "dare_ties", base, fts, weights=[1.0, 0.7, 0.4], density=[0.5, 0.3, 0.6], seed=3
    )
    assert all(torch.equal(merged[n], by_dict[n]) for n in by_dict)
    bad = config(world)
    bad["models"][1]["parameters"]["density"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["merge", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spruce: error:") and "density" in err
    assert not (tmp_path / "o2").exists()
    # a dry run checks the output too
    root = world[0]
    assert main(["merge", str(good), "-o", str(root / "base"), "--dry-run"]) == 2
    assert "must differ from the input base_model" in capsys.readouterr().err


_MEMORY_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from spruce._measure import release_free_memory, reset_peak, status_bytes
from spruce.io import CheckpointWriter, TensorSpec, open_checkpoint
from spruce.merge import merge_checkpoints

root = Path(sys.argv[1])
names = [f"layers.{i}.weight" for i in range(16)]
shape = (1024, 1024)  # 4 MiB float32 per tensor, 64 MiB per model
for k, m in enumerate(["base", "ft0", "ft1", "ft2"]):
    g = torch.Generator().manual_seed(k)
    with CheckpointWriter(root / m, [TensorSpec(n, torch.float32, shape) for n in names]) as w:
        for n in names:
            w.write(n, torch.randn(shape, generator=g))
cfg = {
    "merge_method": sys.argv[2],
    "base_model": str(root / "base"),
    "models": [{"model": str(root / f"ft{k}"), "parameters": {"density": 0.5}} for k in range(3)],
}
merge_checkpoints(cfg, root / "warm", progress=False)  # lazily loaded machinery, once
release_free_memory()
before = status_bytes("VmRSS")
reset_peak()
merge_checkpoints(cfg, root / "out", progress=False)
peak = status_bytes("VmHWM")
with open_checkpoint(root / "out") as ck:
    assert len(ck) == 16
print(json.dumps({"extra": peak - before}))
"""

# A fixed mmap threshold: every large buffer is returned to the system when freed, so the peak
# measures what spruce holds, not how glibc's dynamic threshold happened to recycle it.
_FIXED_MALLOC = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_streaming_memory_is_bounded_by_the_largest_tensor(tmp_path, method):
    """Four 64 MiB checkpoints (16 tensors of 4 MiB): merging them adds about (models + 2)
    tensors of resident memory, far below the 256 MiB the inputs hold."""
    r = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), method],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=_FIXED_MALLOC,
    )
    assert r.returncode == 0, r.stderr
    extra = json.loads(r.stdout.strip().splitlines()[-1])["extra"]
    assert extra < 7 * 4 * 2**20, f"peak extra resident memory {extra / 2**20:.1f} MiB"


def test_merged_checkpoint_loads_into_the_torch_model(tmp_path):
    """Fine-tunes of a real torch transformer, merged by file: the output loads strictly into the
    model (every name, shape and dtype) and equals the merge of the state dicts."""
    torch.manual_seed(0)

    def make() -> torch.nn.Module:
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()

    model = make()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = [finetune(base, k) for k in range(3)]
    save_file(base, str(tmp_path / "base.safetensors"))
    for k, f in enumerate(fts):
        save_file(f, str(tmp_path / f"ft{k}.safetensors"))
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(tmp_path / "base.safetensors"),
        "models": [
            {"model": str(tmp_path / f"ft{k}.safetensors"), "parameters": {"weight": w}}
            for k, w in enumerate([1.0, 0.5, 0.8])
        ],
        "parameters": {"density": 0.4},
        "seed": 11,
    }
    merge_checkpoints(cfg, tmp_path / "merged", progress=False, max_shard_bytes=20_000)
    merged = spruce.io.load_state_dict(tmp_path / "merged")
    by_dict = merge_state_dicts(
        "dare_ties", base, fts, weights=[1.0, 0.5, 0.8], density=0.4, seed=11
    )
    assert sorted(merged) == sorted(base) and all(torch.equal(merged[n], by_dict[n]) for n in base)
    fresh = make()
    fresh.load_state_dict(merged, strict=True)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y, y0 = fresh(x), model(x)
    assert torch.isfinite(y).all() and not torch.equal(y, y0)
