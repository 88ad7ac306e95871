"""``spruce demo`` rows of the pruning capability."""

from __future__ import annotations

from typing import Any

import torch

from ..demo import DemoRow, equal_check, measure


def _sparsegpt_check(got: Any, want: Any) -> tuple[bool, str]:
    (wg, kg), (ww, kw) = got, want
    ok = torch.equal(kg, kw) and torch.equal(wg, ww)
    return ok, "mask and weights identical to reference" if ok else "DIFFERS from reference"


def _ks_check(got: Any, want: Any) -> tuple[bool, str]:
    stat, p = got
    ws, wp = want
    ok = torch.allclose(stat, ws, rtol=1e-12, atol=0) and torch.allclose(
        p, wp, rtol=1e-9, atol=1e-300
    )
    return ok, "statistic and p-value equal to scipy" if ok else "DIFFERS from scipy"


def demo_rows(quick: bool) -> list[DemoRow]:
    """Wanda, SparseGPT, global magnitude and the KS test against their baselines."""
    from .. import _ops
    from ..reference import prune as ref
    from . import ks_test, sparsegpt_, wanda_mask

    g = torch.Generator().manual_seed(0)
    rows, cols = (256, 1024) if quick else (4096, 11008)
    w = torch.randn(rows, cols, generator=g)
    stat = torch.rand(cols, generator=g) * 4
    out = [
        measure(
            "pruning",
            f"Wanda 50% mask, {rows}x{cols} fp32",
            "Wanda repo sort path",
            lambda: wanda_mask(w, stat, 0.5),
            lambda: ref.wanda_mask_repo(w, stat, 0.5),
            equal_check,
            repeat=2,
        )
    ]

    r2, c2 = (64, 128) if quick else (512, 1024)
    w2 = torch.randn(r2, c2, generator=g) * 0.02
    h2 = ref.sparsegpt_hessian([torch.randn(4, 64, c2, generator=g)])

    def run_sparsegpt() -> tuple[torch.Tensor, torch.Tensor]:
        wc = w2.clone()
        res = sparsegpt_(wc, h2, 0.5)
        return wc, res.mask

    out.append(
        measure(
            "pruning",
            f"SparseGPT 50%, {r2}x{c2} fp32",
            "torch re-derivation (sort)",
            run_sparsegpt,
            lambda: ref.sparsegpt(w2, h2, 0.5),
            _sparsegpt_check,
            repeat=1 if not quick else 2,
        )
    )

    n_layers, d = (8, 256) if quick else (32, 1024)
    layers = [torch.randn(d, d, generator=g) for _ in range(n_layers)]

    def spruce_global() -> list[torch.Tensor]:
        value, ties = _ops.score_threshold(layers, [None] * n_layers, [False] * n_layers, 0.5)
        left, masks = int(ties), []
        for lw in layers:
            keep, used = _ops.threshold_mask(lw, None, False, float(value), left)
            left -= int(used)
            masks.append(keep)
        return masks

    out.append(
        measure(
            "pruning",
            f"global magnitude 50%, {n_layers} x {d}x{d}",
            "concatenate + sort",
            spruce_global,
            lambda: ref.global_magnitude_masks(layers, 0.5),
            equal_check,
            repeat=2,
        )
    )

    try:
        from scipy import stats as scipy_stats
    except ImportError:  # the KS row needs scipy (the test extra)
        return out
    kr, kn = (32, 256) if quick else (256, 1024)
    a = torch.randn(kr, kn, generator=g, dtype=torch.float64)
    b = torch.randn(kr, kn, generator=g, dtype=torch.float64) * 1.1

    def scipy_rows() -> tuple[torch.Tensor, torch.Tensor]:
        res = [scipy_stats.ks_2samp(a[i].numpy(), b[i].numpy()) for i in range(kr)]
        return (
            torch.tensor([r.statistic for r in res], dtype=torch.float64),
            torch.tensor([r.pvalue for r in res], dtype=torch.float64),
        )

    out.append(
        measure(
            "pruning",
            f"KS test (exact), {kr} rows x {kn}",
            "scipy.stats.ks_2samp per row",
            lambda: tuple(ks_test(a, b)),
            scipy_rows,
            _ks_check,
            repeat=2,
        )
    )
    return out
