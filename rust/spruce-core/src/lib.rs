//! spruce-core: the pure-Rust kernels of spruce.
//!
//! Nothing here knows Python. Every public kernel takes plain slices and shapes, validates its
//! arguments and returns a typed [`Error`] instead of panicking. Parallel work runs on spruce's
//! own rayon pool ([`parallel`]), and every result is independent of the thread count.
//!
//! Ranking convention (shared by every selection): elements are ordered by `(score, index)`
//! ascending, with `-0.0 == +0.0`; the lowest are pruned first, so ties prune the lower index
//! first. NaN scores cannot be ranked and are rejected with [`Error::NonFinite`].

pub mod distill;
pub mod dtype;
pub mod error;
pub mod graph;
pub mod layout;
pub mod mask;
pub mod merge;
pub mod parallel;
pub mod prune;
pub mod rng;
pub mod select;
pub mod structured;
pub mod tn;

pub use dtype::{bf16, f16, Float, Scores};
pub use error::{Error, Result};
