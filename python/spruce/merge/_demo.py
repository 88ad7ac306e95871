"""``spruce demo`` rows of the merging capability."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..demo import DemoRow, measure


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> tuple[bool, str]:
    diff = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    scale = float(want.double().abs().max()) if want.numel() else 1.0
    ok = got.shape == want.shape and diff <= 1e-6 * max(scale, 1.0)
    return ok, (
        f"matches {what} (max |diff| {diff:.1e})" if ok else f"DIFFERS from {what} ({diff:.1e})"
    )


def _models(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + 0.01 * torch.randn(*shape, generator=g) for _ in range(n)]


def _ties_row(quick: bool) -> DemoRow:
    from ..reference import merge as ref
    from . import merge_tensors

    rows, cols = (256, 1024) if quick else (4096, 11008)
    base, fts = _models(4, (rows, cols), 0)
    weights = [1.0, 0.8, 0.6, 0.4]
    return measure(
        "merging",
        f"TIES of 4 task vectors, {rows}x{cols} fp32, density 0.2",
        "stacked torch (mergekit-style)",
        lambda: merge_tensors("ties", base, fts, weights=weights, density=0.2, preset="mergekit"),
        lambda: ref.ties_stacked(base, fts, weights, 0.2, convention="mergekit"),
        # torch.topk breaks ties among equal magnitudes arbitrarily (large inputs have some):
        # the check is against the plain reference with spruce's exact tie rule.
        lambda got, _: _close(
            got,
            ref.merge("ties", base, fts, weights=weights, density=0.2, preset="mergekit"),
            "the reference (exact tie rule)",
        ),
        repeat=2 if quick else 1,
    )


def demo_rows(quick: bool) -> list[DemoRow]:
    """TIES at tensor level, and a streaming checkpoint merge."""
    from safetensors.torch import load_file, save_file

    from ..reference import merge as ref
    from . import merge_checkpoints

    out = [_ties_row(quick)]
    n_layers, dim = (4, 128) if quick else (8, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        g = torch.Generator().manual_seed(1)
        names = [f"layers.{i}.{p}" for i in range(n_layers) for p in ("attn.weight", "mlp.weight")]
        base_sd = {n: torch.randn(dim, dim, generator=g) for n in names}
        save_file(base_sd, str(root / "base.safetensors"))
        paths = []
        for k in range(3):
            sd = {n: t + 0.01 * torch.randn(dim, dim, generator=g) for n, t in base_sd.items()}
            paths.append(root / f"ft{k}.safetensors")
            save_file(sd, str(paths[-1]))
        del sd
        config = {
            "merge_method": "ties",
            "base_model": str(root / "base.safetensors"),
            "models": [
                {"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in paths
            ],
            "preset": "mergekit",
        }

        def run_spruce() -> dict[str, torch.Tensor]:
            merge_checkpoints(config, root / "out-spruce", progress=False)
            return load_file(str(root / "out-spruce" / "model.safetensors"))

        def run_baseline() -> dict[str, torch.Tensor]:
            b = load_file(str(root / "base.safetensors"))
            ms = [load_file(str(p)) for p in paths]
            merged = {n: ref.ties_stacked(b[n], [m[n] for m in ms], [1.0] * 3, 0.3) for n in b}
            save_file(merged, str(root / "out-baseline.safetensors"))
            return merged

        def check(got: dict, want: dict) -> tuple[bool, str]:
            if set(got) != set(want):
                return False, "DIFFERS: tensor names"
            b = load_file(str(root / "base.safetensors"))
            ms = [load_file(str(p)) for p in paths]
            what = "the per-tensor reference"
            worst = [
                _close(
                    got[n],
                    ref.merge("ties", b[n], [m[n] for m in ms], density=0.3, preset="mergekit"),
                    what,
                )
                for n in want
            ]
            bad = [w for w in worst if not w[0]]
            return (not bad), (bad[0][1] if bad else f"every tensor matches {what}")

        total = len(names) * dim * dim
        out.append(
            measure(
                "merging",
                f"checkpoint TIES, 3 models x {total / 1e6:.2g}M fp32, streamed",
                "load all + stacked torch",
                run_spruce,
                run_baseline,
                check,
                repeat=2,
            )
        )
    return out
