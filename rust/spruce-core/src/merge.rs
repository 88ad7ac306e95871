//! Model merging kernels: task arithmetic, TIES, DARE, DELLA, breadcrumbs, PCB, Fisher, SLERP.
//!
//! Notation: base `θ0`, fine-tunes `θk`, task vectors `τk = θk − θ0`, weights `wk`, densities
//! `dk`, scale `λ`. Every task vector is computed on the fly from the borrowed inputs and never
//! materialized: a merge is a few selection passes over *virtual* keys (`|τk|`, random words,
//! PCB balancing scores) through the selection core, then one fused pass over fixed chunks that
//! sparsifies, rescales, elects signs and combines every model at once. Extra memory is the
//! selection histograms plus a few chunks of scratch per thread, whatever the number of models.
//!
//! Element types f32, f16 and bf16 are read in place and accumulated in f32; f64 in f64. The
//! result does not depend on the thread count: reductions run over fixed chunks in a fixed
//! order, and random draws are counter-based (`rng`), keyed by `(seed, 1 + model index,
//! element index)`.
//!
//! Counting and ranking rules (shared by every sparsifier):
//! - exact-count sparsifiers keep `K = floor(d · n)` entries (computed in f64, as `int(d * n)`
//!   in mergekit and PEFT);
//! - magnitudes rank by `(|τ|, index)` ascending, the lowest dropped first, so among equal
//!   magnitudes the lower index is dropped first (the selection core's total order);
//! - Bernoulli draws keep element `i` when its 32-bit Philox word is below `ceil(p · 2^32)`.

// Combination loops index several per-model arrays by the same model index.
#![allow(clippy::needless_range_loop)]

use crate::dtype::{bf16, f16, key32, key64, Float};
use crate::error::{check_fraction, try_zeroed, Error, Result, Zeroable};
use crate::parallel::{install, SyncPtr};
use crate::rng;
use crate::select::{has_nan, kth_position, make_items, select_threshold, Item, KeySource};
use rayon::prelude::*;
use std::ops::{Add, Div, Mul, Neg, Sub};

const OP: &str = "merge";
/// Elements per work item of the fused pass and of the ordered reductions.
const CHUNK: usize = 1 << 12;
/// mergekit's guard for L1 rescaling: norms below this leave the masked tensor unscaled.
const L1_EPS: f64 = 1e-7;
/// SLERP falls back to linear interpolation when |cos| of the angle exceeds this (mergekit's).
const SLERP_DOT: f64 = 0.9995;
/// SLERP leaves a vector unnormalized when its norm is at most this (mergekit's).
const SLERP_EPS: f64 = 1e-8;
/// PCB clips |τ| of every model at these fractions from the bottom and the top.
const PCB_CLIP: f64 = 1e-4;
/// PCB's floor of the sum of balancing scales.
const PCB_MIN_SCALE: f64 = 1e-12;

// ---------------------------------------------------------------------------------------------
// Element and accumulator types

/// The accumulator arithmetic (f32 or f64).
pub trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Zeroable
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + std::fmt::Debug
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// Significant bits of the order key.
    const BITS: u32;
    fn of(v: f64) -> Self;
    fn get(self) -> f64;
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
    /// The order key (see `dtype`): `key(a) < key(b)` iff `a < b`.
    fn key(self) -> u64;
    /// Inverts [`Acc::key`] (`-0.0` comes back as `+0.0`).
    fn from_key(k: u64) -> Self;
    /// `key(|self|)` without branches (`|x|` has no sign bit, so its key only sets the top bit).
    fn mag_key(self) -> u64;
    /// -1, 0 or 1 (0 for zero and NaN).
    #[inline(always)]
    fn sign(self) -> i32 {
        (self > Self::ZERO) as i32 - (self < Self::ZERO) as i32
    }
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const BITS: u32 = 32;
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn get(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn key(self) -> u64 {
        key32(self)
    }
    fn from_key(k: u64) -> Self {
        let k = k as u32;
        f32::from_bits(if k & 0x8000_0000 != 0 { k & 0x7fff_ffff } else { !k })
    }
    #[inline(always)]
    fn mag_key(self) -> u64 {
        ((self.to_bits() & 0x7fff_ffff) | 0x8000_0000) as u64
    }
}

impl Acc for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const BITS: u32 = 64;
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn get(self) -> f64 {
        self
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    #[inline(always)]
    fn key(self) -> u64 {
        key64(self)
    }
    fn from_key(k: u64) -> Self {
        f64::from_bits(if k & (1 << 63) != 0 { k & !(1 << 63) } else { !k })
    }
    #[inline(always)]
    fn mag_key(self) -> u64 {
        self.to_bits() | (1 << 63)
    }
}

/// An element type of the merged tensors and its accumulator.
pub trait Elem: Float + Zeroable {
    type A: Acc;
    fn load(self) -> Self::A;
    /// Rounds an accumulator value to this type (round to nearest even).
    fn store(a: Self::A) -> Self;
    /// `dst[j] = src[j].load()` over a run (the lengths must be equal).
    #[inline(always)]
    fn load_run(src: &[Self], dst: &mut [Self::A]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x.load();
        }
    }
    /// `dst[j] = store(src[j])` over a run (the lengths must be equal); whether any `src[j]` is
    /// NaN.
    #[inline(always)]
    fn store_run(src: &[Self::A], dst: &mut [Self]) -> bool {
        let mut nan = false;
        for (d, &a) in dst.iter_mut().zip(src) {
            nan |= a.is_nan();
            *d = Self::store(a);
        }
        nan
    }
}

impl Elem for f32 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type A = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(a: f64) -> Self {
        a
    }
}

impl Elem for f16 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        f16::from_f32(a)
    }
    /// `half`'s slice conversion: the hardware instructions where the CPU has them, the same
    /// exact values as [`Elem::load`].
    #[inline(always)]
    fn load_run(src: &[Self], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
    /// `half`'s slice conversion rounds to nearest even as [`Elem::store`] does.
    #[inline(always)]
    fn store_run(src: &[f32], dst: &mut [Self]) -> bool {
        let nan = src.iter().fold(false, |n, &a| n | a.is_nan());
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
        nan
    }
}

/// bfloat16 bits of an f32: round to nearest even, NaN kept quiet (`half`'s `bf16::from_f32`,
/// without branches so that runs of them vectorize).
#[inline(always)]
fn bf16_bits(a: f32) -> (u16, bool) {
    let x = a.to_bits();
    let nan = x & 0x7fff_ffff > 0x7f80_0000;
    // Adding 0x7fff plus the lowest kept bit carries into the kept bits exactly when the dropped
    // half is above one half, or equal to it with an odd kept part (no overflow unless NaN).
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let quiet = (x >> 16) | 0x0040;
    ((if nan { quiet } else { rounded }) as u16, nan)
}

impl Elem for bf16 {
    type A = f32;
    /// `half`'s `bf16::to_f32` (NaN made quiet), without branches.
    #[inline(always)]
    fn load(self) -> f32 {
        let b = self.to_bits() as u32;
        let quiet = if b & 0x7fff > 0x7f80 { b | 0x0040 } else { b };
        f32::from_bits(quiet << 16)
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        bf16::from_bits(bf16_bits(a).0)
    }
    #[inline(always)]
    fn store_run(src: &[f32], dst: &mut [Self]) -> bool {
        let mut nan = false;
        for (d, &a) in dst.iter_mut().zip(src) {
            let (b, n) = bf16_bits(a);
            nan |= n;
            *d = bf16::from_bits(b);
        }
        nan
    }
}

// ---------------------------------------------------------------------------------------------
// The specification of a merge

/// How each task vector is sparsified before combining.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsify {
    /// Keep everything.
    None,
    /// Keep the `floor(d · n)` largest `|τ|` (TIES trimming, magnitude pruning).
    Magnitude,
    /// DARE with an exact count: keep `floor(d · n)` entries chosen by counter-based random words
    /// (the largest words are kept).
    RandomExact,
    /// DARE as in its paper, PEFT and mergekit: keep each entry independently with probability d.
    Bernoulli,
    /// Model breadcrumbs: drop the `floor(γ · n)` largest `|τ|` (outliers) and the smallest, so that
    /// `floor(d · n)` remain; when the two overlap, fewer outliers are dropped.
    Outliers { gamma: f64 },
    /// DELLA (MagPrune): within every row of the last dimension, entry of magnitude rank `r`
    /// (0 = smallest, ties by index) is kept with probability `p = (d − ε) + 2ε · q(r)`, with
    /// `q(r) = r / len` (`RankRule::Paper`) or `r / (len − 1)` (`RankRule::MinMax`, mergekit).
    Rank { epsilon: f64, rule: RankRule },
}

/// The normalization of DELLA's magnitude ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankRule {
    /// `r / len`.
    Paper,
    /// `r / (len − 1)` (mergekit's min-max normalization of 1-based ranks; 0 for len 1).
    MinMax,
}

/// How kept entries are rescaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescale {
    None,
    /// Divide by the keep probability: `n / K` for exact counts, `1 / d` for Bernoulli, `1 / p`
    /// per entry for DELLA. Unbiased: `E[τ̂] = τ`.
    Inverse,
    /// mergekit: multiply the masked task vector by `‖τ‖₁ / ‖τ ⊙ m‖₁` (unscaled when either norm
    /// is below 1e-7).
    L1,
}

/// How the sign is elected in a consensus merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Votes {
    /// `sign(Σ e_k)` (TIES: the side with the larger total mass).
    Sum,
    /// `sign(Σ sign(e_k))` (majority by count).
    Count,
}

/// The divisor of a consensus merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Divisor {
    /// No division.
    One,
    /// The number of agreeing models, at least 1 (PEFT, the TIES paper).
    Count,
    /// The sum of the agreeing models' weights, 1 where it is 0 (mergekit).
    Weight,
}

/// How sparsified task vectors (or models) are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Combine {
    /// `θ0 + λ · Σ wk uk / D`, `D = Σ wk` when `normalize` (1 when |Σ wk| < 1e-8), else 1.
    Sum { normalize: bool },
    /// TIES: `e_k = wk·uk` (weighted) or `uk`; elect `γ` by `votes`; a model agrees where
    /// `sign(e_k) = γ`; `θ0 + λ · Σ_agree wk uk / divisor`. Where the vote is exactly 0, `γ` is +1
    /// when `zero_positive` (PEFT, mergekit), else no model agrees.
    Consensus { votes: Votes, weighted: bool, zero_positive: bool, divisor: Divisor },
    /// Weighted average of the models themselves (no base): `Σ wk θk / Σ wk` (or the sum).
    Linear { normalize: bool },
    /// `Σ wk Fk θk / Σ wk Fk` with `Fk ← max(Fk, floor)` (no base).
    Fisher { floor: f64 },
    /// Spherical interpolation from the base (t = 0) to the one model (t = 1), the whole tensor
    /// one vector; linear interpolation when the two are nearly colinear.
    Slerp { t: f64 },
    /// `θ0 + λ · (θ1 − θ2)`: a task vector moved onto another base (models: fine-tune, its base).
    Transfer,
    /// PCB-merging with per-model keep ratios `dk` (see [`merge`]).
    Pcb,
}

/// A fully resolved merge.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub combine: Combine,
    pub sparsify: Sparsify,
    pub rescale: Rescale,
    /// One per model.
    pub weights: Vec<f64>,
    /// One per model, in [0, 1].
    pub densities: Vec<f64>,
    /// λ.
    pub scale: f64,
    pub seed: u64,
}

/// The set `{(key, i) : key < self.key or (key == self.key and i < self.end)}`: the lowest
/// elements of a ranking by `(key, index)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub key: u64,
    pub end: usize,
}

impl Cut {
    /// Holds nothing.
    pub const NONE: Cut = Cut { key: 0, end: 0 };
    /// Holds every non-NaN key.
    pub const ALL: Cut = Cut { key: u64::MAX, end: usize::MAX };

    #[inline(always)]
    pub fn holds(&self, key: u64, i: usize) -> bool {
        key < self.key || (key == self.key && i < self.end)
    }
}

/// The borrowed inputs of one merge. All model tensors share one element type and `shape`.
pub struct Inputs<'a, T: Elem> {
    pub base: Option<&'a [T]>,
    pub models: Vec<&'a [T]>,
    /// Fisher merges: one diagonal Fisher per model, in the accumulator type.
    pub fisher: Vec<&'a [T::A]>,
    /// Fixed keep-masks, one per model (replace the sparsifier's keep decisions), or none.
    pub masks: Vec<&'a [bool]>,
    /// Magnitude sparsification: precomputed cuts, one per model (see [`model_magnitude_cuts`]),
    /// or none (each tensor trimmed on its own).
    pub cuts: Vec<Cut>,
    pub shape: &'a [usize],
}

/// `floor(d · n)`, computed in f64 and capped at `n`.
pub fn keep_count(d: f64, n: usize) -> usize {
    ((d * n as f64).floor() as usize).min(n)
}

// ---------------------------------------------------------------------------------------------
// Key sources: selection over values that are never stored

/// `|θk − θ0|` over one or more segments (tensors), in the accumulator type.
struct DeltaSource<'a, T: Elem> {
    segs: Vec<(Option<&'a [T]>, &'a [T])>,
    items: Vec<Item>,
}

impl<'a, T: Elem> DeltaSource<'a, T> {
    fn new(segs: Vec<(Option<&'a [T]>, &'a [T])>) -> Self {
        let items = make_items(segs.iter().map(|s| s.1.len()));
        DeltaSource { segs, items }
    }
}

impl<T: Elem> KeySource for DeltaSource<'_, T> {
    fn bits(&self) -> u32 {
        T::A::BITS
    }
    fn items(&self) -> &[Item] {
        &self.items
    }
    /// In blocks: the task vector and its keys in vectorizable runs, then `f` on each key.
    #[inline]
    fn visit<F: FnMut(usize, u64)>(&self, it: &Item, mut f: F) -> bool {
        const BLOCK: usize = 256;
        let (b, m) = self.segs[it.seg];
        let mut tau = [T::A::ZERO; BLOCK];
        let mut keys = [0u64; BLOCK];
        let mut nan = false;
        let mut i0 = it.start;
        while i0 < it.end {
            let len = BLOCK.min(it.end - i0);
            let t = &mut tau[..len];
            T::load_run(&m[i0..i0 + len], t);
            if let Some(b) = b {
                for (x, &y) in t.iter_mut().zip(&b[i0..i0 + len]) {
                    *x = *x - y.load();
                }
            }
            let mut block_nan = false;
            for (k, &x) in keys[..len].iter_mut().zip(t.iter()) {
                block_nan |= x.is_nan();
                *k = x.mag_key();
            }
            if block_nan {
                nan = true;
                for (j, (&k, &x)) in keys[..len].iter().zip(t.iter()).enumerate() {
                    if !x.is_nan() {
                        f(i0 + j, k);
                    }
                }
            } else {
                for (j, &k) in keys[..len].iter().enumerate() {
                    f(i0 + j, k);
                }
            }
            i0 += len;
        }
        nan
    }
}

/// The Philox words of one stream.
struct WordSource {
    seed: u64,
    stream: u32,
    items: Vec<Item>,
}

impl KeySource for WordSource {
    fn bits(&self) -> u32 {
        32
    }
    fn items(&self) -> &[Item] {
        &self.items
    }
    #[inline]
    fn visit<F: FnMut(usize, u64)>(&self, it: &Item, mut f: F) -> bool {
        rng::for_each_word(self.seed, self.stream, it.start as u64, it.end as u64, |i, w| {
            f(i as usize, w as u64)
        });
        false
    }
}

/// The cut holding the `count` lowest elements of a one-segment source.
fn lowest<S: KeySource>(src: &S, count: u64) -> std::result::Result<Cut, ()> {
    if count == 0 {
        return if has_nan(src) { Err(()) } else { Ok(Cut::NONE) };
    }
    let thr = select_threshold(src, count)?;
    let need = count - thr.below;
    if need == thr.equal {
        return Ok(Cut { key: thr.key, end: usize::MAX });
    }
    Ok(Cut { key: thr.key, end: nth_equal(src, thr.key, need) + 1 })
}

/// The position of the `need`-th element (1-based, in source order) whose key is `key`: one
/// parallel counting pass, then a scan of the one item that holds it.
fn nth_equal<S: KeySource>(src: &S, key: u64, need: u64) -> usize {
    let counts: Vec<u64> = src
        .items()
        .par_iter()
        .map(|it| {
            let mut c = 0u64;
            src.visit(it, |_, k| c += (k == key) as u64);
            c
        })
        .collect();
    let mut seen = 0u64;
    for (it, c) in src.items().iter().zip(counts) {
        if seen + c >= need {
            let mut found = it.start;
            src.visit(it, |i, k| {
                if k == key {
                    seen += 1;
                    if seen == need {
                        found = i;
                    }
                }
            });
            return found;
        }
        seen += c;
    }
    usize::MAX - 1
}

/// The value of the `k`-th smallest key (1-based) of a source, as an accumulator value.
fn kth_value<A: Acc, S: KeySource>(src: &S, k: u64) -> std::result::Result<A, ()> {
    select_threshold(src, k).map(|t| A::from_key(t.key))
}

fn nan_err(arg: &'static str) -> Error {
    Error::NonFinite { op: OP, arg }
}

/// The stream of model `k`'s random draws (stream 0 is `random_mask`'s).
fn stream(k: usize) -> u32 {
    (k as u32).wrapping_add(1)
}

/// Model-wide magnitude trimming: the cuts, one per segment, that keep the `floor(d · total)`
/// largest `|θ − θ0|` over all the segments of one model together (ties by segment, then index).
/// Pass them as [`Inputs::cuts`] when merging each segment.
pub fn model_magnitude_cuts<T: Elem>(bases: &[&[T]], models: &[&[T]], density: f64) -> Result<Vec<Cut>> {
    check_fraction(OP, "density", density)?;
    if bases.len() != models.len() {
        return Err(Error::arg(
            OP,
            "base",
            bases.len(),
            format!("one tensor per model tensor ({})", models.len()),
        ));
    }
    for (i, (b, m)) in bases.iter().zip(models).enumerate() {
        if b.len() != m.len() {
            return Err(Error::arg(
                OP,
                "base",
                format!("{} elements in tensor {i}", b.len()),
                format!("the model tensor's {} elements", m.len()),
            ));
        }
    }
    let total: u64 = models.iter().map(|m| m.len() as u64).sum();
    let keep = ((density * total as f64).floor() as u64).min(total);
    let count = total - keep;
    let segs: Vec<_> = bases.iter().zip(models).map(|(b, m)| (Some(*b), *m)).collect();
    install(|| {
        let src = DeltaSource::new(segs);
        if count == 0 {
            return if has_nan(&src) { Err(nan_err("models")) } else { Ok(vec![Cut::NONE; models.len()]) };
        }
        let thr = select_threshold(&src, count).map_err(|_| nan_err("models"))?;
        let need = count - thr.below;
        if need == thr.equal {
            return Ok(vec![Cut { key: thr.key, end: usize::MAX }; models.len()]);
        }
        let (seg, pos) = kth_position(&src, count).map_err(|_| nan_err("models"))?;
        Ok((0..models.len())
            .map(|s| {
                let end = match s.cmp(&seg) {
                    std::cmp::Ordering::Less => usize::MAX,
                    std::cmp::Ordering::Equal => pos + 1,
                    std::cmp::Ordering::Greater => 0,
                };
                Cut { key: thr.key, end }
            })
            .collect())
    })
}

// ---------------------------------------------------------------------------------------------
// Planning: validation and the per-model rules

/// How model k decides which entries it keeps.
#[derive(Clone, Copy, Debug)]
enum Keep {
    All,
    Nothing,
    /// Keep iff `(|τ|, i)` is outside `lo` and inside `hi`.
    Band {
        lo: Cut,
        hi: Cut,
    },
    /// Keep iff `(word, i)` is outside `lo`.
    Words {
        lo: Cut,
    },
    /// Keep iff `word < below`.
    Bernoulli {
        below: u64,
    },
    /// DELLA: `p = lo + span · q(rank)`.
    Rank {
        lo: f64,
        span: f64,
        rule: RankRule,
        inverse: bool,
    },
}

#[derive(Clone, Copy, Debug)]
struct Rule<A> {
    keep: Keep,
    /// The multiplier of kept entries (rescaling), except DELLA with `inverse` (1 / p per entry).
    factor: A,
}

struct Plan<'a, T: Elem> {
    inp: &'a Inputs<'a, T>,
    spec: &'a Spec,
    n: usize,
    numel: usize,
    /// Length of a row of the last dimension (DELLA ranks within rows).
    row: usize,
    rules: Vec<Rule<T::A>>,
    /// The weights in the accumulator type.
    w: Vec<T::A>,
    scale: T::A,
    /// Σ wk (accumulated in order) for the normalized sums.
    wsum: T::A,
    /// SLERP coefficients of the base and the model.
    slerp: (T::A, T::A),
    pcb: Vec<PcbModel>,
}

#[derive(Clone, Copy, Debug, Default)]
struct PcbModel {
    /// Clip bounds of |τ|.
    lo: f64,
    hi: f64,
    /// Lower clamp of β (the kept ones are above it) and the maximum of β; `None`: nothing kept.
    beta: Option<(f64, f64)>,
}

fn needs_base(c: &Combine) -> bool {
    !matches!(c, Combine::Linear { .. } | Combine::Fisher { .. })
}

fn check_len(arg: &'static str, got: usize, want: usize, what: &str) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::arg(OP, arg, format!("{got} entries"), format!("{want} ({what})")))
    }
}

impl<'a, T: Elem> Plan<'a, T> {
    fn new(inp: &'a Inputs<'a, T>, spec: &'a Spec) -> Result<Self> {
        let n = inp.models.len();
        let numel = inp.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let numel = numel.ok_or_else(|| Error::shape(OP, "models", inp.shape, "fewer than 2^64 elements"))?;
        let row = match inp.shape.len() {
            0 | 1 => numel,
            _ => inp.shape[inp.shape.len() - 1],
        };
        if n == 0 {
            return Err(Error::arg(OP, "models", 0, "at least one model"));
        }
        let want_models = match spec.combine {
            Combine::Slerp { .. } => Some(1),
            Combine::Transfer => Some(2),
            _ => None,
        };
        if let Some(w) = want_models {
            if n != w {
                return Err(Error::arg(OP, "models", n, format!("exactly {w} for this method")));
            }
        }
        for (i, m) in inp.models.iter().enumerate() {
            if m.len() != numel {
                return Err(Error::shape(
                    OP,
                    "models",
                    inp.shape,
                    format!("{} elements as model {i} holds", m.len()),
                ));
            }
        }
        match (needs_base(&spec.combine), inp.base) {
            (true, None) => return Err(Error::arg(OP, "base", "None", "a base tensor for this method")),
            (false, Some(_)) => return Err(Error::arg(OP, "base", "a tensor", "None for this method")),
            (_, Some(b)) if b.len() != numel => {
                return Err(Error::shape(OP, "base", &[b.len()], format!("{} elements", numel)))
            }
            _ => {}
        }
        check_len("weights", spec.weights.len(), n, "one per model")?;
        check_len("densities", spec.densities.len(), n, "one per model")?;
        for &d in &spec.densities {
            check_fraction(OP, "density", d)?;
        }
        for &w in &spec.weights {
            if !w.is_finite() {
                return Err(Error::arg(OP, "weights", w, "finite numbers"));
            }
        }
        if !spec.scale.is_finite() {
            return Err(Error::arg(OP, "scale", spec.scale, "a finite number"));
        }
        if !inp.masks.is_empty() {
            check_len("masks", inp.masks.len(), n, "one per model")?;
            if spec.sparsify == Sparsify::None {
                return Err(Error::arg(OP, "masks", "given", "absent for a method that does not sparsify"));
            }
            for m in &inp.masks {
                if m.len() != numel {
                    return Err(Error::shape(OP, "masks", &[m.len()], format!("{numel} elements")));
                }
            }
        }
        if !inp.cuts.is_empty() {
            check_len("cuts", inp.cuts.len(), n, "one per model")?;
            if spec.sparsify != Sparsify::Magnitude {
                return Err(Error::arg(OP, "cuts", "given", "absent unless the sparsifier is magnitude"));
            }
        }
        match spec.combine {
            Combine::Fisher { floor } => {
                check_len("fisher", inp.fisher.len(), n, "one per model")?;
                for f in &inp.fisher {
                    if f.len() != numel {
                        return Err(Error::shape(OP, "fisher", &[f.len()], format!("{numel} elements")));
                    }
                }
                if !(floor.is_finite() && floor > 0.0) {
                    return Err(Error::arg(OP, "fisher_floor", floor, "a finite number > 0"));
                }
                if spec.weights.iter().any(|&w| w < 0.0) || spec.weights.iter().all(|&w| w == 0.0) {
                    return Err(Error::arg(
                        OP,
                        "weights",
                        format!("{:?}", spec.weights),
                        "non-negative, not all 0",
                    ));
                }
            }
            _ if !inp.fisher.is_empty() => {
                return Err(Error::arg(OP, "fisher", "given", "absent unless the method is fisher"));
            }
            Combine::Slerp { t } if !t.is_finite() => {
                return Err(Error::arg(OP, "t", t, "a finite number"));
            }
            Combine::Pcb if n > 700 => {
                return Err(Error::arg(OP, "models", n, "at most 700 for pcb (exp(n) must be finite)"));
            }
            _ => {}
        }
        if let Sparsify::Outliers { gamma } = spec.sparsify {
            check_fraction(OP, "gamma", gamma)?;
        }
        if let Sparsify::Rank { epsilon, .. } = spec.sparsify {
            if !(epsilon.is_finite() && epsilon >= 0.0) {
                return Err(Error::arg(OP, "epsilon", epsilon, "a finite number >= 0"));
            }
            for &d in &spec.densities {
                if d > 0.0 && d < 1.0 && (d - epsilon < 0.0 || d + epsilon > 1.0) {
                    return Err(Error::arg(
                        OP,
                        "epsilon",
                        epsilon,
                        format!("at most min(density, 1 - density) = {} so that keep probabilities stay in [0, 1]", d.min(1.0 - d)),
                    ));
                }
            }
        }
        let mut wsum = T::A::ZERO;
        for &w in &spec.weights {
            wsum = wsum + T::A::of(w);
        }
        if let Combine::Linear { normalize: true } = spec.combine {
            if wsum == T::A::ZERO {
                return Err(Error::arg(
                    OP,
                    "weights",
                    format!("{:?}", spec.weights),
                    "weights whose sum is not 0",
                ));
            }
        }
        if let Combine::Sum { normalize: true } = spec.combine {
            if wsum.abs().get() < 1e-8 {
                wsum = T::A::ONE;
            }
        }
        Ok(Plan {
            inp,
            spec,
            n,
            numel,
            row,
            rules: Vec::new(),
            w: spec.weights.iter().map(|&w| T::A::of(w)).collect(),
            scale: T::A::of(spec.scale),
            wsum,
            slerp: (T::A::ZERO, T::A::ZERO),
            pcb: Vec::new(),
        })
    }

    /// The selection passes: one rule per model (and the SLERP/PCB statistics).
    fn prepare(&mut self) -> Result<()> {
        let spec = self.spec;
        let inp = self.inp;
        let n = self.numel;
        let mut rules = Vec::with_capacity(self.n);
        for k in 0..self.n {
            let d = spec.densities[k];
            let kept = keep_count(d, n);
            let exact_factor = if kept > 0 { n as f64 / kept as f64 } else { 1.0 };
            let delta_src = || DeltaSource::new(vec![(inp.base, inp.models[k])]);
            let nan = || nan_err("models");
            let masked = !inp.masks.is_empty();
            let (keep, inv) = match spec.sparsify {
                Sparsify::None => (Keep::All, 1.0),
                Sparsify::Magnitude if !inp.cuts.is_empty() => {
                    if has_nan(&delta_src()) {
                        return Err(nan());
                    }
                    (Keep::Band { lo: inp.cuts[k], hi: Cut::ALL }, exact_factor)
                }
                Sparsify::Magnitude if masked => (Keep::All, exact_factor),
                Sparsify::Magnitude if kept == n => {
                    if has_nan(&delta_src()) {
                        return Err(nan());
                    }
                    (Keep::All, exact_factor)
                }
                Sparsify::Magnitude => {
                    let lo = lowest(&delta_src(), (n - kept) as u64).map_err(|_| nan())?;
                    (Keep::Band { lo, hi: Cut::ALL }, exact_factor)
                }
                Sparsify::Outliers { .. } if masked => (Keep::All, exact_factor),
                Sparsify::Outliers { gamma } => {
                    let mut n_top = keep_count(gamma, n) as i64;
                    let mut n_bot = n as i64 - kept as i64 - n_top;
                    if n_bot < 0 {
                        n_top += n_bot;
                        n_bot = 0;
                    }
                    let src = delta_src();
                    let lo = lowest(&src, n_bot as u64).map_err(|_| nan())?;
                    let hi = lowest(&src, (n as i64 - n_top) as u64).map_err(|_| nan())?;
                    (Keep::Band { lo, hi }, exact_factor)
                }
                Sparsify::RandomExact if masked => (Keep::All, exact_factor),
                Sparsify::RandomExact => {
                    let src = WordSource {
                        seed: spec.seed,
                        stream: stream(k),
                        items: make_items(std::iter::once(n)),
                    };
                    let lo = lowest(&src, (n - kept) as u64).map_err(|_| nan())?;
                    (Keep::Words { lo }, exact_factor)
                }
                Sparsify::Bernoulli => {
                    let below = (d * 4_294_967_296.0).ceil() as u64;
                    (Keep::Bernoulli { below }, if d > 0.0 { 1.0 / d } else { 1.0 })
                }
                Sparsify::Rank { .. } if d == 0.0 => (Keep::Nothing, 1.0),
                Sparsify::Rank { .. } if d == 1.0 => (Keep::All, 1.0),
                Sparsify::Rank { epsilon, rule } => (
                    Keep::Rank {
                        lo: d - epsilon,
                        span: 2.0 * epsilon,
                        rule,
                        inverse: spec.rescale == Rescale::Inverse,
                    },
                    1.0,
                ),
            };
            // Nothing survives a density of 0, or an exact count of 0, whatever the masks say.
            let keep = match keep {
                _ if spec.sparsify != Sparsify::None && d == 0.0 => Keep::Nothing,
                _ if kept == 0
                    && matches!(
                        spec.sparsify,
                        Sparsify::Magnitude | Sparsify::Outliers { .. } | Sparsify::RandomExact
                    ) =>
                {
                    Keep::Nothing
                }
                other => other,
            };
            let factor = match spec.rescale {
                Rescale::Inverse => inv,
                _ => 1.0,
            };
            rules.push(Rule { keep, factor: T::A::of(factor) });
        }
        // Sparsifiers that decided on magnitude still need the NaN check when nothing was ranked.
        if matches!(
            spec.sparsify,
            Sparsify::None | Sparsify::Bernoulli | Sparsify::RandomExact | Sparsify::Rank { .. }
        ) || !inp.masks.is_empty()
        {
            // NaN is detected in the fused pass (every element is read there).
        }
        self.rules = rules;
        if spec.rescale == Rescale::L1 && spec.sparsify != Sparsify::None {
            for k in 0..self.n {
                let f = self.l1_factor(k)?;
                self.rules[k].factor = T::A::of(f);
            }
        }
        match spec.combine {
            Combine::Slerp { t } => self.slerp = self.slerp_coefficients(t)?,
            Combine::Pcb => self.pcb = self.pcb_statistics()?,
            _ => {}
        }
        Ok(())
    }

    /// Chunks of the fused pass: fixed-size runs, or whole rows when DELLA ranks within rows.
    fn chunk_len(&self) -> usize {
        if matches!(self.spec.sparsify, Sparsify::Rank { .. }) && self.row > 0 {
            self.row * (CHUNK / self.row).max(1)
        } else {
            CHUNK
        }
    }

    /// Fills `tau` with model k's task vector on `start..start + len` and `mult` with the
    /// multiplier of each entry (0 where dropped). Returns whether NaN was seen.
    fn model_chunk(
        &self,
        k: usize,
        start: usize,
        tau: &mut [T::A],
        mult: &mut [T::A],
        rs: &mut RankScratch,
    ) -> bool {
        let m = &self.inp.models[k][start..start + tau.len()];
        T::load_run(m, tau);
        if let Some(b) = self.inp.base {
            let b = &b[start..start + tau.len()];
            for (t, &y) in tau.iter_mut().zip(b) {
                *t = *t - y.load();
            }
        }
        let nan = tau.iter().fold(false, |n, &v| n | v.is_nan());
        let rule = self.rules[k];
        let f = rule.factor;
        let zero = T::A::ZERO;
        let seed = self.spec.seed;
        let end = (start + tau.len()) as u64;
        let mask = self.inp.masks.get(k).map(|m| &m[start..start + tau.len()]);
        match (rule.keep, mask) {
            (Keep::Nothing, _) => mult.fill(zero),
            (Keep::Rank { lo, span, rule: rr, inverse }, _) => {
                self.rank_chunk(k, start, tau, mult, rs, (lo, span, rr, inverse), f, mask);
            }
            (_, Some(mask)) => {
                for (o, &keep) in mult.iter_mut().zip(mask) {
                    *o = if keep { f } else { zero };
                }
            }
            (Keep::All, None) => mult.fill(f),
            (Keep::Band { lo, hi: Cut::ALL }, None) => above_cut(tau, mult, lo, start, f),
            (Keep::Band { lo, hi }, None) => {
                // Branch-free: `(key, i)` outside `lo` and inside `hi`.
                for (j, (o, &t)) in mult.iter_mut().zip(tau.iter()).enumerate() {
                    let key = t.mag_key();
                    let i = start + j;
                    let in_lo = (key < lo.key) | ((key == lo.key) & (i < lo.end));
                    let in_hi = (key < hi.key) | ((key == hi.key) & (i < hi.end));
                    *o = if !in_lo & in_hi { f } else { zero };
                }
            }
            (Keep::Words { lo }, None) => {
                rng::for_each_word(seed, stream(k), start as u64, end, |i, w| {
                    mult[i as usize - start] = if lo.holds(w as u64, i as usize) { zero } else { f };
                });
            }
            (Keep::Bernoulli { below }, None) => {
                rng::for_each_word(seed, stream(k), start as u64, end, |i, w| {
                    mult[i as usize - start] = if (w as u64) < below { f } else { zero };
                });
            }
        }
        nan
    }

    /// DELLA over the whole rows of a chunk.
    #[allow(clippy::too_many_arguments)]
    fn rank_chunk(
        &self,
        k: usize,
        start: usize,
        tau: &[T::A],
        mult: &mut [T::A],
        rs: &mut RankScratch,
        (lo, span, rule, inverse): (f64, f64, RankRule, bool),
        f: T::A,
        mask: Option<&[bool]>,
    ) {
        let row = self.row.max(1);
        let seed = self.spec.seed;
        for (r, (trow, mrow)) in tau.chunks(row).zip(mult.chunks_mut(row)).enumerate() {
            let len = trow.len();
            rs.order.clear();
            rs.order.extend(trow.iter().enumerate().map(|(j, t)| (t.mag_key(), j as u32)));
            rs.order.sort_unstable();
            rs.rank.resize(len, 0);
            for (r, &(_, j)) in rs.order.iter().enumerate() {
                rs.rank[j as usize] = r as u32;
            }
            let denom = match rule {
                RankRule::Paper => len as f64,
                RankRule::MinMax => (len as f64 - 1.0).max(1.0),
            };
            let row_start = start + r * row;
            rs.words.clear();
            if mask.is_none() {
                rng::for_each_word(seed, stream(k), row_start as u64, (row_start + len) as u64, |_, w| {
                    rs.words.push(w)
                });
            }
            for j in 0..len {
                let p = lo + span * (rs.rank[j] as f64 / denom);
                let keep = match mask {
                    Some(m) => m[r * row + j],
                    None => (rs.words[j] as f64) < p * 4_294_967_296.0,
                };
                mrow[j] = if !keep {
                    T::A::ZERO
                } else if inverse {
                    T::A::of(1.0 / p)
                } else {
                    f
                };
            }
        }
    }

    /// mergekit's L1 rescaling factor of model k: ‖τ‖₁ / ‖τ ⊙ m‖₁ (ordered f64 sums).
    fn l1_factor(&self, k: usize) -> Result<f64> {
        let cl = self.chunk_len();
        let parts: Vec<(f64, f64, bool)> = (0..self.numel.div_ceil(cl))
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new(), RankScratch::default()),
                |(tau, mult, rs), c| {
                    let start = c * cl;
                    let len = cl.min(self.numel - start);
                    tau.resize(len, T::A::ZERO);
                    mult.resize(len, T::A::ZERO);
                    let nan = self.model_chunk(k, start, tau, mult, rs);
                    let (mut before, mut after) = (0.0f64, 0.0f64);
                    for (&t, &m) in tau.iter().zip(mult.iter()) {
                        before += t.abs().get();
                        if m != T::A::ZERO {
                            after += t.abs().get();
                        }
                    }
                    (before, after, nan)
                },
            )
            .collect();
        let (mut before, mut after) = (0.0, 0.0);
        for (b, a, nan) in parts {
            if nan {
                return Err(nan_err("models"));
            }
            before += b;
            after += a;
        }
        Ok(if before < L1_EPS || after < L1_EPS { 1.0 } else { before / after })
    }

    fn slerp_coefficients(&self, t: f64) -> Result<(T::A, T::A)> {
        let (a, b) = match self.inp.base {
            Some(a) => (a, self.inp.models[0]),
            None => return Err(Error::arg(OP, "base", "None", "a base tensor for slerp")),
        };
        let parts: Vec<(f64, f64, f64)> = a
            .par_chunks(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .map(|(x, y)| {
                let (mut aa, mut bb, mut ab) = (0.0f64, 0.0f64, 0.0f64);
                for (&p, &q) in x.iter().zip(y) {
                    let (p, q) = (p.to_f64(), q.to_f64());
                    aa += p * p;
                    bb += q * q;
                    ab += p * q;
                }
                (aa, bb, ab)
            })
            .collect();
        let (mut aa, mut bb, mut ab) = (0.0, 0.0, 0.0);
        for (x, y, z) in parts {
            aa += x;
            bb += y;
            ab += z;
        }
        if !(aa.is_finite() && bb.is_finite() && ab.is_finite()) {
            return Err(Error::NonFinite { op: OP, arg: "models" });
        }
        let na = if aa.sqrt() > SLERP_EPS { aa.sqrt() } else { 1.0 };
        let nb = if bb.sqrt() > SLERP_EPS { bb.sqrt() } else { 1.0 };
        let dot = ab / (na * nb);
        let (c0, c1) = if dot.abs() > SLERP_DOT {
            (1.0 - t, t)
        } else {
            let theta0 = dot.acos();
            let s0 = theta0.sin();
            let theta_t = theta0 * t;
            ((theta0 - theta_t).sin() / s0, theta_t.sin() / s0)
        };
        Ok((T::A::of(c0), T::A::of(c1)))
    }
}

/// Per-thread scratch of DELLA's row ranking.
#[derive(Default)]
struct RankScratch {
    order: Vec<(u64, u32)>,
    rank: Vec<u32>,
    words: Vec<u32>,
}

/// Per-thread scratch of the fused pass: `tau` and `mult` of every model over one chunk.
struct Scratch<A> {
    tau: Vec<A>,
    mult: Vec<A>,
    rank: RankScratch,
    f64s: Vec<f64>,
    /// Per-entry accumulators of the combine step.
    work: Vec<A>,
    /// The base over the chunk.
    base: Vec<A>,
}

impl<A> Default for Scratch<A> {
    fn default() -> Self {
        Scratch {
            tau: Vec::new(),
            mult: Vec::new(),
            rank: RankScratch::default(),
            f64s: Vec::new(),
            work: Vec::new(),
            base: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PCB

/// PCB's balancing score of model k at element i, given the task vectors of every model.
struct Beta<'a> {
    n: f64,
    m: &'a PcbModel,
}

impl Beta<'_> {
    #[inline(always)]
    fn of(&self, t: f64, total: f64) -> f64 {
        let span = self.m.hi - self.m.lo;
        let x = if span > 0.0 { (t.abs().clamp(self.m.lo, self.m.hi) - self.m.lo) / span } else { 0.0 };
        (self.n * (x * x)).exp() * (t * total).tanh()
    }
}

/// β of one model as a key source (f64 keys).
struct BetaSource<'a, T: Elem> {
    base: &'a [T],
    models: &'a [&'a [T]],
    k: usize,
    beta: Beta<'a>,
    items: Vec<Item>,
}

impl<T: Elem> KeySource for BetaSource<'_, T> {
    fn bits(&self) -> u32 {
        64
    }
    fn items(&self) -> &[Item] {
        &self.items
    }
    #[inline]
    fn visit<F: FnMut(usize, u64)>(&self, it: &Item, mut f: F) -> bool {
        let mut nan = false;
        for i in it.start..it.end {
            let b = self.base[i].load();
            let mut total = 0.0f64;
            let mut own = 0.0f64;
            for (j, m) in self.models.iter().enumerate() {
                let t = (m[i].load() - b).get();
                total += t;
                if j == self.k {
                    own = t;
                }
            }
            let v = self.beta.of(own, total);
            if v.is_nan() {
                nan = true;
            } else {
                f(i, key64(v));
            }
        }
        nan
    }
}

impl<T: Elem> Plan<'_, T> {
    /// Index (0-based, in ascending order) of PCB's clip and clamp order statistics:
    /// `int(d · ratio)` and `int(d · (1 − ratio) − 1)` as the reference code computes them.
    fn pcb_statistics(&self) -> Result<Vec<PcbModel>> {
        let inp = self.inp;
        let base = inp.base.ok_or_else(|| Error::arg(OP, "base", "None", "a base tensor for pcb"))?;
        let d = self.numel;
        if d == 0 {
            return Ok(vec![PcbModel::default(); self.n]);
        }
        let lo_idx = ((d as f64 * PCB_CLIP) as usize).min(d - 1);
        let hi_idx = ((d as f64 * (1.0 - PCB_CLIP) - 1.0).max(0.0) as usize).min(d - 1);
        let mut out = Vec::with_capacity(self.n);
        for k in 0..self.n {
            let src = DeltaSource::new(vec![(Some(base), inp.models[k])]);
            let lo = kth_value::<T::A, _>(&src, lo_idx as u64 + 1).map_err(|_| nan_err("models"))?.get();
            let hi = kth_value::<T::A, _>(&src, hi_idx as u64 + 1).map_err(|_| nan_err("models"))?.get();
            out.push(PcbModel { lo, hi, beta: None });
        }
        for k in 0..self.n {
            let r = self.spec.densities[k];
            let idx = (d as f64 * (1.0 - r)) as usize;
            if idx >= d {
                continue;
            }
            let m = out[k];
            let src = BetaSource {
                base,
                models: &inp.models,
                k,
                beta: Beta { n: self.n as f64, m: &m },
                items: make_items(std::iter::once(d)),
            };
            let err = |_| Error::NonFinite { op: OP, arg: "models (PCB balancing score)" };
            let floor = f64::from_key(select_threshold(&src, idx as u64 + 1).map_err(err)?.key);
            let max = f64::from_key(select_threshold(&src, d as u64).map_err(err)?.key);
            out[k].beta = Some((floor, max));
        }
        Ok(out)
    }

    fn pcb_chunk(&self, start: usize, out: &mut [T], taus: &mut Vec<f64>) -> bool {
        let base = self.inp.base.unwrap_or(&[]);
        let n = self.n as f64;
        taus.resize(self.n, 0.0);
        let mut nan = false;
        for (j, o) in out.iter_mut().enumerate() {
            let i = start + j;
            let b = base[i].load();
            let mut total = 0.0f64;
            for (t, m) in taus.iter_mut().zip(&self.inp.models) {
                *t = (m[i].load() - b).get();
                total += *t;
            }
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (k, &t) in taus.iter().enumerate() {
                let pm = &self.pcb[k];
                let s = match pm.beta {
                    Some((lo, hi)) if hi > lo => {
                        let v = Beta { n, m: pm }.of(t, total);
                        (v.max(lo) - lo) / (hi - lo)
                    }
                    _ => 0.0,
                };
                let clipped = if t == 0.0 { 0.0 } else { t.signum() * t.abs().clamp(pm.lo, pm.hi) };
                num += clipped * self.spec.weights[k] * s;
                den += s;
            }
            let v = b.get() + self.spec.scale * (num / den.max(PCB_MIN_SCALE));
            nan |= v.is_nan();
            *o = T::from_f64(v);
        }
        nan
    }
}

// ---------------------------------------------------------------------------------------------
// The fused pass

impl<T: Elem> Plan<'_, T> {
    /// Fills the scratch with `u_k = τ_k · mult_k` (in `tau`) and `mult_k` of every model over
    /// one chunk. Returns whether NaN was seen.
    fn sparsified(&self, start: usize, len: usize, s: &mut Scratch<T::A>) -> bool {
        let n = self.n;
        s.tau.resize(n * len, T::A::ZERO);
        s.mult.resize(n * len, T::A::ZERO);
        let mut nan = false;
        for k in 0..n {
            let (tau, mult) = (&mut s.tau[k * len..(k + 1) * len], &mut s.mult[k * len..(k + 1) * len]);
            nan |= self.model_chunk(k, start, tau, mult, &mut s.rank);
            for (t, &m) in tau.iter_mut().zip(mult.iter()) {
                *t = *t * m;
            }
        }
        nan
    }

    /// Merged values of one chunk; returns whether NaN was seen.
    fn values_chunk(&self, start: usize, out: &mut [T], s: &mut Scratch<T::A>) -> bool {
        let len = out.len();
        let n = self.n;
        let zero = T::A::ZERO;
        let lam = self.scale;
        let base = self.inp.base;
        let models = &self.inp.models;
        let range = start..start + len;
        let mut nan = false;
        match self.spec.combine {
            Combine::Slerp { .. } => {
                let (c0, c1) = self.slerp;
                for (j, o) in out.iter_mut().enumerate() {
                    let v = c0 * base_at(base, start + j) + c1 * models[0][start + j].load();
                    nan |= v.is_nan();
                    *o = T::store(v);
                }
                return nan;
            }
            Combine::Transfer => {
                for (j, o) in out.iter_mut().enumerate() {
                    let i = start + j;
                    let v = base_at(base, i) + lam * (models[0][i].load() - models[1][i].load());
                    nan |= v.is_nan();
                    *o = T::store(v);
                }
                return nan;
            }
            Combine::Pcb => return self.pcb_chunk(start, out, &mut s.f64s),
            Combine::Sum { normalize } | Combine::Linear { normalize }
                if self.spec.sparsify == Sparsify::None =>
            {
                // Nothing dropped: sum `wk · τk` straight from the inputs (the same operations as
                // the general path, where every multiplier is 1), model by model over the chunk,
                // each input converted once per chunk in vectorizable runs.
                s.work.resize(len, zero);
                s.tau.resize(len, zero);
                s.base.resize(len, zero);
                let (acc, mv, bv) = (&mut s.work[..len], &mut s.tau[..len], &mut s.base[..len]);
                acc.fill(zero);
                if let Some(b) = base {
                    T::load_run(&b[range.clone()], bv);
                }
                for (m, &wk) in models.iter().zip(&self.w) {
                    T::load_run(&m[range.clone()], mv);
                    if base.is_some() {
                        for ((a, &x), &y) in acc.iter_mut().zip(mv.iter()).zip(bv.iter()) {
                            *a = *a + wk * (x - y);
                        }
                    } else {
                        for (a, &x) in acc.iter_mut().zip(mv.iter()) {
                            *a = *a + wk * x;
                        }
                    }
                }
                let linear = matches!(self.spec.combine, Combine::Linear { .. });
                for (a, &y) in acc.iter_mut().zip(bv.iter()) {
                    let d = if normalize { *a / self.wsum } else { *a };
                    *a = if linear { d } else { y + lam * d };
                }
                return T::store_run(acc, out);
            }
            _ => {}
        }
        nan |= self.sparsified(start, len, s);
        s.work.resize(4 * len, zero);
        s.base.resize(len, zero);
        let bv = &mut s.base[..len];
        match base {
            Some(b) => T::load_run(&b[range.clone()], bv),
            None => bv.fill(zero),
        }
        let bv = &s.base[..len];
        let u = &s.tau;
        let w = &self.w;
        // The sparsifying paths report NaN of the inputs only (dropped infinities give NaN
        // products that the result keeps): the NaN flag of the rounding is not used.
        match self.spec.combine {
            Combine::Sum { normalize } => {
                // Model by model over the whole chunk (vectorizable), each entry summed in order.
                let acc = &mut s.work[..len];
                acc.fill(zero);
                for (k, &wk) in w.iter().enumerate() {
                    for (a, &x) in acc.iter_mut().zip(&u[k * len..(k + 1) * len]) {
                        *a = *a + wk * x;
                    }
                }
                for (a, &y) in acc.iter_mut().zip(bv) {
                    let d = if normalize { *a / self.wsum } else { *a };
                    *a = y + lam * d;
                }
                T::store_run(acc, out);
            }
            Combine::Consensus { votes, weighted, zero_positive, divisor } => {
                let (g, rest) = s.work.split_at_mut(len);
                let (num, rest) = rest.split_at_mut(len);
                let (den, cnt) = rest.split_at_mut(len);
                elect_chunk(u, w, len, votes, weighted, zero_positive, g);
                num.fill(zero);
                den.fill(zero);
                cnt.fill(zero);
                for (k, &wk) in w.iter().enumerate() {
                    agree_chunk(&u[k * len..(k + 1) * len], wk, weighted, g, num, den, cnt);
                }
                let one = T::A::ONE;
                for ((gj, &y), (&nj, (&dj, &cj))) in
                    g.iter_mut().zip(bv).zip(num.iter().zip(den.iter().zip(cnt.iter())))
                {
                    let d = match divisor {
                        Divisor::One => nj,
                        Divisor::Count => nj / if cj > one { cj } else { one },
                        Divisor::Weight => nj / if dj == zero { one } else { dj },
                    };
                    let d = if *gj == zero { zero } else { d };
                    *gj = y + lam * d;
                }
                T::store_run(g, out);
            }
            Combine::Linear { normalize } => {
                for (j, o) in out.iter_mut().enumerate() {
                    let mut acc = zero;
                    for k in 0..n {
                        acc = acc + w[k] * u[k * len + j];
                    }
                    *o = T::store(if normalize { acc / self.wsum } else { acc });
                }
            }
            Combine::Fisher { floor } => {
                let floor = T::A::of(floor);
                let fisher = &self.inp.fisher;
                for (j, o) in out.iter_mut().enumerate() {
                    let (mut num, mut den) = (zero, zero);
                    for k in 0..n {
                        let fk = fisher[k][start + j];
                        nan |= fk.is_nan();
                        let a = w[k] * if fk > floor { fk } else { floor };
                        num = num + a * u[k * len + j];
                        den = den + a;
                    }
                    *o = T::store(num / den);
                }
            }
            Combine::Slerp { .. } | Combine::Transfer | Combine::Pcb => {}
        }
        nan
    }

    /// Coefficients `c_k` of one chunk (`out = θ0 + Σ c_k τ_k`, or `Σ c_k θ_k` without a base),
    /// written at `coef[k * numel + start + j]`.
    fn coef_chunk(&self, start: usize, len: usize, coef: SyncPtr<T::A>, s: &mut Scratch<T::A>) -> bool {
        let n = self.n;
        let zero = T::A::ZERO;
        let lam = self.scale;
        let numel = self.numel;
        let put = |k: usize, j: usize, v: T::A| {
            // SAFETY: elements `start..start + len` of every model's row of the coefficient
            // matrix belong to this chunk alone, and `k * numel + start + j < n * numel`.
            unsafe { coef.write(k * numel + start + j, v) }
        };
        if let Combine::Transfer = self.spec.combine {
            for j in 0..len {
                put(0, j, lam);
                put(1, j, -lam);
            }
            return false;
        }
        let nan = self.sparsified(start, len, s);
        let (u, m, w) = (&s.tau, &s.mult, &self.w);
        match self.spec.combine {
            Combine::Sum { normalize } => {
                for j in 0..len {
                    for k in 0..n {
                        let c = lam * w[k] * m[k * len + j];
                        put(k, j, if normalize { c / self.wsum } else { c });
                    }
                }
            }
            Combine::Consensus { votes, weighted, zero_positive, divisor } => {
                let ballot = Ballot { votes, weighted, zero_positive, divisor };
                let mut agree = vec![false; n];
                for j in 0..len {
                    let den = ballot.divisor(u, w, j, len, &mut agree);
                    for k in 0..n {
                        put(k, j, if agree[k] { lam * w[k] * m[k * len + j] / den } else { zero });
                    }
                }
            }
            Combine::Linear { normalize } => {
                for j in 0..len {
                    for k in 0..n {
                        put(k, j, if normalize { w[k] / self.wsum } else { w[k] });
                    }
                }
            }
            Combine::Fisher { floor } => {
                let floor = T::A::of(floor);
                let mut a = vec![zero; n];
                for j in 0..len {
                    let mut den = zero;
                    for k in 0..n {
                        let fk = self.inp.fisher[k][start + j];
                        a[k] = w[k] * if fk > floor { fk } else { floor };
                        den = den + a[k];
                    }
                    for k in 0..n {
                        put(k, j, a[k] / den);
                    }
                }
            }
            Combine::Slerp { .. } | Combine::Transfer | Combine::Pcb => {}
        }
        nan
    }
}

/// `mult[j] = f` where `(|tau[j]|, start + j)` is outside `lo`, else 0: the magnitude trim, in
/// two runs (positions before and after `lo.end`) of plain key comparisons, 32-bit ones for f32.
fn above_cut<A: Acc>(tau: &[A], mult: &mut [A], lo: Cut, start: usize, f: A) {
    let zero = A::ZERO;
    // Positions below `lo.end` are held by `lo` at a key equal to `lo.key`; the others are not.
    let split = lo.end.saturating_sub(start).min(tau.len());
    let (t0, t1) = tau.split_at(split);
    let (m0, m1) = mult.split_at_mut(split);
    if A::BITS == 32 {
        if lo.key > u32::MAX as u64 {
            // Every key is below the cut.
            mult.fill(zero);
            return;
        }
        let k = lo.key as u32;
        for (o, &t) in m0.iter_mut().zip(t0) {
            *o = if t.mag_key() as u32 > k { f } else { zero };
        }
        for (o, &t) in m1.iter_mut().zip(t1) {
            *o = if t.mag_key() as u32 >= k { f } else { zero };
        }
    } else {
        for (o, &t) in m0.iter_mut().zip(t0) {
            *o = if t.mag_key() > lo.key { f } else { zero };
        }
        for (o, &t) in m1.iter_mut().zip(t1) {
            *o = if t.mag_key() >= lo.key { f } else { zero };
        }
    }
}

#[inline(always)]
fn base_at<T: Elem>(base: Option<&[T]>, i: usize) -> T::A {
    match base {
        Some(b) => b[i].load(),
        None => T::A::ZERO,
    }
}

/// The elected sign of every entry of a chunk (`g[j]` in {-1, 0, 1}, 0: no model agrees).
fn elect_chunk<A: Acc>(
    u: &[A],
    w: &[A],
    len: usize,
    votes: Votes,
    weighted: bool,
    zero_positive: bool,
    g: &mut [A],
) {
    let (zero, one) = (A::ZERO, A::ONE);
    g.fill(zero);
    for (k, &wk) in w.iter().enumerate() {
        let uk = &u[k * len..(k + 1) * len];
        match (votes, weighted) {
            (Votes::Sum, true) => g.iter_mut().zip(uk).for_each(|(s, &x)| *s = *s + wk * x),
            (Votes::Sum, false) => g.iter_mut().zip(uk).for_each(|(s, &x)| *s = *s + x),
            (Votes::Count, _) => g.iter_mut().zip(uk).for_each(|(s, &x)| {
                let e = if weighted { wk * x } else { x };
                *s = *s + ((if e > zero { one } else { zero }) - (if e < zero { one } else { zero }));
            }),
        }
    }
    let tie = if zero_positive { one } else { zero };
    for s in g.iter_mut() {
        let x = *s;
        let sign = (if x > zero { one } else { zero }) - (if x < zero { one } else { zero });
        *s = if x == zero { tie } else { sign };
    }
}

/// Adds model k's agreeing entries to the disjoint sums: it agrees where its vote `e` has the
/// elected sign (`e · g > 0`).
#[inline(always)]
fn agree_chunk<A: Acc>(
    uk: &[A],
    wk: A,
    weighted: bool,
    g: &[A],
    num: &mut [A],
    den: &mut [A],
    cnt: &mut [A],
) {
    let zero = A::ZERO;
    let it = uk.iter().zip(g).zip(num.iter_mut().zip(den.iter_mut()).zip(cnt.iter_mut()));
    if weighted {
        for ((&x, &gj), ((nj, dj), cj)) in it {
            let p = wk * x;
            let agree = p * gj > zero;
            *nj = *nj + if agree { p } else { zero };
            *dj = *dj + if agree { wk } else { zero };
            *cj = *cj + if agree { A::ONE } else { zero };
        }
    } else {
        for ((&x, &gj), ((nj, dj), cj)) in it {
            let agree = x * gj > zero;
            *nj = *nj + if agree { wk * x } else { zero };
            *dj = *dj + if agree { wk } else { zero };
            *cj = *cj + if agree { A::ONE } else { zero };
        }
    }
}

/// The sign election and disjoint mean of a consensus merge.
#[derive(Clone, Copy)]
struct Ballot {
    votes: Votes,
    weighted: bool,
    zero_positive: bool,
    divisor: Divisor,
}

impl Ballot {
    /// What model k votes with at element j: `wk · uk` or `uk`.
    #[inline(always)]
    fn vote<A: Acc>(&self, u: &[A], w: &[A], k: usize, j: usize, len: usize) -> A {
        if self.weighted {
            w[k] * u[k * len + j]
        } else {
            u[k * len + j]
        }
    }

    /// The elected sign at element j (0: no model agrees).
    #[inline(always)]
    fn elect<A: Acc>(&self, u: &[A], w: &[A], j: usize, len: usize) -> i32 {
        let mut s = A::ZERO;
        for k in 0..w.len() {
            let e = self.vote(u, w, k, j, len);
            s = match self.votes {
                Votes::Sum => s + e,
                Votes::Count => s + A::of(e.sign() as f64),
            };
        }
        match s.sign() {
            0 if self.zero_positive => 1,
            g => g,
        }
    }

    /// The divisor at element j, with `agree[k]` set for the agreeing models.
    #[inline(always)]
    fn divisor<A: Acc>(&self, u: &[A], w: &[A], j: usize, len: usize, agree: &mut [bool]) -> A {
        let g = self.elect(u, w, j, len);
        let (mut den, mut cnt) = (A::ZERO, 0u32);
        for (k, &wk) in w.iter().enumerate() {
            agree[k] = g != 0 && self.vote(u, w, k, j, len).sign() == g;
            if agree[k] {
                den = den + wk;
                cnt += 1;
            }
        }
        match self.divisor {
            Divisor::One => A::ONE,
            Divisor::Count => A::of(cnt.max(1) as f64),
            Divisor::Weight if den == A::ZERO => A::ONE,
            Divisor::Weight => den,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points

/// Merges one tensor: the result has the models' element type and shape.
///
/// PCB (Du et al. 2024) per tensor: with `τk` the task vectors, `|τk|` is clipped at its order
/// statistics `int(n · 1e-4)` and `int(n · (1 − 1e-4) − 1)` (0-based, ascending); intra-balancing
/// `exp(K · x²)` with `x` the clipped magnitude min-max scaled to [0, 1] (0 when the two bounds are
/// equal); inter-balancing `tanh(τk · Σj τj)` (unclipped); `β = intra · inter`; β is clamped from
/// below at its order statistic `int(n · (1 − dk))` and min-max scaled (all 0 when that index is
/// `n` or the scale is degenerate); the merge is
/// `θ0 + λ · Σ wk clip(τk) βk / max(Σ βk, 1e-12)`, computed in f64.
pub fn merge<T: Elem>(inp: &Inputs<'_, T>, spec: &Spec) -> Result<Vec<T>> {
    install(|| {
        let mut plan = Plan::new(inp, spec)?;
        plan.prepare()?;
        // Zeroed (calloc: no serial fill); every element is overwritten.
        let mut out = try_zeroed::<T>(OP, plan.numel)?;
        plan.fill(&mut out)?;
        Ok(out)
    })
}

/// [`merge`] into a caller's buffer of the models' element count (a buffer reused from tensor to
/// tensor spares the page faults of a fresh allocation). On error `out` holds unspecified values.
pub fn merge_into<T: Elem>(inp: &Inputs<'_, T>, spec: &Spec, out: &mut [T]) -> Result<()> {
    install(|| {
        let mut plan = Plan::new(inp, spec)?;
        plan.prepare()?;
        if out.len() != plan.numel {
            return Err(Error::arg(
                OP,
                "out",
                format!("{} elements", out.len()),
                format!("{} elements", plan.numel),
            ));
        }
        plan.fill(out)
    })
}

impl<T: Elem> Plan<'_, T> {
    /// The fused pass over fixed chunks of the result (inside the pool).
    fn fill(&self, out: &mut [T]) -> Result<()> {
        let cl = self.chunk_len();
        let nan = out
            .par_chunks_mut(cl)
            .enumerate()
            .map_init(Scratch::default, |s, (c, o)| self.values_chunk(c * cl, o, s))
            .reduce(|| false, |a, b| a | b);
        if nan {
            return Err(nan_err("models"));
        }
        Ok(())
    }
}

/// The merge as coefficients: `c` of shape `(n_models, numel)` such that the merged tensor is
/// `θ0 + Σ_k c[k] ⊙ (θk − θ0)` (`Σ_k c[k] ⊙ θk` for linear and Fisher merges). For a fixed draw of
/// the random masks and fixed sign elections the merge is linear in the models with these
/// coefficients: they are its derivative. SLERP, PCB and L1 rescaling depend on the inputs
/// through norms and order statistics and are refused.
pub fn merge_coefficients<T: Elem>(inp: &Inputs<'_, T>, spec: &Spec) -> Result<Vec<T::A>> {
    match spec.combine {
        Combine::Slerp { .. } => {
            return Err(Error::arg(
                OP,
                "method",
                "slerp",
                "a method that is linear in the models for fixed masks",
            ))
        }
        Combine::Pcb => {
            return Err(Error::arg(
                OP,
                "method",
                "pcb",
                "a method that is linear in the models for fixed masks",
            ))
        }
        _ if spec.rescale == Rescale::L1 && spec.sparsify != Sparsify::None => {
            return Err(Error::arg(
                OP,
                "rescale",
                "l1",
                "inverse or none (the l1 factor depends on every input)",
            ))
        }
        _ => {}
    }
    install(|| {
        let mut plan = Plan::new(inp, spec)?;
        plan.prepare()?;
        let (n, numel) = (plan.n, plan.numel);
        let total = n
            .checked_mul(numel)
            .ok_or_else(|| Error::shape(OP, "models", inp.shape, "fewer than 2^64 coefficients"))?;
        let mut coef: Vec<T::A> = try_zeroed(OP, total)?;
        let ptr = SyncPtr(coef.as_mut_ptr());
        let cl = plan.chunk_len();
        let nan = (0..numel.div_ceil(cl))
            .into_par_iter()
            .map_init(Scratch::default, |s, c| {
                let start = c * cl;
                plan.coef_chunk(start, cl.min(numel - start), ptr, s)
            })
            .reduce(|| false, |a, b| a | b);
        if nan {
            return Err(nan_err("models"));
        }
        Ok(coef)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| lcg(&mut s)).collect()
    }

    fn spec(combine: Combine, sparsify: Sparsify, rescale: Rescale, n: usize, d: f64) -> Spec {
        Spec { combine, sparsify, rescale, weights: vec![1.0; n], densities: vec![d; n], scale: 1.0, seed: 7 }
    }

    fn inputs<'a, T: Elem>(base: Option<&'a [T]>, models: Vec<&'a [T]>, shape: &'a [usize]) -> Inputs<'a, T> {
        Inputs { base, models, fisher: vec![], masks: vec![], cuts: vec![], shape }
    }

    const PEFT: Combine = Combine::Consensus {
        votes: Votes::Sum,
        weighted: false,
        zero_positive: true,
        divisor: Divisor::Count,
    };
    const MERGEKIT: Combine = Combine::Consensus {
        votes: Votes::Sum,
        weighted: true,
        zero_positive: true,
        divisor: Divisor::Weight,
    };

    /// The plainly correct trim: keep the floor(d n) largest |t| by (|t|, index).
    fn trim_reference(t: &[f32], d: f64) -> Vec<bool> {
        let mut order: Vec<(u64, usize)> = t.iter().enumerate().map(|(i, x)| (key32(x.abs()), i)).collect();
        order.sort();
        let drop = t.len() - keep_count(d, t.len());
        let mut keep = vec![true; t.len()];
        for &(_, i) in &order[..drop] {
            keep[i] = false;
        }
        keep
    }

    #[test]
    fn worked_ties_example_under_peft_and_mergekit_conventions() {
        let base = [0.0f32; 4];
        let t1 = [1.0f32, -0.5, 0.3, 0.0];
        let t2 = [-0.6f32, 0.4, -0.2, 0.9];
        let shape = [4];
        let inp = inputs(Some(&base[..]), vec![&t1[..], &t2[..]], &shape);
        let mut s = spec(PEFT, Sparsify::Magnitude, Rescale::None, 2, 1.0);
        s.weights = vec![0.2, 1.0];
        let peft = merge(&inp, &s).unwrap();
        for (g, w) in peft.iter().zip([0.2f32, -0.1, 0.06, 0.9]) {
            assert!((g - w).abs() < 1e-7, "{peft:?}");
        }
        s.combine = MERGEKIT;
        let mk = merge(&inp, &s).unwrap();
        assert_eq!(mk, vec![-0.6f32, 0.4, -0.2, 0.9]);
    }

    #[test]
    fn ties_trim_matches_sorting_with_ties_and_every_density() {
        let n = 1000;
        let base: Vec<f32> = data(n, 1);
        // Quantized task vectors: many equal magnitudes straddle the threshold.
        let t: Vec<Vec<f32>> =
            (0..3).map(|k| data(n, 10 + k).iter().map(|v| (v * 16.0).round() / 16.0).collect()).collect();
        let models: Vec<Vec<f32>> =
            t.iter().map(|tk| tk.iter().zip(&base).map(|(a, b)| a + b).collect()).collect();
        let shape = [n];
        let inp = inputs(Some(&base[..]), models.iter().map(|m| &m[..]).collect(), &shape);
        for d in [0.0, 0.1, 0.37, 0.5, 1.0] {
            let s = spec(Combine::Sum { normalize: false }, Sparsify::Magnitude, Rescale::None, 3, d);
            let c = merge_coefficients(&inp, &s).unwrap();
            for k in 0..3 {
                let tk: Vec<f32> = models[k].iter().zip(&base).map(|(m, b)| m - b).collect();
                let keep = trim_reference(&tk, d);
                let got: Vec<bool> = c[k * n..(k + 1) * n].iter().map(|&v| v != 0.0).collect();
                assert_eq!(got, keep, "model {k} density {d}");
                assert_eq!(got.iter().filter(|&&b| b).count(), keep_count(d, n));
            }
        }
    }

    #[test]
    fn breadcrumbs_band_and_no_zeroing_without_outliers() {
        let base = vec![0.0f32; 100];
        let t: Vec<f32> = (0..100).map(|i| if i % 2 == 0 { i as f32 } else { -(i as f32) }).collect();
        let shape = [100];
        let inp = inputs(Some(&base[..]), vec![&t[..]], &shape);
        // gamma 0.1, density 0.5: drop the 10 largest and the 40 smallest magnitudes.
        let s =
            spec(Combine::Sum { normalize: false }, Sparsify::Outliers { gamma: 0.1 }, Rescale::None, 1, 0.5);
        let out = merge(&inp, &s).unwrap();
        for (i, &v) in out.iter().enumerate() {
            assert_eq!(v, if (40..90).contains(&i) { t[i] } else { 0.0 }, "{i}");
        }
        // gamma small enough that no outlier is dropped: the top stays (no whole-tensor zeroing).
        let s = spec(
            Combine::Sum { normalize: false },
            Sparsify::Outliers { gamma: 0.001 },
            Rescale::None,
            1,
            0.3,
        );
        let out = merge(&inp, &s).unwrap();
        assert_eq!(out.iter().filter(|&&v| v != 0.0).count(), 30);
        assert_eq!(out[99], t[99]);
        // density + gamma > 1: fewer outliers dropped so that the density holds.
        let s =
            spec(Combine::Sum { normalize: false }, Sparsify::Outliers { gamma: 0.2 }, Rescale::None, 1, 0.9);
        let out = merge(&inp, &s).unwrap();
        assert_eq!(out.iter().filter(|&&v| v != 0.0).count(), 89); // index 0 holds 0
        assert_eq!(out[89], t[89]);
        assert_eq!(out[90], 0.0);
    }

    #[test]
    fn dare_exact_count_rescale_and_thread_independence() {
        let n = 50_000;
        let base = data(n, 3);
        let m: Vec<f32> = base.iter().zip(data(n, 4)).map(|(b, t)| b + t + 1.0).collect();
        let shape = [n];
        let inp = inputs(Some(&base[..]), vec![&m[..]], &shape);
        let s = spec(Combine::Sum { normalize: false }, Sparsify::RandomExact, Rescale::Inverse, 1, 0.3);
        crate::parallel::set_num_threads(1);
        let c1 = merge_coefficients(&inp, &s).unwrap();
        crate::parallel::set_num_threads(3);
        let c3 = merge_coefficients(&inp, &s).unwrap();
        let v3 = merge(&inp, &s).unwrap();
        crate::parallel::set_num_threads(0);
        assert_eq!(c1, c3);
        let kept = keep_count(0.3, n);
        assert_eq!(c1.iter().filter(|&&v| v != 0.0).count(), kept);
        let f = (n as f64 / kept as f64) as f32;
        assert!(c1.iter().all(|&v| v == 0.0 || v == f));
        for i in 0..n {
            let t = m[i] - base[i];
            let want = base[i] + if c1[i] != 0.0 { t * f } else { t * 0.0 };
            assert_eq!(v3[i], want);
        }
        let mut other = s.clone();
        other.seed = 8;
        assert_ne!(merge_coefficients(&inp, &other).unwrap(), c1);
    }

    #[test]
    fn bernoulli_rate_and_unbiasedness() {
        let n = 200_000;
        let base = vec![0.0f32; n];
        let m = vec![1.0f32; n];
        let shape = [n];
        let inp = inputs(Some(&base[..]), vec![&m[..]], &shape);
        for d in [0.0, 0.1, 0.5, 1.0] {
            let s = spec(Combine::Sum { normalize: false }, Sparsify::Bernoulli, Rescale::Inverse, 1, d);
            let out = merge(&inp, &s).unwrap();
            let kept = out.iter().filter(|&&v| v != 0.0).count() as f64;
            let sd = (n as f64 * d * (1.0 - d)).sqrt();
            assert!((kept - d * n as f64).abs() <= 5.0 * sd + 1e-9, "d {d}: {kept}");
            let mean: f64 = out.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!(out.iter().all(|v| v.is_finite()));
            if d > 0.0 {
                assert!((mean - 1.0).abs() < 0.05, "d {d}: mean {mean}");
            }
        }
    }

    #[test]
    fn della_ranks_probabilities_and_inverse_rescale() {
        let rows = 400;
        let cols = 50;
        let base = vec![0.0f32; rows * cols];
        // Every row holds magnitudes 1..=cols: rank r has magnitude r + 1.
        let m: Vec<f32> = (0..rows * cols).map(|i| ((i * 7) % cols + 1) as f32).collect();
        let shape = [rows, cols];
        let inp = inputs(Some(&base[..]), vec![&m[..]], &shape);
        let (d, eps) = (0.5, 0.3);
        let s = spec(
            Combine::Sum { normalize: false },
            Sparsify::Rank { epsilon: eps, rule: RankRule::Paper },
            Rescale::Inverse,
            1,
            d,
        );
        let out = merge(&inp, &s).unwrap();
        let mut kept_by_rank = vec![0usize; cols];
        for (i, &v) in out.iter().enumerate() {
            let r = (m[i] as usize) - 1;
            let p = (d - eps) + 2.0 * eps * (r as f64 / cols as f64);
            if v != 0.0 {
                kept_by_rank[r] += 1;
                assert_eq!(v, m[i] * (1.0 / p) as f32);
            }
        }
        // Low ranks are kept near 0.2 of the time, high ranks near 0.8.
        let low: usize = kept_by_rank[..10].iter().sum();
        let high: usize = kept_by_rank[40..].iter().sum();
        assert!(low < 1400 && high > 2600, "{low} {high}");
        let bad = Spec { sparsify: Sparsify::Rank { epsilon: 0.6, rule: RankRule::Paper }, ..s.clone() };
        assert!(merge(&inp, &bad).unwrap_err().to_string().contains("epsilon"));
    }

    #[test]
    fn coefficients_reproduce_the_merge() {
        let n = 3000;
        let base = data(n, 5);
        let models: Vec<Vec<f32>> =
            (0..3).map(|k| base.iter().zip(data(n, 20 + k)).map(|(b, t)| b + t).collect()).collect();
        let shape = [30, 100];
        let inp = inputs(Some(&base[..]), models.iter().map(|m| &m[..]).collect(), &shape);
        let cases = [
            (MERGEKIT, Sparsify::Magnitude, Rescale::None),
            (PEFT, Sparsify::Bernoulli, Rescale::Inverse),
            (
                Combine::Sum { normalize: true },
                Sparsify::Rank { epsilon: 0.1, rule: RankRule::MinMax },
                Rescale::Inverse,
            ),
            (Combine::Sum { normalize: false }, Sparsify::Outliers { gamma: 0.05 }, Rescale::None),
        ];
        for (combine, sparsify, rescale) in cases {
            let mut s = spec(combine, sparsify, rescale, 3, 0.4);
            s.weights = vec![0.5, 1.5, -0.25];
            s.scale = 0.8;
            let out = merge(&inp, &s).unwrap();
            let c = merge_coefficients(&inp, &s).unwrap();
            for i in 0..n {
                let mut v = base[i] as f64;
                for k in 0..3 {
                    v += c[k * n + i] as f64 * (models[k][i] - base[i]) as f64;
                }
                assert!(
                    (v - out[i] as f64).abs() < 1e-5,
                    "{combine:?} {sparsify:?} at {i}: {v} vs {}",
                    out[i]
                );
            }
        }
    }

    #[test]
    fn model_wide_cuts_equal_one_tensor_trim_and_split_ties_across_segments() {
        let base = [0.0f32; 6];
        let t = [1.0f32, 1.0, 3.0, 1.0, 1.0, 2.0];
        let (a, b) = (&t[..3], &t[3..]);
        // keep 3 of 6: 3, 2 and the last of the four 1s in global order (segment 1, index 1).
        let cuts = model_magnitude_cuts(&[&base[..3], &base[3..]], &[a, b], 0.5).unwrap();
        let shape = [3];
        let mut keep = vec![];
        for (seg, m) in [a, b].iter().enumerate() {
            let mut inp = inputs(Some(&base[..3]), vec![*m], &shape);
            inp.cuts = vec![cuts[seg]];
            let s = spec(Combine::Sum { normalize: false }, Sparsify::Magnitude, Rescale::None, 1, 1.0);
            keep.extend(merge(&inp, &s).unwrap().iter().map(|&v| v != 0.0));
        }
        assert_eq!(keep, [false, false, true, false, true, true]);
        let one = model_magnitude_cuts(&[&base[..]], &[&t[..]], 0.5).unwrap();
        let shape6 = [6];
        let inp = inputs(Some(&base[..]), vec![&t[..]], &shape6);
        let s = spec(Combine::Sum { normalize: false }, Sparsify::Magnitude, Rescale::None, 1, 0.5);
        let c = merge_coefficients(&inp, &s).unwrap();
        assert_eq!(c.iter().map(|&v| v != 0.0).collect::<Vec<_>>(), keep);
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn linear_fisher_slerp_transfer() {
        let a = [1.0f32, 0.0, 2.0];
        let b = [0.0f32, 1.0, 4.0];
        let shape = [3];
        let mut s = spec(Combine::Linear { normalize: true }, Sparsify::None, Rescale::None, 2, 1.0);
        s.weights = vec![1.0, 3.0];
        let inp = inputs(None, vec![&a[..], &b[..]], &shape);
        assert_eq!(merge(&inp, &s).unwrap(), vec![0.25, 0.75, 3.5]);
        let fa = [1.0f32, 0.0, 1.0];
        let fb = [1.0f32, 1.0, 3.0];
        let mut inp_f = inputs(None, vec![&a[..], &b[..]], &shape);
        inp_f.fisher = vec![&fa[..], &fb[..]];
        s.combine = Combine::Fisher { floor: 1e-6 };
        s.weights = vec![1.0, 1.0];
        let out = merge(&inp_f, &s).unwrap();
        assert_eq!(out[0], 0.5);
        assert!((out[1] - 1.0).abs() < 1e-5);
        assert_eq!(out[2], (2.0 + 12.0) / 4.0);
        // slerp between orthogonal unit vectors at t = 1/2 stays on the circle.
        let x = [1.0f32, 0.0];
        let y = [0.0f32, 1.0];
        let shape2 = [2];
        let inp_s = inputs(Some(&x[..]), vec![&y[..]], &shape2);
        let ss = spec(Combine::Slerp { t: 0.5 }, Sparsify::None, Rescale::None, 1, 1.0);
        let out = merge(&inp_s, &ss).unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6);
        let t0 = Spec { combine: Combine::Slerp { t: 0.0 }, ..ss.clone() };
        assert_eq!(merge(&inp_s, &t0).unwrap(), vec![1.0, 0.0]);
        let c = [5.0f32, 5.0];
        let inp_t = inputs(Some(&c[..]), vec![&x[..], &y[..]], &shape2);
        let mut st = spec(Combine::Transfer, Sparsify::None, Rescale::None, 2, 1.0);
        st.scale = 2.0;
        assert_eq!(merge(&inp_t, &st).unwrap(), vec![7.0, 3.0]);
    }

    #[test]
    fn half_types_accumulate_in_f32_and_round_once() {
        let base: Vec<bf16> = [1.0f32, 2.0, -3.0].iter().map(|&v| bf16::from_f32(v)).collect();
        let m: Vec<bf16> = [1.5f32, 2.25, -2.0].iter().map(|&v| bf16::from_f32(v)).collect();
        let shape = [3];
        let inp = inputs(Some(&base[..]), vec![&m[..], &m[..]], &shape);
        let mut s = spec(Combine::Sum { normalize: false }, Sparsify::None, Rescale::None, 2, 1.0);
        s.weights = vec![0.5, 0.25];
        let out = merge(&inp, &s).unwrap();
        for i in 0..3 {
            let t = m[i].to_f32() - base[i].to_f32();
            let want = bf16::from_f32(base[i].to_f32() + (0.5 * t + 0.25 * t));
            assert_eq!(out[i], want);
        }
        let h: Vec<f16> = [1.0f32, 2.0, 3.0].iter().map(|&v| f16::from_f32(v)).collect();
        let inp = inputs(Some(&h[..]), vec![&h[..]], &shape);
        assert_eq!(merge(&inp, &spec(PEFT, Sparsify::Magnitude, Rescale::None, 1, 0.5)).unwrap(), h);
    }

    #[test]
    fn pcb_matches_a_sorting_reference() {
        let (k, n) = (3usize, 400usize);
        let base = data(n, 9);
        let models: Vec<Vec<f32>> =
            (0..k).map(|j| base.iter().zip(data(n, 30 + j as u64)).map(|(b, t)| b + t).collect()).collect();
        let shape = [n];
        let inp = inputs(Some(&base[..]), models.iter().map(|m| &m[..]).collect(), &shape);
        let r = 0.3;
        let s = spec(Combine::Pcb, Sparsify::None, Rescale::None, k, r);
        let out = merge(&inp, &s).unwrap();
        let taus: Vec<Vec<f64>> =
            models.iter().map(|m| m.iter().zip(&base).map(|(a, b)| (a - b) as f64).collect()).collect();
        let sorted = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v
        };
        let total: Vec<f64> = (0..n).map(|i| taus.iter().map(|t| t[i]).sum()).collect();
        let mut clipped = vec![vec![0.0; n]; k];
        let mut scale = vec![vec![0.0; n]; k];
        for j in 0..k {
            let mags: Vec<f64> = taus[j].iter().map(|t| t.abs()).collect();
            let srt = sorted(&mags);
            let (lo, hi) = (srt[(n as f64 * 1e-4) as usize], srt[(n as f64 * (1.0 - 1e-4) - 1.0) as usize]);
            let beta: Vec<f64> = (0..n)
                .map(|i| {
                    let x = (mags[i].clamp(lo, hi) - lo) / (hi - lo);
                    (k as f64 * x * x).exp() * (taus[j][i] * total[i]).tanh()
                })
                .collect();
            let sb = sorted(&beta);
            let (blo, bhi) = (sb[(n as f64 * (1.0 - r)) as usize], sb[n - 1]);
            for i in 0..n {
                clipped[j][i] = taus[j][i].signum() * mags[i].clamp(lo, hi);
                scale[j][i] = (beta[i].max(blo) - blo) / (bhi - blo);
            }
        }
        for i in 0..n {
            let num: f64 = (0..k).map(|j| clipped[j][i] * scale[j][i]).sum();
            let den: f64 = (0..k).map(|j| scale[j][i]).sum();
            let want = (base[i] as f64 + num / den.max(1e-12)) as f32;
            assert!((out[i] - want).abs() <= 1e-6, "{i}: {} vs {want}", out[i]);
        }
    }

    #[test]
    fn l1_rescale_restores_the_norm() {
        let n = 10_000;
        let base = vec![0.0f32; n];
        let m = data(n, 11);
        let shape = [n];
        let inp = inputs(Some(&base[..]), vec![&m[..]], &shape);
        let s = spec(Combine::Sum { normalize: false }, Sparsify::Bernoulli, Rescale::L1, 1, 0.3);
        let out = merge(&inp, &s).unwrap();
        let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
        assert!((l1(&out) / l1(&m) - 1.0).abs() < 1e-5);
        assert!(merge_coefficients(&inp, &s).is_err());
    }

    #[test]
    fn bad_inputs_are_refused_with_named_arguments() {
        let a = [1.0f32, f32::NAN];
        let b = [1.0f32, 2.0];
        let shape = [2];
        let inp = inputs(Some(&b[..]), vec![&a[..]], &shape);
        let s = spec(PEFT, Sparsify::Magnitude, Rescale::None, 1, 0.5);
        assert_eq!(merge(&inp, &s).unwrap_err(), Error::NonFinite { op: "merge", arg: "models" });
        let s_sum = spec(Combine::Sum { normalize: false }, Sparsify::None, Rescale::None, 1, 1.0);
        assert!(merge(&inp, &s_sum).is_err());
        let ok = inputs(Some(&b[..]), vec![&b[..]], &shape);
        let mut bad = s.clone();
        bad.densities = vec![1.5];
        assert!(merge(&ok, &bad)
            .unwrap_err()
            .to_string()
            .contains("density (1.5) must be a number in [0, 1]"));
        bad.densities = vec![0.5, 0.5];
        assert!(merge(&ok, &bad).unwrap_err().to_string().contains("densities"));
        let short = [1.0f32];
        let mism = inputs(Some(&b[..]), vec![&short[..]], &shape);
        assert!(matches!(merge(&mism, &s).unwrap_err(), Error::Shape { .. }));
        let nobase = inputs(None, vec![&b[..]], &shape);
        assert!(merge(&nobase, &s).unwrap_err().to_string().contains("base"));
        let slerp = spec(Combine::Slerp { t: 0.5 }, Sparsify::None, Rescale::None, 2, 1.0);
        let two = inputs(Some(&b[..]), vec![&b[..], &b[..]], &shape);
        assert!(merge(&two, &slerp).unwrap_err().to_string().contains("exactly 1"));
        let empty: [f32; 0] = [];
        let shape0 = [0, 3];
        let e = inputs(Some(&empty[..]), vec![&empty[..]], &shape0);
        assert!(merge(&e, &s).unwrap().is_empty());
    }

    #[test]
    fn bf16_and_f16_runs_round_exactly_as_half_does() {
        // Every bf16 pattern through load, and f32 patterns around every rounding case through
        // store: the same bits as `half`'s scalar conversions (NaN: both quiet NaN).
        for b in 0..=u16::MAX {
            let x = bf16::from_bits(b);
            let (mine, theirs) = (<bf16 as Elem>::load(x), x.to_f32());
            assert!(mine.to_bits() == theirs.to_bits() || (mine.is_nan() && theirs.is_nan()), "{b:#x}");
        }
        let mut bits: Vec<u32> = vec![0, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7f7f_ffff, 0xff7f_ffff];
        let mut seed = 1u64;
        for hi in (0..=u16::MAX as u32).step_by(7) {
            for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
                bits.push(hi << 16 | lo);
            }
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            bits.push((seed >> 32) as u32);
        }
        let vals: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut got = vec![bf16::ZERO; vals.len()];
        let nan = <bf16 as Elem>::store_run(&vals, &mut got);
        assert!(nan);
        let mut got16 = vec![f16::ZERO; vals.len()];
        assert!(<f16 as Elem>::store_run(&vals, &mut got16));
        for ((&v, g), g16) in vals.iter().zip(&got).zip(&got16) {
            assert_eq!(g.to_bits(), bf16::from_f32(v).to_bits(), "{:#x}", v.to_bits());
            let want16 = f16::from_f32(v);
            assert!(g16.to_bits() == want16.to_bits() || (g16.is_nan() && want16.is_nan()));
        }
        let finite: Vec<f32> = vals.iter().copied().filter(|v| !v.is_nan()).collect();
        assert!(!<bf16 as Elem>::store_run(&finite, &mut got[..finite.len()]));
    }

    #[test]
    fn merge_into_fills_a_buffer_as_merge_returns() {
        let n = 3 * CHUNK + 17;
        let shape = [n];
        let base: Vec<bf16> = data(n, 1).iter().map(|&x| bf16::from_f32(x)).collect();
        let ms: Vec<Vec<bf16>> =
            (0..3).map(|k| data(n, 2 + k).iter().map(|&x| bf16::from_f32(x)).collect()).collect();
        let inp = inputs(Some(&base[..]), ms.iter().map(|m| &m[..]).collect(), &shape);
        for (combine, sparsify) in [
            (Combine::Sum { normalize: false }, Sparsify::None),
            (MERGEKIT, Sparsify::Magnitude),
            (PEFT, Sparsify::RandomExact),
        ] {
            let s = spec(combine, sparsify, Rescale::None, 3, 0.4);
            let want = merge(&inp, &s).unwrap();
            let mut out = vec![bf16::from_f32(9.0); n];
            merge_into(&inp, &s, &mut out).unwrap();
            assert_eq!(
                out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        let s = spec(Combine::Sum { normalize: false }, Sparsify::None, Rescale::None, 3, 1.0);
        let mut short = vec![bf16::ZERO; n - 1];
        assert!(matches!(merge_into(&inp, &s, &mut short), Err(Error::InvalidArgument { .. })));
    }
}
