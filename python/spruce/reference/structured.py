"""Plain definitions of the structured matrices: factor by factor, or dense.

Written for clarity, not speed: the tests check spruce's structured ops against these, and the
benchmarks use them as the baselines (the factor-by-factor butterfly, materialize-then-matmul
Kronecker, PEFT's dense BOFT formulation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "butterfly_multiply",
    "sylvester_hadamard",
    "dft_twiddle",
    "fwht",
    "kron_matmul",
    "kron_sum_matmul",
    "monarch_multiply",
    "boft_permutation",
    "permutation_matrix",
    "cayley",
    "boft_rotation",
    "peft_boft_forward",
    "oft_rotation",
]


def butterfly_multiply(
    twiddle: Tensor,
    x: Tensor,
    increasing_stride: bool = True,
    output_size: int | None = None,
    transpose: bool = False,
) -> Tensor:
    """One factor at a time, one pair at a time (vectorized over pairs): ``x`` is
    ``(batch, nstacks or 1, in_size)``; returns ``(batch, nstacks, output_size)``."""
    nstacks, nblocks, log_n = twiddle.shape[:3]
    n = 1 << log_n
    batch = x.shape[0]
    v = x[..., :n]
    v = torch.nn.functional.pad(v, (0, n - v.shape[-1])).expand(batch, nstacks, n).clone()
    steps = []
    for block in range(nblocks):
        inc = increasing_stride != (block % 2 == 1)
        for idx in range(log_n):
            steps.append((block, idx, 1 << (idx if inc else log_n - 1 - idx)))
    if transpose:
        steps.reverse()
    i = torch.arange(n // 2)
    for block, idx, s in steps:
        low = i % s
        pos = 2 * (i - low) + low
        t = twiddle[:, block, idx]  # (nstacks, n/2, 2, 2)
        if transpose:
            t = t.transpose(-1, -2)
        a, b = v[:, :, pos], v[:, :, pos + s]
        new_a = t[:, :, 0, 0] * a + t[:, :, 0, 1] * b
        new_b = t[:, :, 1, 0] * a + t[:, :, 1, 1] * b
        v = v.clone()
        v[:, :, pos], v[:, :, pos + s] = new_a, new_b
    size = n if output_size is None else output_size
    return v[:, :, :size]


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``H[i, j] = (-1)^popcount(i & j)`` (``scipy.linalg.hadamard``)."""
    i = torch.arange(n)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def dft_twiddle(n: int) -> Tensor:
    """Complex twiddle ``(1, 1, log2 n, n/2, 2, 2)`` whose increasing-stride product, after a
    bit-reversal of the input, is the DFT matrix: factor ``idx`` (size ``2s``) pairs with
    ``[[1, w], [1, -w]]``, ``w = exp(-2 pi i low / 2s)``."""
    log_n = n.bit_length() - 1
    tw = torch.zeros(1, 1, log_n, n // 2, 2, 2, dtype=torch.complex128)
    for idx in range(log_n):
        s = 1 << idx
        low = (torch.arange(n // 2) % s).to(torch.float64)
        w = torch.exp(-2j * math.pi * low / (2 * s))
        tw[0, 0, idx, :, 0, 0] = 1
        tw[0, 0, idx, :, 0, 1] = w
        tw[0, 0, idx, :, 1, 0] = 1
        tw[0, 0, idx, :, 1, 1] = -w
    return tw


def fwht(x: Tensor, normalized: bool = False) -> Tensor:
    n = x.shape[-1]
    h = sylvester_hadamard(n, torch.float64)
    y = (x.double() @ h).to(x.dtype)
    return y / math.sqrt(n) if normalized else y


def kron_matmul(factors: Sequence[Tensor], x: Tensor) -> Tensor:
    """Materialize-then-matmul: ``x @ torch.kron(F_1, ..., F_k).T``."""
    k = factors[0]
    for f in factors[1:]:
        k = torch.kron(k, f)
    return x @ k.T


def kron_sum_matmul(As: Sequence[Tensor], Bs: Sequence[Tensor], x: Tensor) -> Tensor:
    w = sum(torch.kron(a, b) for a, b in zip(As, Bs, strict=True))
    return x @ w.T


def monarch_multiply(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """fly's definition, step by step with einsum: ``(batch, k p) -> (batch, l s)``."""
    batch = x.shape[0]
    k, q, p = w1.shape
    nl, s, r = w2.shape
    out1 = torch.einsum("kqp,bkp->bkq", w1, x.reshape(batch, k, p))
    out1 = out1.reshape(batch, r, nl).transpose(1, 2)  # '(r l) -> l r'
    out2 = torch.einsum("lsr,blr->bsl", w2, out1)
    return out2.reshape(batch, s * nl)


def boft_permutation(n: int, nblocks: int, block_size: int, level: int, levels: int) -> list[int]:
    """PEFT's butterfly permutation, re-derived: in groups of ``block_size * 2^level``, chunks
    of ``block_size / 2`` go even-indexed first, then odd-indexed."""
    if levels <= 1 or level == 0:
        return list(range(n))
    group = block_size * 2**level
    half = block_size // 2
    perm = []
    for start in range(0, n, group):
        chunks = [
            list(range(start + c * half, start + (c + 1) * half)) for c in range(group // half)
        ]
        for c in chunks[0::2] + chunks[1::2]:
            perm.extend(c)
    return perm


def permutation_matrix(perm: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
    """``P[i, perm[i]] = 1`` (PEFT's ``perm2mat``)."""
    n = len(perm)
    p = torch.zeros(n, n, dtype=dtype)
    p[torch.arange(n), torch.tensor(list(perm))] = 1
    return p


def cayley(a: Tensor, convention: str) -> Tensor:
    """The exact Cayley map of each block, by explicit inverses (dense definition)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    if convention == "peft_boft":
        s = 0.5 * (a - a.transpose(-1, -2))
        return (eye - s) @ torch.linalg.inv(eye + s)
    if convention == "peft_oft":  # a is already skew (U - U^T)
        return (eye - a) @ torch.linalg.inv(eye + a)
    q = a - a.transpose(-1, -2)
    return (eye + q) @ torch.linalg.inv(eye - q)


def boft_rotation(blocks: Tensor) -> Tensor:
    """Dense ``R = F_m ... F_0`` with ``F_i = P_i blockdiag(blocks[i]) P_i^T``."""
    levels, nb, b, _ = blocks.shape
    n = nb * b
    r = torch.eye(n, dtype=blocks.dtype)
    for i in range(levels):
        p = permutation_matrix(boft_permutation(n, nb, b, i, levels), blocks.dtype)
        f = p @ torch.block_diag(*blocks[i]) @ p.T
        r = f @ r
    return r


def peft_boft_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, params: Tensor, scale: Tensor
) -> Tensor:
    """PEFT BOFT's dense formulation: ``((x R) W^T) * s + bias`` with ``R`` built densely."""
    blocks = cayley(params, "peft_boft")
    r = boft_rotation(blocks)
    y = (x @ r) @ weight.T
    y = y * scale.reshape(-1)
    return y if bias is None else y + bias


def oft_rotation(blocks: Tensor) -> Tensor:
    """Dense ``blockdiag(blocks)``."""
    return torch.block_diag(*blocks)
