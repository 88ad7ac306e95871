"""``spruce demo`` rows for structured matrices."""

from __future__ import annotations

import torch

from ..demo import DemoRow, measure


def _close(tol: float):
    def check(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, str]:
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
        ok = err <= tol
        return ok, f"max rel. error {err:.1e} vs reference" if ok else f"DIFFERS ({err:.1e})"

    return check


def demo_rows(quick: bool) -> list[DemoRow]:
    """A butterfly layer against its factor-by-factor definition, a Kronecker product against
    materialize-then-matmul, a BOFT rotation against PEFT's dense formulation."""
    import spruce.structured as st
    from spruce.reference import structured as ref

    # The first call of a torch custom op loads lazily imported machinery: pay it up front.
    st.butterfly_multiply(st.butterfly_twiddle(4), torch.ones(2, 1, 4))
    st.kron_matmul([torch.ones(2, 2), torch.ones(2, 2)], torch.ones(2, 4))
    st.boft_rotate(torch.ones(2, 8), torch.zeros(2, 2, 4, 4))
    g = torch.Generator().manual_seed(0)
    rows, n = (256, 1024) if quick else (4096, 4096)
    x = torch.randn(rows, n, generator=g)
    tw = st.butterfly_twiddle(n, init="ortho", generator=g)
    out = [
        measure(
            "structured",
            f"butterfly {rows}x{n} fp32 ({n.bit_length() - 1} factors)",
            "factor-by-factor torch",
            lambda: st.butterfly_multiply(tw, x.unsqueeze(1)),
            lambda: ref.butterfly_multiply(tw, x.unsqueeze(1)),
            _close(1e-4),
            repeat=2,
        )
    ]
    k = 32 if quick else 64
    fs = [torch.randn(k, k, generator=g) / k**0.5, torch.randn(k, k, generator=g) / k**0.5]
    xk = torch.randn(rows, k * k, generator=g)
    out.append(
        measure(
            "structured",
            f"kron_matmul, two {k}x{k} factors, {rows} rows fp32",
            "torch.kron then matmul",
            lambda: st.kron_matmul(fs, xk),
            lambda: ref.kron_matmul(fs, xk),
            _close(1e-4),
        )
    )
    nb = 1024 if quick else 4096
    b = 32
    params = 0.05 * torch.randn(2, nb // b, b, b, generator=g)
    xb = torch.randn(rows, nb, generator=g)
    out.append(
        measure(
            "structured",
            f"BOFT rotation, n={nb}, 2 factors of {b}x{b} blocks, {rows} rows",
            "PEFT dense R (block_diag, P)",
            lambda: st.boft_rotate(xb, params),
            lambda: xb @ ref.boft_rotation(ref.cayley(params.double(), "peft_boft")).float(),
            _close(1e-4),
            repeat=2,
        )
    )
    return out
