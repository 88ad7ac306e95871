//! Structured matrices: butterfly, Monarch, orthogonal butterfly (BOFT/OFT), Kronecker, Walsh-Hadamard.
//!
//! The kernels here are the ones a fused pass wins: products of `log2 n` sparse 2x2 factors
//! ([`butterfly_multiply`], [`fwht`]). The GEMM-bound structured maps (Kronecker, Monarch, the
//! block-diagonal factors of BOFT) are reshaped GEMMs and live in the Python layer on top of
//! torch's BLAS.
//!
//! Work is split into tiles of rows. A tile is loaded once, transposed so that the rows of the
//! tile are the innermost (vectorized) axis, pushed through every factor while it sits in cache,
//! and written once. Every factor is then the same lane-parallel loop, whatever its stride.

mod butterfly;
#[cfg(test)]
mod tests;

pub use butterfly::{butterfly_multiply, butterfly_multiply_backward, fwht, ButterflySpec, Elem};
