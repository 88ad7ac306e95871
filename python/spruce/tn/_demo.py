"""``spruce demo`` rows for tensor networks."""

from __future__ import annotations

import torch

from ..demo import DemoRow, measure


def demo_rows(quick: bool) -> list[DemoRow]:
    """Greedy path search vs the Python reference's cost model, cached contraction vs
    torch.einsum, and an MPO layer vs its dense weight."""
    import spruce.tn as tn
    from spruce.reference import tn as ref

    rows = []
    n = 60 if quick else 300
    eq, shapes = ref.random_regular_network(n, 3, 4, seed=0)

    try:
        import opt_einsum

        def baseline():
            return opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="greedy")

        name = "opt_einsum greedy"
    except ImportError:  # the row still checks the cost model

        def baseline():
            return None

        name = "none (opt_einsum not installed)"

    def check_path(got, want):
        path, info = got
        cost, largest = ref.path_cost(eq, shapes, path)
        ok = cost == info.opt_cost and largest == info.largest_intermediate
        detail = "cost equals the reference cost model"
        if want is not None:
            ok = ok and info.opt_cost <= int(want[1].opt_cost)
            detail += ", no worse than opt_einsum"
        return ok, detail if ok else "cost DIFFERS"

    rows.append(
        measure(
            "tensor networks",
            f"greedy path, {n}-tensor 3-regular network",
            name,
            lambda: tn.contract_path(eq, *shapes, shapes=True, optimize="greedy"),
            baseline,
            check_path,
        )
    )
    g = torch.Generator().manual_seed(0)
    d = 16 if quick else 64
    ops = [torch.randn(d, d, generator=g) for _ in range(6)]
    chain = "ab,bc,cd,de,ef,fg->ag"
    tn.einsum(chain, *ops)

    def close(got, want):
        ok = torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        return ok, "matches torch.einsum" if ok else "DIFFERS from torch.einsum"

    rows.append(
        measure(
            "tensor networks",
            f"cached 6-matrix chain {d}x{d}",
            "torch.einsum (replans)",
            lambda: tn.einsum(chain, *ops),
            lambda: torch.einsum(chain, *ops),
            close,
        )
    )
    size, modes, rank = (256, [16, 16], 4) if quick else (1024, [32, 32], 4)
    lin = torch.nn.Linear(size, size)
    cores = [
        torch.randn(1, modes[0], modes[0], rank, generator=g),
        torch.randn(rank, modes[1], modes[1], 1, generator=g) / size,
    ]
    with torch.no_grad():
        lin.weight.copy_(tn.mpo_to_matrix(cores))
    mpo = tn.MPOLinear.from_linear(lin, modes, modes, max_rank=rank)
    x = torch.randn(64, size, generator=g)
    with torch.no_grad():
        rows.append(
            measure(
                "tensor networks",
                f"MPO linear {size}x{size}, rank {max(mpo.ranks)}",
                "dense nn.Linear",
                lambda: mpo(x),
                lambda: lin(x),
                lambda got, want: (
                    bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4)),
                    "matches the dense layer",
                ),
            )
        )
    return rows
